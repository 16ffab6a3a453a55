"""Tests of scaling.py, in its order: the sweep's grid, the fits (each recovers known
coefficients from synthetic noisy points of its law), the FLOPs count, and the quick study end
to end through the command line: sweep, fits, tables, plots, resumption."""

import json
import math
import os

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import gpt
import scaling
from gpt import UserError


def noisy(y, rel, seed=0):
    """y times log-normal noise of relative size rel."""
    return np.asarray(y) * np.exp(np.random.default_rng(seed).normal(0, rel, np.shape(y)))


# ---- the sweeps ---------------------------------------------------------------------------


def test_default_grid_is_59_runs_full_budget_first():
    """The README's 59 SAEs: 6 n x 4 k, 4 ReLU + L1, BatchTopK and Matryoshka on the 4 k, 1
    Multi-TopK, 3 n x 3 dead-latent ablations (the only runs without restarts), 2 extra subjects
    x 5 n (the main subject's k 16 runs are in the n x k grid already) and 3 shorter token
    budgets, which come last, so that the first run writes the whole cache."""
    s = scaling.SWEEPS["default"]
    runs = scaling.sweep_runs(s, "main", ["small", "mid", "main"])
    assert len(runs) == 6 * 4 + 4 + 2 * 4 + 1 + 3 * 3 + 2 * 5 + 3 == 59
    assert len({r["run"] + r["model"] for r in runs}) == 59
    assert sum(r["activation"] == "batchtopk" and r["matryoshka"] for r in runs) == 4
    assert sorted((r["n"], r["auxk"], r["init"]) for r in runs if not r["restarts"]) == sorted(
        (n, auxk, init) for n in s["n_dead"] for auxk, init in ((True, True), (False, True), (False, False)))
    budgets = [r["tokens"] for r in runs]
    assert budgets[:56] == [s["tokens"]] * 56 and sorted(budgets[56:]) == [s["tokens"] // 8, s["tokens"] // 4,
                                                                           s["tokens"] // 2]


# ---- the fits -----------------------------------------------------------------------------


def test_power_law_with_offset_recovers_coefficients():
    n = 2.0 ** np.arange(8, 19)
    for a, b, c in ((2.0, 0.4, 0.05), (0.5, 0.8, 0.0), (1.0, 0.2, 0.3)):
        fit = scaling.fit_power_law(n, noisy(c + a * n ** -b, 0.005))
        assert fit["b"] == pytest.approx(b, abs=0.05)
        assert fit["c"] == pytest.approx(c, abs=0.01 + 0.1 * c)
        assert np.allclose(scaling.power_law(n, fit), c + a * n ** -b, rtol=0.02)
        assert fit["rmse_log"] < 0.01


def test_joint_law_recovers_the_papers_coefficients():
    n, k = (g.ravel() for g in np.meshgrid(2.0 ** np.arange(10, 22), 2.0 ** np.arange(3, 10)))
    p = np.array([scaling.PAPER_JOINT[c] for c in scaling.JOINT_NAMES])
    L = noisy(scaling.joint_law(n, k, p), 0.002)
    held = n == n.max()  # fit without the largest n, as the report does, and predict it
    fit = scaling.fit_joint_law(n[~held], k[~held], L[~held])
    q = np.array([fit[c] for c in scaling.JOINT_NAMES])
    assert np.allclose(scaling.joint_law(n[held], k[held], q), scaling.joint_law(n[held], k[held], p), rtol=0.02)
    for name, want in scaling.PAPER_JOINT.items():
        assert fit[name] == pytest.approx(want, abs=0.05 + 0.1 * abs(want)), name


def test_flops_per_token_counts_the_matmuls_of_one_training_step():
    """n 4, d 3, k 2, counted by hand, 2 FLOPs per multiply-add: the encoder W_enc x, 4 x 3 = 12
    multiply-adds; the decoder sum_j z_j W_dec[j] over the 2 kept latents, 2 x 3 = 6; the
    backward's code gradient W_dec[j] . g, 2 x 3 = 6; decoder-row gradient z_j g, 2 x 3 = 6;
    encoder-row gradient of the kept latents dz_j x, 2 x 3 = 6. 2 x (12 + 6 + 6 + 6 + 6) = 72.
    Then torch's FLOP counter on those five products, written out for a batch."""
    assert scaling.flops_per_token(4, 3, 2) == 72
    B, n, d, k = 8, 64, 16, 4
    g = torch.Generator().manual_seed(0)
    x, W_enc, W_dec = (torch.randn(*shape, generator=g) for shape in ((B, d), (n, d), (n, d)))
    with FlopCounterMode(display=False) as counter:
        z, idx = (x @ W_enc.T).topk(k)                          # encoder, dense: (B, n)
        rows = W_dec[idx]                                        # (B, k, d), a gather: no FLOPs
        err = torch.bmm(z[:, None], rows)[:, 0] - x              # decoder, sparse; dL/dx_hat up to a factor
        dz = torch.bmm(rows, err[:, :, None])                    # code gradient (B, k, 1)
        torch.bmm(z[:, :, None], err[:, None])                   # decoder-row gradient (B, k, d)
        torch.bmm(dz, x[:, None])                                # encoder-row gradient (B, k, d)
    assert counter.get_total_flops() == B * scaling.flops_per_token(n, d, k) == B * (2 * 64 * 16 + 8 * 4 * 16)


def test_compute_frontier_recovers_the_optimal_n_exponent():
    """Curves L(n, t) = c + A n^-alpha + B t^-beta with C = 2 n t: the compute-optimal
    n grows as C^(beta / (alpha + beta)) and the frontier falls as C^(-alpha beta / (alpha + beta))."""
    alpha, beta, c = 0.6, 0.4, 0.05
    ladder = 2.0 ** np.arange(4, 16.01, 0.25)
    t = np.geomspace(1e2, 1e7, 300)
    curves = [(n, 2 * n * t, noisy(c + n ** -alpha + t ** -beta, 0.001, seed=i)) for i, n in enumerate(ladder)]
    C, L, n_opt, stale = scaling.compute_frontier(curves)
    fit = scaling.fit_frontier(C, L, n_opt, stale, ladder)
    assert fit["n_opt"]["e"] == pytest.approx(beta / (alpha + beta), abs=0.05)
    assert fit["n_opt"]["points"] >= 10
    assert fit["L"]["b"] == pytest.approx(alpha * beta / (alpha + beta), abs=0.03)
    assert fit["L"]["c"] == pytest.approx(c, abs=0.01)


def test_frontier_marks_ended_runs_stale():
    t = np.linspace(1, 100, 50)
    short, long = (1, t * 2, 1 / t), (10, np.concatenate([t, t + 100]) * 20, 0.5 / np.concatenate([t, t + 100]))
    C, L, n_opt, stale = scaling.compute_frontier([short, long])
    assert (np.diff(L) <= 1e-12).all()  # more compute never does worse
    assert stale[(C > 200) & (n_opt == 1)].all() and not stale[C <= 200].any()


def test_tokens_to_convergence_recovers_the_exponent():
    """L(t) = L_inf (1 + 2 exp(-t / tau)), tau ~ n^0.6: within 2% of the end at t = tau ln 100."""
    tokens = np.arange(1, 5001) * 200.0
    ns = 2.0 ** np.arange(8, 15)
    conv = [scaling.tokens_to_convergence(tokens, noisy(0.1 * (1 + 2 * np.exp(-tokens / (50 * n ** 0.6))), 0.002))
            for n in ns]
    assert all(ok for _, ok in conv)
    assert scaling.fit_power(ns, [t for t, _ in conv])["e"] == pytest.approx(0.6, abs=0.05)
    assert not scaling.tokens_to_convergence(tokens, tokens ** -0.3)[1]  # still improving: a lower bound only


def test_matched_l0_interpolates_in_log_space():
    l0s, fvus = [8, 16, 32, 64], [0.4, 0.2, 0.1, 0.05]
    assert scaling.at_matched_l0(l0s, fvus, 16) == pytest.approx(0.2)
    assert scaling.at_matched_l0(l0s, fvus, math.sqrt(8 * 16)) == pytest.approx(math.sqrt(0.4 * 0.2))
    assert scaling.at_matched_l0(l0s, [0.1, -0.1, 0.3, 0.5], 32 * 2 ** 0.5, log_y=False) == pytest.approx(0.4)
    assert scaling.at_matched_l0(l0s, fvus, 100) is None and scaling.at_matched_l0(l0s, fvus, 4) is None



# ---- the command line: sweep and report, end to end --------------------------------------


def test_sweep_refuses_flags_the_grid_sets(tmp_path):
    for bad in (["--k", "3"], ["--no_auxk"], ["--resume"], ["--tokens", "1000"]):
        with pytest.raises(UserError, match="--sweep quick does not take"):
            scaling.main(["--sweep", "quick", "--out_dir", str(tmp_path), *bad])
    assert not os.listdir(tmp_path)


def test_quick_study_end_to_end(tmp_path, capsys):
    """python scaling.py --sweep quick, then python scaling.py --report: every table and plot, finite
    coefficients; a second sweep trains nothing, and a run that died before its first checkpoint
    is trained again on its own."""
    manifest = scaling.main(["--sweep", "quick", "--out_dir", str(tmp_path)])
    root = tmp_path / "sweep_quick"
    assert len(manifest["runs"]) == sum(os.path.isfile(root / r["dir"] / "ckpt.pt") for r in manifest["runs"])
    out = scaling.main(["--report", str(root)])
    for name in ("L_n", "joint", "compute", "methods", "progressive", "features", "dead", "subjects"):
        assert (root / f"scaling_{name}.png").stat().st_size > 0
    saved = json.load(open(root / "scaling.json"))
    assert saved["plots"] == out["plots"] and len(saved["plots"]) == 8
    report = (root / "scaling.txt").read_text()
    for heading in ("1. L(n)", "2. Joint law", "3. Compute", "4. TopK vs ReLU + L1, BatchTopK and Matryoshka", "5. Progressive", "6. Feature",
                    "7. Dead", "8. Subject"):
        assert heading in report
    finite = lambda *xs: all(x is not None and math.isfinite(x) for x in xs)
    assert all(finite(f["fit"]["a"], f["fit"]["b"], f["fit"]["c"]) for f in saved["L_n"].values())
    assert finite(*(saved["joint"]["fit"][c] for c in scaling.JOINT_NAMES), saved["joint"]["rmse_log_heldout"])
    assert finite(saved["compute"]["L"]["b"], saved["compute"]["L"]["c"])
    assert len(saved["subjects"]) == 3 and all(finite(s["fit"]["b"]) for s in saved["subjects"])
    assert set(saved["progressive"]) == {"TopK", "Multi-TopK"} and len(saved["dead"]) == 4
    methods = saved["methods"]
    assert [len(methods[m]) for m in ("TopK", "ReLU + L1", "BatchTopK", "Matryoshka")] == [3, 2, 3, 3]
    assert all(finite(m["fvu"], m["probe_ce"]) and 0 < m["l0"] <= 8 for rs in methods.values() for m in rs)
    assert all(len(saved["features"][axis]) >= 2 for axis in ("n", "k", "tokens"))
    for r in manifest["runs"]:  # restarts exist for TopK alone
        every = gpt.load_checkpoint(root / r["dir"] / "ckpt.pt")["train_config"]["resample_every"]
        assert r["activation"] != "topk" or (every > 0) == r["restarts"]

    mtimes = {r["dir"]: os.path.getmtime(root / r["dir"] / "ckpt.pt") for r in manifest["runs"]}
    victim = manifest["runs"][3]["dir"]
    os.remove(root / victim / "ckpt.pt")
    capsys.readouterr()
    scaling.main(["--sweep", "quick", "--out_dir", str(tmp_path)])
    assert capsys.readouterr().out.count("done, skipped") == len(manifest["runs"]) - 1
    assert all(os.path.getmtime(root / d / "ckpt.pt") == t for d, t in mtimes.items() if d != victim)
    assert os.path.isfile(root / victim / "ckpt.pt")
