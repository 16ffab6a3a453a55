"""Shared test fixtures and helpers: a tiny subject GPT and a tiny SAE trained on it, built
once per test session in a temporary directory (nothing depends on a local out/), and the
small SAEs and inputs that test_sae.py and test_kernels.py share, and the run-state comparison
of the exact-resume tests."""

import pytest
import torch
from hypothesis import settings, strategies as st

import gpt
import train
from sae import SAE, SAEConfig

TINY_SAE_ARGS = ["--n_latents", "128", "--k", "4", "--tokens", "60000", "--batch_size", "512",
                 "--ctx_len", "32", "--shuffle_tokens", "8192", "--eval_tokens", "2048", "--log_every", "10"]

FEW = settings(deadline=None, max_examples=15)


@pytest.fixture(scope="session")
def tiny_gpt_ckpt(tmp_path_factory):
    """Path of a 2-layer, 32-wide char GPT pretrained for a few seconds on the bundled corpus."""
    d = tmp_path_factory.mktemp("gpt")
    gpt.main(["--preset", "tiny", "--iters", "150", "--out_dir", str(d), "--eval_windows", "16"])
    return str(d / "ckpt.pt")


@pytest.fixture(scope="session")
def tiny_sae_ckpt(tiny_gpt_ckpt, tmp_path_factory):
    """Path of a tiny TopK SAE checkpoint (n=128, k=4) trained by train.py on tiny_gpt_ckpt."""
    d = tmp_path_factory.mktemp("runs")
    train.main(["--model", tiny_gpt_ckpt, "--out_dir", str(d), "--run", "tiny", *TINY_SAE_ARGS])
    return str(d / "tiny" / "ckpt.pt")


@pytest.fixture(scope="session")
def tiny_batchtopk_ckpt(tiny_gpt_ckpt, tmp_path_factory):
    """Path of a tiny Matryoshka BatchTopK SAE checkpoint (n=128, k=4, prefixes 32, 64)."""
    d = tmp_path_factory.mktemp("runs")
    train.main(["--model", tiny_gpt_ckpt, "--out_dir", str(d), "--run", "tiny", *TINY_SAE_ARGS,
                "--activation", "batchtopk", "--matryoshka", "32,64"])
    return str(d / "tiny" / "ckpt.pt")


@pytest.fixture(scope="module")
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
    """An SAE with non-zero biases, so that the tests exercise them."""
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_model=d, n_latents=n, k=k, **kw)).to(dtype)
    with torch.no_grad():
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


def assert_same_state(a, b):
    """Two runs' (weights, EMA, Adam state, dead-latent counters, step) are bitwise equal: the
    exact-resume tests of test_train.py and test_sharding.py."""
    for x, y in zip(a[:3], b[:3]):
        for key in x:
            if isinstance(x[key], dict):
                for k2 in x[key]:
                    assert torch.equal(torch.as_tensor(x[key][k2]), torch.as_tensor(y[key][k2])), (key, k2)
            else:
                assert torch.equal(x[key], y[key]), key
    assert torch.equal(a[3], b[3]) and a[4] == b[4]
