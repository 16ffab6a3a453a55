"""Shared test fixtures: a tiny subject GPT and a tiny SAE trained on it, built once per
test session in a temporary directory (nothing depends on a local out/)."""

import pytest

import gpt
import train

TINY_SAE_ARGS = ["--n_latents", "128", "--k", "4", "--tokens", "60000", "--batch_size", "512",
                 "--ctx_len", "32", "--shuffle_tokens", "8192", "--eval_tokens", "2048", "--log_every", "10"]


def pytest_configure(config):
    # sae.py silences this for users; pytest resets warning filters per test, so say it here
    config.addinivalue_line("filterwarnings", "ignore:Sparse CSR tensor support is in beta state")


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
