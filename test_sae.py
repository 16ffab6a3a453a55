"""Tests for sae.py, ordered like it: the config's checks, input normalization (paper §2.1),
the TopK code (§2.3) and where its gradients go, the losses with known answers (FVU, AuxK,
Multi-TopK, ReLU + L1), the initialization and the decoder constraint (App. A.1), bad input,
checkpoints, and two short training runs on known directions. The fast path's equality with
the dense reference is test_kernels.py's."""
import pytest
import torch
from hypothesis import given, strategies as st

from conftest import FEW, inputs, make, setups
from sae import SAE, SAEConfig, fvu, geometric_median

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the config ----

@pytest.mark.parametrize("kw, match", [
    (dict(k=0), r"k must be in \[1, n_latents=8\], got 0"),
    (dict(k=9), r"k must be in \[1, n_latents=8\], got 9"),
    (dict(k_aux=0), r"k_aux must be in \[1, n_latents=8\], got 0"),
    (dict(k_aux=9), r"k_aux must be in \[1, n_latents=8\], got 9"),
    (dict(activation="gelu"), r"activation must be 'topk', 'batchtopk' or 'relu', got 'gelu'"),
    (dict(l1_coef=0.1), r"l1_coef must be >= 0, and 0 unless activation='relu', got 0.1"),
    (dict(activation="relu", multi_topk=True), r"multi_topk must be False unless activation='topk'"),
    (dict(activation="batchtopk", multi_topk=True), r"multi_topk must be False unless activation='topk'"),
    (dict(matryoshka=(4, 2)), r"matryoshka must be increasing sizes in \[1, n_latents=8\)"),
    (dict(matryoshka=(8,)), r"matryoshka must be increasing sizes"),
    (dict(matryoshka=(0, 4)), r"matryoshka must be increasing sizes"),
    (dict(matryoshka=(4,), multi_topk=True), r"matryoshka must be .* no Multi-TopK"),
    (dict(matryoshka=(4,), activation="relu"), r"matryoshka must be .* with a TopK or BatchTopK code"),
])

def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        SAEConfig(**{"d_model": 4, "n_latents": 8, "k": 2, **kw})


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


# ---- losses ----

@FEW
@given(setups(), st.floats(1e-3, 1e3))
def test_fvu_zero_one_and_scale_invariant(setup, c):
    d, _, _, B, seed, scale = setup
    x, x_hat = inputs(B, d, seed, scale), inputs(B, d, seed + 1, scale)
    assert fvu(x, x) == 0
    torch.testing.assert_close(fvu(x, x.mean(0).expand_as(x)), torch.tensor(1.0, dtype=x.dtype))
    torch.testing.assert_close(fvu(c * x, c * x_hat), fvu(x, x_hat))


def test_auxk_loss_known_answer():
    """AuxK by hand (paper §2.4, App. A.2), normalization off: d_model 2, three latents, k 1,
    latent 2 dead. W_dec rows (1, 0), (0, 1), (0.8, 0.6); W_enc = W_dec / 2; b_pre (0.1, 0.2).
    x = (1, 0), (0, 2): x - b_pre = (0.9, -0.2), (-0.1, 1.8); pre-activations (0.45, -0.1,
    0.30) and (-0.05, 0.9, 0.50): TopK keeps latent 0 (0.45) and latent 1 (0.9), so
    x_hat = (0.55, 0.2), (0.1, 1.1), e = x - x_hat = (0.45, -0.2), (-0.1, 0.9) and the main
    FVU is (0.2425 + 0.82) / 2.5 = 0.425. The dead latent's values 0.30 and 0.50 give
    e_hat = (0.24, 0.18), (0.40, 0.30), with no b_pre; ||e - e_hat||^2 = 0.1885 + 0.61, and
    e's variance about its mean (0.175, 0.35) is 2 * 0.378125. Adding b_pre to e_hat, as
    some libraries once did, gives 0.8685 / 0.75625 instead."""
    sae = SAE(SAEConfig(d_model=2, n_latents=3, k=1, k_aux=1, normalize=False)).double()
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]]))
        sae.W_enc.copy_(sae.W_dec / 2)
        sae.b_pre.copy_(torch.tensor([0.1, 0.2]))
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    dead = torch.tensor([False, False, True])
    aux = (0.1885 + 0.61) / (2 * 0.378125)
    for dense in (False, True):
        out = sae(x, dead_mask=dead, dense=dense)
        torch.testing.assert_close(out.fvu, torch.tensor(0.425, dtype=torch.float64))
        torch.testing.assert_close(out.aux_loss, torch.tensor(aux, dtype=torch.float64))
        torch.testing.assert_close(out.loss, torch.tensor(0.425 + aux / 32, dtype=torch.float64))


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


# ---- since the paper: BatchTopK and Matryoshka ----

@FEW
@given(setups())
def test_batchtopk_keeps_the_batchs_top_k_times_B(setup):
    """In training, the k * B largest ReLU'd pre-activations of the batch, wherever they fall:
    exactly k * B non-zeros when the batch has that many positive pre-activations."""
    d, n, k, B, seed, scale = setup
    sae, x = make(d, n, k, seed, activation="batchtopk"), inputs(B, d, seed, scale)
    out = sae(x)
    pre = sae.preacts(sae.normalize_input(x)[0]).detach().relu()  # (B, n)
    z = torch.zeros_like(pre).scatter(1, out.idx, out.vals)
    assert int((z > 0).sum()) == min(k * B, int((pre > 0).sum()))
    assert torch.equal(z[z > 0], pre[z > 0])  # each kept value is its own pre-activation
    assert torch.equal(z.flatten().sort().values[-k * B:], pre.flatten().sort().values[-k * B:])
    assert out.l0 * B == pytest.approx(int((z > 0).sum()))  # a float mean: 114 / 14 * 14 is not 114


def test_batchtopk_is_a_jumprelu_once_evaluated():
    sae, x = make(8, 40, 3, 0, activation="batchtopk"), inputs(16, 8, 0)
    with pytest.raises(ValueError, match="no inference threshold yet"):
        sae.eval()(x)
    sae.update_threshold(torch.tensor(0.05, dtype=torch.float64))
    pre = sae.preacts(sae.normalize_input(x)[0])
    z = torch.where(pre > 0.05, pre, 0.0)  # JumpReLU: the value itself above the threshold, else 0
    torch.testing.assert_close(sae.encode(x), z)
    out = sae(x)
    torch.testing.assert_close(out.x_hat, sae.reconstruct(x))
    assert out.l0 == (z > 0).sum(1).double().mean() and torch.equal(out.fired, (z > 0).any(0))


def test_batchtopk_threshold_is_a_moving_average_of_the_smallest_kept_value():
    sae = make(8, 40, 3, 0, activation="batchtopk")
    sae.update_threshold(torch.tensor(0.5, dtype=torch.float64))  # the first value is taken as it is
    sae.update_threshold(torch.tensor(0.3, dtype=torch.float64), lr=0.25)
    sae.update_threshold(torch.tensor(float("inf"), dtype=torch.float64))  # a batch where nothing fired
    torch.testing.assert_close(sae.threshold, torch.tensor(0.45, dtype=torch.float64))


def test_matryoshka_adds_each_inner_prefix_reconstruction_fvu():
    sae, x = make(8, 40, 3, 0, matryoshka=(10, 25)), inputs(16, 8, 0)
    x_n, z = sae.normalize_input(x)[0], sae.encode(x)  # z: the dense TopK code (16, 40)
    prefix = [fvu(x_n, sae.decode(z * (torch.arange(40) < m))) for m in (10, 25)]
    out = sae(x)
    torch.testing.assert_close(out.nested_loss, prefix[0] + prefix[1])
    torch.testing.assert_close(out.loss, out.fvu + prefix[0] + prefix[1])
    torch.testing.assert_close(out.fvu, fvu(x_n, sae.decode(z)))


def test_matryoshka_prefix_terms_train_only_their_own_latents():
    """Each prefix's term reaches the decoder rows of its prefix alone: rows past the last
    inner prefix get the plain TopK SAE's gradient, and those inside get more."""
    x, g = inputs(64, 8, 0), {}
    for m in ((), (10, 25)):
        sae = make(8, 40, 6, 0, matryoshka=m)
        sae(x).loss.backward()
        g[m] = sae.W_dec.grad
    torch.testing.assert_close(g[(10, 25)][25:], g[()][25:])
    assert (g[(10, 25)][:25] - g[()][:25]).norm() > 1e-3 * g[()][:25].norm()


# ---- init and the decoder constraint ----

def test_init_encoder_is_a_copy_of_unit_decoder_rows():
    sae = SAE(SAEConfig(d_model=16, n_latents=64, k=4))
    assert torch.equal(sae.W_enc, sae.W_dec) and sae.W_enc.data_ptr() != sae.W_dec.data_ptr()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", [0, 1])  # 0: the seed whose stream once drew both W_dec and the samples
def test_init_encoder_scale_gives_unit_norm_reconstructions(seed):
    torch.manual_seed(seed)
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
        if sae.cfg.activation == "batchtopk":
            sae.update_threshold(torch.where(out.vals > 0, out.vals, torch.inf).amin())
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
def test_batchtopk_threshold_code_matches_the_training_code(seed):
    """After training, on fresh batches of the training distribution, the JumpReLU at the
    tracked threshold keeps k latents per token on average to within 10%, and at least 90% of
    its (token, latent) pairs are the batch code's."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    F = directions(64, 32, g)
    sae = SAE(SAEConfig(d_model=32, n_latents=128, k=3, activation="batchtopk"))
    sae.init_b_pre(batch(F, 3, 1024, g))
    train(sae, F, n_active=3, steps=300, lr=3e-3, auxk=True, seed=seed)
    with torch.no_grad():
        x = batch(F, 3, 1024, g)
        codes = [(lambda o: torch.zeros(len(x), 128).scatter(1, o.idx, o.vals) > 0)(sae.train(mode)(x))
                 for mode in (False, True)]
    jump, trained = codes
    assert abs(jump.sum(1).float().mean() - 3) <= 0.3, jump.sum(1).float().mean()
    assert (jump & trained).sum() >= 0.9 * jump.sum(), ((jump & trained).sum() / jump.sum()).item()


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
