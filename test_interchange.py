"""Tests of interchange.py, in its order: the export to EleutherAI sparsify's layout (read back
by our import and, when installed, by sparsify itself), then the import of another trainer's
SAE and the flags only an SAE directory takes; through evals.py, which uses both."""

import json
import os

import pytest
import torch

import evals
import interchange
from gpt import UserError

# evals.py's reconstruction and downstream sections on a small sample: enough to compare SAEs
QUICK = ["--tokens", "2048", "--skip", "activity,probe,n2g,ablation,progressive"]


def test_export_import_roundtrip(tiny_sae_ckpt, tmp_path):
    """--export then loading the directory gives the same SAE: identical encodings and
    reconstructions, and the same report numbers as the checkpoint."""
    from safetensors.torch import load_file
    out = tmp_path / "export"
    cfg = evals.main([tiny_sae_ckpt, "--export", str(out)])
    assert sorted(os.listdir(out)) == ["cfg.json", "sae.safetensors"] and json.load(open(out / "cfg.json")) == cfg
    assert (cfg["d_in"], cfg["num_latents"], cfg["k"], cfg["activation"]) == (32, 128, 4, "topk")
    assert cfg["nanosae"]["normalization"] == interchange.NORMALIZATION
    w = load_file(out / "sae.safetensors")
    assert {k: tuple(v.shape) for k, v in w.items()} == {"encoder.weight": (128, 32), "encoder.bias": (128,),
                                                          "W_dec": (128, 32), "b_dec": (32,)}
    sae, model, _, subject, val_ids = evals.load(tiny_sae_ckpt)
    imp, _, _, imp_subject, imp_val_ids = evals.load(str(out))
    assert imp.cfg.normalize and (val_ids == imp_val_ids).all()
    assert {k: imp_subject[k] for k in ("sha256", "layer", "ctx_len", "include_first")} == \
        {k: subject[k] for k in ("sha256", "layer", "ctx_len", "include_first")}
    x = evals.heldout(model, sae, val_ids, subject["layer"], subject["ctx_len"], False, 1024, 4).x
    assert torch.equal(imp.encode(x), sae.encode(x)) and torch.equal(imp.reconstruct(x), sae.reconstruct(x))
    mine, theirs = evals.main([tiny_sae_ckpt, *QUICK]), evals.main([str(out), *QUICK])
    assert theirs["meta"]["weights"] == "imported" and os.path.isfile(out / "eval.json")
    assert theirs["results"] == mine["results"]


def test_sparsify_loads_export(tiny_sae_ckpt, tmp_path):
    """When EleutherAI's sparsify is installed: it loads the export and, on normalized inputs,
    gives our latents and, mapped back, our reconstructions."""
    sparsify = pytest.importorskip("sparsify")  # pip install eai-sparsify (PyPI's "sparsify" is another project)
    coder = getattr(sparsify, "SparseCoder", None) or getattr(sparsify, "Sae", None)
    if coder is None:
        pytest.skip("the sparsify installed is not EleutherAI's")
    evals.main([tiny_sae_ckpt, "--export", str(tmp_path / "export")])
    theirs = coder.load_from_disk(tmp_path / "export")
    sae, model, _, subject, val_ids = evals.load(tiny_sae_ckpt)
    x = evals.heldout(model, sae, val_ids, subject["layer"], subject["ctx_len"], False, 1024, 4).x
    x_n, mu, scale = sae.normalize_input(x)
    with torch.no_grad():
        out = theirs(x_n)
    dense = torch.zeros(len(x), sae.cfg.n_latents).scatter(1, out.latent_indices, out.latent_acts.float())
    torch.testing.assert_close(dense, sae.encode(x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.sae_out.float() * scale + mu, sae.reconstruct(x), atol=1e-4, rtol=1e-4)


def test_import_foreign_sae(tiny_gpt_ckpt, tiny_sae_ckpt, tmp_path):
    """An SAE from another trainer (no nanosae block) reads raw residuals with sparsify's
    encoder, TopK(ReLU(W (x - b_dec) + b)), and decoder, and is evaluated on --model --layer."""
    from safetensors.torch import save_file
    d, n, k = 32, 64, 4
    g = torch.Generator().manual_seed(0)
    w = {"encoder.weight": torch.randn(n, d, generator=g) / d ** 0.5, "encoder.bias": torch.randn(n, generator=g) / 10,
         "W_dec": torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1),
         "b_dec": torch.randn(d, generator=g)}
    out = tmp_path / "foreign"
    out.mkdir()
    save_file(w, out / "sae.safetensors")
    (out / "cfg.json").write_text(json.dumps({"d_in": d, "num_latents": n, "k": k, "expansion_factor": 2}))
    with pytest.raises(UserError, match="pass --model .* and --layer"):
        evals.main([str(out)])
    res = evals.main([str(out), "--model", tiny_gpt_ckpt, "--layer", "1", "--ctx_len", "16", *QUICK])
    assert res["meta"]["layer"] == 1 and res["meta"]["ctx_len"] == 16 and 0 < res["results"]["reconstruction"]["fvu"]
    sae, _ = interchange.import_sparsify(str(out), model=tiny_gpt_ckpt, layer=1)
    assert not sae.cfg.normalize
    x = torch.randn(50, d, generator=g) * 3
    pre = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])  # sparsify's encoder
    acts, idx = pre.topk(k)
    dense = torch.zeros(50, n).scatter(1, idx, acts)
    torch.testing.assert_close(sae.encode(x), dense)
    torch.testing.assert_close(sae.reconstruct(x), dense @ w["W_dec"] + w["b_dec"])
    # flags and files it refuses
    with pytest.raises(UserError, match="--layer: only for an SAE directory"):
        evals.main([tiny_sae_ckpt, "--layer", "1"])
    with pytest.raises(UserError, match="--raw: .* holds one set of weights"):
        evals.main([str(out), "--raw", "--model", tiny_gpt_ckpt, "--layer", "1"])
    (out / "cfg.json").write_text(json.dumps({"d_in": d, "num_latents": 2 * n, "k": k}))
    with pytest.raises(UserError, match="expected encoder.weight \\(128, 32\\)"):
        evals.main([str(out), "--model", tiny_gpt_ckpt, "--layer", "1"])
    (out / "cfg.json").write_text(json.dumps({"d_in": d, "num_latents": n}))
    with pytest.raises(UserError, match="not a sparsify SAE config \\(KeyError: 'k'\\)"):
        evals.main([str(out), "--model", tiny_gpt_ckpt, "--layer", "1"])
    with pytest.raises(UserError, match="needs sae.safetensors and cfg.json"):
        evals.main([str(tmp_path), "--model", tiny_gpt_ckpt, "--layer", "1"])
