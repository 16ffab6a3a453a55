"""Tests for browser.py: the page built from the tiny SAE (its contexts and shading against the
SAE's own code, no external resource), the selection rule, the prompt view, and the page in
headless Chromium (skipped where Chromium is not installed)."""

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

import browser
import evals
from gpt import UserError

PROMPT = "To be, or not to be"
FAST = ["--tokens", "2048", "--probe_tokens", "256", "--n2g_examples", "8", "--skip", "downstream,ablation,progressive"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def page_data(path):
    """The JSON inlined in the page."""
    text = open(path, encoding="utf-8").read()
    return json.loads(re.search(r"const D = (\{.*?\});\n", text, re.S).group(1))


@pytest.fixture(scope="module")
def built(tiny_sae_ckpt):
    """(path of features.html, its data, the evals.main result) for the tiny SAE with a prompt."""
    out = evals.main([tiny_sae_ckpt, *FAST, "--html", "--text", PROMPT])
    path = os.path.join(os.path.dirname(tiny_sae_ckpt), "features.html")
    return path, page_data(path), out


def test_page_is_one_file_with_no_external_resource(built):
    path, _, out = built
    text = open(path, encoding="utf-8").read()
    assert not re.search(r"https?://|//cdn|<link|<img|\bsrc=|@import|url\(", text)
    assert "<style>" in text and "<script>" in text and out["seconds"]["html"] > 0


def test_every_listed_live_latent_has_its_contexts(built):
    _, d, _ = built
    live = [e for e in d["latents"] if e["count"]]
    assert live and any(not e["count"] for e in d["latents"])  # dead latents are listed too, marked
    for e in live:
        assert e["groups"][0]["label"] == "top activations" and e["groups"][0]["examples"]
        tops = [ex[3][ex[2]] for ex in e["groups"][0]["examples"]]
        assert tops == sorted(tops, reverse=True) and tops[0] == pytest.approx(e["max"], rel=1e-3)
        assert sum(e["hist"]) == e["count"] and e["boost"] and e["suppress"]
        for g in e["groups"]:
            for w, s, t, acts in g["examples"]:
                assert acts[t] > 0 and len(d["windows"][w]) >= s + len(acts)
                assert all(str(i) in d["vocab"] for i in d["windows"][w][s:s + len(acts)])


def test_shading_is_the_sae_code_recomputed(built, tiny_sae_ckpt):
    _, d, _ = built
    sae, model, _, subject, _ = evals.load(tiny_sae_ckpt)
    first = 0 if subject["include_first"] else 1
    checked = 0
    for e in d["latents"][::7]:
        for w, s, t, acts in (ex for g in e["groups"] for ex in g["examples"]):
            with torch.no_grad():
                z = sae.encode(model.resid(torch.tensor([d["windows"][w]]), subject["layer"])[0])[:, e["id"]]
            want = [0.0 if p < first else float(z[p]) for p in range(s, s + len(acts))]
            np.testing.assert_allclose(acts, want, rtol=2e-3, atol=1e-6)
            checked += 1
    assert checked > 10


def test_probe_and_prompt_latents_are_listed_first(built):
    _, d, out = built
    ids = [e["id"] for e in d["latents"]]
    for t in out["results"]["probe"]["tasks"]:
        e = d["latents"][ids.index(t["latent"])]
        assert t["task"] in [p["task"] for p in e["probe"]]
    prompt_latents = {lat for _, top in d["prompt"] for lat, _ in top or []}
    assert prompt_latents <= set(ids) and d["prompt"][0][1] is None  # position 0 is not encoded


def test_select_latents_is_a_stratified_sample_over_density():
    freq = np.array([0.0, 0.5, 0.01, 0.2, 0.0, 0.001, 0.05, 0.3, 0.002])
    # by density the live latents are 5, 8, 2, 6, 3, 7, 1; four evenly spaced: ranks 0, 2, 4, 6; dead 0, 4 last
    assert browser.select_latents(freq, 4) == [1, 2, 3, 5, 0, 4]
    # `must` first (even a dead one), then the rest of the n from the others, rarest first
    assert browser.select_latents(freq, 3, must=[4, 2]) == [4, 2, 5, 0]
    assert browser.select_latents(freq, 100) == [1, 2, 3, 5, 6, 7, 8, 0, 4]


def test_example_groups_are_top_then_quartiles():
    vals = np.arange(40, 0, -1.0)
    groups = browser.example_groups(np.arange(40), vals, np.random.default_rng(0))
    assert [v for _, v in groups[0][1]] == list(vals[:browser.N_TOP])
    assert len(groups) == 5 and all(len(ex) == browser.N_QUARTILE for _, ex in groups[1:])
    lows = [max(v for _, v in ex) for _, ex in groups[1:]]
    assert lows == sorted(lows, reverse=True) and max(lows) < vals[browser.N_TOP - 1]


def test_logits_at_matches_the_full_forward(tiny_sae_ckpt):
    _, model, _, subject, val_ids = evals.load(tiny_sae_ckpt)
    idx = torch.from_numpy(val_ids[:64].reshape(2, 32))
    with torch.no_grad():
        h = model.resid(idx, subject["layer"])
        t = torch.tensor([5, 30])
        full = model.logits_from_resid(h, subject["layer"])[torch.arange(2), t]
        torch.testing.assert_close(browser.logits_at(model, h, subject["layer"], t), full)


def test_text_alone_prints_the_prompt_view(tiny_sae_ckpt, capsys):
    out = evals.main([tiny_sae_ckpt, "--tokens", "2048", "--n2g_examples", "4", "--text", "To be"])
    text = capsys.readouterr().out
    assert out["path"] is None and text.startswith("prompt view")
    assert len(text.strip().splitlines()) == 1 + len("To be") and "position 0" in text and "#" in text
    with pytest.raises(UserError, match="--html_latents must be positive"):
        evals.main([tiny_sae_ckpt, "--tokens", "2048", "--text", "To be", "--html_latents", "0"])


# ---- in a real browser --------------------------------------------------------


def chromium(*args):
    """Run headless Chromium -> (stdout, stderr)."""
    p = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
                        "--window-size=1400,900", *args], capture_output=True, text=True, timeout=120)
    return p.stdout, p.stderr


def console_errors(stderr):
    return [line for line in stderr.splitlines() if "Uncaught" in line or ("CONSOLE" in line and "rror" in line)]


def not_blank(png):
    import matplotlib.image
    img = matplotlib.image.imread(png)[..., :3]
    return img.std() > 0.05 and len(np.unique(img.reshape(-1, 3).round(2), axis=0)) > 50


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium; "
                                              ".ci/run installs it when it can)")
def test_page_renders_in_chromium_without_errors(built, tmp_path):
    path, d, _ = built
    live = next(e for e in d["latents"] if e["count"] and len(e["groups"]) > 1)
    dom, err = chromium("--dump-dom", f"file://{path}#latent={live['id']}")
    assert not console_errors(err), console_errors(err)
    assert f"Latent #{live['id']}" in dom
    assert dom.count('class="ex"') == sum(len(g["examples"]) for g in live["groups"])
    assert dom.count('class="hit"') == dom.count('class="ex"')  # one activating token per context
    assert len(re.findall(r'<tr [^>]*data-id=', dom)) == len(d["latents"])
    shots = {"index": f"file://{path}", "latent": f"file://{path}#latent={live['id']}"}
    for name, url in shots.items():
        _, err = chromium(f"--screenshot={tmp_path / name}.png", url)
        assert not console_errors(err) and not_blank(tmp_path / f"{name}.png"), name
    broken = tmp_path / "broken.html"  # the error check itself sees a script error
    broken.write_text("<script>undefinedFunction()</script>")
    assert console_errors(chromium("--dump-dom", f"file://{broken}")[1])
