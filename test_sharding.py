"""Tests for sharding.py, in its order: bad --latent_shards input, the sharded initial draw
(randn_rows), end-to-end runs of 2 shards and of 2 replicas x 2 shards under torchrun against
one process, and the sharded checkpoints' exact kill-and-resume. kernels.py's merged TopK and
sharded_recon are tested in test_kernels.py."""

import json
import os
import subprocess
import sys

import pytest
import torch

import evals
import gpt
import sharding
import train
from conftest import assert_same_state

HERE = os.path.dirname(os.path.abspath(__file__))


def test_latent_shards_bad_input(tiny_gpt_ckpt, tmp_path, monkeypatch):
    """One line naming the fix: no torchrun, a shard count that does not divide the processes or
    n_latents, a ReLU SAE."""
    base = ["--model", tiny_gpt_ckpt, "--out_dir", str(tmp_path), "--n_latents", "128", "--k", "4"]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(gpt.UserError, match="--latent_shards 2 needs one process per shard: run it under torchrun"):
        train.parse(base + ["--latent_shards", "2"])
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(gpt.UserError, match="--latent_shards 3 does not divide the 4 processes"):
        train.parse(base + ["--latent_shards", "3"])
    with pytest.raises(gpt.UserError, match="--latent_shards 4 does not divide --n_latents 130"):
        train.parse(base + ["--latent_shards", "4", "--n_latents", "130"])
    for extra in (["--activation", "relu", "--l1_coef", "1e-3"], ["--activation", "batchtopk"], ["--matryoshka", "32"]):
        with pytest.raises(gpt.UserError, match="TopK SAE only"):
            train.parse(base + ["--latent_shards", "2", *extra])
    with pytest.raises(gpt.UserError, match="--latent_shards 0: use a number in"):
        train.parse(base + ["--latent_shards", "0"])
    _, c = train.parse(base + ["--latent_shards", "2"])
    assert c.shards == 2  # one data shard per replica: 4 processes / 2 shards


def test_randn_rows_are_the_full_draws_rows():
    """A shard's initial rows are the single-process SAE's, and the generator ends where it does."""
    for n, d, lo, hi in ((128, 32, 64, 128), (1000, 24, 250, 500), (37, 5, 0, 37), (300, 3, 100, 200)):
        torch.manual_seed(0)
        full, after = torch.randn(n, d), torch.randint(2**62, (1,))
        torch.manual_seed(0)
        rows = sharding.randn_rows(n, d, lo, hi, chunk=256)
        assert torch.equal(rows, full[lo:hi]) and torch.equal(torch.randint(2**62, (1,)), after)


# --- end-to-end: torchrun --latent_shards M against one process --------------------------------

# 8 steps of 512 tokens from 2 data shards (so that a 2 x 2 grid's replicas read one each), a
# checkpoint every 4; AuxK starts after 2 steps; no restarts of dead latents, which a sharded
# run does not make (the one-process reference would by default)
SHARD_RUN = ["--n_latents", "128", "--k", "4", "--ctx_len", "32", "--tokens", "4096", "--batch_size", "512",
             "--shuffle_tokens", "2048", "--eval_tokens", "512", "--dead_tokens", "1024", "--ckpt_every", "2048",
             "--log_every", "1", "--shards", "2", "--resample_every", "0"]

# train.py under torchrun or plain python, recording each training step's codes (sorted latent
# ids per token) in STATE_DIR/codes<RANK>.pt; DTYPE=float64 trains the SAE in float64; rank 1
# kills itself with SIGKILL at optimizer step KILL_AT_STEP.
SHARD_TRAIN = """
import os, signal, sys, torch
sys.path.insert(0, {here!r})
import gpt, sae, sharding, train
rank, kill_at, steps = os.environ.get("RANK", "0"), int(os.environ.get("KILL_AT_STEP", "0")), [0]
codes = []
def recording(forward):
    def wrapped(self, x, dead_mask=None, **kw):
        out = forward(self, x, dead_mask=dead_mask, **kw)
        if self.training:
            codes.append(out.idx.sort(dim=1).values)
        return out
    return wrapped
sae.SAE.forward = recording(sae.SAE.forward)
sharding.ShardedSAE.forward = recording(sharding.ShardedSAE.forward)
orig = sharding.ShardedSAE.normalize_decoder
def normalize_decoder(self):
    steps[0] += 1
    if rank == "1" and steps[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return orig(self)
sharding.ShardedSAE.normalize_decoder = normalize_decoder
if os.environ.get("DTYPE") == "float64":
    for module, name in ((train, "make_sae"), (sharding, "make_sharded_sae")):
        make = getattr(module, name)
        setattr(module, name, lambda *a, make=make: make(*a).double())
gpt.run_cli(train.main)
torch.save(codes, os.path.join(os.environ["STATE_DIR"], f"codes{{rank}}.pt"))
"""


@pytest.fixture(scope="module")
def shard_runs(tiny_gpt_ckpt, tmp_path_factory):
    """run(name, procs, *flags, **env) -> the completed process of train.py (SHARD_TRAIN) in
    tmp/<name>, plain python for procs=0, else torchrun with that many processes."""
    tmp = tmp_path_factory.mktemp("shards")
    script = tmp / "shard_train.py"
    script.write_text(SHARD_TRAIN.format(here=HERE))

    def run(name, procs, *extra, **env):
        cmd = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--standalone"]
               if procs else [sys.executable]) + [str(script)]
        (tmp / name).mkdir(exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS="1", STATE_DIR=str(tmp / name), **env)
        return subprocess.run(cmd + ["--model", tiny_gpt_ckpt, "--out_dir", str(tmp / name), *SHARD_RUN, *extra],
                              env=env, cwd=tmp, capture_output=True, text=True, timeout=300)
    run.dir = tmp
    # the run directory (torchrun's parser would take --run for its --run-path: the default name)
    run.ckpt = lambda name: next((tmp / name).glob("topk_*")) / "ckpt.pt"
    return run


def sharded_state(path):
    """A run's final checkpoint (sharded: the manifest) -> its whole SAE, EMA, dead counters."""
    ck = torch.load(path, weights_only=True)
    if "latent_shards" in ck:
        ck = sharding.load_checkpoint(str(path), ck)
    return ck


def assert_sharded_run_matches(run, one, sharded, ranks, atol):
    """Same codes at every step (rank r's are its replica's rows of the batch) and the same
    weights, EMA and dead-latent counters to atol; metrics as one process's."""
    codes = {d: [torch.load(run.dir / d / f"codes{r}.pt") for r in rs] for d, rs in ((one, [0]), (sharded, ranks))}
    assert len(codes[one][0]) == 8
    for step in range(8):
        assert torch.equal(codes[one][0][step], torch.cat([c[step] for c in codes[sharded]])), step
    a, b = (sharded_state(run.ckpt(d)) for d in (one, sharded))
    for key in ("sae", "ema"):
        for name in a[key]:
            torch.testing.assert_close(b[key][name], a[key][name], rtol=0, atol=atol)
    assert torch.equal(a["tokens_since_fired"], b["tokens_since_fired"]) and b["step"] == 8
    logs = {d: [json.loads(line) for line in open(run.ckpt(d).parent / "log.jsonl")] for d in (one, sharded)}
    assert [r["step"] for r in logs[sharded]] == list(range(1, 9))
    for x, y in zip(logs[one], logs[sharded]):
        for key in ("loss", "fvu", "aux_loss", "l0", "dead_frac"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), key
    assert any(r["aux_loss"] > 0 and r["dead_frac"] > 0 for r in logs[one])  # AuxK ran


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_latent_shards_match_one_process(shard_runs):
    """2 shards (2 processes) and 2 replicas x 2 shards (4 processes) against one process on
    the same batches: the same codes at every step and the parameters to 1e-6 after 8 steps
    with AuxK active; evals.py's loader reads the sharded checkpoint as a whole SAE."""
    for name, procs in (("one", 0), ("m2", 2), ("grid", 4)):
        r = shard_runs(name, procs, *(["--latent_shards", "2"] if procs else []))
        assert r.returncode == 0, r.stderr[-3000:]
    assert_sharded_run_matches(shard_runs, "one", "m2", [0], 1e-6)
    assert_sharded_run_matches(shard_runs, "one", "grid", [0, 2], 1e-6)
    ck_path = shard_runs.ckpt("m2")
    files = sorted(f for f in os.listdir(ck_path.parent) if ".shard" in f)
    assert files == ["ckpt.step8.shard0of2.pt", "ckpt.step8.shard1of2.pt"]  # step 4's were removed
    sae, ck = train.load_sae(str(ck_path))
    one, one_ck = train.load_sae(str(shard_runs.ckpt("one")))
    assert sae.cfg.n_latents == 128 and ck["metrics"]["fvu"] == pytest.approx(one_ck["metrics"]["fvu"], rel=1e-4)
    torch.testing.assert_close(sae.W_dec, one.W_dec, rtol=0, atol=1e-6)
    # --export (sparsify's layout) and evals.py's loader take the manifest as they take ckpt.pt
    cfg = evals.main([str(ck_path), "--export", str(shard_runs.dir / "export")])
    assert cfg["num_latents"] == 128
    loaded = evals.load(str(ck_path))[0]
    assert torch.equal(loaded.W_enc, sae.W_enc) and torch.equal(loaded.b_pre, sae.b_pre)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_latent_shards_match_one_process_in_float64_with_multi_topk(shard_runs):
    """The same in float64, with Multi-TopK and gradient clipping: to 1e-12."""
    extra = ["--multi_topk", "--grad_clip", "0.05"]
    for name, procs in (("one64", 0), ("grid64", 4)):
        r = shard_runs(name, procs, *extra, *(["--latent_shards", "2"] if procs else []), DTYPE="float64")
        assert r.returncode == 0, r.stderr[-3000:]
    assert_sharded_run_matches(shard_runs, "one64", "grid64", [0, 2], 1e-12)


# --- sharded checkpoints: kill and resume ------------------------------------------------------

@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_a_sharded_run_killed_and_resumed_is_bitwise_exact(shard_runs):
    """2 shards, rank 1 SIGKILLed at step 6 (after the step-4 checkpoint), resumed: every shard
    file's weights, EMA, Adam state and counters equal an uninterrupted run's (the first test's)."""
    if not (shard_runs.dir / "m2").exists():
        assert shard_runs("m2", 2, "--latent_shards", "2").returncode == 0
    r = shard_runs("killed", 2, "--latent_shards", "2", KILL_AT_STEP="6")
    ckpt = shard_runs.ckpt("killed")
    assert r.returncode != 0 and torch.load(ckpt, weights_only=True)["step"] == 4
    r = shard_runs("killed", 2, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    for s in range(2):
        name = f"ckpt.step8.shard{s}of2.pt"
        a, b = (torch.load(shard_runs.ckpt(d).parent / name, weights_only=True) for d in ("m2", "killed"))
        assert_same_state((a["sae"], a["ema"], a["optimizer"]["state"], a["tokens_since_fired"], a["step"]),
                          (b["sae"], b["ema"], b["optimizer"]["state"], b["tokens_since_fired"], b["step"]))
