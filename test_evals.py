"""Tests for evals.py: known answers for every metric, the N2G builder and predictor, the
probe rules and fit, the end-to-end report on the tiny checkpoint, and bad input."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import evals
import explanations
import gpt
import train
from gpt import GPT, GPTConfig, UserError
from sae import SAE, SAEConfig

HERE = os.path.dirname(os.path.abspath(__file__))
SMALL = ["--tokens", "2048", "--probe_tokens", "256", "--n2g_latents", "8", "--n2g_examples", "8",
         "--ablation_samples", "16"]


def random_gpt(d=16, vocab=30, block=16):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=block, vocab_size=vocab, n_layer=2, n_head=2, n_embd=d)).eval()


def exact_sae(d):
    """An SAE that reconstructs exactly: latents +e_j and -e_j, k = d. For every j exactly one of
    the pair has a pre-activation >= 0, so TopK(d) keeps |x_j| on the right sign of e_j."""
    sae = SAE(SAEConfig(d_model=d, n_latents=2 * d, k=d))
    with torch.no_grad():
        sae.W_dec.copy_(torch.cat([torch.eye(d), -torch.eye(d)]))
        sae.W_enc.copy_(sae.W_dec)
        sae.b_enc.zero_()
        sae.b_pre.zero_()
    return sae.eval()


# ---- 1. reconstruction ----------------------------------------------------------


def test_reconstruction_known_answers():
    x = torch.tensor([[1.0, 0], [-1, 0], [0, 2], [0, -2]])  # mean 0, total variance 10
    vals = torch.tensor([[1.0, 0], [2, 3], [0, 0], [0, 0.5]])  # 1 + 2 + 0 + 1 non-zero
    for x_hat, want in ((torch.zeros_like(x), 1.0), (x, 0.0), (x / 2, 0.25), (x + torch.tensor([1.0, 0]), 0.4)):
        r = evals.reconstruction_metrics(x, x_hat, x * 3, x_hat * 3, vals)
        assert r["fvu"] == pytest.approx(want) and r["fvu_raw"] == pytest.approx(want)
        assert r["l0"] == 1.0 and r["tokens"] == 4
    # the mean, not zero, is the baseline: predicting the mean scores 1
    x = torch.tensor([[1.0, 1], [3, 3]])
    assert evals.reconstruction_metrics(x, torch.full_like(x, 2), x, x, vals[:2])["fvu_raw"] == pytest.approx(1.0)


def test_exact_sae_has_zero_fvu_delta_ce_and_kl():
    model, d = random_gpt(), 16
    sae = exact_sae(d)
    val_ids = np.random.default_rng(0).integers(0, 30, 3000)
    data = evals.heldout(model, sae, val_ids, 0, 16, False, 512, 4 * d)
    r = evals.reconstruction(sae, data)
    assert r["fvu"] < 1e-10 and r["fvu_raw"] < 1e-10 and r["l0"] <= d
    down = evals.downstream_loss(model, sae, data, 0)
    assert abs(down["delta_ce"]) < 1e-5 and abs(down["kl"]) < 1e-5
    assert down["loss_recovered_zero"] == pytest.approx(1, abs=1e-3)
    assert down["loss_recovered_mean"] == pytest.approx(1, abs=1e-3)
    for p in evals.progressive_recovery(model, sae, data, 0, d)["points"]:
        assert (p["fvu"] < 1e-10) == (p["k"] >= d)


def test_heldout_windows_and_codes_match_train_and_sae(tiny_sae_ckpt):
    sae, model, tok, subject, val_ids = evals.load(tiny_sae_ckpt)
    ctx, inc = subject["ctx_len"], subject["include_first"]
    data = evals.heldout(model, sae, val_ids, subject["layer"], ctx, inc, 1024, 4 * sae.cfg.k)
    torch.testing.assert_close(data.windows, train.heldout_windows(val_ids, ctx, 1024, inc))
    assert (data.windows[:, :-1].reshape(-1)[:5].numpy() == val_ids[data.starts[0]:data.starts[0] + 5]).all()
    assert data.positions()[0] == data.starts[0] + data.first
    torch.testing.assert_close(data.peak, sae.preacts(data.x_n).max(0).values)
    # a prefix of the sorted 4k-wide code is the test-time TopK(k') code (paper §5.3)
    for k in (1, 2, sae.cfg.k, 4 * sae.cfg.k):
        torch.testing.assert_close(evals.reconstruct(sae, data, k)[1], sae.reconstruct(data.x, k), atol=1e-5, rtol=1e-5)


# ---- 2. latent activity ------------------------------------------------------------


def test_latent_activity_counts():
    sae = SAE(SAEConfig(d_model=4, n_latents=10, k=2))
    # 100 tokens: latent 0 fires on all, 1 on 5, 2 on 1 (a zero value is not a fire), the rest never
    vals = torch.zeros(100, 2)
    idx = torch.full((100, 2), 9)
    vals[:, 0], idx[:, 0] = 1.0, 0
    vals[:5, 1], idx[:5, 1] = 1.0, 1
    vals[5, 1], idx[5, 1] = 2.0, 2
    peak = -torch.arange(10) / 10  # each latent's largest pre-activation: 0, -0.1, ..., -0.9
    data = evals.Heldout(**{f.name: None for f in dataclasses.fields(evals.Heldout)} |
                         {"vals": vals, "idx": idx, "peak": peak})
    r = evals.latent_activity(sae, data)
    assert r["dead_frac"] == pytest.approx(0.7)
    assert r["dense_1pct_frac"] == pytest.approx(0.2) and r["dense_10pct_frac"] == pytest.approx(0.1)
    assert sum(r["log10_freq_hist"]["counts"]) == 3
    # dead latents 3..9 peak at -0.3..-0.9 (median -0.6); the 2nd-largest code value is 0 on 94 tokens
    assert r["dead_peak_preact_median"] == pytest.approx(-0.6) and r["topk_threshold_median"] == 0


# ---- 8. SAEBench core ------------------------------------------------------------


def test_saebench_metrics_known_answers():
    x = torch.tensor([[1.0, 0], [-1, 0], [0, 2], [0, -2]])  # mean 0: each token's own norm is its spread
    freq = torch.tensor([0, 0.5, 0.05, 0.005, 0.0], dtype=torch.float64)
    W_enc = torch.tensor([[1.0, 0], [2, 0], [0, 1]])  # rows 0 and 1 parallel, row 2 orthogonal to both
    W_dec = torch.tensor([[1.0, 0], [1, 1], [0, 1]])  # 45 degrees apart in turn
    r = evals.saebench_metrics(x, 0.5 * x, freq, W_enc, W_dec)
    # x_hat = x / 2: per token 1 - (1/2)^2 explained; parallel; half the norm; shrinkage 1/2
    assert r["explained_variance"] == pytest.approx(0.75) and r["cossim"] == pytest.approx(1.0)
    assert r["l2_ratio"] == pytest.approx(0.5) and r["relative_reconstruction_bias"] == pytest.approx(0.5)
    assert r["frac_alive"] == pytest.approx(0.6)
    assert r["freq_over_1_percent"] == pytest.approx(0.4) and r["freq_over_10_percent"] == pytest.approx(0.2)
    assert r["normalized_freq_over_10_percent"] == pytest.approx(0.5 / 0.555)
    assert r["average_max_encoder_cosine_sim"] == pytest.approx(2 / 3)
    assert r["average_max_decoder_cosine_sim"] == pytest.approx(2 ** -0.5)
    # a mean of per-token ratios, not 1 - FVU: a token far from the mean weighs the same as a near one
    x_hat = x.clone()
    x_hat[2:] = 0  # the two large tokens (4/5 of the variance) lost: 1 - FVU = 0.2, per-token mean 0.5
    r = evals.saebench_metrics(x, x_hat, freq, W_enc, W_dec)
    assert r["explained_variance"] == pytest.approx(0.5)
    assert 1 - evals.fvu(x, x_hat).item() == pytest.approx(0.2)
    assert r["l2_ratio"] == pytest.approx(0.5) and r["relative_reconstruction_bias"] == pytest.approx(1.0)
    # a zero input: SAEBench's guard divides by 1, not by ~0
    assert evals.saebench_metrics(torch.zeros(2, 2), torch.ones(2, 2), freq, W_enc, W_dec)["l2_ratio"] == \
        pytest.approx(2 ** 0.5)


def test_max_cosine_chunks_agree_with_the_full_matrix():
    W = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    Wn = torch.nn.functional.normalize(W, dim=1)
    s = Wn @ Wn.T
    s.fill_diagonal_(-2)
    torch.testing.assert_close(evals.max_cosine(W, chunk_elems=7 * 50), s.max(1).values)


# ---- 4. probe loss -----------------------------------------------------------------


def test_probe_picks_planted_latent():
    g = torch.Generator().manual_seed(0)
    y = (torch.arange(800) % 2).float()
    f = torch.randn(300, 800, generator=g)
    f[137] = y + 0.3 * torch.randn(800, generator=g)  # the planted latent
    r = evals.probe_task(f[:, :400], y[:400], f[:, 400:], y[400:])
    assert r["best"] == 137 and r["test_ce"] < 0.2  # Bayes-optimal CE at this noise: about 0.12


def test_newton_matches_reference_fit():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(5, 300, generator=g, dtype=torch.float64)
    y = (torch.rand(300, generator=g, dtype=torch.float64) < torch.sigmoid(0.5 + 1.5 * f[2])).double()
    f = (f - f.mean(1, keepdim=True)) / f.std(1, keepdim=True)
    a, b = evals.fit_logistic(f, y, ridge=1e-3, tol=1e-10)
    for row in range(5):  # reference: L-BFGS on the same penalized objective, one feature at a time
        ab = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([ab], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(ab[0] + ab[1] * f[row], y) + 1e-3 / 2 * ab[1] ** 2
            loss.backward()
            return loss
        opt.step(closure)
        assert a[row].item() == pytest.approx(ab[0].item(), abs=1e-6)
        assert b[row].item() == pytest.approx(ab[1].item(), abs=1e-6)


def test_newton_separable_data_stays_finite():
    y = torch.tensor([0.0] * 50 + [1.0] * 50)
    f = torch.stack([y * 2 - 1, torch.linspace(-1, 1, 100)])  # row 0 separates perfectly
    a, b = evals.fit_logistic(f, y)
    assert torch.isfinite(a).all() and torch.isfinite(b).all() and b[0] > 5
    assert evals.logistic_ce(f, y, a, b)[0] < 0.05


def test_char_rules_known_answers():
    text = "ACT I.\n[Enter A.]\nTROILUS.\nThe man, he.\nAnd tt"
    r = evals.char_rules(text)
    at = lambda name: "".join(ch for ch, v in zip(text, r[name]) if v)
    assert at("stage_direction") == "[Enter A."
    assert at("speaker_line") == "ACT I.TROILUS.TA"  # capitals so far: a line's first capital counts
    assert at("first_speech_line") == "[Enter A.]\nThe man, he.\n"  # after "ACT I." and "TROILUS."
    assert at("line_start") == "A[TTA"
    assert at("word_start") == "AIEATTmhAt"
    assert at("word_the") == "he"  # spelling "the": from its 2nd letter
    assert at("word_and") == "nd"
    assert at("double_letter") == "t"
    assert at("after_end_punct") == "\n]\n\n"
    assert at("sentence_start") == "TA"
    assert at("after_comma") == ", he"


@settings(deadline=None, max_examples=20)
@given(st.text(alphabet="ab AB[].,!?'\n", min_size=1, max_size=60), st.integers(0, 60))
def test_char_rules_look_only_at_the_past(text, cut):
    """Labels of a prefix equal the prefix of the labels: no rule reads ahead."""
    cut = min(cut, len(text))
    full, part = evals.char_rules(text), evals.char_rules(text[:cut] or text[:1])
    for name in full:
        assert (full[name][:len(part[name])] == part[name]).all(), name


def test_bpe_labels():
    if not os.path.isfile(gpt.GPT2_BPE):
        pytest.skip("data/gpt2.tiktoken not present")
    tok = gpt.BPETokenizer()
    ids = gpt.encode_text("[Enter HAMLET.]\nHAMLET.\nThe man and the woman", tok)
    labels = evals.probe_labels(tok, ids)
    assert all(len(v) == len(ids) for v in labels.values()) and len(labels) >= 20
    words = [tok.decode([i]) for i in ids]
    assert [w for w, v in zip(words, labels["word_the"]) if v] == ["The", " the"]
    assert [w for w, v in zip(words, labels["stage_direction"]) if v][0] == "["


# ---- 5. N2G --------------------------------------------------------------------------

PAD = 99


def last_act(fn):
    """An act_fn from a per-position rule fn(tokens) -> list of activations."""
    return lambda contexts, latents: np.array([fn(c)[-1] for c in contexts], dtype=np.float64)


def examples_from(fn, docs):
    """explanations.py's test docs: (tokens, index of the activating token)."""
    return [(0, toks[:i + 1], fn(toks)[i]) for toks, i in docs]


@pytest.mark.parametrize("fn, docs, cases", [
    (lambda t: [1.0] + [0.0] * (len(t) - 1),  # fires on the first token of a context
     [([0, 1, 2], 0), ([1, 2, 3], 0)],
     [([0, 1, 2], [1, 0, 0]), ([2, 1, 0], [1, 0, 0])]),
    (lambda t: [float(x == 2) for x in t],  # fires on token 2
     [([0, 1, 2], 2), ([1, 2, 3], 1)],
     [([1, 2], [0, 1]), ([0, 0, 0], [0, 0, 0]), ([2, 1, 2], [1, 0, 1])]),
    (lambda t: [float(x == 2 and 0 in t[:i]) for i, x in enumerate(t)],  # 2 after a 0 anywhere before
     [([0, 1, 2], 2), ([1, 0, 2], 2), ([0, 2, 3], 1)],
     [([1, 2], [0, 0]), ([0, 2], [0, 1]), ([0, 4, 2, 0, 2], [0, 0, 1, 0, 1]), ([0, 1, 1, 2], [0, 0, 0, 0])]),
])
def test_n2g_matches_explanations_py(fn, docs, cases):
    """The known answers of openai/sparse_autoencoder explanations.py's own checks."""
    trie = explanations.n2g_build(last_act(fn), examples_from(fn, docs), PAD)[0]
    for tokens, want in cases:
        assert explanations.n2g_predict(trie, tokens) == want


def heldout_chars():
    text = gpt.split_text(gpt.load_text())[1]
    tok = gpt.CharTokenizer(gpt.load_text())
    ids = tok.encode(text)
    return tok, ids[:len(ids) // 2], ids[len(ids) // 2:]


@pytest.mark.parametrize("rule, want", [("th", "th"), ("t?e", "t*e")])
def test_n2g_bigram_and_wildcard_on_heldout_text(rule, want):
    """A latent that fires exactly on a character pattern gets that pattern, with precision =
    recall = 1 on the other half of the held-out text."""
    tok, build, score = heldout_chars()
    first, last = tok.stoi[rule[0]], tok.stoi[rule[-1]]
    span = len(rule)
    fires = lambda t: [float(i >= span - 1 and t[i] == last and t[i - span + 1] == first) for i in range(len(t))]
    ctx, pad = 32, tok.stoi[" "]
    windows = [build[s:s + ctx] for s in range(0, len(build) - ctx, ctx)]
    examples = [(7, w[:i + 1], 1.0) for w in windows for i, a in enumerate(fires(w)) if a and i >= 1][:16]
    tries = explanations.n2g_build(last_act(fires), examples, pad, min_len=2, max_len=64)
    pats = explanations.n2g_patterns(tries[7])
    assert [explanations.render_pattern(tok, p, anchored) for p, anchored, _ in pats] == [want]
    pred, actual = [], []
    for s in range(0, 20000, ctx):
        w = score[s:s + ctx]
        pred += [p > 0 for p in explanations.n2g_predict(tries[7], w)[1:]]
        actual += [a > 0 for a in fires(w)[1:]]
    pred, actual = np.array(pred), np.array(actual)
    assert actual.sum() > 20
    assert explanations.prf(pred, actual) == (1.0, 1.0, 1.0)


def test_prf():
    p, a = np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 1], bool)
    assert explanations.prf(p, a) == pytest.approx((0.5, 1 / 3, 0.4))
    assert explanations.prf(np.zeros(4, bool), a) == (0.0, 0.0, 0.0)


# ---- 6. ablation sparsity -----------------------------------------------------------


def test_ablation_sparsity_known_answers():
    """T 2, V 3, by hand: the logit changes [[2, -1, 0], [0, 5, 1]] less their medians 0 and 1
    give v = [2, -1, 0, -1, 4, 0]; ||v||_1 = 8, ||v||_2^2 = 22, (8^2 / 22) / 6 = 16/33. Then the
    extremes: 1/(V T) for one nonzero entry, 1 for equal magnitudes."""
    v = evals.logit_effect(torch.tensor([[2.0, -1.0, 0.0], [0.0, 5.0, 1.0]]))
    assert v.tolist() == [2, -1, 0, -1, 4, 0]
    assert evals.ablation_sparsity_score(v) == pytest.approx(16 / 33)
    T, V = 16, 84
    one_hot = torch.zeros(T * V)
    one_hot[5] = 3.0
    assert evals.ablation_sparsity_score(one_hot) == pytest.approx(1 / (V * T))
    signs = torch.randint(0, 2, (T * V,), generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert evals.ablation_sparsity_score(0.7 * signs.float()) == pytest.approx(1.0)


@settings(deadline=None, max_examples=20)
@given(st.integers(0, 2 ** 16), st.floats(-5, 5))
def test_logit_effect_ignores_per_position_shifts(seed, shift):
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(16, 50, generator=g, dtype=torch.float64)
    shifted = delta + shift * torch.arange(16, dtype=torch.float64)[:, None]
    torch.testing.assert_close(evals.logit_effect(shifted), evals.logit_effect(delta))


def test_ablation_sparsity_runs_on_model():
    """After the last block nothing mixes positions: an ablation at t moves the V logits at t
    alone, so v has at most V of its V T entries nonzero and the score is at most V / (V T) = 1/T
    (an effect spread evenly over the T positions would score T times that)."""
    model, d = random_gpt(block=32), 16
    sae = exact_sae(d)
    for layer in (0, 1):
        data = evals.heldout(model, sae, np.random.default_rng(0).integers(0, 30, 3000), layer, 32, False, 512, 4 * d)
        r = evals.ablation_sparsity(model, sae, data, layer, 8, 0)
        assert r["samples"] == 8 and r["T"] == 16 and r["V"] == 30
    assert 1 / (16 * 30) < r["mean_latent"] <= 1 / 16 and 1 / (16 * 30) < r["mean_random"] <= 1 / 16


# ---- the report, end to end, and bad input ----------------------------------------------


def strict_json(path):
    def bad(c):
        raise ValueError(f"non-standard JSON constant {c}")
    with open(path) as f:
        return json.load(f, parse_constant=bad)


def test_report_end_to_end(tiny_sae_ckpt, capsys):
    out = evals.main([tiny_sae_ckpt, *SMALL])
    text = capsys.readouterr().out
    for header in ("1. Reconstruction", "2. Latent activity", "3. Downstream loss", "4. Probe loss",
                   "5. N2G", "6. Ablation sparsity", "7. Progressive recovery", "8. SAEBench core"):
        assert header in text
    d = os.path.dirname(tiny_sae_ckpt)
    j = strict_json(os.path.join(d, "eval.json"))
    r = j["results"]
    assert set(r) == set(evals.SECTIONS)
    for section, key in [("reconstruction", "fvu"), ("reconstruction", "fvu_raw"), ("reconstruction", "l0"),
                         ("activity", "dead_frac"), ("activity", "dense_1pct_frac"), ("downstream", "delta_ce"),
                         ("downstream", "kl"), ("downstream", "loss_recovered_zero"),
                         ("downstream", "loss_recovered_mean"), ("probe", "mean_latent_ce"),
                         ("probe", "mean_channel_ce"), ("n2g", "median_f1"), ("ablation", "mean_latent"),
                         ("ablation", "mean_random"), ("saebench", "explained_variance"), ("saebench", "cossim"),
                         ("saebench", "l2_ratio"), ("saebench", "relative_reconstruction_bias"),
                         ("saebench", "average_max_decoder_cosine_sim")]:
        assert isinstance(r[section][key], float), (section, key)
    assert len(r["probe"]["tasks"]) + len(r["probe"]["skipped"]) >= 20
    assert all(t["latent_ce"] > 0 for t in r["probe"]["tasks"])
    assert r["n2g"]["explanations"] and r["n2g"]["explanations"][0]["patterns"]
    assert [p["k"] for p in r["progressive"]["points"]] == [1, 2, 4, 8, 16]
    assert r["saebench"]["frac_alive"] == pytest.approx(1 - r["activity"]["dead_frac"])
    assert r["saebench"]["freq_over_1_percent"] == r["activity"]["dense_1pct_frac"]
    assert j["flags"]["tokens"] == 2048 and out["meta"]["weights"] == "EMA"
    # the same held-out windows as train.py's summary (--eval_tokens 2048): the same numbers
    metrics = gpt.load_checkpoint(tiny_sae_ckpt)["metrics"]
    assert r["reconstruction"]["fvu"] == pytest.approx(metrics["fvu"], rel=1e-4)
    assert r["downstream"]["delta_ce"] == pytest.approx(metrics["delta_ce"], rel=1e-3, abs=1e-5)
    for png in ("eval_firing_rates.png", "eval_progressive.png"):
        with open(os.path.join(d, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_batchtopk_matryoshka_sae_is_evaluated_at_its_threshold(tiny_batchtopk_ckpt, capsys):
    """Every section runs on a Matryoshka BatchTopK SAE, on its JumpReLU code: the L0 it
    reaches is reported, the same numbers as train.py's held-out summary, and progressive
    recovery is centred on that L0."""
    out = evals.main([tiny_batchtopk_ckpt, *SMALL])
    text = capsys.readouterr().out
    assert "BatchTopK k 4, evaluated as JumpReLU at" in text and "Matryoshka prefixes 32, 64" in text
    r = out["results"]
    assert set(r) == set(evals.SECTIONS)
    metrics = gpt.load_checkpoint(tiny_batchtopk_ckpt)["metrics"]
    assert r["reconstruction"]["l0"] == pytest.approx(metrics["l0"], rel=1e-4) and r["reconstruction"]["l0"] != 4
    assert r["reconstruction"]["fvu"] == pytest.approx(metrics["fvu"], rel=1e-4)
    assert r["progressive"]["k"] == round(r["reconstruction"]["l0"])
    sae, model, _, subject, val_ids = evals.load(tiny_batchtopk_ckpt)
    data = evals.heldout(model, sae, val_ids, subject["layer"], subject["ctx_len"], False, 2048, 16)
    vals, _ = data.code()
    assert data.threshold == float(sae.threshold) and (vals[vals > 0] > data.threshold).all()
    assert (data.code(16)[0] > 0).sum() > (vals > 0).sum()  # TopK(16) on the same pre-activations keeps more


def test_skip_and_raw(tiny_sae_ckpt):

    out = evals.main([tiny_sae_ckpt, *SMALL, "--raw", "--skip", "probe,n2g,ablation,progressive,activity,saebench"])
    assert set(out["results"]) == {"reconstruction", "downstream"}
    assert strict_json(os.path.join(os.path.dirname(tiny_sae_ckpt), "eval_raw.json"))["meta"]["weights"] == "raw"
    with pytest.raises(UserError, match="unknown section"):
        evals.main([tiny_sae_ckpt, "--skip", "probes"])


def test_bad_checkpoints(tiny_sae_ckpt, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(UserError, match="notes.txt"):
        evals.main([str(text)])
    pickled = tmp_path / "pickled.pt"
    torch.save({"sae_config": torch.nn.Linear(2, 2)}, pickled)  # a module: pickled code
    with pytest.raises(UserError, match="pickled.pt.*pickled Python objects"):
        evals.main([str(pickled)])
    not_sae = tmp_path / "gpt.pt"
    torch.save({"model_args": {}}, not_sae)
    with pytest.raises(UserError, match="gpt.pt: not an SAE checkpoint"):
        evals.main([str(not_sae)])
    ck = gpt.load_checkpoint(tiny_sae_ckpt)
    for change, message in ((dict(path=str(tmp_path / "gone.pt")), "gone.pt is missing; restore it, or retrain"),
                            (dict(sha256="0" * 64), "is not the one the SAE was trained on")):
        bad = tmp_path / "bad.pt"
        torch.save({**ck, "subject": {**ck["subject"], **change}}, bad)
        with pytest.raises(UserError, match=f"bad.pt: .*{message}"):
            evals.main([str(bad)])


def test_cli_error_is_one_line(tmp_path):
    missing = tmp_path / "nope.pt"
    p = subprocess.run([sys.executable, os.path.join(HERE, "evals.py"), str(missing)], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "nope.pt" in p.stderr and p.stderr.startswith("error:")
