"""Tests for kernels.py, ordered like it: the fast path equals sae.py's dense reference on
every route (codes, losses, gradients), the static route that CUDA graphs and torch.compile
take among them, the two-stage TopK, the bf16 screen's error bound and exactness, the dense
(CUDA) backward under autocast, the gradient buffers kept across steps, that importing the
fast path leaves the process's warning filters alone, and latent sharding's merged TopK and
sharded reconstruction (two gloo processes against one)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import kernels
from conftest import FEW, assert_rel, grads, inputs, make, setups

pytestmark = pytest.mark.usefixtures("one_thread")


def run_path(sae, x, dead, dense):
    """One forward and backward on the fast or the dense path -> (SAEOutput, gradients)."""
    sae.zero_grad(set_to_none=True)
    out = sae(x, dead_mask=dead, dense=dense)
    out.loss.backward()
    return out, grads(sae)


# ---- sparse_recon == SAE.recon_dense ----

@FEW
@given(setups(), st.booleans(), st.sampled_from([0.0, 0.3, 1.0]))
def test_fast_path_equals_dense_reference(setup, multi_topk, dead_frac):
    d, n, k, B, seed, scale = setup
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        sae = make(d, n, k, seed, dtype, multi_topk=multi_topk, k_aux=max(1, n // 3))
        x = inputs(B, d, seed, scale, dtype)
        dead = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < dead_frac
        (fast, g_fast), (ref, g_ref) = (run_path(sae, x, dead, dense) for dense in (False, True))
        assert torch.equal(fast.idx, ref.idx) and torch.equal(fast.fired, ref.fired)
        for name in ("loss", "fvu", "aux_loss", "multi_loss", "l0", "vals", "x_hat"):
            assert_rel(getattr(fast, name).detach(), getattr(ref, name).detach(), tol)
        for name in g_ref:
            assert_rel(g_fast[name], g_ref[name], tol)


@pytest.mark.parametrize("multi_topk", [False, True])
@pytest.mark.parametrize("auxk_block_ratio", [0, 10**9])  # the AuxK code always sparse, always a block
@pytest.mark.parametrize("dead_frac", [0.05, 0.3, 1.0])  # AuxK pre-activations by a second matmul; dead first
@pytest.mark.parametrize("chunk", [1 << 22, 10_000])  # the encoder in one chunk; in chunks of 10 rows
@pytest.mark.parametrize("dense_backward", [False, True])  # the CPU's CSR kernels; CUDA's dense matmuls
@pytest.mark.parametrize("screen", [False, True])  # fp32 encoder; bf16 screen (fp32 only), with or without AMX
def test_fast_path_equals_dense_reference_on_every_route(monkeypatch, multi_topk, auxk_block_ratio, dead_frac,
                                                         chunk, dense_backward, screen):
    """Shapes large enough for the two-stage TopK (n = 1000 leaves a tail of 1000 % 16 columns)
    and for both ways of reading the dead latents' pre-activations; both backward kernels;
    the encoder in fp32 and as the bf16 screen."""
    monkeypatch.setattr(kernels, "_BF16_SCREEN", screen)
    monkeypatch.setattr(kernels, "_AUXK_BLOCK_RATIO", auxk_block_ratio)
    monkeypatch.setattr(kernels, "_CHUNK", chunk)
    monkeypatch.setattr(kernels, "_dense_backward", lambda t: dense_backward)
    d, n, k, B = 8, 1000, 3, 64
    dead = torch.rand(n, generator=torch.Generator().manual_seed(0)) < dead_frac
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        sae, x = make(d, n, k, 0, dtype, multi_topk=multi_topk, k_aux=8), inputs(B, d, 0, 1.0, dtype)
        (fast, g_fast), (ref, g_ref) = (run_path(sae, x, dead, dense) for dense in (False, True))
        assert fast.aux_loss > 0 and torch.equal(fast.idx, ref.idx) and torch.equal(fast.fired, ref.fired)
        for name in ("loss", "fvu", "aux_loss", "multi_loss", "vals", "x_hat"):
            assert_rel(getattr(fast, name).detach(), getattr(ref, name).detach(), tol)
        for name in g_ref:
            assert_rel(g_fast[name], g_ref[name], tol)


@pytest.mark.parametrize("kind", ["topk", "multi_topk", "matryoshka"])
@pytest.mark.parametrize("dead_frac", [0.0, 0.05, 0.3])  # no AuxK; AuxK as a dense block; sparse
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("chunk", [1 << 26, 100])  # the gathers in one piece; a few tokens at a time
def test_gather_backward_equals_dense_reference(monkeypatch, kind, dead_frac, static, chunk):
    """CUDA's backward by gathered rows and index_add_ (kernels._GATHER_BACKWARD), run on CPU."""
    monkeypatch.setattr(kernels, "_dense_backward", lambda t: True)
    monkeypatch.setattr(kernels, "_GATHER_BACKWARD", True)
    monkeypatch.setattr(kernels, "_GATHER_CHUNK", chunk)
    monkeypatch.setattr(kernels, "_STATIC", static)
    d, n, k, B = 8, 1000, 3, 64
    dead = torch.rand(n, generator=torch.Generator().manual_seed(0)) < dead_frac
    kw = {"multi_topk": kind == "multi_topk", "matryoshka": (100, 400) if kind == "matryoshka" else ()}
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        sae, x = make(d, n, k, 0, dtype, k_aux=8, **kw), inputs(B, d, 0, 1.0, dtype)
        (fast, g_fast), (ref, g_ref) = (run_path(sae, x, dead, dense) for dense in (False, True))
        assert (fast.aux_loss > 0) == (dead_frac > 0) and torch.equal(fast.idx, ref.idx)
        for name in ("loss", "fvu", "aux_loss", "multi_loss", "nested_loss", "vals", "x_hat"):
            assert_rel(getattr(fast, name).detach(), getattr(ref, name).detach(), tol)
        for name in g_ref:
            assert_rel(g_fast[name], g_ref[name], tol)


def dense_codes(out, n):
    """An SAEOutput's code as a dense (B, n) matrix: BatchTopK's zero padding may point
    anywhere, so codes are compared this way, not by their indices."""
    return torch.zeros(len(out.vals), n, dtype=out.vals.dtype).scatter(1, out.idx, out.vals)


@FEW
@given(setups(), st.sampled_from([("batchtopk", False), ("batchtopk", True), ("topk", True)]),
       st.sampled_from([0.0, 0.3]))
def test_fast_path_equals_dense_reference_for_batchtopk_and_matryoshka(setup, kind, dead_frac):
    d, n, k, B, seed, scale = setup
    activation, nested = kind
    matryoshka = tuple(sorted({max(1, n // 4), max(1, n // 2)} - {n})) if nested else ()
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        sae = make(d, n, k, seed, dtype, activation=activation, matryoshka=matryoshka, k_aux=max(1, n // 3))
        x = inputs(B, d, seed, scale, dtype)
        dead = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < dead_frac
        (fast, g_fast), (ref, g_ref) = (run_path(sae, x, dead, dense) for dense in (False, True))
        assert torch.equal(dense_codes(fast, n) > 0, dense_codes(ref, n) > 0) and torch.equal(fast.fired, ref.fired)
        assert_rel(dense_codes(fast, n), dense_codes(ref, n), tol)
        for name in ("loss", "fvu", "aux_loss", "nested_loss", "l0", "x_hat"):
            assert_rel(getattr(fast, name).detach(), getattr(ref, name).detach(), tol)
        for name in g_ref:
            assert_rel(g_fast[name], g_ref[name], tol)


@pytest.mark.parametrize("dense_backward", [False, True])
@pytest.mark.parametrize("screen", [False, True])
def test_batchtopk_fast_path_widens_its_candidates_until_exact(monkeypatch, dense_backward, screen):
    """A token holding more of the batch's winners than its 2k candidates: the encoder runs
    again with more, and the code is still the dense reference's, k * B non-zeros."""
    monkeypatch.setattr(kernels, "_BF16_SCREEN", screen)
    monkeypatch.setattr(kernels, "_dense_backward", lambda t: dense_backward)
    d, n, k, B = 8, 1000, 3, 64
    sae, x = make(d, n, k, 0, torch.float32, activation="batchtopk", matryoshka=(100, 400)), inputs(B, d, 0, dtype=torch.float32)
    with torch.no_grad():  # 50 latents far above the rest in every token: some token's share passes 2k
        sae.b_enc[:50] += 10.0
    (fast, g_fast), (ref, g_ref) = (run_path(sae, x, None, dense) for dense in (False, True))
    assert sae._scratch["batch_candidates"] > 2 * k and int((fast.vals > 0).sum()) == k * B
    assert_rel(dense_codes(fast, n), dense_codes(ref, n), 1e-5)
    for name in g_ref:
        assert_rel(g_fast[name], g_ref[name], 1e-5)


# ---- the static route (kernels.static_shapes: CUDA graphs, torch.compile) ----

@pytest.mark.parametrize("dead_frac", [0.0, 0.003, 0.03, 0.3, 1.0])  # none; 3, fewer than k_aux; 30; many; all
@pytest.mark.parametrize("n_cand", [None, 40, 200])  # AuxK's candidates: every latent; 40 (a block); 200 (sparse)
@pytest.mark.parametrize("kind", ["topk", "multi_topk", "matryoshka"])
@pytest.mark.parametrize("dense_backward", [False, True])
def test_static_route_equals_dense_reference(monkeypatch, dead_frac, n_cand, kind, dense_backward):
    """AuxK over a mask of the dead latents at a fixed width gives the reference's top
    min(k_aux, n_dead) code, its loss (0 with nothing dead) and gradients, while the dead latents
    fit in AuxK's candidates; past that, the reference's over the candidates' dead latents."""
    monkeypatch.setattr(kernels, "_STATIC", True)
    monkeypatch.setattr(kernels, "_dense_backward", lambda t: dense_backward)
    d, n, k, B = 8, 1000, 3, 64
    dead = torch.rand(n, generator=torch.Generator().manual_seed(0)) < dead_frac
    kw = {"multi_topk": kind == "multi_topk", "matryoshka": (100, 400) if kind == "matryoshka" else ()}
    sae, x = make(d, n, k, 0, torch.float64, k_aux=8, **kw), inputs(B, d, 0, 1.0, torch.float64)
    if n_cand is not None:
        sae._scratch["aux_candidates"] = n_cand
    fast, g_fast = run_path(sae, x, dead, False)
    if n_cand is not None and dead.sum() > n_cand:  # the candidates: the dead latents first, as the route picks them
        cand = dead.double().topk(n_cand, sorted=False).indices
        dead = torch.zeros_like(dead).index_fill_(0, cand, True) & dead
    ref, g_ref = run_path(sae, x, dead, True)
    assert (fast.aux_loss > 0) == bool(dead.any()) and torch.equal(fast.idx, ref.idx)
    assert torch.equal(fast.fired, ref.fired)
    for name in ("loss", "fvu", "aux_loss", "multi_loss", "nested_loss", "vals", "x_hat"):
        assert_rel(getattr(fast, name).detach(), getattr(ref, name).detach(), 1e-10)
    for name in g_ref:
        assert_rel(g_fast[name], g_ref[name], 1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench.py's GPU run runs it)")
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("multi_topk", [False, True])
@pytest.mark.parametrize("gather", [False, True])
def test_fast_path_equals_dense_reference_on_a_gpu(monkeypatch, static, multi_topk, gather):
    """CUDA's own kernels (its TopK stages, dense or gather backward), dynamic and static routes, in fp32."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(kernels, "_STATIC", static)
    monkeypatch.setattr(kernels, "_GATHER_BACKWARD", gather)
    d, n, k, B = 64, 4096, 8, 512
    dead = (torch.rand(n, generator=torch.Generator().manual_seed(0)) < 0.05).cuda()
    sae = make(d, n, k, 0, torch.float32, multi_topk=multi_topk, k_aux=32).cuda()
    x = inputs(B, d, 0, 1.0, torch.float32).cuda()
    (fast, g_fast), (ref, g_ref) = (run_path(sae, x, dead, dense) for dense in (False, True))
    assert fast.aux_loss > 0 and torch.equal(fast.idx, ref.idx) and torch.equal(fast.fired, ref.fired)
    for name in ("loss", "fvu", "aux_loss", "multi_loss", "vals", "x_hat"):
        assert_rel(getattr(fast, name).detach(), getattr(ref, name).detach(), 1e-4)
    for name in g_ref:
        assert_rel(g_fast[name], g_ref[name], 1e-4)


@pytest.mark.parametrize("n_dead", [0, 1, 5, 300])
def test_static_codes_have_the_same_shapes_whatever_is_dead(n_dead):
    B, d, n, k, k_aux = 16, 8, 300, 4, 8
    g = torch.Generator().manual_seed(n_dead)
    x_c, W, b = torch.randn(B, d, generator=g), torch.randn(n, d, generator=g), torch.randn(n, generator=g)
    dead = torch.zeros(n, dtype=torch.bool).index_fill_(0, torch.randperm(n, generator=g)[:n_dead], True)
    for n_cand, shape in ((n, (B, k_aux)), (20, (B, 20)), (200, (B, k_aux))):  # all; a block over 20; sparse
        vals, idx, aux_vals, aux_idx = kernels._static_codes(x_c, W, b, k, dead, k_aux, n_cand)
        assert vals.shape == idx.shape == (B, k) and aux_vals.shape == shape
        assert aux_idx.shape == (shape if n_cand != 20 else (20,))  # a block's columns: its latents
        live = ~dead[aux_idx].expand_as(aux_vals)
        assert not aux_vals[live].any() and int((aux_vals > 0).sum(1).max()) <= min(n_dead, k_aux)


def test_aux_candidates_are_twice_the_dead_within_8_k_aux_and_every_latent():
    assert kernels.aux_candidates(32768, 384, 0) == 8 * 384
    assert kernels.aux_candidates(32768, 384, 2000) == 4000
    assert kernels.aux_candidates(512, 16, 1000) == 512


def test_static_forward_traces_as_one_graph_with_no_host_sync(monkeypatch):
    """torch.compile(fullgraph=True) refuses a step that reads a value back (nonzero, a bool of
    a tensor): the check, on CPU, that a CUDA graph could capture the forward. The dynamic
    route fails it, so the test can tell them apart."""
    monkeypatch.setattr(kernels, "_dense_backward", lambda t: True)  # CUDA's backward, traced with it
    sae, x = make(8, 1000, 3, 0, torch.float32, k_aux=8), inputs(64, 8, 0, 1.0, torch.float32)
    dead = torch.rand(1000, generator=torch.Generator().manual_seed(0)) < 0.3
    step = lambda x, m: sae(x, dead_mask=m).loss
    want = step(x, dead)
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="eager")(x, dead)
    assert_rel(got.detach(), want.detach(), 1e-6)
    monkeypatch.setattr(kernels, "static_shapes", lambda t: False)
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(step, fullgraph=True, backend="eager")(x, dead)
    torch._dynamo.reset()


# ---- the two-stage TopK ----


@FEW
@given(st.integers(1, 6), st.integers(1, 300), st.integers(1, 40), st.integers(0, 2**31 - 1), st.booleans())
def test_two_stage_topk_equals_torch_topk(B, n, k, seed, ties):
    """Values exactly torch.topk's, sorted; indices point at them, distinct (they may differ
    from torch.topk's between ties). Also on a column slice, as the AuxK code uses it."""
    k = min(k, n)
    g = torch.Generator().manual_seed(seed)
    wide = (torch.randint(0, 4, (B, n + 7), generator=g).double() if ties
            else torch.randn(B, n + 7, generator=g, dtype=torch.float64))
    for x in (wide[:, 7:].contiguous(), wide[:, :n]):
        for block in (2, 3, 16):
            vals, idx = kernels.topk(x, k, block)
            assert torch.equal(vals, x.topk(k, dim=1).values)
            assert torch.equal(x.gather(1, idx), vals) and (idx.sort(1).values.diff(dim=1) > 0).all()


# ---- the bf16 screen (_screened_topk) ----

@pytest.mark.parametrize("amx, avx512_bf16, native", [
    (True, False, True), (False, True, True), (True, True, True), (False, False, False)])
def test_bf16_screen_is_chosen_by_native_bf16_matmuls(monkeypatch, amx, avx512_bf16, native):
    """AMX (Intel) or AVX512-BF16 (Intel Cooper Lake, AMD Zen 4) turn the screen on; a CPU
    with neither emulates bf16 and keeps the fp32 encoder."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert kernels._native_bf16_matmul() == native


def bf16_error_bound_holds(x, W, b):
    """Whether every exact pre-activation (float64) lies within A_b + u |pre~| of the screen's
    bf16 one; also -> the largest share of that bound an entry used."""
    x16, W16, A = kernels._bf16_operands({}, x, W, b)
    pre16 = (x16 @ W16.t()).double()
    bound = A.double().unsqueeze(1) + kernels._BF16_U * pre16.abs()
    err = (x.double() @ W.double().t() + b.double() - pre16).abs()
    return bool((err <= bound).all()), (err / bound).max().item()


@FEW
@given(st.integers(1, 32), st.integers(1, 40), st.integers(1, 200), st.integers(0, 2**31 - 1),
       st.floats(-6, 6), st.floats(-6, 6), st.floats(-6, 6))
def test_bf16_screen_error_bound_holds(B, d, n, seed, log_x, log_W, log_b):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g) * 10 ** log_x
    W = torch.randn(n, d, generator=g) * 10 ** log_W * torch.rand(n, 1, generator=g)  # rows of many norms
    b = torch.randn(n, generator=g) * 10 ** log_b
    assert bf16_error_bound_holds(x, W, b)[0]


def test_bf16_screen_error_bound_is_tight_where_rounding_aligns():
    """Each Cauchy-Schwarz term is nearly reached: a latent whose row points along the
    token's rounding residual (the ||r|| ||W|| term), and a token along a row's residual
    (the ||x|| ||R|| term). Dropping either term breaks the bound here."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, generator=g)
    r = x - x.bfloat16().float()
    W1 = F.normalize(torch.randn(8, 64, generator=g), dim=1).bfloat16().float()  # R = 0
    W1[:4] = F.normalize(r, dim=1).bfloat16().float()  # W_j ~ r_j / ||r_j||
    W2 = F.normalize(torch.randn(8, 64, generator=g), dim=1)
    R = W2 - W2.bfloat16().float()
    x2 = (3 * F.normalize(R[:4], dim=1)).bfloat16().float()  # r = 0, x ~ R_j / ||R_j||
    for xs, W in ((x, W1), (x2, W2)):
        ok, used = bf16_error_bound_holds(xs, W, torch.zeros(8))
        assert ok and used > 0.5, used


def near_duplicate_latents(groups, size, d, eps, seed):
    """W (groups * size, d): `groups` random unit directions, each repeated `size` times with
    relative perturbations eps, far below bf16's resolution for eps ~ 1e-4."""
    g = torch.Generator().manual_seed(seed)
    base = F.normalize(torch.randn(groups, d, generator=g), dim=1).repeat_interleave(size, 0)
    return base + eps * torch.randn(groups * size, d, generator=g) / d ** 0.5


@pytest.mark.parametrize("case, past_tier_1, past_tier_2", [
    ("random", None, None),     # tier 1 settles nearly every token
    ("groups of 12", ">0", 0),  # 12 near-equal latents > tier 1's 8 candidates: tier 2 settles them
    ("groups of 64", ">0", ">0"),  # more than tier 2's 32 too: the fp32 encoder decides
])
@pytest.mark.parametrize("chunk", [1 << 25, 0])  # the batch in one chunk; in chunks of d_model rows
def test_bf16_screen_returns_the_exact_top_k(monkeypatch, case, past_tier_1, past_tier_2, chunk):
    monkeypatch.setattr(kernels, "_SCREEN_CHUNK", chunk)
    B, d, k = 80, 32, 4
    g = torch.Generator().manual_seed(1)
    if case == "random":
        W = torch.randn(1024, d, generator=g)
    else:
        W = near_duplicate_latents(1024 // int(case.split()[-1]), int(case.split()[-1]), d, 1e-4, 1)
    b = 0.01 * torch.randn(len(W), generator=g)
    x = torch.randn(B, d, generator=g)
    scratch = {}
    vals, idx = kernels._screened_topk(scratch, x, W, b, k)
    exact = (x.double() @ W.double().t() + b.double()).topk(k, dim=1)
    assert torch.equal(idx, exact.indices)  # no ties: near-duplicates differ by ~1e-4, far above fp32's rounding
    torch.testing.assert_close(vals.double(), exact.values, rtol=1e-6, atol=1e-6)
    tokens, *counts = scratch["screen_counts"]
    assert tokens == B
    for count, want in zip(counts, (past_tier_1, past_tier_2)):
        assert want is None or (count > 0 if want == ">0" else count == want), counts


# ---- backward ----

@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float16, 1e-5)])
def test_dense_backward_under_autocast(monkeypatch, dtype, tol):
    """Under autocast the dense (CUDA) backward runs its matmuls in bfloat16 and agrees with the
    CSR backward to bfloat16's precision; under float16 autocast it stays in float32 (fp16
    gradients would underflow), so it agrees to float32's. Gradients come back in float32."""
    sae, x = make(16, 600, 4, 0, torch.float32, k_aux=8), inputs(256, 16, 0, 1.0, torch.float32)
    dead = torch.rand(600, generator=torch.Generator().manual_seed(0)) < 0.3
    g = {}
    for dense_backward in (False, True):
        monkeypatch.setattr(kernels, "_dense_backward", lambda t: dense_backward)
        sae.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype):  # the forward only, as train.py runs it
            out = sae(x, dead_mask=dead)
        out.loss.backward()
        g[dense_backward] = grads(sae)
    g_csr, g_dense = g[False], g[True]
    assert out.aux_loss > 0
    for name in g_csr:
        assert g_dense[name].dtype == torch.float32
        assert_rel(g_dense[name], g_csr[name], tol)
    if dtype == torch.bfloat16:  # it did run in bfloat16: apart by more than fp32 rounding
        assert (g_dense["W_enc"] - g_csr["W_enc"]).norm() > 1e-4 * g_csr["W_enc"].norm()


# ---- buffers kept across steps ----

def test_gradient_buffers_are_reused_but_never_overwrite_a_held_gradient():
    """The CPU backward writes W_enc's and W_dec's gradients into last step's memory once
    zero_grad(set_to_none=True) has dropped them, and into new memory while anything still
    holds them: a caller's reference, or .grad itself when gradients accumulate."""
    d, n, k, B = 8, 200, 3, 32
    sae, dead = make(d, n, k, 0, torch.float32, k_aux=8), torch.rand(n, generator=torch.Generator().manual_seed(0)) < 0.3
    x1, x2 = inputs(B, d, 1, dtype=torch.float32), inputs(B, d, 2, dtype=torch.float32)
    weights = (sae.W_enc, sae.W_dec)

    def backward(x, zero=True):
        if zero:
            sae.zero_grad(set_to_none=True)
        sae(x, dead_mask=dead).loss.backward()
        return [W.grad for W in weights]

    g1 = [g.clone() for g in backward(x1)]
    ptrs = [W.grad.data_ptr() for W in weights]
    g2 = [g.clone() for g in backward(x2)]
    assert [W.grad.data_ptr() for W in weights] == ptrs  # reused
    held = backward(x1)  # the caller keeps these tensors
    backward(x2)
    assert all(torch.equal(h, g) for h, g in zip(held, g1))  # not overwritten by the x2 step
    assert all(W.grad.data_ptr() != h.data_ptr() for W, h in zip(weights, held))
    backward(x1)
    acc = backward(x2, zero=False)  # accumulated over two backward passes
    for a, a1, a2 in zip(acc, g1, g2):
        assert_rel(a, a1 + a2, 1e-6)


# ---- no global side effects ----

def test_import_and_a_step_leave_warning_filters_alone_and_warn_nothing():
    """sae.py and kernels.py change no global warning state, and the CSR kernels' one-time
    'beta' warning from torch stays inside kernels.py: a fresh process with every warning
    turned into an error runs a fast training step."""
    code = """if True:
        import warnings
        import torch  # torch adds filters of its own on import
        warnings.simplefilter("error")
        before = list(warnings.filters)
        import sae
        assert warnings.filters == before, "importing sae changed the warning filters"
        s = sae.SAE(sae.SAEConfig(d_model=8, n_latents=64, k=4))
        s(torch.randn(16, 8), dead_mask=torch.ones(64, dtype=torch.bool)).loss.backward()
        assert warnings.filters == before, "a step changed the warning filters"
    """
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


# ---- latent sharding: the merged TopK and sharded_recon ----

@FEW
@given(st.integers(1, 6), st.integers(1, 5), st.integers(1, 40), st.integers(1, 60), st.integers(0, 2**31 - 1),
       st.booleans(), st.booleans())
def test_merged_shard_topk_equals_torch_topk(B, M, rows, k, seed, ties, one_shard_wins):
    """Each of M shards' local top k (kernels.topk, as the encoder takes it), merged: the values
    are torch.topk's on the concatenated pre-activations exactly, the ids point at them, and with
    distinct values the ids are torch.topk's too; with ties, equal values come lower id first.
    one_shard_wins puts every winner in one shard (more than k / M there, where a capacity
    factor would drop some). merge_topk itself: the top k by (value descending, id ascending)
    of the candidates, whatever their order, and candidate_ranks marks exactly those."""
    n = M * rows
    k = min(k, n)
    g = torch.Generator().manual_seed(seed)
    pre = (torch.randint(0, 4, (B, n), generator=g).double() if ties
           else torch.randn(B, n, generator=g, dtype=torch.float64))
    if one_shard_wins:
        pre[:, (seed % M) * rows:(seed % M + 1) * rows] += 10
    K = min(k, rows)
    local = [kernels.topk(pre[:, s * rows:(s + 1) * rows], K) for s in range(M)]
    vals = torch.cat([v for v, _ in local], 1)  # (B, M * K), in shard order as all_gather gives them
    ids = torch.cat([i + s * rows for s, (_, i) in enumerate(local)], 1)
    top_vals, top_ids, pos = kernels.merge_topk(vals, ids, k)
    ref = pre.topk(k, dim=1)
    assert torch.equal(top_vals, ref.values) and torch.equal(pre.gather(1, top_ids), top_vals)
    assert (top_ids.sort(1).values.diff(dim=1) > 0).all()
    if not ties:
        assert torch.equal(top_ids, ref.indices)
    assert ((top_vals.diff(dim=1) < 0) | (top_ids.diff(dim=1) > 0)).all()  # equal values: lower id first
    # the merge alone: order-free, and the (value desc, id asc) order of a plain sort of the pairs
    perm = torch.randperm(vals.shape[1], generator=g)
    v2, i2, pos2 = kernels.merge_topk(vals[:, perm], ids[:, perm], k)
    assert torch.equal(v2, top_vals) and torch.equal(i2, top_ids) and torch.equal(perm[pos2], pos)
    for b in range(B):
        pairs = sorted(zip((-vals[b]).tolist(), ids[b].tolist()))[:k]
        assert [i for _, i in pairs] == top_ids[b].tolist()
    rank = kernels.candidate_ranks(pos, vals.shape[1])
    assert torch.equal((rank >= 0).sum(1), torch.full((B,), k)) and torch.equal(rank.gather(1, pos),
                                                                                torch.arange(k).expand(B, k))


SHARDED_RECON = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {here!r})
import kernels, sharding
from sae import SAE, SAEConfig
rank, M = int(sys.argv[1]), 2
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank, world_size=M)
torch.set_num_threads(1)
for multi_topk, dead_ids in ((False, []), (True, [1, 2, 5, 20, 21, 30]), (False, [3, 7, 9]), (True, list(range(32)))):
    cfg = SAEConfig(d_model=8, n_latents=32, k=3, k_aux=4, multi_topk=multi_topk)
    torch.manual_seed(0)
    full = SAE(cfg).double()
    with torch.no_grad():
        full.b_enc.normal_(0, 0.1)
        full.b_pre.normal_(0, 0.1)
    x = torch.randn(16, 8, dtype=torch.float64)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[dead_ids] = True
    rows = slice(16 * rank, 16 * rank + 16)
    shard = sharding.ShardedSAE(cfg, kernels.Shard(rank, M, 16 * rank, 16, None), draw=False).double()
    shard.load_state_dict({{k: v if k == "b_pre" else v[rows] for k, v in full.state_dict().items()}})
    ref, out = full(x, dead_mask=dead), shard(x, dead_mask=dead[rows])
    ref.loss.backward()
    out.loss.backward()
    assert torch.equal(out.idx, ref.idx) and torch.equal(out.fired, ref.fired[rows])
    for name in ("loss", "fvu", "aux_loss", "multi_loss", "vals", "x_hat"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=0, atol=1e-13)
    for name, p in shard.named_parameters():
        want = full.get_parameter(name).grad
        torch.testing.assert_close(p.grad, want if name == "b_pre" else want[rows], rtol=0, atol=1e-13)
    assert (ref.aux_loss > 0) == bool(dead_ids)
dist.barrier()  # both done before either tears gloo down: a peer gone mid-exit aborts the other
dist.destroy_process_group()
print("ok")
"""


def test_sharded_recon_gives_the_single_process_codes_and_gradients(tmp_path):
    """Two gloo processes, each holding half the latents, against the whole SAE on the same batch
    (float64): the codes, losses, reconstruction and every gradient, b_pre's whole (its encoder
    part summed over the shards, its decoder part not), with Multi-TopK and AuxK, dead latents on
    both shards, on one shard only, or all of them."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = tmp_path / "sharded_recon.py"
    script.write_text(SHARDED_RECON.format(here=os.path.dirname(os.path.abspath(__file__))))
    procs = [subprocess.Popen([sys.executable, str(script), str(r), port], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
             for r in range(2)]
    results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
    assert all(rc == 0 and out.strip() == "ok" for rc, out, _ in results), [err[-2000:] for _, _, err in results]
