"""Tests for train.py: end-to-end runs on a tiny subject model, the activation stream and cache,
the checkpoint, and command-line errors."""

import json
import os
import subprocess
import sys

import pytest
import torch

import gpt
import train
from conftest import TINY_SAE_ARGS

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


def test_auxk_keeps_fewer_dead_latents(tiny_gpt_ckpt, tmp_path):
    args = ["--model", tiny_gpt_ckpt, "--out_dir", str(tmp_path), "--n_latents", "512", "--k", "4",
            "--tokens", "60000", "--batch_size", "512", "--ctx_len", "32", "--shuffle_tokens", "8192",
            "--eval_tokens", "512", "--dead_tokens", "5000", "--lr", "1e-3"]
    with_aux = train.main(args + ["--run", "aux"])["metrics"]["dead_frac"]
    without = train.main(args + ["--run", "noaux", "--no_auxk"])["metrics"]["dead_frac"]
    assert with_aux < without, (with_aux, without)


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
    (["--run", "exists"], "already exists"),
    (["--resume", "--run", "fresh"], "does not exist"),
])
def test_cli_bad_input(tiny_gpt_ckpt, tmp_path, args, message):
    (tmp_path / "out" / "exists").mkdir(parents=True)
    base = ["--model", tiny_gpt_ckpt, "--n_latents", "64", "--k", "4", "--ctx_len", "32", "--tokens", "1000"]
    r = run_train(*base, *args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_help_explains_every_flag():
    r = run_train("--help", cwd=HERE)
    assert r.returncode == 0
    for f in train.fields(train.TrainConfig):
        assert f"--{'no_auxk' if f.name == 'auxk' else f.name}" in r.stdout
