"""Tests for the scaling-law study: the fits recover known coefficients from synthetic noisy
points of each law (evals.py's scaling section), the sweep's bookkeeping (train.py --sweep),
and the quick study end to end: sweep, fits, tables, plots."""

import json
import math
import os

import numpy as np
import pytest
import torch

import evals
import train
from gpt import UserError


def noisy(y, rel, seed=0):
    """y times log-normal noise of relative size rel."""
    return np.asarray(y) * np.exp(np.random.default_rng(seed).normal(0, rel, np.shape(y)))


def test_power_law_with_offset_recovers_coefficients():
    n = 2.0 ** np.arange(8, 19)
    for a, b, c in ((2.0, 0.4, 0.05), (0.5, 0.8, 0.0), (1.0, 0.2, 0.3)):
        fit = evals.fit_power_law(n, noisy(c + a * n ** -b, 0.005))
        assert fit["b"] == pytest.approx(b, abs=0.05)
        assert fit["c"] == pytest.approx(c, abs=0.01 + 0.1 * c)
        assert np.allclose(evals.power_law(n, fit), c + a * n ** -b, rtol=0.02)
        assert fit["rmse_log"] < 0.01


def test_joint_law_recovers_the_papers_coefficients():
    n, k = (g.ravel() for g in np.meshgrid(2.0 ** np.arange(10, 22), 2.0 ** np.arange(3, 10)))
    p = np.array([evals.PAPER_JOINT[c] for c in evals.JOINT_NAMES])
    L = noisy(evals.joint_law(n, k, p), 0.002)
    held = n == n.max()  # fit without the largest n, as --scaling does, and predict it
    fit = evals.fit_joint_law(n[~held], k[~held], L[~held])
    q = np.array([fit[c] for c in evals.JOINT_NAMES])
    assert np.allclose(evals.joint_law(n[held], k[held], q), evals.joint_law(n[held], k[held], p), rtol=0.02)
    for name, want in evals.PAPER_JOINT.items():
        assert fit[name] == pytest.approx(want, abs=0.05 + 0.1 * abs(want)), name


def test_compute_frontier_recovers_the_optimal_n_exponent():
    """Curves L(n, t) = c + A n^-alpha + B t^-beta with C = 2 n t: the compute-optimal
    n grows as C^(beta / (alpha + beta)) and the frontier falls as C^(-alpha beta / (alpha + beta))."""
    alpha, beta, c = 0.6, 0.4, 0.05
    ladder = 2.0 ** np.arange(4, 16.01, 0.25)
    t = np.geomspace(1e2, 1e7, 300)
    curves = [(n, 2 * n * t, noisy(c + n ** -alpha + t ** -beta, 0.001, seed=i)) for i, n in enumerate(ladder)]
    C, L, n_opt, stale = evals.compute_frontier(curves)
    fit = evals.fit_frontier(C, L, n_opt, stale, ladder)
    assert fit["n_opt"]["e"] == pytest.approx(beta / (alpha + beta), abs=0.05)
    assert fit["n_opt"]["points"] >= 10
    assert fit["L"]["b"] == pytest.approx(alpha * beta / (alpha + beta), abs=0.03)
    assert fit["L"]["c"] == pytest.approx(c, abs=0.01)


def test_frontier_marks_ended_runs_stale():
    t = np.linspace(1, 100, 50)
    short, long = (1, t * 2, 1 / t), (10, np.concatenate([t, t + 100]) * 20, 0.5 / np.concatenate([t, t + 100]))
    C, L, n_opt, stale = evals.compute_frontier([short, long])
    assert (np.diff(L) <= 1e-12).all()  # more compute never does worse
    assert stale[(C > 200) & (n_opt == 1)].all() and not stale[C <= 200].any()


def test_tokens_to_convergence_recovers_the_exponent():
    """L(t) = L_inf (1 + 2 exp(-t / tau)), tau ~ n^0.6: within 2% of the end at t = tau ln 100."""
    tokens = np.arange(1, 5001) * 200.0
    ns = 2.0 ** np.arange(8, 15)
    conv = [evals.tokens_to_convergence(tokens, noisy(0.1 * (1 + 2 * np.exp(-tokens / (50 * n ** 0.6))), 0.002))
            for n in ns]
    assert all(ok for _, ok in conv)
    assert evals.fit_power(ns, [t for t, _ in conv])["e"] == pytest.approx(0.6, abs=0.05)
    assert not evals.tokens_to_convergence(tokens, tokens ** -0.3)[1]  # still improving: a lower bound only


def test_matched_l0_interpolates_in_log_space():
    l0s, fvus = [8, 16, 32, 64], [0.4, 0.2, 0.1, 0.05]
    assert evals.at_matched_l0(l0s, fvus, 16) == pytest.approx(0.2)
    assert evals.at_matched_l0(l0s, fvus, math.sqrt(8 * 16)) == pytest.approx(math.sqrt(0.4 * 0.2))
    assert evals.at_matched_l0(l0s, [0.1, -0.1, 0.3, 0.5], 32 * 2 ** 0.5, log_y=False) == pytest.approx(0.4)
    assert evals.at_matched_l0(l0s, fvus, 100) is None and evals.at_matched_l0(l0s, fvus, 4) is None


def test_flops_per_token_counts_the_dense_encoder_and_sparse_rest():
    assert evals.flops_per_token(4096, 128, 32) == 2 * 4096 * 128 + 8 * 32 * 128


def test_no_init_tricks_starts_the_encoder_independent_of_the_decoder(tiny_gpt_ckpt, tmp_path):
    """After one step the encoder is still ~ the decoder's transpose with the init tricks, and
    unrelated to it without them."""
    args = ["--model", tiny_gpt_ckpt, "--out_dir", str(tmp_path), "--n_latents", "64", "--k", "4", "--tokens", "512",
            "--batch_size", "512", "--ctx_len", "32", "--shuffle_tokens", "4096", "--eval_tokens", "512"]
    cos = {}
    for name, extra in (("tricks", []), ("none", ["--no_init_tricks"])):
        sae = train.main(args + ["--run", name, *extra])["sae"]
        cos[name] = torch.nn.functional.cosine_similarity(sae["W_enc"], sae["W_dec"], dim=1).mean().item()
    assert cos["tricks"] > 0.9 and abs(cos["none"]) < 0.3


def test_sweep_refuses_flags_the_grid_sets(tmp_path):
    for bad in (["--k", "3"], ["--no_auxk"], ["--resume"], ["--tokens", "1000"]):
        with pytest.raises(UserError, match="--sweep quick does not take"):
            train.main(["--sweep", "quick", "--out_dir", str(tmp_path), *bad])
    assert not os.listdir(tmp_path)


def test_quick_study_end_to_end(tmp_path, capsys):
    """python train.py --sweep quick, then python evals.py --scaling: every table and plot, finite
    coefficients; a second sweep trains nothing, and a run that died before its first checkpoint
    is trained again on its own."""
    manifest = train.main(["--sweep", "quick", "--out_dir", str(tmp_path)])
    root = tmp_path / "sweep_quick"
    assert len(manifest["runs"]) == sum(os.path.isfile(root / r["dir"] / "ckpt.pt") for r in manifest["runs"])
    out = evals.main([str(root), "--scaling"])
    for name in ("L_n", "joint", "compute", "topk_vs_relu", "progressive", "features", "dead", "subjects"):
        assert (root / f"scaling_{name}.png").stat().st_size > 0
    saved = json.load(open(root / "scaling.json"))
    assert saved["plots"] == out["plots"] and len(saved["plots"]) == 8
    report = (root / "scaling.txt").read_text()
    for heading in ("1. L(n)", "2. Joint law", "3. Compute", "4. TopK vs ReLU", "5. Progressive", "6. Feature",
                    "7. Dead", "8. Subject"):
        assert heading in report
    finite = lambda *xs: all(x is not None and math.isfinite(x) for x in xs)
    assert all(finite(f["fit"]["a"], f["fit"]["b"], f["fit"]["c"]) for f in saved["L_n"].values())
    assert finite(*(saved["joint"]["fit"][c] for c in evals.JOINT_NAMES), saved["joint"]["rmse_log_heldout"])
    assert finite(saved["compute"]["L"]["b"], saved["compute"]["L"]["c"])
    assert len(saved["subjects"]) == 3 and all(finite(s["fit"]["b"]) for s in saved["subjects"])
    assert set(saved["progressive"]) == {"TopK", "Multi-TopK"} and len(saved["dead"]) == 3
    assert all(len(saved["features"][axis]) >= 2 for axis in ("n", "k", "tokens"))

    mtimes = {r["dir"]: os.path.getmtime(root / r["dir"] / "ckpt.pt") for r in manifest["runs"]}
    victim = manifest["runs"][3]["dir"]
    os.remove(root / victim / "ckpt.pt")
    capsys.readouterr()
    train.main(["--sweep", "quick", "--out_dir", str(tmp_path)])
    assert capsys.readouterr().out.count("done, skipped") == len(manifest["runs"]) - 1
    assert all(os.path.getmtime(root / d / "ckpt.pt") == t for d, t in mtimes.items() if d != victim)
    assert os.path.isfile(root / victim / "ckpt.pt")
