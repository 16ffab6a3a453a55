"""Tests for bench.py: its timing protocol on a fake clock (known answers), and a smoke run
of the quick grid whose derived numbers are checked against the raw ones they come from."""
import json

import pytest
import torch

import bench
import gpt
import kernels


def test_time_all_times_each_entry_right_after_an_untimed_run_of_it(monkeypatch):
    """warmup runs of every entry first; then, per round, each entry twice in a row with the
    second run timed; then each entry twice more for its peak memory. On a clock that each
    call of entry a advances by 1 s and each call of b by 3 s (and b by 30 s in its first
    timed run), the medians are exactly 1 and 3."""
    now, calls, timed_b = [0.0], [], [0]

    def entry(name, seconds):
        def fn():
            calls.append(name)
            now[0] += seconds() if callable(seconds) else seconds
        return fn

    def b_seconds():  # an outlier in b's first timed run: the median must ignore it
        timed_b[0] += 1
        return 30.0 if timed_b[0] == 3 else 3.0

    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])
    res = bench.time_all({"a": entry("a", 1.0), "b": entry("b", b_seconds)}, "cpu", warmup=1, runs=3)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3 + ["a", "a", "b", "b"]
    assert res["a"][0] == 1.0 and res["b"][0] == 3.0


def test_bench_quick_runs(tiny_gpt_ckpt, capsys, tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--json", "--profile", "--model", tiny_gpt_ckpt, "--json_out", str(out),
                "--e2e_args=--k_aux 8"])
    res = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == res and res["train"]["argv"][-2:] == ["--k_aux", "8"]
    r = res["shapes"][0]
    d, n, k, B = bench.GRIDS["quick"][0]
    assert (r["d_model"], r["n_latents"], r["k"], r["batch"], r["k_aux"]) == (d, n, k, B, d // 2)
    prof = r["profile"]
    assert set(prof["phases_ms"]) == set(bench.PHASES) and all(ms > 0 for ms in prof["phases_ms"].values())
    top = [o["ms"] for o in prof["top_ops"]]  # the costliest operators, costliest first
    assert len(top) == 12 and top == sorted(top, reverse=True)
    cuda = res["device"].startswith("cuda")
    assert (prof["kernels_per_step"] is None) == (prof["gpu_busy"] is None) == (not cuda)
    assert res["bf16_screen"] == kernels._BF16_SCREEN
    # mm is bf16 on CUDA; the CSR backward and the CUDA graph are CUDA's alone
    entries = {"mm", "mm_topk", "fast", "fast0", "dense"} | (
        {"fast_csr", "fast_gather", "fast_graph", "fast_graph_gather"} if cuda else {"mm_bf16"})
    assert set(r["ms"]) == set(r["tokens_per_s"]) == entries and r["errors"] == {}
    assert r["micro_batch"] == B and (r["syncs_per_step"] == {}) == (not cuda)
    for name, ms in r["ms"].items():  # tokens/s and the ratios come from the same medians
        assert r["tokens_per_s"][name] == pytest.approx(B / (ms / 1e3))
    ratios = {key for key in r if "_over_" in key}
    assert ratios == {f"{a}_over_{b}" for a in entries - {"mm", "mm_topk", "mm_bf16", "dense"}
                      for b in ("mm", "mm_topk", "mm_bf16", "dense") if b in entries}
    for key in ratios:
        a, b = key.split("_over_")
        assert r[key] == pytest.approx(r["ms"][b] / r["ms"][a])
    if kernels._BF16_SCREEN and not cuda:  # the quick shape's fast steps ran the screen
        assert r["screen"]["tokens"] > 0 and 0 <= r["screen"]["past_tier_2"] <= r["screen"]["past_tier_1"] <= 1
    if r["memory_gb"] is not None:  # None off Linux
        # parameters (W_enc, W_dec, b_enc, b_pre) and Adam's two moments, plus one (B, n) of
        # pre-activations in the matmul's dtype: fp32 on CPU, bf16 on CUDA
        params = 4 * (2 * n * d + n + d)
        want = 3 * params + B * n * (2 if cuda else 4)
        assert r["memory_gb"]["budget"] * 2**30 == pytest.approx(want)
        assert r["memory_gb"]["fast_over_budget"] == pytest.approx(r["memory_gb"]["fast"] / r["memory_gb"]["budget"])
    assert res["activations"]["tokens_per_s"] > 0
    t = res["train"]
    assert 0 < t["useful_share"] <= 1 and t["tokens_per_s"] > 0
    assert t["useful_share"] == pytest.approx((t["sae_step_s"] + t["subject_forward_s"]) / t["loop_s"])


def test_a_shape_that_fails_is_reported_and_the_next_still_runs(monkeypatch, capsys):
    def bench_shape(d, n, k, B, args):
        if n == 2048:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
        if n == 1024:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        return real(d, n, k, B, args)
    real = bench.bench_shape
    monkeypatch.setattr(bench, "bench_shape", bench_shape)
    res = bench.main(["--shapes", "32,2048,8,64", "32,1024,8,64", "32,512,8,64", "--runs", "1", "--no_train",
                      "--no_dense"])
    assert res["shapes"][0]["error"] == "out of memory: CUDA out of memory. Tried to allocate 64.00 GiB"
    assert res["shapes"][1]["error"] == "RuntimeError: CUDA error: operation not permitted when stream is capturing"
    assert res["shapes"][2]["tokens_per_s"]["fast"] > 0
    out = capsys.readouterr().out
    assert "32 | 2048 | 8 | 64 | out of memory" in out and "32 | 1024 | 8 | 64 | RuntimeError" in out


def test_e2e_args_must_be_train_flags():
    with pytest.raises(gpt.UserError, match="train.py has no flag --cuda_grahp"):
        bench.main(["--quick", "--e2e_args=--cuda_grahp"])


def test_micro_batches_halve_the_batch_until_its_pre_activations_fit():
    assert bench.micro_batch(4096, 32768) == 4096  # 2^27 elements: one micro-batch
    assert bench.micro_batch(65536, 32768) == 65536  # 2^31: still one
    assert bench.micro_batch(131072, 131072) == 16384  # 2^34: eight of 2^31
    assert bench.micro_batch(6, 10, limit=20) == 3 and bench.micro_batch(3, 10, limit=20) == 3  # odd: as it is


def test_a_step_in_micro_batches_accumulates_their_weighted_gradients():
    """Two micro-batches of 32 tokens: the optimizer sees half the sum of each one's own gradient."""
    from sae import SAE, SAEConfig

    class Recorder:  # an optimizer that records the gradients it is given
        def zero_grad(self, set_to_none=True):
            sae.zero_grad(set_to_none=set_to_none)

        def step(self):
            self.seen = {name: p.grad.clone() for name, p in sae.named_parameters()}

    torch.manual_seed(0)
    sae, opt = SAE(SAEConfig(d_model=8, n_latents=64, k=4)), Recorder()
    x, dead = torch.randn(64, 8), torch.arange(64) % 5 == 0
    bench.make_step(sae, opt, None, 32, cuda=False)(dead, x=x)
    got = opt.seen
    want = {}
    for half in (x[:32], x[32:]):
        sae.zero_grad(set_to_none=True)
        sae(half, dead_mask=dead).loss.backward()
        sae.project_decoder_grad()
        for name, p in sae.named_parameters():
            want[name] = want.get(name, 0) + p.grad / 2
    for name in want:
        torch.testing.assert_close(got[name], want[name])


def test_bench_latent_shards_runs():
    """--latent_shards 1 2 at a tiny shape: one row per shard count, the model's state 40 n d / M,
    a step time and a peak memory each (None off Linux)."""
    res = bench.main(["--latent_shards", "1", "2", "--shapes", "16,256,4,64", "--runs", "1", "--json"])
    rows = res["latent_shards"]["rows"]
    assert [r["shards"] for r in rows] == [1, 2]
    for r in rows:
        assert r["state_gb"] * 2**30 == pytest.approx(40 * 256 * 16 / r["shards"]) and r["step_ms"] > 0
        assert r["peak_gb"] is None or r["peak_gb"] >= 0
