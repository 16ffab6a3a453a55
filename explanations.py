"""N2G explanations (paper §4.3), after the released code's explanations.py: each latent is
explained by the token patterns that predict its activation ("neuron to graph"), built as a
trie over its top contexts, then scored by precision and recall on held-out text. evals.py
reports them (section 5) and browser.py shows them; this file holds only the method.
"""
import numpy as np
import torch

from gpt import UserError


def own_k(sae):
    """The SAE's own code: TopK(k), or None for the whole ReLU code and BatchTopK's JumpReLU code."""
    return sae.cfg.k if sae.cfg.activation == "topk" else None


ANY, START, ACT = "*", "^", "act"  # trie keys besides token ids: wildcard, context start, leaf activation


def n2g_build(act_fn, examples, pad, min_len=1, max_len=None):
    """Neuron-to-Graph explanations, OpenAI's simplified variant. examples: (latent, tokens, act)
    with tokens a context ending at the activating token (list of ids) and act > 0 its
    activation. act_fn(contexts, latents) -> each context's activation at its last token. Per
    example: the shortest suffix (>= min_len tokens) keeping >= half the activation; anchored at
    the context start if prefixing the pad token drops it below half; each suffix token's
    saliency 1 - act(token := pad) / act(suffix), a wildcard below 0.5. The suffixes go reversed
    into a trie per latent whose leaf holds the suffix's activation. -> {latent: trie}."""
    found = [None] * len(examples)  # (suffix length, activation)
    lo, hi, longest = min_len, 8, max((len(t) for _, t, _ in examples), default=0)
    while lo <= longest and None in found:  # lengths in doubling chunks: most suffixes are short
        todo = [(e, L) for e, (_, toks, _) in enumerate(examples) if found[e] is None
                for L in range(lo, min(hi, len(toks)) + 1)]
        acts = act_fn([examples[e][1][-L:] for e, L in todo], [examples[e][0] for e, _ in todo])
        for (e, L), act in zip(todo, acts):
            if found[e] is None and act >= 0.5 * examples[e][2]:
                found[e] = (L, act)
        lo, hi = hi + 1, 2 * hi
    found = [f or (len(t), a) for f, (_, t, a) in zip(found, examples)]  # none: the whole context
    queries = []  # (context, latent, example, position replaced by pad; -1: pad prefixed)
    for e, ((lat, toks, _), (L, _)) in enumerate(zip(examples, found)):
        s = toks[-L:]
        if max_len is None or L < max_len:
            queries.append(([pad] + s, lat, e, -1))
        queries += [(s[:i] + [pad] + s[i + 1:], lat, e, i) for i in range(L)]
    acts = act_fn([q[0] for q in queries], [q[1] for q in queries]) if queries else []
    anchored = [True] * len(examples)  # a suffix as long as the context cannot be tested: anchored
    saliency = [[0.0] * L for L, _ in found]
    for (_, _, e, i), act in zip(queries, acts):
        if i < 0:
            anchored[e] = act / examples[e][2] < 0.5
        else:
            saliency[e][i] = 1 - act / found[e][1]
    tries = {}
    for (lat, toks, _), (L, act), sal, anc in zip(examples, found, saliency, anchored):
        node = tries.setdefault(lat, {})
        for tok, s in zip(toks[-L:][::-1], sal[::-1]):
            node = node.setdefault(tok if s >= 0.5 else ANY, {})
        if anc:
            node = node.setdefault(START, {})
        node[ACT] = act
    return tries


def n2g_predict(trie, tokens):
    """explanations.py's predict: for each position walk back through the trie, an exact token
    before the wildcard, until a node holds an activation; a START node matches only at the
    first token. -> predicted activation per position (list)."""
    out = [0.0] * len(tokens)
    for i in range(len(tokens)):
        node = trie
        for j in range(i, -1, -1):
            node = node.get(tokens[j], node.get(ANY))
            if node is None:
                break
            if ACT in node:
                out[i] = node[ACT]
                break
            if j == 0 and START in node:
                out[i] = node[START][ACT]
    return out


def n2g_patterns(trie):
    """-> [(tokens in text order, ANY for wildcards, anchored, activation)] of a trie."""
    out = []

    def walk(node, path):
        for key, child in node.items():
            if key == ACT:
                out.append((path[::-1], False, child))
            elif key == START:
                out.append((path[::-1], True, child[ACT]))
            else:
                walk(child, path + [key])
    walk(trie, [])
    return out


def render_pattern(tok, tokens, anchored):
    """Readable pattern: ^ context start, * any token, ␣ space, ⏎ newline."""
    s = "".join(ANY if t == ANY else tok.decode([t]) for t in tokens)
    return ("^" if anchored else "") + s.replace("\n", "⏎").replace(" ", "␣")


def prf(pred, actual):
    """Precision TP / #predicted, recall TP / #actual, F1 their harmonic mean; 0 if undefined."""
    tp = int((pred & actual).sum())
    p, r = tp / max(int(pred.sum()), 1), tp / max(int(actual.sum()), 1)
    return p, r, 2 * p * r / (p + r) if p + r else 0.0


def latent_values(sae, x, latents, k):
    """Raw residuals (B, d) -> (B,) value of latents[b] in the SAE code of x[b] (0 when outside
    the TopK, below a BatchTopK SAE's threshold, or negative: the code z, not the pre-activation)."""
    pre = sae.preacts(sae.normalize_input(x)[0])  # (B, n_latents)
    v = pre.gather(1, latents[:, None])[:, 0]
    if k is not None:
        v = torch.where(v >= pre.topk(k, dim=1).values[:, -1], v, 0.0)
    elif sae.cfg.activation == "batchtopk":
        v = sae.jumprelu(v)
    return v.relu()


def latent_act_fn(model, sae, layer, pad, batch=256):
    """act_fn for n2g_build: contexts sorted by length, right-padded (invisible to a causal
    model), the latent's value at each context's last token."""
    device = sae.b_pre.device

    @torch.no_grad()
    def act_fn(contexts, latents):
        from tqdm import tqdm
        out = np.zeros(len(contexts), dtype=np.float32)
        order = np.argsort([len(c) for c in contexts], kind="stable")
        for i in tqdm(range(0, len(order), batch), desc="n2g build", unit="batch", leave=False):
            sel = order[i:i + batch]
            lens = torch.tensor([len(contexts[j]) for j in sel])
            ids = torch.full((len(sel), int(lens.max())), pad, dtype=torch.long)
            for r, j in enumerate(sel):
                ids[r, :lens[r]] = torch.tensor(contexts[j])
            h = model.resid(ids.to(device), layer)[torch.arange(len(sel)), lens - 1].float()  # (B, d)
            lat = torch.tensor([latents[j] for j in sel], device=device)
            out[sel] = latent_values(sae, h, lat, own_k(sae)).cpu().numpy()
        return out
    return act_fn


def n2g(model, sae, data, layer, tok, n_latents, n_examples, seed, latents=None):
    """paper §4.3. Held-out ids split in halves: sample live latents of the first half, build
    each one's N2G explanation from its top-activating and random activating contexts there
    (n2g_build), predict "fires" (activation > 0) at every evaluated token of the second half
    and score against the SAE code: precision, recall, F1 per latent, and their medians.
    latents: explain these (those live in the first half) instead of a sample."""
    from tqdm import tqdm
    g = torch.Generator().manual_seed(seed)
    W, T, _ = data.h.shape
    per = T - data.first
    half = data.n_ids // 2
    win = torch.arange(len(data.x)) // per  # (N,) window of each row
    build = torch.from_numpy(data.starts + T <= half)[win]
    score_w = np.flatnonzero(data.starts >= half)
    if not build.any() or not len(score_w):
        raise UserError(f"N2G needs held-out contexts in both halves of the text: raise --tokens (now {len(data.x)})")
    vals, idx = (t.cpu() for t in data.code(own_k(sae)))
    fired = torch.bincount(idx[build][vals[build] > 0], minlength=sae.cfg.n_latents)
    live = fired.nonzero()[:, 0]
    if latents is not None:
        live = live[torch.isin(live, torch.as_tensor(list(latents), dtype=live.dtype))]
    latents = live[torch.randperm(len(live), generator=g)[:n_latents]].sort().values  # (S,)
    col = torch.full((sae.cfg.n_latents,), -1).index_put_((latents,), torch.arange(len(latents)))
    z = torch.zeros(len(vals), len(latents))  # (N, S) activations of the sampled latents
    m = (col[idx] >= 0) & (vals > 0)
    z[m.nonzero()[:, 0], col[idx][m]] = vals[m]
    examples = []
    for s, lat in enumerate(latents.tolist()):
        rows = (build & (z[:, s] > 0)).nonzero()[:, 0]
        top = rows[z[rows, s].argsort(descending=True)[:n_examples // 2]]
        rest = rows[~torch.isin(rows, top)]
        pick = torch.cat([top, rest[torch.randperm(len(rest), generator=g)[:n_examples - len(top)]]])
        for r in pick.tolist():
            w, t = r // per, data.first + r % per
            examples.append((lat, data.windows[w, :t + 1].tolist(), z[r, s].item()))
    # pad: GPT-2's <|endoftext|>; the char model's space, its most frequent character, so a context
    # with one character blanked is still ordinary text to the model. The price: a space is never
    # salient (blanking it changes nothing), so word-boundary conditions become wildcards.
    pad = 50256 if tok.kind == "gpt2" else tok.stoi.get(" ", 0)
    tries = n2g_build(latent_act_fn(model, sae, layer, pad), examples, pad,
                      min_len=data.first + 1, max_len=model.config.block_size)
    results, score_tokens = [], [data.windows[w, :T].tolist() for w in score_w]
    for s, lat in enumerate(tqdm(latents.tolist(), desc="n2g score", unit="latent", leave=False)):
        pred = np.concatenate([np.array(n2g_predict(tries[lat], toks)[data.first:]) > 0 for toks in score_tokens])
        actual = (z.view(W, per, -1)[torch.from_numpy(score_w), :, s] > 0).reshape(-1).numpy()
        if actual.any():
            p, r, f1 = prf(pred, actual)
            pats = sorted(n2g_patterns(tries[lat]), key=lambda x: -x[2])
            results.append({"latent": lat, "precision": p, "recall": r, "f1": f1, "test_fires": int(actual.sum()),
                            "patterns": [render_pattern(tok, t, a) for t, a, _ in pats[:8]]})
    med = lambda key: float(np.median([x[key] for x in results])) if results else None
    return {"latents": len(latents), "scored": len(results), "median_precision": med("precision"),
            "median_recall": med("recall"), "median_f1": med("f1"), "build_tokens": int(build.sum()),
            "test_tokens": len(score_w) * per, "pad": tok.decode([pad]),
            "explanations": sorted(results, key=lambda x: -x["f1"])}
