"""Tests for bench.py: its timing protocol on a fake clock (known answers), and a smoke run
of the quick grid whose derived numbers are checked against the raw ones they come from."""
import json

import pytest

import bench
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


def test_bench_quick_runs(tiny_gpt_ckpt, capsys):
    bench.main(["--quick", "--json", "--profile", "--model", tiny_gpt_ckpt])
    res = json.loads(capsys.readouterr().out)
    r = res["shapes"][0]
    d, n, k, B = bench.GRIDS["quick"][0]
    assert (r["d_model"], r["n_latents"], r["k"], r["batch"], r["k_aux"]) == (d, n, k, B, d // 2)
    prof = r["profile"]
    assert set(prof["phases_ms"]) == set(bench.PHASES) and all(ms > 0 for ms in prof["phases_ms"].values())
    top = [o["ms"] for o in prof["top_ops"]]  # the costliest operators, costliest first
    assert len(top) == 12 and top == sorted(top, reverse=True)
    cuda = res["device"].startswith("cuda")
    assert res["bf16_screen"] == kernels._BF16_SCREEN
    entries = {"mm", "mm_topk", "fast", "fast0", "dense"} | (set() if cuda else {"mm_bf16"})  # mm is bf16 on CUDA
    assert set(r["ms"]) == set(r["tokens_per_s"]) == entries
    for name, ms in r["ms"].items():  # tokens/s and the ratios come from the same medians
        assert r["tokens_per_s"][name] == pytest.approx(B / (ms / 1e3))
    for key, num in (("fast_over_mm", "mm"), ("fast_over_mm_topk", "mm_topk"), ("fast_over_dense", "dense")):
        assert r[key] == pytest.approx(r["ms"][num] / r["ms"]["fast"])
    assert r["fast0_over_mm"] == pytest.approx(r["ms"]["mm"] / r["ms"]["fast0"])
    assert (r["fast_over_mm_bf16"] is None) == cuda
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


def test_bench_latent_shards_runs():
    """--latent_shards 1 2 at a tiny shape: one row per shard count, the model's state 40 n d / M,
    a step time and a peak memory each (None off Linux)."""
    res = bench.main(["--latent_shards", "1", "2", "--shapes", "16,256,4,64", "--runs", "1", "--json"])
    rows = res["latent_shards"]["rows"]
    assert [r["shards"] for r in rows] == [1, 2]
    for r in rows:
        assert r["state_gb"] * 2**30 == pytest.approx(40 * 256 * 16 / r["shards"]) and r["step_ms"] > 0
        assert r["peak_gb"] is None or r["peak_gb"] >= 0
