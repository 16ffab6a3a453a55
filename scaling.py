"""
scaling.py: the scaling-law study (paper §3, §5): the sweeps that train its grids of SAEs, and
the fits, tables and plots made from them.

    python scaling.py --sweep default          # 59 SAEs + 2 small GPTs into out/sweep_default/
    python scaling.py --report                 # fits, tables and plots of out/sweep_default
    python scaling.py --sweep quick --out_dir /tmp/q --report   # both, the whole pipeline in seconds

The sweep: each grid point of SWEEPS[NAME] is an ordinary train.py run directory, named by its
settings, in OUT_DIR/sweep_NAME/ (extra subject models in OUT_DIR/sweep_NAME/gpt_*/), all runs
of a subject model reading one activation cache; rerunning the same command skips finished
runs and resumes interrupted ones. sweep.json, the manifest, lists the grid.

The report: reads the finished runs (each ckpt.pt: train.py's held-out summary, FVU in the
normalized space, L0, delta CE, dead fraction; its log.jsonl: the training curve), evaluates a
few checkpoints with evals.py (cached in their eval.json), fits the laws by least squares and
writes a PNG per section, scaling.txt (the tables, as printed) and scaling.json next to
sweep.json, in eight sections:

    1. L(n) = c + a n^-b at fixed k                                    paper §3.1.2
    2. the joint law L(n, k), tested on held-out grid points           paper §3.1.2
    3. compute: the frontier L(C), compute-optimal n, tokens to convergence   paper §3.1.1
    4. TopK vs ReLU + L1, BatchTopK and Matryoshka at matched L0       paper §5.1, since
    5. progressive recovery, TopK and Multi-TopK                       paper §5.3
    6. feature recovery along n, k and training: probe, N2G, ablation  paper §4.2-4.5
    7. dead latents with and without AuxK and the init tricks          paper §2.4
    8. subject model size                                              paper §3.2
"""

import argparse
import contextlib
import io
import json
import math
import os
import time
from dataclasses import fields

import numpy as np
import torch

import evals
import gpt
import train
from gpt import UserError

# -----------------------------------------------------------------------------
# Constants: the grids

# All runs share dead_tokens = tokens / 4 (the full run's default) and all but the token ladder
# train on `tokens` tokens: with the same seed, data order and constant learning rate, the run
# with tokens / 4 is exactly the first quarter of the full run, so the ladder doubles as the full
# run's intermediate checkpoints ("along training", paper §4). The learning rate keeps the
# paper's 1 / sqrt(n) rule times lr_scale, because the paper's constant was set for 131k-token
# batches and long runs: it leaves 512-step CPU runs far from converged, larger n the furthest,
# so that L(n) turned upward at the largest n (README, "Learning rate", has the runs that chose 4).
# Every run trains with train.py's default recipe, restarts of dead latents included, except the
# dead-latent ablations, which turn restarts off to measure the paper's remedies, AuxK and the
# init tricks, alone (and against the default).
SWEEPS = {
    # The bundled char GPT (d_model 128), sized for 2 CPU cores: 59 runs and two small GPTs (the
    # README has its wall time).
    "default": dict(
        model=gpt.DEFAULT_CKPT, cache=True, train=["--log_every", "5"], tokens=1 << 21, lr_scale=4,
        n=[256, 512, 1024, 2048, 4096, 8192], k=[8, 16, 32, 64], k_main=32, n_mid=2048,
        token_fracs=[1 / 8, 1 / 4, 1 / 2], n_relu=1024, l1=[0.1, 0.2, 0.3, 0.5], matryoshka=[64, 256],
        n_dead=[512, 2048, 8192], subjects=[dict(n_layer=2, n_head=2, n_embd=64), dict(n_layer=3, n_head=3, n_embd=96)],
        gpt=["--preset", "cpu"], n_subject=[256, 512, 1024, 2048, 4096], k_subject=16, evals=["--tokens", "16384"]),
    # The whole pipeline in seconds (the test suite runs it): three tiny GPTs trained here, the
    # largest one the subject of every other sweep.
    "quick": dict(
        model=None, cache=True, tokens=16384, lr_scale=4,
        train=["--batch_size", "512", "--ctx_len", "32", "--shuffle_tokens", "8192", "--eval_tokens", "2048",
               "--log_every", "2"],
        n=[32, 64, 128, 256], k=[2, 4, 8], k_main=4, n_mid=128, token_fracs=[1 / 4, 1 / 2], n_relu=64,
        l1=[0.3, 0.7], matryoshka=[8, 16], n_dead=[64, 256],
        subjects=[dict(n_layer=1, n_head=2, n_embd=16), dict(n_layer=2, n_head=2, n_embd=24),
                  dict(n_layer=2, n_head=2, n_embd=32)],
        gpt=["--preset", "tiny", "--iters", "150", "--eval_windows", "16"], n_subject=[32, 64, 128], k_subject=4,
        evals=["--tokens", "2048", "--probe_tokens", "256", "--n2g_latents", "8", "--n2g_examples", "8",
               "--ablation_samples", "16"]),
    # GPT-2 small, layer 8 (2/3 of the depth: the paper's site), sized for one GPU (the README
    # has its estimated time). No cache, because 33M tokens of 768-wide activations would be
    # 100 GB; generated on the fly they are the same batches.
    "gpt2": dict(
        model="gpt2", cache=False, train=["--batch_size", "32768", "--shuffle_tokens", str(1 << 21), "--log_every", "10"],
        tokens=1 << 25, lr_scale=4, n=[4096, 8192, 16384, 32768, 65536], k=[16, 32, 64, 128], k_main=32, n_mid=16384,
        token_fracs=[1 / 8, 1 / 4, 1 / 2], n_relu=16384, l1=[0.1, 0.2, 0.3, 0.5], matryoshka=[1024, 4096],
        n_dead=[4096, 16384, 65536],
        subjects=["gpt2-medium", "gpt2-large"], gpt=[], n_subject=[4096, 8192, 16384, 32768], k_subject=32,
        evals=[]),
}
SWEEP_FLAGS = {"model", "model_path", "data", "layer", "device", "dtype", "seed", "out_dir"}  # all else is the grid's

# -----------------------------------------------------------------------------
# Constants of the fits

# paper §3.1.2, GPT-4, k in 32..512 [recalled] (tags: sae.py's docstring): the
# joint law's coefficients, printed beside ours
PAPER_JOINT = {"alpha": -0.50, "beta_k": 0.26, "beta_n": -0.017, "gamma": -0.042, "zeta": -1.32, "eta": -0.085}
JOINT_NAMES = tuple(PAPER_JOINT)
CONVERGED_EPS = 0.02  # within 2% of the final training FVU: above the smoothed curve's batch noise

# -----------------------------------------------------------------------------
# Constants of the command line: every flag's help, the subject and device ones from train.py's

HELP = {
    "sweep": "train the grid SWEEPS[NAME] into OUT_DIR/sweep_NAME, one train.py run per grid point; running it again "
             "skips finished runs and resumes interrupted ones (delete OUT_DIR/sweep_NAME to start over)",
    "report": "fit the laws of the finished runs in sweep directory DIR: tables, scaling_*.png, scaling.txt and "
              "scaling.json in DIR, evaluating some checkpoints (eval.json beside each); DIR defaults to "
              "OUT_DIR/sweep_NAME of --sweep, else OUT_DIR/sweep_default; what runs when --sweep is not given",
    "model": "the main subject model, instead of the grid's (" + train.HELP["model"] + ")",
    "model_path": train.HELP["model_path"],
    "data": train.HELP["data"],
    "layer": "the main subject's site, instead of the grid's (" + train.HELP["layer"] + ")",
    "device": train.HELP["device"] + " (training and the report's evaluations)",
    "dtype": train.HELP["dtype"],
    "seed": train.HELP["seed"],
    "out_dir": "parent directory of sweep directories (default: out)",
    "debug": "show tracebacks for user errors",
}


# -----------------------------------------------------------------------------
# Sweeps: train a grid, one train.py run per grid point


def sweep_runs(s, main_model, subjects):
    """The grid of sweep preset s -> list of run settings (dicts), the full-budget runs first so
    that the first run of each subject writes the whole activation cache."""
    T = s["tokens"]
    runs = []

    def add(model=main_model, n=s["n_mid"], k=s["k_main"], activation="topk", l1=0.0, multi=False, auxk=True,
            init=True, tokens=T, matryoshka=False, restarts=True):
        name = (f"{activation}_n{n}_k{k}" if activation != "relu" else f"relu_n{n}_l1_{l1:g}") + "_multi" * multi + \
            "_matryoshka" * matryoshka + "_noauxk" * (not auxk) + "_noinit" * (not init) + \
            "_norestarts" * (not restarts) + f"_t{tokens // 1024}k"
        r = dict(model=model, run=name, n=n, k=k, activation=activation, l1=l1, multi=multi, auxk=auxk, init=init,
                 tokens=tokens, matryoshka=matryoshka, restarts=restarts)
        if r not in runs:
            runs.append(r)
    for k in s["k"]:                    # paper §3.1: L(n) per k, and the joint law L(n, k)
        for n in s["n"]:
            add(n=n, k=k)
    for l1 in s["l1"]:                  # paper §2.2, §5.1: the ReLU + L1 baseline, matched to TopK's k ladder
        add(n=s["n_relu"], activation="relu", l1=l1)
    for k in s["k"]:                    # since the paper: BatchTopK and Matryoshka (BatchTopK) on TopK's k ladder
        for matryoshka in (False, True):
            add(n=s["n_relu"], k=k, activation="batchtopk", matryoshka=matryoshka)
    add(multi=True)                     # paper §5.3: Multi-TopK, progressive codes
    for n in s["n_dead"]:               # paper §2.4: dead latents with AuxK and the init tricks alone (no
        add(n=n, restarts=False)         # restarts), without AuxK, and without the init tricks too
        add(n=n, auxk=False, restarts=False)
        add(n=n, auxk=False, init=False, restarts=False)
    for model in subjects:              # paper §3.2: subject model size
        for n in s["n_subject"]:
            add(model=model, n=n, k=s["k_subject"])
    for f in s["token_fracs"]:          # token budgets, the full run's intermediate checkpoints
        add(tokens=int(T * f))
    return runs


def _finished(run_dir):
    """Whether the run in run_dir trained to its end: only its last checkpoint holds metrics."""
    path = os.path.join(run_dir, "ckpt.pt")
    return os.path.isfile(path) and bool(gpt.load_checkpoint(path)["metrics"])


def subject_homes(s, root, flags, seconds):
    """The subject models of preset s other than the main one (paper §3.2: models of growing
    size), gpt.py ones pretrained here with one recipe unless done -> {model: the directory of its
    runs and activation cache}. flags: the overrides as command-line flags; seconds gets each
    pretraining's wall time."""
    homes = {}
    for spec in s["subjects"]:
        if isinstance(spec, str):  # a pretrained GPT-2 size
            homes[spec] = os.path.join(root, spec)
            continue
        home = os.path.join(root, f"gpt_L{spec['n_layer']}_d{spec['n_embd']}")
        if not os.path.isfile(os.path.join(home, "ckpt.pt")):
            t0 = time.time()
            gpt.main([*s["gpt"], "--out_dir", home, *[a for f, v in spec.items() for a in (f"--{f}", str(v))],
                      *flags(("data", "device", "seed"))])
            seconds[os.path.basename(home)] = round(time.time() - t0, 1)
        homes[os.path.join(home, "ckpt.pt")] = home
    return homes


def run_argv(s, r, home, run_dir, flags, main_model):
    """train.py's command line for grid point r of preset s, resuming it if it has a checkpoint."""
    argv = ["--model", r["model"], "--out_dir", home, "--run", r["run"], "--n_latents", str(r["n"]),
            "--tokens", str(r["tokens"]), "--dead_tokens", str(s["tokens"] // 4),
            "--lr", f"{s['lr_scale'] * train.paper_lr(r['n']):.6g}", *s["train"],
            *flags(("data", "device", "dtype", "seed"))]
    argv += ["--cache", os.path.join(home, "cache")] if s["cache"] else []
    argv += flags(("model_path", "layer")) if r["model"] == main_model else []
    argv += ["--k", str(r["k"])] if r["activation"] != "relu" else ["--l1_coef", str(r["l1"])]
    argv += ["--activation", r["activation"]]
    argv += ["--matryoshka", ",".join(map(str, s["matryoshka"]))] if r.get("matryoshka") else []
    argv += ["--multi_topk"] * r["multi"] + ["--no_auxk"] * (not r["auxk"]) + ["--no_init_tricks"] * (not r["init"])
    argv += ["--resample_every", "0"] * (not r["restarts"])  # else train.py's default: on for TopK
    if os.path.isfile(os.path.join(run_dir, "ckpt.pt")):
        argv.append("--resume")
    elif os.path.exists(run_dir):
        argv.append("--overwrite")  # stopped before its first checkpoint
    return argv


def sweep(name, out_dir="out", overrides=None):
    """Train the grid SWEEPS[name] into OUT_DIR/sweep_NAME/, one train.py run per grid point,
    sequentially: finished runs are skipped and interrupted ones resumed, so running the same
    command again continues a stopped sweep. overrides: TrainConfig fields from SWEEP_FLAGS
    (model: the main subject; model_path and layer apply to it alone). Writes sweep.json, the
    manifest that the report (scaling) reads; returns it."""
    s, overrides = SWEEPS[name], dict(overrides or {})
    flags = lambda names: [a for f in names if f in overrides for a in (f"--{f}", str(overrides[f]))]
    root = os.path.join(out_dir, f"sweep_{name}")
    os.makedirs(root, exist_ok=True)
    manifest_path = os.path.join(root, "sweep.json")
    old = json.load(open(manifest_path)) if os.path.isfile(manifest_path) else {}
    seconds = old.get("seconds", {})  # wall time of each run and subject model, summed over restarts
    homes = subject_homes(s, root, flags, seconds)  # subject model -> the directory of its runs and cache
    main_model = overrides.get("model") or s["model"] or list(homes)[-1]
    homes[main_model] = root
    runs = sweep_runs(s, main_model, list(homes))
    for r in runs:
        r["dir"] = os.path.relpath(os.path.join(homes[r["model"]], r["run"]), root)
    manifest = {"name": name, "preset": s, "main": main_model, "subjects": list(homes), "runs": runs,
                "seconds": seconds}

    def save():
        with open(manifest_path + ".tmp", "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(manifest_path + ".tmp", manifest_path)
    save()
    for i, r in enumerate(runs):
        home, run_dir = homes[r["model"]], os.path.join(root, r["dir"])
        if _finished(run_dir):
            print(f"[{i + 1}/{len(runs)}] {r['dir']}: done, skipped")
            continue
        argv = run_argv(s, r, home, run_dir, flags, main_model)
        print(f"[{i + 1}/{len(runs)}] {r['dir']}")
        t0 = time.time()
        train.main(argv)
        seconds[r["dir"]] = round(seconds.get(r["dir"], 0) + time.time() - t0, 1)
        save()
    print(f"sweep {name}: {len(runs)} runs in {root}, {sum(seconds.values()) / 60:.1f} min of training in all; "
          f"fit and plot them: python scaling.py --report {root}")
    return manifest


# -----------------------------------------------------------------------------
# Fits of the laws: least squares on log L


def least_squares(residuals, p0, iters=500):
    """Levenberg-Marquardt: the p minimizing sum(residuals(p)^2), from p0, in float64 with the
    Jacobian from autograd. The damping falls after a step that lowers the cost and rises after
    one that does not. -> (p as a numpy array, cost)."""
    p = torch.as_tensor(np.asarray(p0, dtype=np.float64))
    r = residuals(p)
    cost, lam = float(r @ r), 1e-3
    for _ in range(iters):
        J = torch.autograd.functional.jacobian(residuals, p)
        A, g = J.T @ J, J.T @ r
        step = torch.linalg.lstsq(A + lam * torch.diag(A.diagonal().clamp_min(1e-12)), -g[:, None]).solution[:, 0]
        r_new = residuals(p + step)
        new = float(r_new @ r_new)
        if math.isfinite(new) and new < cost:
            done = cost - new <= 1e-13 * cost
            p, r, cost, lam = p + step, r_new, new, max(lam / 3, 1e-12)
            if done:
                break
        else:
            lam *= 4
            if lam > 1e10:
                break
    return p.numpy(), cost


def power_law(x, fit):
    """c + a x^-b for a fit_power_law result."""
    return fit["c"] + fit["a"] * np.asarray(x, dtype=np.float64) ** -fit["b"]


def plot_power_law(ax, pts, fit, label):
    """Points (n, L) as dots and, when fitted, their c + a n^-b curve in the same color."""
    line = ax.plot(*zip(*pts), "o", label=label)[0]
    if fit:
        xs = np.geomspace(pts[0][0], pts[-1][0], 50)
        ax.plot(xs, power_law(xs, fit), "-", color=line.get_color(), alpha=0.6)


def fit_power_law(x, y):
    """paper §3.1: y = c + a x^-b, with a, c >= 0 (log-parameterized; c is the irreducible
    loss) and b free, least squares on log y: relative errors, so points orders of magnitude
    apart weigh alike. x is divided by its geometric mean inside (conditioning); the best of a
    few starts is kept. -> {a, b, c, rmse_log}."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x0 = math.exp(np.log(x).mean())
    xs, ly = torch.from_numpy(x / x0), torch.from_numpy(np.log(y))
    res = lambda p: torch.log(p[0].exp() + p[1].exp() * xs ** -p[2]) - ly
    best = None
    for b0 in (0.1, 0.3, 1.0):
        for c_frac in (1e-3, 0.5, 0.9):
            c0 = c_frac * y.min()
            a0 = math.exp(np.mean(np.log(np.maximum(y - c0, 1e-3 * y.min())) + b0 * np.log(x / x0)))
            p, cost = least_squares(res, [math.log(c0), math.log(a0), b0])
            if best is None or cost < best[1]:
                best = p, cost
    (lc, la, b), cost = best
    return {"a": math.exp(la) * x0 ** b, "b": float(b), "c": math.exp(lc), "rmse_log": math.sqrt(cost / len(x))}


def fit_power(x, y):
    """y = a x^e, a straight line in log-log (no offset). -> {a, e}."""
    e, la = np.polyfit(np.log(x), np.log(y), 1)
    return {"a": float(math.exp(la)), "e": float(e)}


def joint_law(n, k, p):
    """paper §3.1.2: L(n, k) = exp(alpha + beta_k log k + beta_n log n + gamma log k log n)
    + exp(zeta + eta log k); p in JOINT_NAMES order; numpy or torch."""
    lib = torch if isinstance(p, torch.Tensor) else np
    lk, ln = lib.log(k), lib.log(n)
    return lib.exp(p[0] + p[1] * lk + p[2] * ln + p[3] * lk * ln) + lib.exp(p[4] + p[5] * lk)


def fit_joint_law(n, k, L):
    """Least squares on log L of joint_law. Starts: for an irreducible part c = f * min(L), the
    first term's four coefficients by linear regression of log(L - c), zeta = log c, eta = 0;
    the best final fit is kept. -> {name: value, ..., rmse_log}."""
    n, k, L = (np.asarray(v, dtype=np.float64) for v in (n, k, L))
    nt, kt, lL = torch.from_numpy(n), torch.from_numpy(k), torch.from_numpy(np.log(L))
    res = lambda p: torch.log(joint_law(nt, kt, p)) - lL
    X = np.stack([np.ones_like(n), np.log(k), np.log(n), np.log(k) * np.log(n)], 1)
    best = None
    for f in (1e-3, 0.3, 0.6, 0.9):
        c = f * L.min()
        first = np.linalg.lstsq(X, np.log(L - c), rcond=None)[0]
        p, cost = least_squares(res, [*first, math.log(c), 0.0])
        if best is None or cost < best[1]:
            best = p, cost
    return {**dict(zip(JOINT_NAMES, map(float, best[0]))), "rmse_log": math.sqrt(best[1] / len(L))}


def flops_per_token(n, d, k):
    """Training FLOPs per token of this project's TopK SAE (sae.py's sparse path): the dense
    encoder matmul, 2 n d, plus 8 k d for the sparse rest (decoder forward 2 k d, decoder weight
    and code gradients 4 k d, encoder weight gradient 2 k d); k -> 4k for Multi-TopK. Left out:
    AuxK (at most 8 k_aux d, only while latents are dead) and the per-step Adam and EMA updates
    (O(n d) per batch of thousands of tokens, against the encoder's 2 n d per token)."""
    return 2 * n * d + 8 * k * d


def smooth(y, w):
    """Centered moving average of log y over w points (fewer at the ends), back in y's units."""
    ly = np.log(np.asarray(y, dtype=np.float64))
    c = np.concatenate([[0.0], np.cumsum(ly)])
    i = np.arange(len(ly))
    lo, hi = np.maximum(i - w // 2, 0), np.minimum(i + w // 2 + 1, len(ly))
    return np.exp((c[hi] - c[lo]) / (hi - lo))


def compute_frontier(curves, points=48):
    """paper §3.1.1 (after Lindsey et al.): the compute-MSE frontier. curves: [(n, C, L)], the
    loss along training of each n against training compute C (increasing arrays). At
    log-spaced C, each curve that has started offers its loss there (log-log interpolation of
    its running minimum) or, past its end, its final loss ("stale": a longer run might do
    better); the frontier is the lowest offer, n_opt its n. -> (C, L, n_opt, stale) arrays."""
    curves = [(n, Cs, np.minimum.accumulate(Ls)) for n, Cs, Ls in curves]
    out = []
    for C in np.geomspace(min(c[1][0] for c in curves), max(c[1][-1] for c in curves), points):
        offers = [(math.exp(np.interp(math.log(C), np.log(Cs), np.log(Ls))), n, C > Cs[-1])
                  for n, Cs, Ls in curves if Cs[0] <= C]
        if len(offers) >= 2:
            out.append((C, *min(offers)))
    return tuple(np.array(v, dtype=np.float64) for v in zip(*out)) if out else (np.zeros(0),) * 4


def fit_frontier(C, L, n_opt, stale, ladder):
    """L(C) = c + a C^-b over the frontier points that are not stale (paper Fig. 1 left);
    n_opt = A C^e over those whose n_opt is also inside the ladder (at its ends the optimum may
    lie beyond it). -> {L, n_opt}, each None when too few points."""
    live = stale == 0
    inner = live & (n_opt > min(ladder)) & (n_opt < max(ladder))
    return {"L": {**fit_power_law(C[live], L[live]), "points": int(live.sum())} if live.sum() >= 3 else None,
            "n_opt": {**fit_power(C[inner], n_opt[inner]), "points": int(inner.sum())}
            if len(set(n_opt[inner])) >= 2 else None}


def tokens_to_convergence(tokens, loss, eps=CONVERGED_EPS, w=7):
    """Tokens until the smoothed training loss first comes within eps of its final value, and
    whether the run converged at all: its last quarter improved by less than eps (a run still
    improving gives only a lower bound). -> (tokens, converged)."""
    s = smooth(loss, w)
    return float(tokens[np.argmax(s <= (1 + eps) * s[-1])]), bool(s[int(0.75 * (len(s) - 1))] <= (1 + eps) * s[-1])


def at_matched_l0(l0s, ys, l0, log_y=True):
    """TopK's ys over its k ladder (L0 = k) at L0 = l0, interpolated in log L0 (and log y when
    log_y; delta CE can be <= 0); None outside the ladder."""
    order = np.argsort(l0s)
    x, y = np.log(np.asarray(l0s, dtype=np.float64)[order]), np.asarray(ys, dtype=np.float64)[order]
    if l0 <= 0 or not x[0] <= math.log(l0) <= x[-1]:  # l0 = 0: a collapsed ReLU SAE
        return None
    return float(np.exp(np.interp(math.log(l0), x, np.log(y))) if log_y else np.interp(math.log(l0), x, y))


# -----------------------------------------------------------------------------
# Reading a sweep: its finished runs, and evals.py's results on some of them


def load_sweep(root):
    """sweep.json and the runs that finished: settings, d_model, held-out summary `m` (train.py),
    training curve (tokens, FVU) from log.jsonl."""
    path = os.path.join(root, "sweep.json")
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: --report takes a sweep directory written by python scaling.py --sweep NAME")
    manifest = json.load(open(path))
    runs = []
    for r in manifest["runs"]:
        ckpt = os.path.join(root, r["dir"], "ckpt.pt")
        ck = gpt.load_checkpoint(ckpt) if os.path.isfile(ckpt) else {}
        if not ck.get("metrics"):
            continue
        log = [json.loads(line) for line in open(os.path.join(root, r["dir"], "log.jsonl"))]
        runs.append({**r, "path": ckpt, "d": ck["subject"]["d_model"], "m": ck["metrics"],
                     "dead_tokens": ck["train_config"]["dead_tokens"],
                     "curve": (np.array([x["tokens"] for x in log], dtype=np.float64), np.array([x["fvu"] for x in log]))})
    print(f"{root}: {len(runs)} of {len(manifest['runs'])} runs finished")
    return manifest, runs


def pick(runs, **want):
    """The runs whose settings have every given value."""
    return [r for r in runs if all(r.get(key, False) == v for key, v in want.items())]  # a key new since: False


def eval_cached(path, flags, device):
    """evals.py on one checkpoint, quietly; reuses its eval.json when newer than the checkpoint
    and made with the same flags."""
    args = vars(evals.build_parser().parse_args([path, *flags, "--device", device]))
    want = {f: v for f, v in args.items() if f not in ("path", "device", "debug")}
    out = os.path.join(os.path.dirname(path), "eval.json")
    if os.path.isfile(out) and os.path.getmtime(out) >= os.path.getmtime(path):
        old = json.load(open(out))
        if {f: old["flags"].get(f) for f in want} == want:
            return old
    t = time.time()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        res = evals.main([path, *flags, "--device", device])
    print(f"  evaluated {path} ({time.time() - t:.0f} s)")
    return res


# -----------------------------------------------------------------------------
# The report, section by section: each prints its table, saves its PNG and returns its part of
# scaling.json


class Study:
    """A sweep's manifest and finished runs (load_sweep), and the subsets the sections share."""

    def __init__(self, manifest, runs):
        self.manifest, self.runs, self.s = manifest, runs, manifest["preset"]
        self.main, self.T, self.k_main, self.n_mid = manifest["main"], self.s["tokens"], self.s["k_main"], self.s["n_mid"]
        # the main subject's TopK runs in the default recipe, and those of the full budget (a manifest
        # older than restarts has no "restarts" key: its runs were its recipe then)
        self.base = [r for r in pick(runs, model=self.main, activation="topk", multi=False, auxk=True, init=True)
                     if r.get("restarts", True)]
        self.full = pick(self.base, tokens=self.T)
        self.ks, self.ns = sorted({r["k"] for r in self.full}), sorted({r["n"] for r in self.full})
        self.fvu_at = {(r["n"], r["k"]): r["m"]["fvu"] for r in self.full}
        self.ladder = [r for r in self.full if r["k"] == self.k_main]  # the n ladder at k_main
        self.ladder_tok = sorted(pick(self.base, n=self.n_mid, k=self.k_main), key=lambda r: r["tokens"])
        self.multi = pick(runs, model=self.main, activation="topk", multi=True, n=self.n_mid, k=self.k_main,
                          tokens=self.T)
        # section 4's methods at n_relu, each sorted by its ladder (k; ReLU: L1 coefficient)
        at = dict(model=self.main, n=self.s["n_relu"], tokens=self.T)
        self.methods = {name: sorted(rs, key=lambda r: r["k"] if r["activation"] != "relu" else -r["l1"]) for name, rs in (
            ("TopK", pick(self.full, n=self.s["n_relu"])), ("ReLU + L1", pick(runs, activation="relu", **at)),
            ("BatchTopK", pick(runs, activation="batchtopk", matryoshka=False, **at)),
            ("Matryoshka", pick(runs, activation="batchtopk", matryoshka=True, **at)))}


class Report:
    """The text and the PNGs of the report: say() prints a line and keeps it for scaling.txt,
    save() writes a figure as ROOT/scaling_NAME.png."""

    def __init__(self, root):
        import matplotlib
        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
        self.root, self.plt, self.lines, self.plots = root, plt, [], []

    def say(self, text=""):
        self.lines.append(text)
        print(text)

    def save(self, fig, name):
        from matplotlib.ticker import NullFormatter
        for ax in fig.axes:  # label decades only: minor-tick labels of short log axes overlap
            ax.xaxis.set_minor_formatter(NullFormatter())
        self.plots.append(os.path.join(self.root, f"scaling_{name}.png"))
        fig.savefig(self.plots[-1], dpi=120, bbox_inches="tight")
        self.plt.close(fig)


def law_n(st, rep):
    """1. L(n) at fixed k (paper §3.1.2, Fig. 1 right): c + a n^-b per k."""
    ns, fvu_at = st.ns, st.fvu_at
    rep.say("\n1. L(n) = c + a n^-b per k: held-out FVU (normalized MSE) of the EMA weights")
    rep.say("    " + f"{'k':>5}" + "".join(f"{'n=' + str(n):>10}" for n in ns) + f"{'a':>10}{'b':>8}{'c':>8}{'rmse':>8}")
    out = {}
    fig, ax = rep.plt.subplots(figsize=(6, 4.5))
    for k in st.ks:
        pts = sorted((n, fvu_at[n, k]) for n in ns if (n, k) in fvu_at)
        fit = fit_power_law(*zip(*pts)) if len(pts) >= 3 else None
        out[str(k)] = {"points": pts, "fit": fit}
        rep.say(f"    {k:>5}" + "".join(f"{fvu_at.get((n, k), float('nan')):>10.4f}" for n in ns) +
                (f"{fit['a']:>10.3g}{fit['b']:>8.3f}{fit['c']:>8.4f}{fit['rmse_log']:>8.3f}" if fit else ""))
        plot_power_law(ax, pts, fit, f"k={k}")
    ax.set(xscale="log", yscale="log", xlabel="latents n", ylabel="FVU", title="L(n) at fixed k, fits c + a n^-b")
    ax.legend()
    rep.save(fig, "L_n")
    return out


def law_joint(st, rep):
    """2. The joint law L(n, k) (paper §3.1.2), fitted without the largest n of each k, which
    tests extrapolation. -> None when fewer than 6 grid points remain to fit."""
    rep.say("\n2. Joint law L(n, k) = exp(alpha + beta_k log k + beta_n log n + gamma log k log n) + exp(zeta + eta log k)")
    fvu_at = st.fvu_at
    largest = {k: max(n for n, kk in fvu_at if kk == k) for k in st.ks}
    train_pts = [(n, k, v) for (n, k), v in fvu_at.items() if n != largest[k]]
    held = [(n, k, v) for (n, k), v in fvu_at.items() if n == largest[k]]
    if len(train_pts) < 6:
        rep.say("    skipped: fewer than 6 grid points to fit")
        return None
    fit = fit_joint_law(*zip(*train_pts))
    p = np.array([fit[c] for c in JOINT_NAMES])
    err = lambda pts: np.log(np.array([joint_law(n, k, p) for n, k, _ in pts])) - np.log([v for _, _, v in pts])
    gof = {"fit_points": len(train_pts), "heldout_points": len(held),
           "rmse_log_fit": float(np.sqrt(np.mean(err(train_pts) ** 2))),
           "rmse_log_heldout": float(np.sqrt(np.mean(err(held) ** 2))) if held else None,
           "max_rel_err_heldout": float(np.max(np.abs(np.expm1(-err(held))))) if held else None}
    rep.say(f"    {'':8}{'ours':>10}{'paper (GPT-4)':>16}")
    for c in JOINT_NAMES:
        rep.say(f"    {c:<8}{fit[c]:>10.3f}{PAPER_JOINT[c]:>16.3f}")
    rep.say(f"    fitted on {len(train_pts)} grid points: rmse of log L {gof['rmse_log_fit']:.3f}; held out the largest n "
            f"of each k ({len(held)} points): rmse of log L {evals.fmt(gof['rmse_log_heldout'])}, worst relative error "
            f"{evals.fmt(gof['max_rel_err_heldout'])}")
    fig, ax = rep.plt.subplots(figsize=(6, 4.5))
    for k in st.ks:
        pts = sorted((n, v) for (n, kk), v in fvu_at.items() if kk == k)
        line = ax.plot(*zip(*pts), "o", label=f"k={k}")[0]
        xs = np.geomspace(st.ns[0], st.ns[-1], 50)
        ax.plot(xs, joint_law(xs, k, p), "-", color=line.get_color(), alpha=0.6)
        ax.plot(largest[k], fvu_at[largest[k], k], "s", mfc="none", ms=11, color=line.get_color())
    ax.set(xscale="log", yscale="log", xlabel="latents n", ylabel="FVU", title="joint law L(n, k) (squares: held out)")
    ax.legend()
    rep.save(fig, "joint")
    return {"fit": fit, **gof}


def frontier(st, rep):
    """3a. The compute frontier (paper §3.1.1) over the training curves of the n ladder at
    k_main, its fit L(C) and the compute-optimal n. -> (curves, (C, L, n_opt, stale), fits)."""
    curves = []
    for r in sorted(st.ladder, key=lambda r: r["n"]):
        tok, loss = r["curve"]
        curves.append((r["n"], tok * flops_per_token(r["n"], r["d"], r["k"]), smooth(loss, 9)))
    C, L, n_opt, stale = compute_frontier(curves) if len(curves) >= 2 else (np.zeros(0),) * 4
    fits = fit_frontier(C, L, n_opt, stale, [r["n"] for r in st.ladder]) if len(C) else {"L": None, "n_opt": None}
    if fits["L"]:
        rep.say(f"    frontier L(C) = {fits['L']['c']:.4f} + {fits['L']['a']:.3g} C^-{fits['L']['b']:.3f} over "
                f"{fits['L']['points']} points (paper, GPT-4, C as a fraction of its pretraining compute: "
                f"0.09 + 0.056 C^-0.084)")
    no = "not enough distinct optimal n inside the ladder"
    rep.say("    compute-optimal n: " + (f"n_opt = {fits['n_opt']['a']:.3g} C^{fits['n_opt']['e']:.3f} "
                                        f"({fits['n_opt']['points']} frontier points)" if fits["n_opt"] else no))
    rep.say(f"    {'C (FLOP)':>12}{'frontier FVU':>14}{'n_opt':>8}   (stale: the best run had ended; not fitted)")
    for i in np.unique(np.linspace(0, len(C) - 1, min(len(C), 8)).astype(int)):
        rep.say(f"    {C[i]:>12.3g}{L[i]:>14.4f}{int(n_opt[i]):>8}" + "   stale" * bool(stale[i]))
    return curves, (C, L, n_opt, stale), fits


def convergence(st, rep):
    """3b. Tokens to convergence of the n ladder at k_main against n (paper §3.1.1). -> ({n:
    (tokens, converged)}, the power-law fit over the converged runs or None)."""
    conv = {r["n"]: tokens_to_convergence(*r["curve"]) for r in st.ladder}
    done = sorted((n, t) for n, (t, ok) in conv.items() if ok)
    fit = {**fit_power(*zip(*done)), "points": len(done)} if len(done) >= 2 else None
    rep.say(f"    tokens to convergence (smoothed training FVU within {CONVERGED_EPS:.0%} of its final value; "
            f"'>' marks runs still improving):")
    rep.say("    " + "  ".join(f"n={n}: {'' if ok else '>'}{t:,.0f}" for n, (t, ok) in sorted(conv.items())))
    rep.say("    " + (f"tokens ~ n^{fit['e']:.2f} over {len(done)} converged runs (paper: n^0.6 GPT-2 small, "
                      f"n^0.65 GPT-4)" if fit else "fewer than 2 converged runs: no exponent (paper: ~n^0.6)"))
    return conv, fit


def plot_compute(rep, curves, front, fits, conv):
    """Section 3's three panels: loss against compute with the frontier, n_opt(C), and tokens to
    convergence against n."""
    C, L, n_opt, stale = front
    fig, axes = rep.plt.subplots(1, 3, figsize=(16, 4.5))
    for n, Cs, Ls in curves:
        axes[0].plot(Cs, Ls, "-", alpha=0.7, label=f"n={n}")
    if len(C):
        axes[0].plot(C, L, "k--", lw=2, label="frontier")
    if fits["L"]:
        axes[0].plot(C, power_law(C, fits["L"]), "r:", lw=2, label=f"fit, b={fits['L']['b']:.3f}")
    axes[0].set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="training FVU (smoothed)",
                title="loss vs compute, frontier L(C)")
    axes[0].legend(fontsize=7)
    live = stale == 0
    axes[1].plot(C[live], n_opt[live], "o", label="frontier")
    axes[1].plot(C[~live], n_opt[~live], "o", mfc="none", color="gray", label="stale (not fitted)")
    if fits["n_opt"]:
        axes[1].plot(C[live], fits["n_opt"]["a"] * C[live] ** fits["n_opt"]["e"], "r-",
                     label=f"C^{fits['n_opt']['e']:.2f}")
    axes[1].legend()
    axes[1].set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="compute-optimal n", title="n_opt(C)")
    for n, (t, ok) in conv.items():
        axes[2].plot(n, t, "o" if ok else "^", color="C0" if ok else "gray")
    if fits["convergence"]:
        xs = np.array(sorted(conv))
        axes[2].plot(xs, fits["convergence"]["a"] * xs ** fits["convergence"]["e"], "r-",
                     label=f"n^{fits['convergence']['e']:.2f}")
        axes[2].legend()
    axes[2].set(xscale="log", yscale="log", xlabel="latents n", ylabel="tokens to convergence",
                title="tokens to convergence (triangles: lower bounds)")
    rep.save(fig, "compute")


def compute(st, rep):
    """3. Compute (paper §3.1.1): the frontier, then tokens to convergence, in one figure."""
    rep.say(f"\n3. Compute: C = tokens x (2 n d + 8 k d) FLOPs (flops_per_token), k = {st.k_main}; "
            f"loss along training (log.jsonl)")
    curves, front, fits = frontier(st, rep)
    conv, fits["convergence"] = convergence(st, rep)
    plot_compute(rep, curves, front, fits, conv)
    C, L, n_opt, stale = front
    return {**fits, "frontier": {"C": C.tolist(), "L": L.tolist(), "n_opt": n_opt.tolist(),
                                 "stale": stale.astype(bool).tolist()},
            "convergence_tokens": {str(n): {"tokens": t, "converged": ok} for n, (t, ok) in conv.items()}}


def methods(st, rep, ev):
    """4. TopK vs ReLU + L1 (paper §5.1, Fig. 2) and TopK's successors, BatchTopK and Matryoshka
    (BatchTopK), at n = n_relu: FVU, delta CE, dead latents and probe loss (§4.2, one feature
    metric), beside TopK's at the same L0, interpolated over its k ladder in log L0."""
    rep.say(f"\n4. TopK vs ReLU + L1, BatchTopK and Matryoshka at n = {st.s['n_relu']}, by L0; in brackets "
            f"TopK's at the same L0 (interpolated over its k ladder)")
    rep.say(f"    {'':22}{'L0':>7}{'FVU':>10}{'':9}{'dCE':>10}{'':10}{'dead':>7}{'probe CE':>10}")
    keys = ("fvu", "delta_ce", "probe_ce")
    rows = {name: [{"run": r["run"], "label": f"l1 {r['l1']:g}" if r["activation"] == "relu" else f"k {r['k']}",
                    **{m: r["m"][m] for m in ("l0", "fvu", "delta_ce", "dead_frac")},
                    "probe_ce": ev[r["path"]]["probe"]["mean_latent_ce"]} for r in rs]
            for name, rs in st.methods.items()}
    ladder = rows["TopK"]
    for name, rs in rows.items():
        for m in rs:
            if name != "TopK" and len(ladder) >= 2:
                m.update({f"topk_{key}": at_matched_l0([t["l0"] for t in ladder], [t[key] for t in ladder], m["l0"],
                                                       log_y=key != "delta_ce") for key in keys})
            ref = lambda key, spec: "" if name == "TopK" else \
                f" ({'n/a' if m.get('topk_' + key) is None else format(m['topk_' + key], spec)})"
            rep.say(f"    {name + ', ' + m['label']:<22}{m['l0']:>7.1f}{m['fvu']:>10.4f}{ref('fvu', '.4f'):<9}"
                    f"{m['delta_ce']:>+10.4f}{ref('delta_ce', '+.4f'):<10}{m['dead_frac']:>7.1%}"
                    f"{m['probe_ce']:>10.4f}{ref('probe_ce', '.4f')}")
    fig, axes = rep.plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, label in zip(axes, keys, ("FVU", "delta CE (nats)", "probe CE (§4.2), lower is better")):
        for (name, rs), marker in zip(rows.items(), "os^v"):
            pts = sorted((m["l0"], m[key]) for m in rs if m["l0"] >= 1)  # not a collapsed ReLU SAE's (the table has it)
            if pts:
                ax.plot(*zip(*pts), marker + "-", label=name)
        log_y = key != "probe_ce" and all(m[key] > 0 for rs in rows.values() for m in rs)  # delta CE can be <= 0
        ax.set(xscale="log", yscale="log" if log_y else "linear", xlabel="L0", ylabel=label)
        ax.legend(fontsize=8)
    fig.suptitle(f"TopK, ReLU + L1, BatchTopK and Matryoshka at n = {st.s['n_relu']}: held-out, by L0")
    rep.save(fig, "methods")
    return rows


def evaluate(st, rep, device):
    """The evals.py results sections 4 to 6 read, of a few checkpoints (eval.json beside each).
    -> {checkpoint path: results}."""
    flags = st.s["evals"]
    todo = {r["path"]: r for r in [*st.ladder, *pick(st.full, n=st.n_mid), *st.ladder_tok, *st.multi,
                                   *(r for rs in st.methods.values() for r in rs)]}
    rep.say(f"\n(evaluating {len(todo)} checkpoints with evals.py {' '.join(flags)})")
    return {p: eval_cached(p, flags, device)["results"] for p in todo}


def progressive(st, rep, ev):
    """5. Progressive recovery (paper §5.3): FVU at test-time k' of TopK- and Multi-TopK-trained
    SAEs."""
    rep.say(f"\n5. Progressive recovery at n = {st.n_mid}, k = {st.k_main}: FVU at test-time k'")
    out = {}
    fig, ax = rep.plt.subplots(figsize=(6, 4.5))
    for name, rs in (("TopK", pick(st.full, n=st.n_mid, k=st.k_main)), ("Multi-TopK", st.multi)):
        if rs:
            pts = ev[rs[0]["path"]]["progressive"]["points"]
            out[name] = pts
            rep.say(f"    {name:<11}" + "  ".join(f"k'={p['k']}: {p['fvu']:.4f}" for p in pts))
            ax.plot([p["k"] for p in pts], [p["fvu"] for p in pts], "o-", label=name)
    ax.axvline(st.k_main, color="gray", ls=":")
    ax.set(xscale="log", yscale="log", xlabel="test-time k'", ylabel="FVU", title="progressive recovery (trained k dotted)")
    ax.legend()
    rep.save(fig, "progressive")
    return out


def feature_metrics(e):
    """An evals.py result -> the feature-recovery numbers of section 6, with their baselines."""
    return {"probe_ce": e["probe"]["mean_latent_ce"], "channel_ce": e["probe"]["mean_channel_ce"],
            "n2g_f1": e["n2g"]["median_f1"], "ablation": e["ablation"]["mean_latent"],
            "ablation_random": e["ablation"]["mean_random"]}


def features(st, rep, ev):
    """6. Feature recovery across scale (paper §4.2, §4.3, §4.5): probe loss, N2G F1 and
    ablation sparsity along n, k and training tokens, a column of panels each."""
    rep.say("\n6. Feature recovery: probe loss (lower is better), N2G F1, ablation sparsity (lower is sparser)")
    rep.say(f"    {'':22}{'probe CE':>10}{'N2G F1':>8}{'ablation':>10}   (baselines: residual channels' probe CE, "
            f"random directions' ablation)")
    out = {}
    baselines = {"probe_ce": ("channel_ce", "residual channels"), "ablation": ("ablation_random", "random directions")}
    fig, axes = rep.plt.subplots(3, 3, figsize=(14, 10), squeeze=False)
    for col, (axis, rs) in enumerate((("n", sorted(st.ladder, key=lambda r: r["n"])),
                                      ("k", sorted(pick(st.full, n=st.n_mid), key=lambda r: r["k"])),
                                      ("tokens", st.ladder_tok))):
        rows = [(r[axis], feature_metrics(ev[r["path"]])) for r in rs]
        out[axis] = rows
        for x, m in rows:
            cell = {key: evals.fmt(value) for key, value in m.items()}
            rep.say(f"    {axis + ' = ' + format(x, ','):<22}{cell['probe_ce']:>10}{cell['n2g_f1']:>8}"
                    f"{cell['ablation']:>10}   ({cell['channel_ce']}, {cell['ablation_random']})")
        for row, (key, label) in enumerate((("probe_ce", "probe CE"), ("n2g_f1", "N2G F1"), ("ablation", "ablation sparsity"))):
            ax, xs = axes[row, col], [x for x, _ in rows]
            values = lambda name: [np.nan if m[name] is None else m[name] for _, m in rows]
            ax.plot(xs, values(key), "o-", label="SAE latents")
            if key in baselines:
                ax.plot(xs, values(baselines[key][0]), "--", color="gray", label=baselines[key][1])
                ax.legend(fontsize=7)
            ax.set(xscale="log", xlabel=axis, ylabel=label)
        axes[0, col].set_title({"n": f"along n (k = {st.k_main})", "k": f"along k (n = {st.n_mid})",
                                "tokens": f"along training (n = {st.n_mid}, k = {st.k_main})"}[axis])
    rep.save(fig, "features")
    return out


def dead_latents(st, rep):
    """7. Dead latents against n: the default recipe (restarts, AuxK, init tricks), and without
    restarts, with and without AuxK and the init tricks (paper §2.4)."""
    windows = ", ".join(f"{t:,}" for t in sorted({r["dead_tokens"] for r in st.full}))
    rep.say(f"\n7. Dead latents (no fire in the last {windows} training tokens) at k = {st.k_main}")
    at = dict(model=st.main, activation="topk", multi=False, tokens=st.T, k=st.k_main, restarts=False)
    settings = (("restarts + AuxK + init", [r for r in st.full if r["k"] == st.k_main and r.get("restarts")]),
                ("AuxK + init tricks", pick(st.runs, auxk=True, init=True, **at)),
                ("no AuxK", pick(st.runs, auxk=False, init=True, **at)),
                ("no AuxK, no init tricks", pick(st.runs, auxk=False, init=False, **at)))
    rep.say(f"    {'':26}" + "".join(f"{'n=' + str(n):>10}" for n in st.s["n_dead"]))
    out = {}
    fig, ax = rep.plt.subplots(figsize=(6, 4.5))
    for name, rs in settings:
        pts = sorted((r["n"], r["m"]["dead_frac"]) for r in rs if r["n"] in st.s["n_dead"])
        out[name] = pts
        rep.say(f"    {name:<26}" + "".join(f"{dict(pts).get(n, float('nan')):>10.1%}" for n in st.s["n_dead"]))
        if pts:
            ax.plot(*zip(*pts), "o-", label=name)
    ax.set(xscale="log", xlabel="latents n", ylabel="dead fraction", title="dead latents")
    ax.legend()
    rep.save(fig, "dead")
    return out


def subjects(st, rep):
    """8. Subject model size (paper §3.2): L(n) = c + a n^-b at fixed k on each subject, by width."""
    s = st.s
    rep.say(f"\n8. Subject model size: L(n) = c + a n^-b at k = {s['k_subject']}")
    out = []
    fig, ax = rep.plt.subplots(figsize=(6, 4.5))
    subj = []
    for model in st.manifest["subjects"]:
        rs = sorted((r for r in pick(st.runs, model=model, activation="topk", multi=False, auxk=True, init=True,
                                     tokens=st.T, k=s["k_subject"]) if r["n"] in s["n_subject"]), key=lambda r: r["n"])
        if rs:
            subj.append((rs[0]["d"], model, rs))
    for d, model, rs in sorted(subj, key=lambda x: x[0]):
        pts = [(r["n"], r["m"]["fvu"]) for r in rs]
        fit = fit_power_law(*zip(*pts)) if len(pts) >= 3 else None
        name = model if model in gpt.GPT.PRETRAINED else os.path.basename(os.path.dirname(model))
        out.append({"model": model, "d_model": d, "ce_clean": rs[0]["m"]["ce_clean"], "points": pts, "fit": fit})
        rep.say(f"    {name:<12} d_model {d:>5}  CE {rs[0]['m']['ce_clean']:.3f}  "
                + "  ".join(f"n={n}: {v:.4f}" for n, v in pts) + (f"  b {fit['b']:.3f}  c {fit['c']:.4f}" if fit else ""))
        plot_power_law(ax, pts, fit, f"{name} (d={d})")
    ax.set(xscale="log", yscale="log", xlabel="latents n", ylabel="FVU", title="subject model size")
    ax.legend()
    rep.save(fig, "subjects")
    return out


def scaling(root, device="cpu"):
    """Every fit, table and plot of the study in the sweep directory root, the sections in the
    report's order. -> the scaling.json dict."""
    t0 = time.time()
    rep = Report(root)
    st = Study(*load_sweep(root))
    out = {"sweep": st.manifest["name"], "root": root}
    rep.say(f"Sweep {st.manifest['name']}: subject {st.main}, d_model {st.full[0]['d'] if st.full else '?'}, "
            f"{st.T:,} tokens per run")
    out["L_n"] = law_n(st, rep)
    out["joint"] = law_joint(st, rep)
    out["compute"] = compute(st, rep)
    ev = evaluate(st, rep, device)
    out["methods"] = methods(st, rep, ev)
    out["progressive"] = progressive(st, rep, ev)
    out["features"] = features(st, rep, ev)
    out["dead"] = dead_latents(st, rep)
    out["subjects"] = subjects(st, rep)
    wall = sum(st.manifest["seconds"].values())
    out.update(plots=rep.plots, train_seconds=wall, scaling_seconds=round(time.time() - t0, 1))
    rep.say(f"\nsweep training {wall / 60:.1f} min (sweep.json), this analysis {out['scaling_seconds'] / 60:.1f} min")
    with open(os.path.join(root, "scaling.txt"), "w") as f:
        f.write("\n".join(rep.lines) + "\n")
    with open(os.path.join(root, "scaling.json"), "w") as f:
        json.dump(evals.json_ready(out), f, indent=1, allow_nan=False)
    print(f"wrote {os.path.join(root, 'scaling.txt')}, scaling.json and {len(rep.plots)} plots: "
          + ", ".join(os.path.basename(p) for p in rep.plots))
    return out


# -----------------------------------------------------------------------------
# Command line


def build_parser():
    p = argparse.ArgumentParser(description="The scaling-law study (paper §3, §5): train a sweep's grid of SAEs "
                                            "(--sweep), and fit, tabulate and plot its laws (--report).")
    p.add_argument("--sweep", choices=sorted(SWEEPS), metavar="NAME",
                   help=HELP["sweep"] + f"; one of {', '.join(sorted(SWEEPS))}")
    p.add_argument("--report", nargs="?", const="", default=None, metavar="DIR", help=HELP["report"])
    for f in fields(train.TrainConfig):  # TrainConfig's defaults: a flag left at its default lets the grid choose
        if f.name in SWEEP_FLAGS:
            p.add_argument(f"--{f.name}", type=gpt.integer if f.type is int else f.type, default=f.default,
                           help=HELP[f.name])
    p.add_argument("--debug", action="store_true", help=HELP["debug"])
    return p


def main(argv=None):
    """--sweep NAME trains the grid; --report [DIR], or no --sweep, fits and plots a sweep
    directory. -> the manifest (sweep alone) or the scaling.json dict."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # before anything is written
        raise UserError(f"{'--sweep ' + args.sweep if args.sweep else 'scaling.py'} does not take {' '.join(unknown)}: "
                        f"the grid sets the runs' flags (edit SWEEPS in scaling.py for another) and resumes by "
                        f"itself; delete OUT_DIR/sweep_{args.sweep or 'NAME'} to start over")
    if args.sweep:
        given = {f: getattr(args, f) for f in SWEEP_FLAGS if getattr(args, f) != parser.get_default(f)}
        manifest = sweep(args.sweep, args.out_dir, given)
        if args.report is None:
            return manifest
    root = args.report or os.path.join(args.out_dir, f"sweep_{args.sweep or 'default'}")
    return scaling(root, args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


if __name__ == "__main__":
    gpt.run_cli(main)
