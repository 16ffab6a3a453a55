"""Tests for train.py: end-to-end runs on a tiny subject model, restarts of dead latents, the
activation stream and cache, the checkpoint, and command-line errors."""

import errno
import json
import os
import subprocess
import sys
import threading

import pytest
import torch
from hypothesis import assume, given, strategies as st
from torch.nn.functional import normalize

import gpt
import train
from conftest import FEW, TINY_SAE_ARGS, assert_same_state, inputs, make, setups

HERE = os.path.dirname(os.path.abspath(__file__))


def test_end_to_end_checkpoint(tiny_sae_ckpt, tiny_gpt_ckpt):
    run_dir = os.path.dirname(tiny_sae_ckpt)
    log = [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]
    assert log[-1]["fvu"] < 0.5 * log[0]["fvu"], (log[0], log[-1])  # FVU falls well below where it started
    ck = torch.load(tiny_sae_ckpt, weights_only=True)
    assert ck["train_config"]["n_latents"] == 128 and ck["subject"]["sha256"] == gpt.file_sha256(tiny_gpt_ckpt)
    assert ck["tokens_seen"] >= 60000 and set(ck["ema"]) == set(ck["sae"])
    # the EMA weights reload and reproduce the reported held-out metrics
    sae, _ = train.load_sae(tiny_sae_ckpt, ema=True)
    model, tok, _ = gpt.load_gpt_checkpoint(tiny_gpt_ckpt)
    _, val_text = gpt.split_text(gpt.load_text())
    c = ck["train_config"]
    windows = train.heldout_windows(gpt.encode_text(val_text, tok), c["ctx_len"], c["eval_tokens"], c["include_first"])
    m = train.heldout_summary(sae, model.eval(), windows, c["layer"], c["include_first"], "cpu")
    for key in ("fvu", "l0", "delta_ce"):
        assert m[key] == pytest.approx(ck["metrics"][key], rel=1e-5, abs=1e-6)
    assert m["fvu"] < 0.5 and m["l0"] <= 4
    raw, _ = train.load_sae(tiny_sae_ckpt, ema=False)
    assert not torch.equal(raw.W_enc, sae.W_enc)


def test_auxk_leaves_fewer_latents_dead_at_a_high_learning_rate(tmp_path):
    """AuxK switches on once latents die, --no_auxk turns it off, and at 9x the paper's
    learning rate, where large updates kill latents, the run with AuxK ends with fewer dead
    ones. That is all this shows: at the paper's rate the same tiny run goes the other way
    (README, "Dead latents and AuxK", has both). The subject is an untrained 2x32 GPT, whose
    activations spread out; the trained tiny GPT's sit in a few dozen clusters, where most
    latents have nothing to fire on either way."""
    gpt.main(["--preset", "tiny", "--iters", "1", "--out_dir", str(tmp_path / "gpt"), "--eval_windows", "4"])
    args = ["--model", str(tmp_path / "gpt" / "ckpt.pt"), "--out_dir", str(tmp_path), "--n_latents", "512",
            "--k", "4", "--lr", "1e-2", "--tokens", "100000", "--batch_size", "512", "--ctx_len", "32",
            "--shuffle_tokens", "8192", "--eval_tokens", "2048", "--log_every", "10", "--resample_every", "0"]
    logs, dead = {}, {}
    for name, extra in (("aux", []), ("noaux", ["--no_auxk"])):
        dead[name] = train.main(args + ["--run", name] + extra)["metrics"]["dead_frac"]
        logs[name] = [json.loads(line) for line in open(tmp_path / name / "log.jsonl")]
    assert any(r["dead_frac"] > 0 and r["aux_loss"] > 0 for r in logs["aux"])
    assert any(r["dead_frac"] > 0 for r in logs["noaux"]) and all(r["aux_loss"] == 0 for r in logs["noaux"])
    assert dead["aux"] < dead["noaux"] - 0.02, dead


@pytest.mark.usefixtures("one_thread")
@FEW
@given(setups(), st.data())
def test_resample_starts_each_latent_on_one_badly_reconstructed_input(setup, data):
    """Each restarted latent gets its own input (drawn without replacement): its decoder row is
    that input's unit residual under the other latents' TopK code, its encoder row points at
    the input at the others' mean encoder norm, and its pre-activation there is a tenth of the
    way from the input's k-th largest pre-activation among the others to its largest. Given
    that code, as a training step has it, the restarts are the same. No other latent changes;
    at most B // 2 and n - k restart."""
    d, n, k, B, seed, scale = setup
    assume(k < n)
    sae, x = make(d, n, k, seed), inputs(B, d, seed, scale)
    x_n = sae.normalize_input(x)[0]
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:data.draw(st.integers(1, n - 1))]
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    others = torch.ones(n, dtype=torch.bool).index_fill_(0, idx[:min(len(idx), B // 2, n - k)], False)
    top = sae.preacts(x_n).detach().masked_fill(~others, float("-inf")).topk(k, dim=1)
    vals = top.values.relu()  # (B, k): the code's values are ReLU'd
    e = x_n - (torch.zeros(B, n, dtype=x_n.dtype).scatter(1, top.indices, vals) @ before["W_dec"] + before["b_pre"])
    at = vals[:, -1] + 0.1 * (vals[:, 0] - vals[:, -1])  # a tenth of the way up from the k-th
    norm = before["W_enc"][others].norm(dim=1).mean()

    twin = make(d, n, k, seed)
    train.restart_latents(twin, idx, x_n, code=(vals, x_n - e), generator=torch.Generator().manual_seed(seed))
    done = train.restart_latents(sae, idx, x_n, generator=torch.Generator().manual_seed(seed))
    for name, p in sae.named_parameters():
        torch.testing.assert_close(getattr(twin, name), p)
    assert torch.equal(done, idx[:len(done)])
    assert len(done) == min(len(idx), B // 2, n - k, int((e.norm(dim=1) > 0).sum()))
    W_enc, W_dec, b_pre = sae.W_enc.detach(), sae.W_dec.detach(), sae.b_pre.detach()
    inputs_of = (normalize(W_enc[done], dim=1) @ normalize(x_n - b_pre, dim=1).t()).argmax(1)  # (m,)
    assert len(set(inputs_of.tolist())) == len(done)  # one input each
    torch.testing.assert_close(W_dec[done], normalize(e[inputs_of], dim=1))
    torch.testing.assert_close(W_enc[done].norm(dim=1), norm.expand(len(done)))
    torch.testing.assert_close(sae.preacts(x_n).detach()[inputs_of, done], at[inputs_of])
    kept = torch.ones(n, dtype=torch.bool).index_fill_(0, done, False)
    for name in ("W_enc", "W_dec", "b_enc"):
        assert torch.equal(getattr(sae, name).detach()[kept], before[name][kept])
    assert torch.equal(b_pre, before["b_pre"])


def test_resampling_restarts_dead_latents_and_leaves_fewer_dead(tmp_path):
    """--resample_every restarts the latents that are dead (train.resample_dead), the log and the
    checkpoint count the restarts, and the run ends with fewer dead latents than the same run
    without it, at the high learning rate where latents die."""
    gpt.main(["--preset", "tiny", "--iters", "1", "--out_dir", str(tmp_path / "gpt"), "--eval_windows", "4"])
    args = ["--model", str(tmp_path / "gpt" / "ckpt.pt"), "--out_dir", str(tmp_path), "--n_latents", "512",
            "--k", "4", "--lr", "1e-2", "--tokens", "100000", "--batch_size", "512", "--ctx_len", "32",
            "--shuffle_tokens", "8192", "--eval_tokens", "2048", "--log_every", "10", "--dead_tokens", "10000"]
    dead, logs = {}, {}
    for name, extra in (("plain", ["--resample_every", "0"]), ("resampled", ["--resample_every", "2048"])):
        ck = train.main(args + ["--run", name] + extra)
        dead[name] = ck["metrics"]["dead_frac"]
        logs[name] = [json.loads(line) for line in open(tmp_path / name / "log.jsonl")]
    assert all(r["restarts"] == 0 for r in logs["plain"]) and logs["resampled"][-1]["restarts"] > 0
    assert ck["restarts"] == logs["resampled"][-1]["restarts"]
    assert dead["resampled"] < dead["plain"] - 0.02, dead


def test_batchtopk_matryoshka_run_records_its_settings_and_threshold(tiny_batchtopk_ckpt):
    """The checkpoint records the activation and the prefixes; the threshold is saved with the
    weights and their EMA; the held-out summary, taken with the JumpReLU code, keeps about k
    latents per token; the log carries the prefixes' terms in its loss."""
    ck = torch.load(tiny_batchtopk_ckpt, weights_only=True)
    assert ck["sae_config"]["activation"] == "batchtopk" and tuple(ck["sae_config"]["matryoshka"]) == (32, 64)
    assert ck["train_config"]["matryoshka"] == "32,64"
    assert 0 < ck["sae"]["threshold"] and 0 < ck["ema"]["threshold"]
    assert 3 <= ck["metrics"]["l0"] <= 5, ck["metrics"]["l0"]
    log = [json.loads(line) for line in open(os.path.join(os.path.dirname(tiny_batchtopk_ckpt), "log.jsonl"))]
    assert all(r["loss"] > 2 * r["fvu"] for r in log)  # the two inner prefixes reconstruct worse than all 128
    sae, _ = train.load_sae(tiny_batchtopk_ckpt)
    assert sae.cfg.matryoshka == (32, 64) and float(sae.threshold) == pytest.approx(float(ck["ema"]["threshold"]))


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


def test_learning_rate_schedule():
    """20 steps, warm-up over 10% (2 steps), linear decay to 0 over the last 20% (4 steps);
    without either, the paper's constant rate."""
    c = train.TrainConfig(lr=1.0, lr_warmup=0.1, lr_decay=0.2)
    assert [train.lr_at(c, s, 20) for s in range(20)] == [0.5] + [1.0] * 15 + [1.0, 0.75, 0.5, 0.25]
    assert {train.lr_at(train.TrainConfig(lr=3e-4), s, 20) for s in range(20)} == {3e-4}
    short = train.TrainConfig(lr=1.0, lr_warmup=0.5, lr_decay=0.5)  # warm-up and decay meet
    assert [train.lr_at(short, s, 4) for s in range(4)] == [0.5, 1.0, 1.0, 0.5]


def test_cache_gives_same_batches(tiny_gpt_ckpt, tmp_path):
    c = train.TrainConfig(model=tiny_gpt_ckpt, ctx_len=32, tokens=5000, batch_size=256, shuffle_tokens=1024,
                          device="cpu").resolve()
    model, _, train_ids, _, subject = train.load_subject(c)
    live = train.ActivationStream(c, model, train_ids, subject)
    c.cache = str(tmp_path / "cache")
    cached = train.ActivationStream(c, model, train_ids, subject)
    reopened = train.ActivationStream(c, model, train_ids, subject)  # reads what the first wrote
    for step in (0, 3, 4, 19):
        b = live.batch(step)
        assert b.shape == (256, 32)
        assert torch.equal(b, cached.batch(step)) and torch.equal(b, reopened.batch(step))
    assert not torch.equal(live.batch(0), live.batch(1))
    # a cache built for another setup is refused
    c.layer = 0
    with pytest.raises(gpt.UserError, match="different setup"):
        train.ActivationStream(c, model, train_ids, subject)


def run_train(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,message", [
    (["--k", "200", "--n_latents", "128"], "--k 200 is out of range"),
    (["--layer", "5"], "--layer 5 is out of range"),
    (["--model", "gpt7"], "unknown model"),
    (["--data", "nope.txt"], "no such text file"),
    (["--ctx_len", "999"], "--ctx_len 999 is longer"),
    (["--k", "0"], "--k 0: use a number in [1, "),
    (["--n_latents", "0"], "--n_latents 0: use a number in [1, "),
    (["--lr", "-1"], "--lr -1.0: use a number in [0, 1]"),  # before, a traceback from inside Adam
    (["--cache", "/proc/nope"], "--cache /proc/nope: cannot write in /proc"),
    (["--data", "empty.txt"], "empty.txt: the file is empty"),
    (["--data", "latin1.txt"], "latin1.txt: not UTF-8"),
    (["--run", "exists"], "already exists"),
    (["--matryoshka", "32,16"], "--matryoshka 32,16: use increasing positive prefix sizes"),
    (["--matryoshka", "8,x"], "--matryoshka 8,x: use increasing positive prefix sizes"),
    (["--matryoshka", "16,64"], "each inner prefix must be smaller than --n_latents (64)"),
    (["--activation", "batchtopk", "--multi_topk"], "multi_topk must be False unless activation='topk'"),
    (["--cuda_graph", "--device", "cpu"], "--cuda_graph records the step of a TopK SAE in one process on CUDA"),

    (["--resume", "--run", "fresh"], "does not exist"),
])
def test_cli_bad_input(tiny_gpt_ckpt, tmp_path, args, message):
    (tmp_path / "out" / "exists").mkdir(parents=True)
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    base = ["--model", tiny_gpt_ckpt, "--n_latents", "64", "--k", "4", "--ctx_len", "32", "--tokens", "1000"]
    r = run_train(*base, *args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert os.listdir(tmp_path / "out") == ["exists"]  # a failed start leaves nothing behind


def test_cli_help_explains_every_flag():
    r = run_train("--help", cwd=HERE)
    assert r.returncode == 0
    for f in train.fields(train.TrainConfig):
        assert f"--{'no_auxk' if f.name == 'auxk' else f.name}" in r.stdout


# --- reliability: exact resume, crashes, non-finite values ----------------------------------

RUN = ["--n_latents", "128", "--k", "4", "--tokens", "20480", "--batch_size", "512", "--ctx_len", "32",
       "--shuffle_tokens", "4096", "--eval_tokens", "512", "--ckpt_every", "2048"]  # 40 steps, a checkpoint every 4

# Runs train.py, killing itself with SIGKILL at the FAULT=step:N-th optimizer step or in the
# middle of the FAULT=write:N-th checkpoint write (a partial temporary file, no rename).
FAULTY_TRAIN = """
import os, signal, sys, torch
sys.path.insert(0, {here!r})
import gpt, sae, train
mode, n = os.environ.get("FAULT", "none:0").split(":")
count = [0]
def kill_at_n():
    count[0] += 1
    return count[0] == int(n)
if mode == "step":
    orig_step = sae.SAE.normalize_decoder
    def normalize_decoder(self):
        if kill_at_n():
            os.kill(os.getpid(), signal.SIGKILL)
        return orig_step(self)
    sae.SAE.normalize_decoder = normalize_decoder
elif mode == "write":
    orig_save = torch.save
    def save(obj, f, *a, **k):
        if kill_at_n():
            f.write(b"half a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return orig_save(obj, f, *a, **k)
    torch.save = save
gpt.run_cli(train.main)
"""


def final_state(path):
    ck = torch.load(path, weights_only=True)
    return ck["sae"], ck["ema"], ck["optimizer"]["state"], ck["tokens_since_fired"], ck["step"]


def test_resume_after_sigkill_is_bitwise_exact(tiny_gpt_ckpt, tmp_path):
    """Killed during steps and during a checkpoint write, resumed each time: the final
    parameters, EMA, Adam state and dead-latent counters equal an uninterrupted run's, with a
    learning-rate schedule and dead latents restarted along the way."""
    base = [sys.executable, "-c", FAULTY_TRAIN.format(here=HERE), "--model", tiny_gpt_ckpt,
            "--out_dir", str(tmp_path), *RUN, "--lr_warmup", "0.1", "--lr_decay", "0.3",  # lr a function of step
            "--dead_tokens", "1024", "--resample_every", "1024"]  # restarts drawn from a per-step generator

    def run(run_name, fault, *extra):
        env = dict(os.environ, FAULT=fault)
        return subprocess.run(base + ["--run", run_name, *extra], env=env, capture_output=True, text=True,
                              timeout=300, cwd=tmp_path)

    def check(r, rc):
        assert r.returncode == rc, r.stderr[-2000:]

    check(run("whole", "none:0"), 0)
    ckpt = tmp_path / "crashy" / "ckpt.pt"
    check(run("crashy", "step:7"), -9)                 # after the checkpoint at step 4
    assert torch.load(ckpt, weights_only=True)["step"] == 4
    check(run("crashy", "write:2", "--resume"), -9)    # wrote step 8, dies writing step 12
    assert torch.load(ckpt, weights_only=True)["step"] == 8  # the previous checkpoint is intact
    check(run("crashy", "step:9", "--resume"), -9)
    check(run("crashy", "none:0", "--resume"), 0)
    assert_same_state(final_state(tmp_path / "whole" / "ckpt.pt"), final_state(ckpt))
    assert torch.load(ckpt, weights_only=True)["restarts"] > 0


def test_nonfinite_activations_stop_or_skip(tiny_gpt_ckpt, tmp_path, monkeypatch):
    orig = train.ActivationStream.batch

    def batch(self, step):
        x = orig(self, step)
        return torch.full_like(x, float("nan")) if step == 5 else x
    monkeypatch.setattr(train.ActivationStream, "batch", batch)
    args = ["--model", tiny_gpt_ckpt, "--out_dir", str(tmp_path), *RUN]
    with pytest.raises(gpt.UserError, match="non-finite activations at step 5"):
        train.main(args + ["--run", "stop"])
    assert torch.load(tmp_path / "stop" / "ckpt.pt", weights_only=True)["step"] == 4  # last good checkpoint kept
    ck = train.main(args + ["--run", "skip", "--skip_nonfinite"])
    assert ck["metrics"]["skipped"] == 1 and ck["step"] == 40
    assert json.loads(open(tmp_path / "skip" / "log.jsonl").readlines()[-1])["skipped"] == 1


# --- data parallelism: torchrun, DDP --------------------------------------------------------

# 8 steps of 512 tokens, a checkpoint every 4; dead_tokens small enough for AuxK to start
DDP_RUN = ["--n_latents", "128", "--k", "4", "--ctx_len", "32", "--tokens", "4096", "--batch_size", "512",
           "--shuffle_tokens", "2048", "--eval_tokens", "512", "--dead_tokens", "1024", "--ckpt_every", "2048",
           "--log_every", "1"]

# train.py under torchrun or plain python; each rank saves its final SAE parameters to
# STATE_DIR/rank<R>.pt, and rank 1 kills itself with SIGKILL at optimizer step KILL_AT_STEP.
DDP_TRAIN = """
import os, signal, sys, torch
sys.path.insert(0, {here!r})
import gpt, sae, train
rank, kill_at, steps = os.environ.get("RANK", "0"), int(os.environ.get("KILL_AT_STEP", "0")), [0]
orig = sae.SAE.normalize_decoder
def normalize_decoder(self):
    steps[0] += 1
    if rank == "1" and steps[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return orig(self)
sae.SAE.normalize_decoder = normalize_decoder
ck = gpt.run_cli(train.main)
torch.save(ck["sae"], os.path.join(os.environ["STATE_DIR"], f"rank{{rank}}.pt"))
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_ddp_two_processes_match_one_and_resume(tiny_gpt_ckpt, tmp_path):
    """torchrun, 2 gloo processes of 256 tokens a step each, reaches the parameters of one process
    reading both data shards, 512 tokens a step, to float tolerance; the ranks stay identical,
    the logged metrics are the global batch's, and a run killed mid-way resumes."""
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_TRAIN.format(here=HERE))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(script)]

    def run(cmd, name, *extra, **env):
        (tmp_path / name).mkdir(exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS="1", STATE_DIR=str(tmp_path / name), **env)
        return subprocess.run(cmd + ["--model", tiny_gpt_ckpt, "--out_dir", str(tmp_path / name), *DDP_RUN, *extra],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    r = run([sys.executable, str(script)], "one", "--shards", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run(torchrun, "ddp", KILL_AT_STEP="6")
    ckpt = tmp_path / "ddp" / "topk_n128_k4" / "ckpt.pt"
    assert r.returncode != 0 and torch.load(ckpt, weights_only=True)["step"] == 4
    r = run(torchrun, "ddp", "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("held-out") == 1  # only rank 0 prints
    one, rank0, rank1 = (torch.load(tmp_path / d / f"rank{i}.pt") for d, i in (("one", 0), ("ddp", 0), ("ddp", 1)))
    for key in one:
        assert torch.equal(rank0[key], rank1[key]), key
        torch.testing.assert_close(rank0[key], one[key], rtol=0, atol=1e-6)
    ck = torch.load(ckpt, weights_only=True)
    assert ck["step"] == 8 and ck["train_config"]["shards"] == 2
    assert all(torch.equal(ck["sae"][k], rank0[k]) for k in rank0)
    sae, _ = train.load_sae(str(ckpt))
    assert sae.cfg.n_latents == 128
    logs = {d: {rec["step"]: rec for rec in map(json.loads, open(tmp_path / d / "topk_n128_k4" / "log.jsonl"))}
            for d in ("one", "ddp")}
    assert sorted(logs["ddp"]) == sorted(logs["one"]) == list(range(1, 9))
    for step, rec in logs["one"].items():
        for key in ("loss", "fvu", "aux_loss", "l0", "dead_frac"):
            assert logs["ddp"][step][key] == pytest.approx(rec[key], rel=1e-5, abs=1e-6), (step, key)
    assert any(rec["aux_loss"] > 0 for rec in logs["one"].values())  # AuxK ran, on the all-reduced dead mask
    assert ck["restarts"] > 0  # and restarts, drawn from the whole batch on every rank


def test_shard_and_batch_flags(tiny_gpt_ckpt, tmp_path):
    base = ["--model", tiny_gpt_ckpt, "--out_dir", str(tmp_path), "--n_latents", "64", "--k", "4"]
    with pytest.raises(gpt.UserError, match="--batch_size 1000 .* must split into 3 equal shard batches"):
        train.main(base + ["--batch_size", "1000", "--shards", "3"])
    with pytest.raises(gpt.UserError, match="--shards -1"):
        train.main(base + ["--shards", "-1"])
    # the shards are different data, and one process reading them all sees their concatenation
    c = train.TrainConfig(model=tiny_gpt_ckpt, ctx_len=32, tokens=5000, batch_size=256, shuffle_tokens=1024,
                          device="cpu", shards=2).resolve()
    model, _, train_ids, _, subject = train.load_subject(c)
    both = train.ActivationStream(c, model, train_ids, subject)
    c.cache = str(tmp_path / "cache")  # a cache per shard gives the same batches
    parts = [train.ActivationStream(c, model, train_ids, subject, shards=[r]) for r in (0, 1)]
    for step in (0, 3, 4, 19):
        assert torch.equal(both.batch(step), torch.cat([p.batch(step) for p in parts]))
    assert not torch.equal(parts[0].batch(0), parts[1].batch(0))
    assert sorted(os.listdir(c.cache)) == ["shard0of2", "shard1of2"]


# --- one writer per run, nothing left by a failed start, caches and disks that fail ---------

SMALL_RUN = ["--n_latents", "64", "--k", "4", "--tokens", "2048", "--batch_size", "512", "--ctx_len", "32",
             "--shuffle_tokens", "2048", "--eval_tokens", "512"]

# claims OUT_DIR/RUN as train.main does (argv: run_dir, resume 0/1), then dies by SIGKILL
KILLED_CLAIM = """
import os, signal, sys
sys.path.insert(0, {here!r})
import gpt
gpt.claim_run_dir(sys.argv[1], sys.argv[2] == "1", False)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_start_that_fails_before_its_first_checkpoint_leaves_nothing(tiny_gpt_ckpt, tmp_path, monkeypatch):
    """Fails at step 1 (non-finite activations): no run directory, and no out_dir it made for
    it; the same command, the fault gone, then runs without --overwrite."""
    orig = train.ActivationStream.batch
    monkeypatch.setattr(train.ActivationStream, "batch", lambda self, step: orig(self, step) * float("nan"))
    args = ["--model", tiny_gpt_ckpt, "--out_dir", str(tmp_path / "out" / "sweep"), "--run", "r", *SMALL_RUN]
    with pytest.raises(gpt.UserError, match="non-finite activations at step 0"):
        train.main(args)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(train.ActivationStream, "batch", orig)
    assert train.main(args)["step"] == 4


def test_a_killed_start_or_run_leaves_a_lock_that_blocks_nothing(tiny_gpt_ckpt, tiny_sae_ckpt, tmp_path):
    """A process killed holding a run's lock (SIGKILL: no cleanup runs) leaves the lock file;
    the OS has dropped the lock. A killed start (no checkpoint) is rerun without --overwrite;
    a killed run with a checkpoint is resumed."""
    for run, resume in (("started", "0"), ("resumable", "1")):
        run_dir = tmp_path / run
        if resume == "1":
            run_dir.mkdir()
            (run_dir / "ckpt.pt").write_bytes(open(tiny_sae_ckpt, "rb").read())  # a finished tiny run
        r = subprocess.run([sys.executable, "-c", KILLED_CLAIM.format(here=HERE), str(run_dir), resume],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == -9 and os.path.exists(run_dir / gpt.LOCK), r.stderr[-2000:]
    ck = train.main(["--model", tiny_gpt_ckpt, "--out_dir", str(tmp_path), "--run", "started", *SMALL_RUN])
    assert ck["step"] == 4
    ck = train.main(["--out_dir", str(tmp_path), "--run", "resumable", "--resume"])
    assert ck["step"] == torch.load(tiny_sae_ckpt, weights_only=True)["step"]


def test_a_run_in_use_is_refused_to_a_second_writer(tiny_sae_ckpt, tmp_path):
    run_dir = tmp_path / "busy"
    run_dir.mkdir()
    (run_dir / "ckpt.pt").write_bytes(open(tiny_sae_ckpt, "rb").read())
    lock, _ = gpt.lock_file(str(run_dir / gpt.LOCK))  # another train.py, as far as the OS can tell
    try:
        for extra in (["--resume"], ["--overwrite"], []):
            with pytest.raises(gpt.UserError, match=f"busy is in use by another train.py \\(pid {os.getpid()}\\)"):
                train.main(["--out_dir", str(tmp_path), "--run", "busy", *extra])
    finally:
        lock.close()
    assert sorted(os.listdir(run_dir)) == [gpt.LOCK, "ckpt.pt"]  # and it was left alone


def test_two_trainers_started_on_one_run_exactly_one_trains(tiny_gpt_ckpt, tmp_path):
    args = [sys.executable, os.path.join(HERE, "train.py"), "--model", tiny_gpt_ckpt, "--run", "r", *RUN]
    procs = [subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1")) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    refusal = next(err for rc, err in results if rc == 2).strip()
    # refused while the other trains, or after it has finished
    assert "\n" not in refusal and ("is in use by another train.py" in refusal or "already exists" in refusal)
    assert torch.load(tmp_path / "out" / "r" / "ckpt.pt", weights_only=True)["step"] == 40


def test_a_truncated_or_overwritten_cache_is_refused_with_the_fix(tiny_gpt_ckpt, tmp_path):
    c = train.TrainConfig(model=tiny_gpt_ckpt, ctx_len=32, tokens=5000, batch_size=256, shuffle_tokens=1024,
                          device="cpu", cache=str(tmp_path / "cache")).resolve()
    model, _, train_ids, _, subject = train.load_subject(c)
    good = train.ActivationStream(c, model, train_ids, subject)  # writes 5 chunks of 1024 rows
    data = tmp_path / "cache" / "acts.f32"
    whole = data.read_bytes()
    fix = "delete .*cache.* or pass another --cache"
    with open(data, "r+b") as f:  # truncated after it was opened: the next chunk read is short
        f.truncate(len(whole) - 100)
    with pytest.raises(gpt.UserError, match=f"chunk 4 of acts.f32 is cut short.*{fix}"):
        good.batch(19)
    with pytest.raises(gpt.UserError, match=f"acts.f32 is truncated .*{fix}"):  # found at open
        train.ActivationStream(c, model, train_ids, subject)
    data.write_bytes(whole[:2 * good.chunk_bytes + 8] + b"\0" * 4 + whole[2 * good.chunk_bytes + 12:])
    stream = train.ActivationStream(c, model, train_ids, subject)
    assert torch.equal(stream.batch(0), good.batch(0))
    with pytest.raises(gpt.UserError, match=f"chunk 2 of acts.f32 does not match its checksum.*{fix}"):
        stream.batch(8)  # chunk 2: steps 8-11
    data.write_bytes(whole)
    assert torch.equal(train.ActivationStream(c, model, train_ids, subject).batch(8), good.batch(8))


def test_a_cache_half_written_is_finished_not_read_and_a_writer_is_waited_for(tiny_gpt_ckpt, tmp_path, capsys):
    """A cache whose writer died after 2 of 5 chunks is completed by the next run; while another
    process holds the cache's lock (it is writing), a reader waits rather than read it."""
    c = train.TrainConfig(model=tiny_gpt_ckpt, ctx_len=32, tokens=5000, batch_size=256, shuffle_tokens=1024,
                          device="cpu").resolve()
    model, _, train_ids, _, subject = train.load_subject(c)
    live = train.ActivationStream(c, model, train_ids, subject)
    c.cache = str(tmp_path / "cache")
    train.ActivationStream(c, model, train_ids, subject)
    meta_path = tmp_path / "cache" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "chunks_done": 2, "crc32": meta["crc32"][:2]}))
    lock, _ = gpt.lock_file(str(tmp_path / "cache" / ".lock"))
    opened = []
    reader = threading.Thread(target=lambda: opened.append(train.ActivationStream(c, model, train_ids, subject)))
    reader.start()
    reader.join(timeout=1.0)
    assert reader.is_alive() and not opened  # waiting on the writer
    lock.close()
    reader.join(timeout=60)
    assert f"waiting for process {os.getpid()}, which is writing the activation cache" in capsys.readouterr().out
    assert json.loads(meta_path.read_text()) == meta  # chunks 2-4 rewritten, the same
    assert all(torch.equal(opened[0].batch(s), live.batch(s)) for s in (0, 8, 19))


def test_a_full_disk_stops_the_run_and_keeps_the_previous_checkpoint(tiny_gpt_ckpt, tmp_path, monkeypatch):
    """The second checkpoint write fails with ENOSPC: the run stops with the disk named, the
    step-4 checkpoint loads, and --resume continues from it."""
    real_save, writes = torch.save, [0]

    def save(obj, f, *a, **k):
        writes[0] += 1
        if writes[0] == 2:
            f.write(b"part of a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", save)
    args = ["--model", tiny_gpt_ckpt, "--out_dir", str(tmp_path), "--run", "full", *RUN, "--tokens", "6144"]
    with pytest.raises(gpt.UserError, match=f"No space left on device.*disk holding {tmp_path / 'full'}.*--resume"):
        train.main(args)
    assert sorted(os.listdir(tmp_path / "full")) == [gpt.LOCK, "ckpt.pt", "log.jsonl"]
    assert gpt.load_checkpoint(str(tmp_path / "full" / "ckpt.pt"))["step"] == 4
    assert train.main(args + ["--resume"])["step"] == 12
