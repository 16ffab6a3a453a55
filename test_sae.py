"""Tests for sae.py: properties over random small shapes (hypothesis), the sparse fast path
against the dense reference on each of its routes, init and decoder constraint, two short
training runs, and a smoke run of bench.py."""
import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import bench
import sae as sae_module
from sae import SAE, SAEConfig, _topk, fvu, geometric_median

FEW = settings(deadline=None, max_examples=15)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes: one thread avoids OpenMP overhead, which dominates on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@st.composite
def setups(draw):
    """(d_model, n_latents, k, batch, seed, input scale): tiny shapes, k <= n_latents.
    d_model >= 3: at 2, normalized tokens are +-(1, -1)/sqrt(2) and a batch can have no
    variance, where FVU is undefined."""
    d, n = draw(st.integers(3, 16)), draw(st.integers(2, 64))
    return (d, n, draw(st.integers(1, n)), draw(st.integers(2, 32)),
            draw(st.integers(0, 2**31 - 1)), draw(st.floats(1e-2, 1e2)))


def make(d, n, k, seed, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_model=d, n_latents=n, k=k, **kw)).to(dtype)
    with torch.no_grad():  # non-zero biases, so that the tests exercise them
        sae.b_enc.normal_(0, 0.1)
        sae.b_pre.normal_(0, 0.1)
    return sae


def inputs(B, d, seed, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed + 1)
    return scale * (torch.randn(B, d, generator=g, dtype=dtype) + torch.randn(d, generator=g, dtype=dtype))


def grads(sae):
    return {name: p.grad.clone() for name, p in sae.named_parameters()}


def assert_rel(a, b, tol):
    """||a - b|| <= tol * ||b|| (plus a floor for b == 0)."""
    a, b = a.double(), b.double()
    assert (a - b).norm() <= tol * b.norm() + 1e-12, ((a - b).norm() / b.norm()).item()


# ---- the TopK code ----

@FEW
@given(setups(), st.data())
def test_code_is_sparse_nonnegative_and_full_k_is_relu(setup, data):
    d, n, k, B, seed, scale = setup
    sae, x = make(d, n, k, seed), inputs(B, d, seed, scale)
    for kk in (None, data.draw(st.integers(1, n))):  # training k and a test-time k'
        z = sae.encode(x, k=kk)
        assert ((z != 0).sum(1) <= (k if kk is None else kk)).all() and (z >= 0).all()
    x_n = sae.normalize_input(x)[0]
    torch.testing.assert_close(sae.encode(x, k=n), sae.preacts(x_n).relu())


@FEW
@given(setups())
def test_main_loss_gradients_only_reach_selected_latents(setup):
    d, n, k, B, seed, scale = setup
    sae, x = make(d, n, k, seed), inputs(B, d, seed, scale).requires_grad_()
    out = sae(x)
    out.loss.backward()
    z = sae.encode(x.detach())  # "fired": a value > 0 in the code
    assert torch.equal(out.fired, (z > 0).any(0)) and out.l0 == (z > 0).sum(1).float().mean()
    unselected = torch.ones(n, dtype=torch.bool)
    unselected[out.idx.flatten()] = False
    for p in (sae.W_enc, sae.b_enc, sae.W_dec):
        assert (p.grad[unselected] == 0).all()
    assert x.grad is None  # no gradient flows back into the activations


@FEW
@given(setups())
def test_auxk_gradients_only_reach_dead_latents(setup):
    d, n, k, B, seed, scale = setup
    sae, x = make(d, n, k, seed), inputs(B, d, seed, scale)
    dead = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.5
    out = sae(x, dead_mask=dead)
    if not dead.any():
        assert out.aux_loss == 0
        return
    out.aux_loss.backward()
    assert torch.isfinite(out.aux_loss)
    for p in (sae.W_enc, sae.b_enc, sae.W_dec):
        assert (p.grad[~dead] == 0).all()


def run_path(sae, x, dead, dense):
    """One forward and backward on the fast or the dense path -> (SAEOutput, gradients)."""
    sae.zero_grad(set_to_none=True)
    out = sae(x, dead_mask=dead, dense=dense)
    out.loss.backward()
    return out, grads(sae)


# ---- fast path == dense reference ----

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
    monkeypatch.setattr(sae_module, "_BF16_SCREEN", screen)
    monkeypatch.setattr(sae_module, "_AUXK_BLOCK_RATIO", auxk_block_ratio)
    monkeypatch.setattr(sae_module, "_CHUNK", chunk)
    monkeypatch.setattr(sae_module, "_dense_backward", lambda t: dense_backward)
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


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float16, 1e-5)])
def test_dense_backward_under_autocast(monkeypatch, dtype, tol):
    """Under autocast the dense (CUDA) backward runs its matmuls in bfloat16 and agrees with the
    CSR backward to bfloat16's precision; under float16 autocast it stays in float32 (fp16
    gradients would underflow), so it agrees to float32's. Gradients come back in float32."""
    sae, x = make(16, 600, 4, 0, torch.float32, k_aux=8), inputs(256, 16, 0, 1.0, torch.float32)
    dead = torch.rand(600, generator=torch.Generator().manual_seed(0)) < 0.3
    g = {}
    for dense_backward in (False, True):
        monkeypatch.setattr(sae_module, "_dense_backward", lambda t: dense_backward)
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
    if dtype == torch.bfloat16:  # it did run in bfloat16 (measured: 1.6e-3 apart)
        assert (g_dense["W_enc"] - g_csr["W_enc"]).norm() > 1e-4 * g_csr["W_enc"].norm()


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
            vals, idx = _topk(x, k, block)
            assert torch.equal(vals, x.topk(k, dim=1).values)
            assert torch.equal(x.gather(1, idx), vals) and (idx.sort(1).values.diff(dim=1) > 0).all()


# ---- the CPU's bf16 screen (sae.py _screened_topk) ----

def bf16_error_bound_holds(x, W, b):
    """Whether every exact pre-activation (float64) lies within A_b + u |pre~| of the screen's
    bf16 one; also -> the largest share of that bound an entry used."""
    x16, W16, A = sae_module._bf16_operands({}, x, W, b)
    pre16 = (x16 @ W16.t()).double()
    bound = A.double().unsqueeze(1) + sae_module._BF16_U * pre16.abs()
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
    monkeypatch.setattr(sae_module, "_SCREEN_CHUNK", chunk)
    B, d, k = 80, 32, 4
    g = torch.Generator().manual_seed(1)
    if case == "random":
        W = torch.randn(1024, d, generator=g)
    else:
        W = near_duplicate_latents(1024 // int(case.split()[-1]), int(case.split()[-1]), d, 1e-4, 1)
    b = 0.01 * torch.randn(len(W), generator=g)
    x = torch.randn(B, d, generator=g)
    scratch = {}
    vals, idx = sae_module._screened_topk(scratch, x, W, b, k)
    exact = (x.double() @ W.double().t() + b.double()).topk(k, dim=1)
    assert torch.equal(idx, exact.indices)  # no ties: near-duplicates differ by ~1e-4, far above fp32's rounding
    torch.testing.assert_close(vals.double(), exact.values, rtol=1e-6, atol=1e-6)
    tokens, *counts = scratch["screen_counts"]
    assert tokens == B
    for count, want in zip(counts, (past_tier_1, past_tier_2)):
        assert want is None or (count > 0 if want == ">0" else count == want), counts


# ---- losses ----

@FEW
@given(setups(), st.floats(1e-3, 1e3))
def test_fvu_zero_one_and_scale_invariant(setup, c):
    d, _, _, B, seed, scale = setup
    x, x_hat = inputs(B, d, seed, scale), inputs(B, d, seed + 1, scale)
    assert fvu(x, x) == 0
    torch.testing.assert_close(fvu(x, x.mean(0).expand_as(x)), torch.tensor(1.0, dtype=x.dtype))
    torch.testing.assert_close(fvu(c * x, c * x_hat), fvu(x, x_hat))


def test_multi_topk_loss_is_k_plus_4k_over_8():
    sae, x = make(8, 40, 3, 0, multi_topk=True), inputs(16, 8, 0)
    x_n = sae.normalize_input(x)[0]
    L = {kk: fvu(x_n, sae.decode_sparse(*sae.encode_sparse(x_n, kk))) for kk in (3, 12)}
    torch.testing.assert_close(sae(x).loss, L[3] + L[12] / 8)


def test_relu_baseline_loss_is_fvu_plus_weighted_l1():
    sae, x = make(8, 40, 3, 0, activation="relu", l1_coef=0.1), inputs(16, 8, 0)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(40, 1, dtype=torch.float64) + 0.5)  # non-unit rows
    z, x_n = sae.encode(x), sae.normalize_input(x)[0]
    l1 = (z * sae.W_dec.norm(dim=1)).sum(1).mean()
    out = sae(x)
    torch.testing.assert_close(out.loss, fvu(x_n, sae.decode(z)) + 0.1 * l1)
    torch.testing.assert_close(out.x_hat, sae.reconstruct(x))
    assert torch.equal(out.fired, (z > 0).any(0))


# ---- normalization ----

@FEW
@given(setups(), st.booleans())
def test_normalization_round_trips_and_inputs_are_not_modified(setup, normalize):
    d, n, k, B, seed, scale = setup
    sae = make(d, n, k, seed, normalize=normalize)
    x = inputs(B, d, seed, scale)
    x[0] = 3.0  # a constant token has zero norm after centering
    x_copy = x.clone()
    x_n, mu, scale_ = sae.normalize_input(x)
    torch.testing.assert_close(sae.denormalize(x_n, mu, scale_), x)
    if normalize:
        torch.testing.assert_close(x_n[1:].norm(dim=1), torch.ones(B - 1, dtype=x.dtype))
        torch.testing.assert_close(x_n.mean(1), torch.zeros(B, dtype=x.dtype))
    sae.encode(x), sae.reconstruct(x), sae(x, dead_mask=torch.ones(n, dtype=torch.bool))
    assert torch.equal(x, x_copy)


# ---- init and the decoder constraint ----

def test_init_encoder_is_a_copy_of_unit_decoder_rows():
    sae = SAE(SAEConfig(d_model=16, n_latents=64, k=4))
    assert torch.equal(sae.W_enc, sae.W_dec) and sae.W_enc.data_ptr() != sae.W_dec.data_ptr()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-6, rtol=0)


def test_init_encoder_scale_gives_unit_norm_reconstructions():
    sae = SAE(SAEConfig(d_model=16, n_latents=256, k=8))
    with torch.no_grad():
        sae.b_pre.normal_()
    sae.init_encoder_scale()
    u = torch.nn.functional.normalize(torch.randn(4096, 16), dim=1) + sae.b_pre
    x_hat_n = sae.decode_sparse(*sae.encode_sparse(u)) - sae.b_pre
    assert abs(x_hat_n.norm(dim=1).mean().item() - 1) < 0.05
    torch.testing.assert_close(sae.W_enc / sae.W_enc.norm(dim=1, keepdim=True), sae.W_dec)


@FEW
@given(st.lists(st.floats(-100, 100), min_size=1, max_size=15).filter(lambda v: len(v) % 2))
def test_geometric_median_is_the_median_in_1d(values):
    points = torch.tensor(values, dtype=torch.float64).unsqueeze(1)
    # Weiszfeld converges only linearly when the minimizer is a data point: relative tol.
    spread = (points.max() - points.min()).item()
    torch.testing.assert_close(geometric_median(points), points.median(0).values,
                               atol=1e-5 * (1 + spread), rtol=0)


@FEW
@given(st.integers(0, 2**31 - 1), st.integers(1, 12))
def test_geometric_median_translation_and_brute_force(seed, N):
    g = torch.Generator().manual_seed(seed)
    points = torch.randn(N, 2, generator=g, dtype=torch.float64)
    shift = 10 * torch.randn(2, generator=g, dtype=torch.float64)
    m = geometric_median(points)
    torch.testing.assert_close(geometric_median(points + shift), m + shift, atol=1e-6, rtol=0)

    def objective(y):  # (M, 2) candidates -> (M,) sum of distances
        return torch.cdist(y, points).sum(1)

    lo, hi = points.min(0).values, points.max(0).values
    grid = torch.stack(torch.meshgrid(*[torch.linspace(lo[i], hi[i], 201, dtype=torch.float64)
                                        for i in range(2)], indexing="ij"), -1).reshape(-1, 2)
    best = objective(torch.cat([grid, points])).min()
    assert objective(m[None]) <= best * (1 + 1e-6) + 1e-12


@FEW
@given(setups())
def test_decoder_projection_and_renormalization(setup):
    d, n, k, B, seed, scale = setup
    sae, x = make(d, n, k, seed, torch.float32), inputs(B, d, seed, scale, torch.float32)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    sae(x).loss.backward()
    sae.W_dec.grad += torch.randn_like(sae.W_dec)  # make every row's gradient non-trivial
    before = sae.W_dec.grad.norm(dim=1)
    sae.project_decoder_grad()
    g, W = sae.W_dec.grad, sae.W_dec
    assert ((g * W).sum(1).abs() <= 1e-6 * before).all()
    opt.step()
    sae.normalize_decoder()
    assert ((sae.W_dec.norm(dim=1) - 1).abs() <= 1e-6).all()


# ---- bad input ----

@pytest.mark.parametrize("kw, match", [
    (dict(k=0), r"k must be in \[1, n_latents=8\], got 0"),
    (dict(k=9), r"k must be in \[1, n_latents=8\], got 9"),
    (dict(k_aux=0), r"k_aux must be in \[1, n_latents=8\], got 0"),
    (dict(k_aux=9), r"k_aux must be in \[1, n_latents=8\], got 9"),
    (dict(activation="gelu"), r"activation must be 'topk' or 'relu', got 'gelu'"),
    (dict(l1_coef=0.1), r"l1_coef must be >= 0, and 0 unless activation='relu', got 0.1"),
    (dict(activation="relu", multi_topk=True), r"multi_topk must be False when"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        SAEConfig(**{"d_model": 4, "n_latents": 8, "k": 2, **kw})


def test_bad_input():
    sae = SAE(SAEConfig(d_model=4, n_latents=8, k=2))
    with pytest.raises(ValueError, match=r"shape \(batch, d_model=4\), got \(3, 5\)"):
        sae(torch.randn(3, 5))
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            sae.encode(torch.full((3, 4), bad))
    with pytest.raises(ValueError, match=r"k must be in \[1, n_latents=8\], got 9"):
        sae.encode(torch.randn(3, 4), k=9)
    with pytest.raises(ValueError, match=r">= 2 tokens .* got 1"):
        sae(torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"dead_mask must be a bool tensor of shape \(8,\)"):
        sae(torch.randn(3, 4), dead_mask=torch.ones(7, dtype=torch.bool))


def test_checkpoint_round_trip():
    sae, x = make(8, 40, 3, 0), inputs(16, 8, 0)
    again = SAE.from_checkpoint(sae.to_checkpoint()).double()
    assert again.cfg == sae.cfg
    torch.testing.assert_close(again.reconstruct(x), sae.reconstruct(x))


# ---- end to end: sparse non-negative combinations of known unit directions ----

def directions(n_true, d, g):
    """(n_true, d) unit directions with zero mean over d, so input normalization keeps them."""
    F = torch.randn(n_true, d, generator=g)
    F -= F.mean(1, keepdim=True)
    return F / F.norm(dim=1, keepdim=True)


def batch(F, n_active, B, g):
    idx = torch.rand(B, len(F), generator=g).argsort(1)[:, :n_active]
    coefs = torch.zeros(B, len(F)).scatter(1, idx, torch.rand(B, n_active, generator=g) + 0.5)
    return coefs @ F  # (B, d)


def train(sae, F, n_active, steps, lr, auxk, seed, B=128, dead_after=10, window=50):
    """A minimal trainer with the dead-latent counter; returns the latents fired in the
    last `window` steps."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    since_fired = torch.zeros(sae.cfg.n_latents)
    fired_late = torch.zeros(sae.cfg.n_latents, dtype=torch.bool)
    for step in range(steps):
        out = sae(batch(F, n_active, B, g), dead_mask=since_fired > dead_after if auxk else None)
        opt.zero_grad()
        out.loss.backward()
        sae.project_decoder_grad()
        opt.step()
        sae.normalize_decoder()
        since_fired += 1
        since_fired[out.fired] = 0
        if step >= steps - window:
            fired_late |= out.fired
    return fired_late


@pytest.mark.parametrize("seed", [0, 1])
def test_training_recovers_true_directions(seed):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    F = directions(64, 32, g)
    sae = SAE(SAEConfig(d_model=32, n_latents=128, k=3))
    sae.init_b_pre(batch(F, 3, 1024, g))
    train(sae, F, n_active=3, steps=300, lr=3e-3, auxk=True, seed=seed)
    best_cos = (F @ sae.W_dec.detach().t()).max(1).values  # (64,)
    assert best_cos.mean() >= 0.9, best_cos.mean()


@pytest.mark.parametrize("seed", [0, 1])
def test_auxk_revives_dead_latents(seed):
    """Bad init: half the encoder rows are too short to reach TopK, and there are more
    true directions (128) than latents (64). They get no gradient from the main loss."""
    dead = {}
    for auxk in (False, True):
        torch.manual_seed(seed)
        F = directions(128, 32, torch.Generator().manual_seed(seed))
        sae = SAE(SAEConfig(d_model=32, n_latents=64, k=4))
        with torch.no_grad():
            sae.W_enc[32:] *= 0.1
        fired = train(sae, F, n_active=3, steps=300, lr=3e-3, auxk=auxk, seed=seed)
        dead[auxk] = 1 - fired.float().mean().item()
    assert dead[True] <= 0.1 and dead[False] >= 0.3, dead


# ---- bench.py ----

def test_bench_quick_runs(tiny_gpt_ckpt, capsys):
    bench.main(["--quick", "--json", "--profile", "--model", tiny_gpt_ckpt])
    res = json.loads(capsys.readouterr().out)
    r = res["shapes"][0]
    prof = r["profile"]
    assert set(prof["phases_ms"]) == set(bench.PHASES) and all(ms > 0 for ms in prof["phases_ms"].values())
    assert any(o["op"] == "_SparseEncode" for o in prof["top_ops"])
    assert set(r["ms"]) == set(r["tokens_per_s"]) == {"mm", "mm_topk", "mm_bf16", "fast", "fast0", "dense"}
    assert all(r[key] > 0 for key in ("fast_over_mm", "fast_over_mm_topk", "fast0_over_mm", "fast_over_mm_bf16",
                                      "fast_over_dense"))
    if sae_module._BF16_SCREEN:  # the quick shape's fast steps ran the screen
        assert r["screen"]["tokens"] > 0 and 0 <= r["screen"]["past_tier_2"] <= r["screen"]["past_tier_1"] <= 1
    assert "memory_gb" in r  # None off Linux
    assert res["activations"]["tokens_per_s"] > 0
    assert 0 < res["train"]["useful_share"] <= 1 and res["train"]["tokens_per_s"] > 0
