"""
evals.py: the paper's evaluations of a trained SAE, on held-out text only.

    python evals.py out/topk_n32768_k32/ckpt.pt                  # every section
    python evals.py out/topk_n32768_k32/ckpt.pt --skip probe,n2g  # leave some out
    python evals.py out/topk_n32768_k32/ckpt.pt --raw            # the raw weights, not their EMA
    python evals.py out/topk_n32768_k32/ckpt.pt --export DIR     # to EleutherAI sparsify's layout
    python evals.py DIR --model gpt2 --layer 8                   # an SAE in that layout, from any trainer

Loads the SAE and the subject model its checkpoint names (checked against the recorded
sha256), reads the held-out split of the text it was trained on (gpt.split_text) and prints
a report in eight sections, the paper's metrics in its order, then SAEBench's core metrics:

    1. reconstruction        FVU (normalized MSE) and L0                          paper §2.1
    2. latent activity       dead and dense latents, firing-rate histogram        paper §2.4
    3. downstream loss       delta CE, KL, loss recovered, reconstruction spliced  paper §4.1
    4. probe loss            best 1-D logistic probe over latents, per task       paper §4.2
    5. N2G                   pattern explanations: precision, recall, F1          paper §4.3
    6. ablation sparsity     how concentrated one latent's effect on logits is    paper §4.5
    7. progressive recovery  FVU and delta CE at test-time k'                     paper §5.3
    8. SAEBench core         explained variance, cosine, shrinkage, alive, max cos  SAEBench evals/core

Writes eval.json (every number, the flags, per-task probes, N2G patterns) and the PNGs
eval_firing_rates.png and eval_progressive.png next to the checkpoint (with --raw:
eval_raw.json, eval_raw_*.png, so both sets can sit side by side).
"""

import argparse
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import gpt
import train
from gpt import UserError
from explanations import n2g, own_k
from interchange import export_sparsify, import_flags, import_sparsify
from sae import fvu

SECTIONS = ("reconstruction", "activity", "downstream", "probe", "n2g", "ablation", "progressive", "saebench")
ABLATION_T = 16  # paper §4.5: the ablated position and the next 15, 16 positions in all


def build_parser():
    p = gpt.ArgumentParser(description="Evaluate a train.py SAE checkpoint on held-out text (the paper's metrics).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("path", help="SAE checkpoint written by train.py, e.g. out/topk_n32768_k32/ckpt.pt, or a directory "
                                "in sparsify's layout (see --export, --model)")
    p.add_argument("--tokens", type=int, default=32768,
                   help="held-out tokens for sections 1-3 and 7 (evenly spaced contexts of the SAE's ctx_len); "
                        "the probe, N2G and ablation samples are drawn from these contexts")
    p.add_argument("--probe_tokens", type=int, default=1024,
                   help="tokens per probe task: half positives, half negatives, split evenly into train and test")
    p.add_argument("--n2g_latents", type=int, default=64, help="live latents sampled for N2G explanations")
    p.add_argument("--n2g_examples", type=int, default=16,
                   help="activating contexts per N2G latent: half the top-activating, half chosen at random")
    p.add_argument("--ablation_samples", type=int, default=0,
                   help="(position, active latent) pairs for ablation sparsity, and as many random directions; "
                        "0 means 256, or 32 when the vocabulary has more than 1000 tokens (GPT-2)")
    p.add_argument("--skip", default="", help=f"comma-separated sections to leave out: {','.join(SECTIONS)}")
    p.add_argument("--raw", action="store_true", help="evaluate the raw final weights instead of their EMA")
    p.add_argument("--seed", type=int, default=0, help="random seed of every sample")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--export", metavar="DIR", default="",
                   help="write the SAE (EMA weights, or --raw) in EleutherAI sparsify's layout, DIR/sae.safetensors "
                        "and DIR/cfg.json, and stop; inputs must then be normalized per token (cfg.json says how)")
    p.add_argument("--model", default="", help="for an SAE directory in sparsify's layout (PATH): its subject model, "
                   "gpt2, gpt2-medium, ... or a gpt.py checkpoint; default: the one cfg.json's nanosae block names")
    p.add_argument("--layer", type=int, default=None, help="for an SAE directory: the residual stream it reads, after "
                   "this block (0-based); default: the nanosae block's")
    p.add_argument("--ctx_len", type=int, default=None,
                   help="for an SAE directory: tokens per held-out context; default: the nanosae block's, else 64")
    p.add_argument("--data", default="", help="for an SAE directory: the text whose last ~10%% is held out; "
                   "default: the nanosae block's, else the bundled corpus")
    p.add_argument("--html", action="store_true",
                   help="also write features.html next to the checkpoint: a self-contained feature browser "
                        "(browser.py) of --html_latents latents")
    p.add_argument("--html_latents", type=int, default=200,
                   help="latents on the --html page: each probe task's best latent and the --text prompt's, then "
                        "live latents evenly spaced by firing rate (a stratified sample over density), plus 5 dead ones")
    p.add_argument("--text", default="", help="a prompt: print each token's top latents with their activations and "
                   "N2G explanations, and stop (with --html: after the report, and shown on the page too)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    return p


def check_sections(skip):
    unknown = {s for s in skip.split(",") if s} - set(SECTIONS)
    return f"unknown section(s) {', '.join(sorted(unknown))}; choose from {','.join(SECTIONS)}" if unknown else None


# what each flag accepts (gpt.check_flags), checked before anything is loaded
RULES = {"path": gpt.InputFile("checkpoint (ckpt.pt) or sparsify directory", dirs_too=True),
         "tokens": gpt.Number(1, 1 << 30), "probe_tokens": gpt.Number(2, 1 << 24), "n2g_latents": gpt.Number(1, 1 << 24),
         "n2g_examples": gpt.Number(1, 1 << 16),
         "ablation_samples": gpt.Number(0, 1 << 20, note="0: 256, or 32 for GPT-2's vocabulary"),
         "skip": check_sections, "seed": gpt.SEED, "device": gpt.check_device, "export": gpt.OutputDir(),
         "model": gpt.Model(), "layer": gpt.Number(0, 10_000), "ctx_len": gpt.Number(2, 1 << 20),
         "data": gpt.InputFile("text file"), "html_latents": gpt.Number(0, 1 << 20),
         "text": None}  # any prompt: characters the tokenizer lacks are named when it encodes them


# -----------------------------------------------------------------------------
# Loading: the SAE, its subject model (hash-checked) and the held-out sample


def load(path, raw=False, device="cpu", import_flags=None):
    """-> (sae, model, tokenizer, subject dict, held-out token ids), all on `device`. path: a
    train.py checkpoint, or a directory in sparsify's layout (import_sparsify, given
    import_flags: its model, layer, ctx_len, data)."""
    if os.path.isdir(path):
        sae, subject = import_sparsify(path, **(import_flags or {}))
    else:
        sae, ck = train.load_sae(path, ema=not raw)
        subject = ck.get("subject")
    if not subject:
        raise UserError(f"{path}: no subject model recorded in the checkpoint; train it with python train.py")
    weights, data = subject["path"], subject["data"]
    fix = f"restore it, or retrain the SAE: python train.py --model {subject['model']}"
    if subject["sha256"] and not os.path.isfile(weights):  # no sha256: an import's --model, nothing to check
        raise UserError(f"{path}: its subject model {weights} is missing; {fix}")
    if not os.path.isfile(data):
        raise UserError(f"{path}: its training text {data} is missing; restore it to evaluate on its held-out split")
    pretrained = subject["model"] in gpt.GPT.PRETRAINED
    model, tok, ref = gpt.load_subject_model(subject["model"] if pretrained else weights, weights if pretrained else None)
    if subject["sha256"] and ref["sha256"] != subject["sha256"]:  # hashed once, by load_subject_model
        raise UserError(f"{path}: subject model {weights} is not the one the SAE was trained on "
                        f"(sha256 differs from {subject['sha256'][:12]}...); {fix}")
    if model.config.n_embd != sae.cfg.d_model:
        raise UserError(f"{path}: SAE d_model {sae.cfg.d_model} != subject model width {model.config.n_embd}")
    if subject["ctx_len"] > model.config.block_size:
        raise UserError(f"--ctx_len {subject['ctx_len']} is longer than the model's block_size {model.config.block_size}")
    val_ids = gpt.encode_text(gpt.split_text(gpt.load_text(data))[1], tok)
    return sae.to(device), model.to(device), tok, subject, val_ids


@dataclass
class Heldout:
    """The held-out sample the sections share. Rows of x are the evaluated positions
    first..T-1 of every window, window-major; row r is window r // (T - first)."""
    windows: torch.Tensor  # (W, T + 1) token ids: inputs [:, :-1], next-token targets [:, 1:]
    starts: np.ndarray     # (W,) offset of each window in the held-out ids
    n_ids: int             # length of the held-out ids (N2G splits them in halves)
    first: int             # 1 when position 0 is excluded, as in training (its residual is an outlier)
    h: torch.Tensor        # (W, T, d) residual after block `layer`, every position
    x: torch.Tensor        # (N, d) raw residuals at the evaluated positions
    x_n: torch.Tensor      # (N, d) the SAE's normalized space (paper §2.1), with mu, scale (N, 1)
    mu: torch.Tensor
    scale: torch.Tensor
    vals: torch.Tensor     # (N, K) code values sorted descending, ReLU'd, K >= 4k: a prefix of
    idx: torch.Tensor      # length k' is the TopK(k') code (paper §5.3); (N, K) latent ids
    peak: torch.Tensor     # (n_latents,) each latent's largest pre-activation over the N tokens
    threshold: float | None = None  # a BatchTopK SAE's inference threshold (sae.py: a JumpReLU)

    def code(self, k=None):
        """(vals, idx) of the TopK(k) code; k=None: the SAE's own code (all of a ReLU SAE's, the
        values above the threshold of a BatchTopK SAE's)."""
        vals = self.vals[:, :k]
        if k is None and self.threshold is not None:
            vals = vals * (vals > self.threshold)
        return vals, self.idx[:, :k]

    def positions(self):
        """(N,) offset in the held-out ids of each row's token."""
        return (self.starts[:, None] + np.arange(self.first, self.h.shape[1])).reshape(-1)



@torch.no_grad()
def heldout(model, sae, val_ids, layer, ctx_len, include_first, n_tokens, k_max):
    """Evenly spaced, non-overlapping held-out windows of ctx_len + 1 tokens (the spacing of
    gpt.fixed_windows, as train.heldout_windows, kept with their offsets), their residuals, and
    the SAE's code for each evaluated token, sorted, k_max wide (a ReLU SAE: all positives)."""
    first = 0 if include_first else 1
    starts = gpt.fixed_window_starts(len(val_ids), ctx_len, max(2, math.ceil(n_tokens / (ctx_len - first))))
    n_windows = len(starts)
    windows = torch.from_numpy(val_ids[starts[:, None] + np.arange(ctx_len + 1)])
    device = sae.b_pre.device
    h = torch.cat([model.resid(windows[i:i + 64, :-1].to(device), layer).float() for i in range(0, n_windows, 64)])
    x = h[:, first:].reshape(-1, h.shape[-1])
    x_n, mu, scale = sae.normalize_input(x)
    from tqdm import tqdm
    rows = max(1, 2 ** 25 // sae.cfg.n_latents)  # (rows, n_latents) pre-activations: 128 MiB at a time
    codes = [encode_sorted(sae, x_n[i:i + rows], k_max)
             for i in tqdm(range(0, len(x_n), rows), desc="encode", unit="chunk", leave=False)]
    K = max(v.shape[1] for v, _, _ in codes)  # a ReLU code's width varies by chunk: pad with zeros
    vals = torch.cat([F.pad(v, (0, K - v.shape[1])) for v, _, _ in codes])
    idx = torch.cat([F.pad(i, (0, K - i.shape[1])) for _, i, _ in codes])
    peak = torch.stack([p for _, _, p in codes]).max(0).values
    threshold = float(sae.threshold) if sae.cfg.activation == "batchtopk" else None
    return Heldout(windows, starts, len(val_ids), first, h, x, x_n, mu, scale, vals, idx, peak, threshold)


def encode_sorted(sae, x_n, k_max):
    """Normalized (B, d) -> (vals, idx) (B, K) sorted descending and ReLU'd, and each latent's
    largest pre-activation (n_latents,). TopK SAE: K = k_max; ReLU SAE: every positive
    pre-activation (TopK(k') on it is again a prefix); BatchTopK SAE: at least every
    pre-activation above its threshold."""
    pre = sae.preacts(x_n)  # (B, n_latents)
    if sae.cfg.activation == "relu":
        k_max = max(1, int((pre > 0).sum(1).max()))
    if sae.cfg.activation == "batchtopk":
        k_max = max(k_max, int((pre > sae.threshold).sum(1).max()))
    vals, idx = pre.topk(min(k_max, pre.shape[1]), dim=1, sorted=True)
    return vals.relu(), idx, pre.max(0).values


def reconstruct(sae, data, k=None):
    """-> (x_hat_n, x_hat): the reconstruction from the TopK(k) code in the normalized and in
    the raw residual space, each (N, d)."""
    x_hat_n = sae.decode_sparse(*data.code(k))
    return x_hat_n, sae.denormalize(x_hat_n, data.mu, data.scale)


# -----------------------------------------------------------------------------
# 1. Reconstruction (paper §2.1)


def reconstruction_metrics(x, x_hat, x_n, x_hat_n, vals):
    """paper §2.1. FVU (normalized MSE) = sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean_t x||^2,
    the MSE relative to always predicting the mean (sae.fvu), over all evaluated tokens, in the
    SAE's normalized space (x_n = normalize_input(resid), where the SAE is trained) and in the
    raw residual space. L0 = mean over tokens of #{i : z_i > 0}."""
    return {"fvu": fvu(x_n, x_hat_n).item(), "fvu_raw": fvu(x, x_hat).item(),
            "l0": (vals > 0).sum(1).float().mean().item(), "tokens": len(x)}


def reconstruction(sae, data):
    x_hat_n, x_hat = reconstruct(sae, data, own_k(sae))
    return reconstruction_metrics(data.x, x_hat, data.x_n, x_hat_n, data.code(own_k(sae))[0])


# -----------------------------------------------------------------------------
# 2. Latent activity (paper §2.4)


def firing_rates(sae, data):
    """(n_latents,) f_i = #{evaluated tokens with z_i > 0} / #tokens, float64 on the CPU."""
    vals, idx = data.code(own_k(sae))
    return torch.bincount(idx[vals > 0], minlength=sae.cfg.n_latents).double().cpu() / len(vals)


def latent_activity(sae, data):
    """Firing rate f_i = #{tokens with z_i > 0} / #tokens over the evaluated tokens. Dead: f_i = 0
    (the paper's criterion is 10M training tokens, §2.4: on a smaller sample more latents look
    dead). Dense: f_i > 1% and > 10%. Histogram of log10 f_i over the live latents. For a TopK
    SAE, how far the dead are from firing: the median over dead latents of their largest
    pre-activation, against the median over tokens of the k-th largest (the TopK threshold)."""
    vals = data.code(own_k(sae))[0]
    freq = firing_rates(sae, data)
    live = freq[freq > 0].log10().numpy()
    counts, edges = np.histogram(live, bins=50) if len(live) else (np.zeros(0), np.zeros(0))
    dead = freq == 0
    margin = {}
    if sae.cfg.activation == "topk" and dead.any():
        margin = {"dead_peak_preact_median": data.peak[dead.to(data.peak.device)].median().item(),
                  "topk_threshold_median": vals[:, -1].median().item()}
    return {"dead_frac": dead.double().mean().item(), "dense_1pct_frac": (freq > 0.01).double().mean().item(),
            "dense_10pct_frac": (freq > 0.1).double().mean().item(), "tokens": len(vals),
            "median_log10_freq_live": float(np.median(live)) if len(live) else None,
            "log10_freq_hist": {"counts": counts.tolist(), "edges": edges.tolist()}, **margin}


# -----------------------------------------------------------------------------
# 3. Downstream loss (paper §4.1)


@torch.no_grad()
def spliced_losses(model, data, layer, variants):
    """Cross-entropy of the next token with the residual after block `layer` replaced at the
    evaluated positions by each variant ((N, d) per-token, or (d,) broadcast), and
    KL(clean || spliced) = sum_v p_clean(v) (log p_clean(v) - log p_spliced(v)), both mean nats
    per evaluated token. -> {"clean": ce, name: (ce, kl), ...}."""
    W, T, d = data.h.shape
    first, per = data.first, T - data.first
    tgt = data.windows[:, 1 + first:].to(data.h.device)
    reps = {name: r.view(W, per, d) if r.dim() == 2 else r.expand(W, per, d) for name, r in variants.items()}
    ce = dict.fromkeys(["clean", *variants], 0.0)
    kl = dict.fromkeys(variants, 0.0)
    logp = lambda r: model.logits_from_resid(r, layer)[:, first:].log_softmax(-1)  # (B, T', V)
    bs = max(1, 2 ** 24 // (T * model.config.vocab_size))  # windows per batch: logits (bs, T, V) of 64 MiB
    for i in range(0, W, bs):
        h, t = data.h[i:i + bs], tgt[i:i + bs]
        clean = logp(h)
        ce["clean"] += F.nll_loss(clean.flatten(0, 1), t.flatten(), reduction="sum").item()
        for name, rep in reps.items():
            s = logp(torch.cat([h[:, :first], rep[i:i + bs]], 1))
            ce[name] += F.nll_loss(s.flatten(0, 1), t.flatten(), reduction="sum").item()
            kl[name] += F.kl_div(s, clean, log_target=True, reduction="sum").item()
    n = tgt.numel()
    return {"clean": ce["clean"] / n, **{name: (ce[name] / n, kl[name] / n) for name in variants}}


def downstream_loss(model, sae, data, layer):
    """paper §4.1, the reconstruction spliced in at every evaluated position: delta CE =
    CE_spliced - CE_clean and KL(clean || spliced) (the headline numbers), and loss recovered
    = (CE_ablated - CE_spliced) / (CE_ablated - CE_clean) against zero-ablation (residual := 0)
    and mean-ablation (residual := its mean over the evaluated tokens); it saturates near 1."""
    r = spliced_losses(model, data, layer, {"sae": reconstruct(sae, data, own_k(sae))[1],
                                            "zero": data.x.new_zeros(data.x.shape[1]), "mean": data.x.mean(0)})
    clean, (ce, kl) = r["clean"], r["sae"]
    recovered = lambda abl: (abl - ce) / (abl - clean) if abl != clean else None
    return {"ce_clean": clean, "ce_spliced": ce, "delta_ce": ce - clean, "kl": kl,
            "ce_zero_ablation": r["zero"][0], "ce_mean_ablation": r["mean"][0],
            "loss_recovered_zero": recovered(r["zero"][0]), "loss_recovered_mean": recovered(r["mean"][0]),
            "tokens": len(data.x)}


# -----------------------------------------------------------------------------
# 4. Probe loss (paper §4.2)

PROBE_WORDS = ("the", "that", "this", "thou", "and", "you", "your")  # frequent in the corpus: enough positives per task


def char_rules(text):
    """Binary labels per character of `text`, each a function of the text up to and including
    that character only (nothing ahead). -> {task: (len(text),) bool}."""
    c = np.array(list(text))
    n, pos = len(c), np.arange(len(text))
    prev = lambda a, fill: np.concatenate([[fill], a[:-1]])
    lc, upper, letter = np.char.lower(c), np.char.isupper(c), np.char.isalpha(c)
    nl = c == "\n"
    starts = np.flatnonzero(prev(nl, True))  # first position of each line
    line = np.cumsum(prev(nl, False))  # (n,) line number; a newline ends its line
    line_start = starts[line]
    # all capitals so far in the line (speaker names "TROILUS.", headings), first char a capital
    bad = np.concatenate([[0], np.cumsum(~(upper | np.isin(c, list(" .,'-"))))])
    caps_line = (bad[pos + 1] - bad[line_start] == 0) & upper[line_start] & ~nl
    ends = np.flatnonzero(nl) - 1  # last char of each complete line
    ok = (ends >= starts[:len(ends)]) & caps_line[ends.clip(0)] & (c[ends.clip(0)] == ".")
    after_caps = np.concatenate([[False], ok])  # after_caps[L]: line L - 1 was "NAME."
    word = letter | ((c == "'") & prev(letter, False))  # a word: letters, apostrophes inside ("I'll")
    word_start = letter & ~prev(word, False)
    ws = np.maximum.accumulate(np.where(word_start, pos, 0))  # (n,) start of the current word
    nonspace = np.maximum.accumulate(np.where(~np.char.isspace(c), pos, -1))
    prev_nonspace = prev(nonspace, -1)
    punct = np.isin(c, list(",.;:!?"))
    last_punct = np.maximum.accumulate(np.where(punct, pos, -1))
    rules = {
        "stage_direction": np.cumsum(c == "[") - np.cumsum(c == "]") > 0,  # inside [Enter ...]
        "speaker_line": caps_line,  # a line of capitals so far: a speaker's name, a heading
        "first_speech_line": after_caps[line],  # the line after a speaker's name
        "upper": upper,
        "vowel": np.isin(lc, list("aeiou")),
        "digit": np.char.isdigit(c),
        "space": c == " ",
        "newline": nl,
        "punctuation": np.isin(c, list(",.;:!?'-")),
        "line_start": (pos == line_start) & ~nl,
        "late_in_line": (pos - line_start >= 30) & ~nl,
        "word_start": word_start,
        "in_word": letter & ~word_start & word,
        "long_word": letter & word & (pos - ws >= 4),
        "capitalized_word": word & upper[ws],
        "double_letter": letter & (lc == prev(lc, "")),
        "after_end_punct": prev(np.isin(c, list(".!?")), False),
        "sentence_start": word_start & (prev_nonspace >= 0) & np.isin(c[prev_nonspace.clip(0)], list(".!?")),
        "after_comma": (last_punct >= line_start) & (c[last_punct.clip(0)] == ","),
    }
    for w in PROBE_WORDS:  # spelling w: the word so far is a prefix of w (no look-ahead), from its 2nd letter
        m = word_start & (lc == w[0])
        rules[f"word_{w}"] = np.zeros(n, bool)
        for ch in w[1:]:
            m = prev(m, False) & (lc == ch)
            rules[f"word_{w}"] |= m
    return rules


def probe_labels(tok, ids):
    """Binary labels per token of the held-out ids. Char model: char_rules. BPE: char_rules at
    each token's last character, the word tasks as "the token is the word", plus token-shape
    tasks. -> {task: (len(ids),) bool}."""
    if tok.kind == "char":
        return char_rules(tok.decode(ids))
    pieces = [tok.decode([i]) for i in ids]
    last = (np.cumsum([len(p) for p in pieces]) - 1).clip(0)  # (n_tokens,) each token's last char
    labels = {k: v[last] for k, v in char_rules("".join(pieces)).items() if not k.startswith("word_")}
    words = np.array([p.strip().lower() for p in pieces])
    labels.update({f"word_{w}": words == w for w in PROBE_WORDS})
    labels["leading_space"] = np.array([p.startswith(" ") for p in pieces])
    labels["capitalized_token"] = np.array([p.strip()[:1].isupper() for p in pieces])
    return labels


def fit_logistic(f, y, ridge=1e-3, iters=20, tol=1e-4, max_step=5.0):
    """Newton's method for many 1-D logistic regressions at once: for each row of f (F, M)
    (a standardized feature over M tokens) and shared labels y (M,) in {0, 1}, minimize
    mean_t CE(y_t, sigmoid(a + b f_t)) + ridge/2 b^2. Each step solves the 2x2 Newton system
    in closed form; steps are capped at max_step (scaled, so the Newton direction is kept), and
    rows whose step fell below tol leave the active set. -> a, b (F,)."""
    a, b = f.new_zeros(len(f)), f.new_zeros(len(f))
    active, fa = torch.arange(len(f), device=f.device), f
    for _ in range(iters):
        p = torch.sigmoid(torch.addcmul(a[active, None], b[active, None], fa))  # (F', M)
        r, w = p - y, p * (1 - p)
        ga, gb = r.mean(1), (r * fa).mean(1) + ridge * b[active]
        wf = w * fa
        haa, hab, hbb = w.mean(1), wf.mean(1), (wf * fa).mean(1) + ridge
        det = (haa * hbb - hab ** 2).clamp_min(1e-12)
        da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
        step = torch.maximum(da.abs(), db.abs())
        s = (max_step / step).clamp(max=1.0)
        a[active] -= s * da
        b[active] -= s * db
        keep = step > tol
        active, fa = active[keep], fa[keep]
        if len(active) == 0:
            break
    return a, b


def logistic_ce(f, y, a, b):
    """Mean cross-entropy (nats) of sigmoid(a + b f) per row of f (F, M) against y (M,)."""
    return F.binary_cross_entropy_with_logits(torch.addcmul(a[:, None], b[:, None], f), y.expand_as(f),
                                              reduction="none").mean(1)


def probe_task(f_train, y_train, f_test, y_test):
    """paper §4.2 for one task: standardize each feature (rows of f, (F, M)) with train
    statistics, fit a 1-D logistic regression per feature on train, pick the feature with the
    lowest train cross-entropy, report its test cross-entropy."""
    mu, sd = f_train.mean(1, keepdim=True), f_train.std(1, keepdim=True).clamp_min(1e-6)
    f_train = (f_train - mu) / sd
    a, b = fit_logistic(f_train, y_train)
    train_ce = logistic_ce(f_train, y_train, a, b)
    best = int(train_ce.argmin())
    test = (f_test[best:best + 1] - mu[best]) / sd[best]
    return {"best": best, "train_ce": train_ce[best].item(),
            "test_ce": logistic_ce(test, y_test, a[best:best + 1], b[best:best + 1]).item()}


@torch.no_grad()
def probe_loss(sae, data, labels, n_tokens, seed):
    """paper §4.2. For each binary task with a base rate of 1-99% among the evaluated tokens:
    up to n_tokens of them, half positive and half negative, split into equal train and test parts
    (chance = ln 2 = 0.693); the best latent's test cross-entropy of a 1-D logistic regression
    on its pre-activation (probe_task), and the same over the raw residual channels (d_model)
    as the baseline. Reported: the means over tasks; lower is better."""
    from tqdm import tqdm
    g = torch.Generator().manual_seed(seed)
    pos = data.positions()
    tasks, skipped = [], []
    for name, lab in tqdm(labels.items(), desc="probe", unit="task", leave=False):
        y = torch.from_numpy(lab[pos]).to(data.x.device)
        rate = y.float().mean().item()
        m = min(int(y.sum()), int((~y).sum()), n_tokens // 2) // 2  # per class and split
        if not 0.01 <= rate <= 0.99 or m < 16:  # fewer: the best-of-n_latents choice is noise
            skipped.append({"task": name, "base_rate": rate})
            continue
        pick = lambda rows: rows[torch.randperm(len(rows), generator=g)[:2 * m].to(rows.device)]
        p, q = pick(y.nonzero()[:, 0]), pick((~y).nonzero()[:, 0])
        train_rows, test_rows = torch.cat([p[:m], q[:m]]), torch.cat([p[m:], q[m:]])
        yy = torch.cat([y.new_ones(m), y.new_zeros(m)]).float()
        latent = probe_task(sae.preacts(data.x_n[train_rows]).T.contiguous(), yy,
                            sae.preacts(data.x_n[test_rows]).T, yy)  # (n_latents, 2m)
        channel = probe_task(data.x[train_rows].T.contiguous(), yy, data.x[test_rows].T, yy)  # (d_model, 2m)
        tasks.append({"task": name, "base_rate": rate, "n_train": 2 * m, "n_test": 2 * m,
                      "latent": latent["best"], "latent_ce": latent["test_ce"], "latent_train_ce": latent["train_ce"],
                      "channel": channel["best"], "channel_ce": channel["test_ce"]})
    mean = lambda key: float(np.mean([t[key] for t in tasks])) if tasks else None
    return {"mean_latent_ce": mean("latent_ce"), "mean_channel_ce": mean("channel_ce"), "chance_ce": math.log(2),
            "tasks": tasks, "skipped": skipped}


# -----------------------------------------------------------------------------
# 5. N2G explanations (paper §4.3): explanations.py

# -----------------------------------------------------------------------------
# 6. Ablation sparsity (paper §4.5)


def logit_effect(delta):
    """Logit changes (T, V) -> v (T * V): each position's median over the vocabulary subtracted
    (a shift of every logit at a position changes no probability), concatenated."""
    return (delta - delta.median(-1, keepdim=True).values).reshape(-1)


def ablation_sparsity_score(v):
    """paper §4.5: (||v||_1 / ||v||_2)^2 / len(v), len(v) = V * T: 1/(V T) for a one-hot effect,
    1 when every entry has the same magnitude; lower is sparser."""
    return ((v.abs().sum() / v.norm()) ** 2 / v.numel()).item()


@torch.no_grad()
def ablation_sparsity(model, sae, data, layer, n_samples, seed):
    """paper §4.5. With the reconstruction spliced in at every evaluated position, for sampled
    (position t, active latent i) pairs: subtract i's contribution z_i W_dec[i] (times the
    token's normalization scale: the raw residual space) at t only, take the logit change at t
    and the next T-1 = 15 positions, v = logit_effect, score ablation_sparsity_score(v).
    Baseline: a random residual direction of the same norm subtracted instead."""
    g = torch.Generator().manual_seed(seed)
    W, Tc, d = data.h.shape
    first, per = data.first, Tc - data.first
    T = min(ABLATION_T, per)  # short contexts: every position from first on
    vals, idx = data.code(own_k(sae))
    spliced = torch.cat([data.h[:, :first], reconstruct(sae, data, own_k(sae))[1].view(W, per, d)], 1)
    pos = torch.arange(len(vals)) % per + first
    rows = ((pos <= Tc - T).to(vals.device) & (vals > 0).any(1)).nonzero()[:, 0].cpu()
    rows = rows[torch.randperm(len(rows), generator=g)[:n_samples]]
    batch = max(1, min(16, 2 ** 24 // (Tc * model.config.vocab_size)))  # logits (3 * batch, Tc, V)
    scores = {"latent": [], "random": []}
    for i in range(0, len(rows), batch):
        r = rows[i:i + batch]
        w, t = r // per, pos[r]
        active = vals[r] > 0  # pick one active latent per row, uniformly
        j = torch.multinomial(active.float().cpu(), 1, generator=g)[:, 0]
        contrib = vals[r, j, None] * sae.W_dec[idx[r, j]] * data.scale[r]  # (B, d) raw space
        rand = torch.randn(len(r), d, generator=g).to(contrib)
        rand = rand / rand.norm(dim=1, keepdim=True) * contrib.norm(dim=1, keepdim=True)
        base = spliced[w]
        ar = torch.arange(len(r))
        variants = [base]
        for delta in (contrib, rand):
            v = base.clone()
            v[ar, t] -= delta
            variants.append(v)
        logits = model.logits_from_resid(torch.cat(variants), layer).view(3, len(r), Tc, -1)
        for b in range(len(r)):
            sl = slice(int(t[b]), int(t[b]) + T)
            for name, k in (("latent", 1), ("random", 2)):
                v = logit_effect(logits[k, b, sl] - logits[0, b, sl])
                if v.norm() > 0:
                    scores[name].append(ablation_sparsity_score(v))
    mean = lambda key: float(np.mean(scores[key])) if scores[key] else None
    return {"mean_latent": mean("latent"), "mean_random": mean("random"), "samples": len(scores["latent"]),
            "T": T, "V": model.config.vocab_size}


# -----------------------------------------------------------------------------
# 7. Progressive recovery (paper §5.3)


def progressive_recovery(model, sae, data, layer, k):
    """paper §5.3: test-time TopK(k') for k' in {k/4, k/2, k, 2k, 4k} (within 1..n_latents):
    FVU in the normalized space and delta CE with the reconstruction spliced in (§4.1). For a
    ReLU SAE k is its mean L0 and TopK(k') keeps the k' largest of its code."""
    ks = sorted({min(max(1, round(k * f)), sae.cfg.n_latents) for f in (0.25, 0.5, 1, 2, 4)})
    recons = {kk: reconstruct(sae, data, kk) for kk in ks}
    r = spliced_losses(model, data, layer, {kk: x_hat for kk, (_, x_hat) in recons.items()})
    return {"k": k, "points": [{"k": kk, "fvu": fvu(data.x_n, recons[kk][0]).item(),
                                "delta_ce": r[kk][0] - r["clean"], "kl": r[kk][1]} for kk in ks]}


# -----------------------------------------------------------------------------
# 8. SAEBench's core metrics (adamkarvonen/SAEBench, sae_bench/evals/core/main.py)


def max_cosine(W, chunk_elems=2 ** 25):
    """(n, d) rows -> (n,) each row's largest cosine similarity with any other row, in row
    chunks so the (chunk, n) similarity block stays small."""
    Wn = F.normalize(W.float(), dim=1)
    out = torch.empty(len(W), device=W.device)
    rows = max(1, chunk_elems // len(W))
    for i in range(0, len(W), rows):
        s = Wn[i:i + rows] @ Wn.T  # (rows, n)
        s[torch.arange(len(s)), torch.arange(i, i + len(s))] = -float("inf")  # not itself
        out[i:i + rows] = s.max(1).values
    return out


def saebench_metrics(x, x_hat, freq, W_enc, W_dec):
    """SAEBench core's definitions, in the raw residual space (SAEBench treats the SAE as a map
    x -> x_hat there too), per token t of x, x_hat (N, d), each a mean over tokens unless said:
    explained_variance = mean_t (1 - ||x_t - x_hat_t||^2 / ||x_t - mean_s x_s||^2) (a mean of
    per-token ratios, where 1 - FVU is a ratio of sums); cossim = mean_t cos(x_t, x_hat_t);
    l2_ratio = mean_t ||x_hat_t|| / ||x_t||; relative_reconstruction_bias = mean_t ||x_hat_t||^2 /
    mean_t <x_t, x_hat_t> (shrinkage, arXiv 2404.16014 eq. 10: 1 unbiased, < 1 shrunk). From the
    firing rates freq (n_latents,): frac_alive = mean_i [f_i > 0] (1 - dead_frac);
    freq_over_1/10_percent = mean_i [f_i > 0.01 / 0.1] (dense_1pct/10pct_frac), and
    normalized_freq_over_1/10_percent, those latents' share of all firings. From the weights
    (n_latents, d): average_max_encoder/decoder_cosine_sim = mean_i max_{j != i} cos(w_i, w_j)
    over all latents. SAEBench averages the ratios per batch of 2,048 tokens; here one sample."""
    x, x_hat = x.double(), x_hat.double()
    tot = (x - x.mean(0)).pow(2).sum(1)
    norm_in = x.norm(dim=1)
    ratio = x_hat.norm(dim=1) / torch.where(norm_in < 1e-4, 1.0, norm_in)  # SAEBench's guard
    share = lambda m: (freq[m].sum() / freq.sum()).item() if freq.sum() > 0 else 0.0
    return {"explained_variance": (1 - (x - x_hat).pow(2).sum(1) / tot).mean().item(),
            "cossim": F.cosine_similarity(x, x_hat, dim=1).mean().item(), "l2_ratio": ratio.mean().item(),
            "relative_reconstruction_bias": (x_hat.pow(2).sum(1).mean() / (x * x_hat).sum(1).mean()).item(),
            "frac_alive": (freq > 0).double().mean().item(),
            "freq_over_1_percent": (freq > 0.01).double().mean().item(),
            "freq_over_10_percent": (freq > 0.1).double().mean().item(),
            "normalized_freq_over_1_percent": share(freq > 0.01),
            "normalized_freq_over_10_percent": share(freq > 0.1),
            "average_max_encoder_cosine_sim": max_cosine(W_enc).mean().item(),
            "average_max_decoder_cosine_sim": max_cosine(W_dec).mean().item(), "tokens": len(x)}


def saebench_core(sae, data):
    return saebench_metrics(data.x, reconstruct(sae, data, own_k(sae))[1], firing_rates(sae, data),
                            sae.W_enc.detach(), sae.W_dec.detach())


# -----------------------------------------------------------------------------
# The report: a plain-text table, eval.json, PNGs


def sae_label(sae):
    """The SAE's kind in a few words, for the report and the browser's header."""
    cfg = sae.cfg
    label = {"topk": f"TopK k {cfg.k}", "relu": "ReLU + L1",
             "batchtopk": f"BatchTopK k {cfg.k}, evaluated as JumpReLU at {float(getattr(sae, 'threshold', 0)):.4g}"}
    nested = f", Matryoshka prefixes {', '.join(map(str, cfg.matryoshka))}" if cfg.matryoshka else ""
    return label[cfg.activation] + ", Multi-TopK" * cfg.multi_topk + nested


def fmt(x, spec=".4f"):
    """A metric as the reports print it (evals.py's, scaling.py's): n/a where it is None."""
    return "n/a" if x is None else format(x, spec)


def row(name, value):
    """One line of the report: a metric's name and its value, aligned."""
    return f"    {name:<52}{value}"


def report(res, meta):
    """The plain-text table, grouped by section."""
    lines = [f"{meta['checkpoint']}  ({meta['weights']} weights)  n_latents {meta['n_latents']:,}  {meta['label']}",
             f"subject {meta['subject']}  layer {meta['layer']}  held-out: {meta['windows']} contexts of "
             f"{meta['ctx_len']} tokens, {meta['tokens']:,} evaluated (position 0 "
             f"{'included' if meta['first'] == 0 else 'excluded'})", ""]
    if "reconstruction" in res:
        r = res["reconstruction"]
        lines += ["1. Reconstruction (§2.1)",
                  row("FVU, normalized space", fmt(r["fvu"])),
                  row("FVU, raw residual space", fmt(r["fvu_raw"])),
                  row("L0", fmt(r["l0"], ".2f"))]
    if "activity" in res:
        r = res["activity"]
        lines += ["2. Latent activity (§2.4)",
                  row(f"dead (no fire in {r['tokens']:,} tokens)", fmt(r["dead_frac"], ".2%")),
                  row("dense: firing on > 1% / > 10% of tokens",
                      f"{fmt(r['dense_1pct_frac'], '.2%')} / {fmt(r['dense_10pct_frac'], '.2%')}"),
                  row("median log10 firing rate (live latents)", fmt(r["median_log10_freq_live"], ".2f"))]
        if "dead_peak_preact_median" in r:
            lines.append(row("dead: median peak pre-activation / TopK threshold",
                             f"{fmt(r['dead_peak_preact_median'])} / {fmt(r['topk_threshold_median'])}"))
    if "downstream" in res:
        lines += downstream_lines(res["downstream"])
    if "probe" in res:
        lines += probe_lines(res["probe"])
    if "n2g" in res:
        lines += n2g_lines(res["n2g"])
    if "ablation" in res:
        r = res["ablation"]
        lines += [f"6. Ablation sparsity (§4.5): (|v|_1/|v|_2)^2 / (V T), T = {r['T']}, lower is sparser",
                  row(f"latents / random directions ({r['samples']} samples)",
                      f"{fmt(r['mean_latent'])} / {fmt(r['mean_random'])}")]
    if "progressive" in res:
        r = res["progressive"]
        lines += [f"7. Progressive recovery (§5.3): test-time TopK(k'), centred on k = {r['k']} "
                  "(the trained k; a ReLU or BatchTopK SAE's L0)", f"    {'k':>6}{'FVU':>10}{'delta CE':>12}",
                  *(f"    {p['k']:>6}{p['fvu']:>10.4f}{p['delta_ce']:>+12.4f}" for p in r["points"])]
    if "saebench" in res:
        lines += saebench_lines(res["saebench"])
    return "\n".join(lines)


def downstream_lines(r):
    """Section 3 of the report: the subject model's loss with the reconstruction spliced in."""
    return ["3. Downstream loss (§4.1), nats per token",
            row("delta CE (spliced - clean)", fmt(r["delta_ce"], "+.4f")),
            row("KL(clean || spliced)", fmt(r["kl"])),
            row("CE clean / spliced", f"{fmt(r['ce_clean'])} / {fmt(r['ce_spliced'])}"),
            row("CE zero- / mean-ablation", f"{fmt(r['ce_zero_ablation'])} / {fmt(r['ce_mean_ablation'])}"),
            row("loss recovered vs zero- / mean-ablation",
                f"{fmt(r['loss_recovered_zero'])} / {fmt(r['loss_recovered_mean'])}")]


def probe_lines(r):
    """Section 4 of the report: the probe tasks, one line each."""
    lines = [f"4. Probe loss (§4.2): test CE of the best 1-D probe, lower is better, chance {r['chance_ce']:.3f}",
             row(f"mean over {len(r['tasks'])} tasks: latents / residual channels",
                 f"{fmt(r['mean_latent_ce'])} / {fmt(r['mean_channel_ce'])}"),
             f"    {'task':<22}{'base rate':>10}{'latent':>8}{'CE':>8}{'channel':>9}{'CE':>8}"]
    lines += [f"    {t['task']:<22}{t['base_rate']:>10.3f}{t['latent']:>8}{t['latent_ce']:>8.3f}"
              f"{t['channel']:>9}{t['channel_ce']:>8.3f}" for t in r["tasks"]]
    if r["skipped"]:
        lines.append("    skipped (base rate outside 1-99%, or under 32 tokens per class): " +
                     ", ".join(f"{t['task']} ({t['base_rate']:.2%})" for t in r["skipped"]))
    return lines


def n2g_lines(r):
    """Section 5 of the report: N2G's scores and its best explanations."""
    return [f"5. N2G explanations (§4.3): {r['scored']} of {r['latents']} sampled live latents scored "
            f"on {r['test_tokens']:,} tokens",
            row("median precision / recall / F1",
                f"{fmt(r['median_precision'], '.3f')} / {fmt(r['median_recall'], '.3f')} / {fmt(r['median_f1'], '.3f')}"),
            "    best explained (^ context start, * any token, ␣ space, ⏎ newline):",
            *(f"      latent {e['latent']:>6}  F1 {e['f1']:.2f} (P {e['precision']:.2f} R {e['recall']:.2f})  "
              + "  ".join(e["patterns"][:4]) for e in r["explanations"][:5])]


def saebench_lines(r):
    """Section 8 of the report: SAEBench's names, raw residual space."""
    rows = [("explained variance (mean of per-token ratios)", f"{r['explained_variance']:.4f}"),
            ("cosine(x, x_hat)", f"{r['cossim']:.4f}"),
            ("L2 ratio ||x_hat||/||x||; relative recon. bias",
             f"{r['l2_ratio']:.4f}; {r['relative_reconstruction_bias']:.4f}"),
            ("alive; firing on > 1% / > 10% of tokens",
             f"{r['frac_alive']:.2%}; {r['freq_over_1_percent']:.2%} / {r['freq_over_10_percent']:.2%}"),
            ("share of firings by those > 1% / > 10%",
             f"{r['normalized_freq_over_1_percent']:.2%} / {r['normalized_freq_over_10_percent']:.2%}"),
            ("max cosine to another latent, mean: enc / dec",
             f"{r['average_max_encoder_cosine_sim']:.4f} / {r['average_max_decoder_cosine_sim']:.4f}")]
    return ["8. SAEBench core metrics (adamkarvonen/SAEBench evals/core), raw residual space",
            *(row(name, value) for name, value in rows)]


def plot(res, prefix):
    """The firing-rate histogram and the progressive-recovery curve as PNGs; -> paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    if "activity" in res and res["activity"]["log10_freq_hist"]["counts"]:
        h = res["activity"]["log10_freq_hist"]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.stairs(h["counts"], h["edges"], fill=True)
        ax.set(xlabel="log10 firing rate", ylabel="latents",
               title=f"firing rates of live latents (dead: {res['activity']['dead_frac']:.1%})")
        paths.append(prefix + "_firing_rates.png")
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    if "progressive" in res:
        pts = res["progressive"]["points"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, key, label in zip(axes, ("fvu", "delta_ce"), ("FVU (normalized MSE)", "delta CE (nats)")):
            ax.plot([p["k"] for p in pts], [p[key] for p in pts], "o-")
            ax.axvline(res["progressive"]["k"], color="gray", ls=":")
            ax.set(xscale="log", xlabel="test-time k'", ylabel=label)
        fig.suptitle("progressive recovery (trained k dotted)")
        paths.append(prefix + "_progressive.png")
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    return paths


def json_ready(x):
    """NaN/inf -> None, numpy scalars -> Python, so the JSON is strict."""
    if isinstance(x, dict):
        return {str(k): json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x.item() if isinstance(x, np.generic) else x


def main(argv=None):
    args = gpt.parse_args(build_parser(), RULES, argv, positional=("path",))
    skip = {s for s in args.skip.split(",") if s}
    if args.export:
        return export_sparsify(args.path, args.export, args.raw)
    torch.manual_seed(args.seed)
    sae, model, tok, subject, val_ids = load(args.path, args.raw, args.device, import_flags(args))
    layer, k = subject["layer"], own_k(sae)
    t0 = time.time()
    with torch.no_grad():
        data = heldout(model, sae, val_ids, layer, subject["ctx_len"], subject["include_first"], args.tokens,
                       4 * (sae.cfg.k if sae.cfg.activation != "relu" else 1))
        if args.text and not args.html:  # the prompt view alone
            import browser
            return browser.run(args, model, sae, tok, data, layer, {}, {}, "")
        # a ReLU SAE's progressive recovery is centered on its mean L0
        k_ref = k or max(1, round(reconstruction(sae, data)["l0"]))
        run = {
            "reconstruction": lambda: reconstruction(sae, data),
            "activity": lambda: latent_activity(sae, data),
            "downstream": lambda: downstream_loss(model, sae, data, layer),
            "probe": lambda: probe_loss(sae, data, probe_labels(tok, val_ids), args.probe_tokens, args.seed),
            "n2g": lambda: n2g(model, sae, data, layer, tok, args.n2g_latents, args.n2g_examples, args.seed),
            "ablation": lambda: ablation_sparsity(model, sae, data, layer, args.ablation_samples or
                                                  (256 if model.config.vocab_size <= 1000 else 32), args.seed),
            "progressive": lambda: progressive_recovery(model, sae, data, layer, k_ref),
            "saebench": lambda: saebench_core(sae, data),
        }
        res, seconds = {}, {"heldout_pass": round(time.time() - t0, 2)}
        for name in SECTIONS:
            if name not in skip:
                t = time.time()
                res[name] = run[name]()
                seconds[name] = round(time.time() - t, 2)
    imported = os.path.isdir(args.path)
    meta = {"checkpoint": args.path, "weights": "imported" if imported else "raw" if args.raw else "EMA",
            "n_latents": sae.cfg.n_latents,
            "k": sae.cfg.k, "activation": sae.cfg.activation, "label": sae_label(sae),
            "subject": subject["model"], "layer": layer,

            "ctx_len": subject["ctx_len"], "windows": len(data.windows), "tokens": len(data.x), "first": data.first}
    print(report(res, meta))
    prefix = os.path.join(os.path.abspath(args.path) if imported else os.path.dirname(os.path.abspath(args.path)),
                          "eval_raw" if args.raw else "eval")
    pngs = plot(res, prefix)
    if args.html:
        import browser
        page = browser.run(args, model, sae, tok, data, layer, res, meta, os.path.dirname(prefix))
        seconds["html"] = page["seconds"]
    out = {"meta": meta, "flags": {f: v for f, v in vars(args).items() if f != "debug"}, "subject": subject,
           "sae_config": vars(sae.cfg), "results": res, "seconds": seconds, "plots": pngs}
    with open(prefix + ".json", "w") as fh:
        json.dump(json_ready(out), fh, indent=1, allow_nan=False)
    print(f"wrote {prefix}.json" + "".join(f", {p}" for p in pngs) + f" ({time.time() - t0:.0f} s)")
    return out


if __name__ == "__main__":
    gpt.run_cli(main)
