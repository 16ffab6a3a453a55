"""Tests for gpt.py: the subject model, tokenizers, data split, checkpoints, GPT-2 loading."""

import contextlib
import errno
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

import gpt
from gpt import GPT, GPTConfig, UserError

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(block_size=16, vocab_size=50, n_layer=3, n_head=2, n_embd=16)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


@settings(deadline=None, max_examples=20)
@given(t=st.integers(0, 14), seed=st.integers(0, 2**16))
def test_causality(t, seed):
    """Changing a future token never changes earlier logits."""
    model = tiny_model()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 50, (2, 16), generator=g)
    idx2 = idx.clone()
    idx2[:, t + 1:] = torch.randint(0, 50, idx2[:, t + 1:].shape, generator=g)
    a, _ = model(idx)
    b, _ = model(idx2)
    torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], rtol=0, atol=1e-5)


def test_resid_equals_residual_inside_full_forward():
    model = tiny_model()
    idx = torch.randint(0, 50, (2, 12))
    for layer in range(3):
        captured = {}
        h = model.transformer.h[layer].register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
        full, _ = model(idx)
        h.remove()
        torch.testing.assert_close(model.resid(idx, layer), captured["x"])


def test_patched_forward():
    model = tiny_model()
    idx = torch.randint(0, 50, (2, 12))
    plain, _ = model(idx)
    same, _ = model.forward_patched(idx, 1, lambda x: x)
    torch.testing.assert_close(same, plain)
    changed, _ = model.forward_patched(idx, 1, lambda x: x * 0.5)
    assert (changed - plain).abs().max() > 1e-3


def test_layer_out_of_range():
    model = tiny_model()
    with pytest.raises(UserError, match="out of range"):
        model.resid(torch.zeros(1, 4, dtype=torch.long), 3)


def test_char_tokenizer_round_trip():
    text = "To be, or not to be: that is the question.\n"
    tok = gpt.CharTokenizer(text)
    assert tok.decode(tok.encode(text)) == text
    tok2 = gpt.tokenizer_from_dict(tok.to_dict())
    assert tok2.encode(text) == tok.encode(text)
    with pytest.raises(UserError, match="vocabulary"):
        tok.encode("Z")


def test_bpe_tokenizer_offline_gives_gpt2_ids():
    tok = gpt.BPETokenizer()
    assert tok.encode("hello world") == [31373, 995]
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert tok.vocab_size == 50257
    s = "ROMEO.\nBut, soft! what light through yonder window breaks?"
    assert tok.decode(tok.encode(s)) == s


def test_split_holds_out_whole_works():
    text = gpt.load_text()
    train, val = gpt.split_text(text)
    assert train + val == text
    assert 0.08 < len(val) / len(text) < 0.12
    assert val.lstrip("\n").startswith("THE HISTORY OF TROILUS AND CRESSIDA")
    # text with no marked works is cut at the line break nearest 90%
    train, val = gpt.split_text("abcdefghi\n" * 100)
    assert len(val) == 100 and val.startswith("a")


def test_fixed_windows_are_deterministic():
    import numpy as np
    data = np.arange(1000)
    w1, w2 = gpt.fixed_windows(data, 10, 7), gpt.fixed_windows(data, 10, 7)
    assert torch.equal(w1, w2) and w1.shape == (7, 11)
    assert (w1[:, 1:] - w1[:, :-1] == 1).all()


def test_training_lowers_loss():
    torch.manual_seed(0)
    text = "the quick brown fox jumps over the lazy dog. " * 40
    tok = gpt.CharTokenizer(text)
    data = gpt.encode_text(text, tok)
    model = GPT(GPTConfig(block_size=16, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    windows = gpt.fixed_windows(data, 16, 20)
    before = gpt.evaluate(model, windows)
    for _ in range(60):
        x, y = gpt.get_batch(data, 16, 16, g)
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert gpt.evaluate(model, windows) < before - 1.0


# --- GPT-2 weights in Hugging Face's layout, made here ---------------------------------------

def random_hf_state_dict(cfg, seed=0):
    """A random GPT2LMHeadModel-style state dict: Conv1D weights as (in, out)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1
    C = cfg.n_embd
    sd = {"transformer.wte.weight": r(cfg.vocab_size, C), "transformer.wpe.weight": r(cfg.block_size, C),
          "transformer.ln_f.weight": 1 + r(C), "transformer.ln_f.bias": r(C)}
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        sd.update({p + "ln_1.weight": 1 + r(C), p + "ln_1.bias": r(C), p + "ln_2.weight": 1 + r(C), p + "ln_2.bias": r(C),
                   p + "attn.c_attn.weight": r(C, 3 * C), p + "attn.c_attn.bias": r(3 * C),
                   p + "attn.c_proj.weight": r(C, C), p + "attn.c_proj.bias": r(C),
                   p + "mlp.c_fc.weight": r(C, 4 * C), p + "mlp.c_fc.bias": r(4 * C),
                   p + "mlp.c_proj.weight": r(4 * C, C), p + "mlp.c_proj.bias": r(C),
                   p + "attn.bias": torch.ones(1, 1, cfg.block_size, cfg.block_size)})
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


def test_load_hf_state_dict_transposes_conv1d():
    cfg = GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16)
    sd = random_hf_state_dict(cfg)
    model = GPT(cfg)
    model.load_hf_state_dict(sd)
    torch.testing.assert_close(model.transformer.h[1].mlp.c_fc.weight, sd["transformer.h.1.mlp.c_fc.weight"].t())
    # GPT2Model keys (no "transformer." prefix), as in OpenAI's model.safetensors, load too
    model2 = GPT(cfg)
    model2.load_hf_state_dict({k.removeprefix("transformer."): v for k, v in sd.items()})
    idx = torch.randint(0, 50, (1, 8))
    torch.testing.assert_close(model(idx)[0], model2(idx)[0])
    with pytest.raises(UserError, match="not a GPT-2 state dict"):
        GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=3, n_head=2, n_embd=16)).load_hf_state_dict(sd)


def test_from_pretrained_reads_local_safetensors(tmp_path, monkeypatch):
    from safetensors.torch import save_file
    # the full-size GPT-2 layout would be 500 MB: shrink the registry entry for the test
    monkeypatch.setitem(GPT.PRETRAINED, "gpt2", (2, 2, 16))
    small = GPTConfig(block_size=1024, vocab_size=50257, n_layer=2, n_head=2, n_embd=16)
    sd = {k: v.contiguous() for k, v in random_hf_state_dict(small).items() if k != "lm_head.weight"}
    save_file(sd, str(tmp_path / "model.safetensors"))
    model, file = GPT.from_pretrained("gpt2", str(tmp_path))
    assert file.endswith("model.safetensors")
    torch.testing.assert_close(model.transformer.wte.weight, sd["transformer.wte.weight"])


def test_from_pretrained_offline_message(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def no_network(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(gpt.urllib.request, "urlretrieve", no_network)
    with pytest.raises(UserError, match=r"Offline\? Put Hugging Face's model.safetensors"):
        GPT.from_pretrained("gpt2")
    with pytest.raises(UserError, match="unknown model"):
        GPT.from_pretrained("gpt5")


@contextlib.contextmanager
def pypi_kernels():
    """Let `import kernels` find Hugging Face's package of that name (transformers imports it when
    installed) instead of this project's kernels.py, which stays loaded for the project's modules."""
    ours = sys.modules.pop("kernels", None)
    path = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
    try:
        yield
    finally:
        sys.path[:] = path
        if ours is not None:
            sys.modules["kernels"] = ours


def test_logits_match_transformers():
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    with pypi_kernels():
        hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():  # HF initializes biases to zero: randomize everything
        for p in hf.parameters():
            p.normal_(0, 0.1)
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16)).eval()
    model.load_hf_state_dict(hf.state_dict())
    idx = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        ref = hf(idx).logits
    ours, _ = model(idx)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


# --- checkpoints and the command line ---------------------------------------------------------

def test_checkpoint_atomic_and_safe_loading(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    gpt.save_checkpoint({"a": torch.ones(3)}, path)
    assert torch.equal(gpt.load_checkpoint(path)["a"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        gpt.load_checkpoint(path)
    torch.save({"obj": UserError("x")}, path)  # a pickled Python object
    with pytest.raises(UserError, match="arbitrary code"):
        gpt.load_checkpoint(path)
    with pytest.raises(UserError, match="no such checkpoint"):
        gpt.load_checkpoint(str(tmp_path / "missing.pt"))


@pytest.mark.parametrize("content", [b"", b"hello\n", b"not a checkpoint", bytes(range(256))])
def test_garbage_checkpoint_is_a_user_error(tmp_path, content):
    p = tmp_path / "junk.pt"
    p.write_bytes(content)
    with pytest.raises(UserError, match="junk.pt: not a"):
        gpt.load_checkpoint(str(p))


def run_gpt(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(HERE, "gpt.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_shipped_subject_model_reproduces_its_recorded_loss():
    """data/gpt.pt, the default subject model, is what `python gpt.py` made: its held-out loss on
    the same fixed windows is the one it recorded (up to another CPU's rounding)."""
    model, tok, ckpt = gpt.load_gpt_checkpoint(gpt.DEFAULT_CKPT)
    assert ckpt["train_args"]["preset"] == "cpu" and ckpt["train_args"]["seed"] == 1337
    _, val_text = gpt.split_text(gpt.load_text())
    windows = gpt.fixed_windows(gpt.encode_text(val_text, tok), ckpt["model_args"]["block_size"],
                                ckpt["train_args"]["eval_windows"])
    assert gpt.evaluate(model, windows) == pytest.approx(ckpt["val_loss"], abs=1e-4)
    assert 1.5 < ckpt["val_loss"] < 1.7


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cli_pretrain_tiny_and_sample(tmp_path, dtype):
    r = run_gpt("--preset", "tiny", "--iters", "20", "--out_dir", str(tmp_path / "g"), "--eval_windows", "8",
                "--dtype", dtype, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "held-out loss" in r.stdout and dtype in r.stdout
    model, tok, ckpt = gpt.load_gpt_checkpoint(str(tmp_path / "g" / "ckpt.pt"))
    assert ckpt["model_args"]["n_layer"] == 2 and tok.kind == "char"
    r = run_gpt("--sample", "--out_dir", str(tmp_path / "g"), "--num_tokens", "20", cwd=tmp_path)
    assert r.returncode == 0 and len(r.stdout) > 10, r.stderr


@pytest.mark.parametrize("args,message", [
    (["--data", "missing.txt"], "no such text file"),
    (["--data", "empty.txt"], "empty"),
    (["--data", "latin1.txt"], "not UTF-8"),
    (["--sample", "--out_dir", "nowhere"], "no such checkpoint"),
    (["--lr", "nan"], "--lr nan: use a number in (0, 1]"),
])
def test_cli_bad_input(tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    r = run_gpt("--preset", "tiny", *args, cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_full_disk_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    """A write failing with ENOSPC partway (the disk fills up): a UserError naming the disk,
    no temporary file left, the previous checkpoint intact."""
    path = str(tmp_path / "ckpt.pt")
    gpt.save_checkpoint({"step": 1, "w": torch.arange(10)}, path)
    real_open = open

    class FillsUp:
        """A file that takes 1000 bytes, then fails as a full disk does."""
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(gpt, "open", lambda p, mode="r": FillsUp(real_open(p, mode)), raising=False)
    with pytest.raises(UserError, match=f"No space left on device.*disk holding {tmp_path}.*previous checkpoint"):
        gpt.save_checkpoint({"step": 2, "w": torch.randn(10000)}, path)
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert gpt.load_checkpoint(path)["step"] == 1


# --- flag rules: every flag of every command line (gpt.check_flags) -------------------------

import bench  # noqa: E402  (the command lines whose flags these tests drive)
import evals  # noqa: E402
import train  # noqa: E402

# name -> (its parser, its RULES, its parsing and checking of argv, as its main does)
CLIS = {
    "train": (train.build_parser, train.RULES, train.parse),
    "evals": (evals.build_parser, evals.RULES,
              lambda argv: gpt.parse_args(evals.build_parser(), evals.RULES, [gpt.DEFAULT_CKPT, *argv], ("path",))),
    "gpt": (gpt.build_parser, gpt.RULES, gpt.parse),
    "bench": (bench.build_parser, bench.RULES, lambda argv: gpt.parse_args(bench.build_parser(), bench.RULES, argv)),
}


def value_flags(cli):
    """The options of a command line that take a value (not the switches)."""
    return [a for a in CLIS[cli][0]()._actions if a.option_strings and a.nargs != 0]


def test_every_flag_that_takes_a_value_has_a_rule():
    for cli, (parser, rules, _) in CLIS.items():
        for a in parser()._actions:
            if a.nargs != 0 and a.choices is None:
                assert a.dest in rules, f"{cli}: --{a.dest} has no rule in RULES"


def test_the_defaults_pass_the_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for cli, (_, _, parse) in CLIS.items():
        parse([])
    assert os.listdir(tmp_path) == []


def bad_values(action, rule):
    """A strategy of values that `action` (the rule's flag) must refuse."""
    integer = action.type not in (float, str, None)  # int, or gpt.integer
    junk = ["abc", "1,5", "0x", "nan", "inf", "-inf", "1e400"] + (["2.5", ""] if integer else [""])
    if action.choices is not None or isinstance(rule, gpt.OneOf):
        choices = action.choices if action.choices is not None else rule.choices
        return st.text(min_size=1).filter(lambda t: t not in choices)
    lo, hi = rule.lo, rule.hi
    if integer:
        out = st.integers(-10 ** 30, int(lo) - (0 if rule.open_lo else 1)) | st.integers(int(hi) + (0 if rule.open_hi else 1), 10 ** 30)
    else:
        out = st.floats(max_value=lo, exclude_max=not rule.open_lo) | st.floats(min_value=hi, exclude_min=not rule.open_hi)
    return st.sampled_from(junk) | out.map(repr)


def ruled(cli):
    rules = CLIS[cli][1]
    return [a for a in value_flags(cli) if a.choices is not None or isinstance(rules.get(a.dest), (gpt.Number, gpt.OneOf))]


@pytest.fixture(scope="module")
def empty_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cwd")


@settings(deadline=None, max_examples=300)
@given(data=st.data())
def test_a_bad_value_of_any_flag_is_a_one_line_user_error_that_makes_nothing(data, empty_dir):
    """Generated bad numbers (negative, zero, NaN, inf, huge, fractional for integers), bad
    choices and junk for every numeric or choice flag of train.py, evals.py, gpt.py and
    bench.py: refused by the parse-and-check that main runs first, with one line naming the
    flag (run_cli prints it and exits 2), and no file or directory made."""
    cli = data.draw(st.sampled_from(sorted(CLIS)))
    action = data.draw(st.sampled_from(ruled(cli)))
    value = data.draw(bad_values(action, CLIS[cli][1].get(action.dest)))
    flag = action.option_strings[0]
    with contextlib.chdir(empty_dir):
        with pytest.raises(UserError) as e:
            CLIS[cli][2]([f"{flag}={value}"])
    assert os.listdir(empty_dir) == []
    assert "\n" not in str(e.value) and flag in str(e.value), str(e.value)


@pytest.mark.parametrize("cli,argv,message", [
    ("train", ["--data", "missing.txt"], "--data missing.txt: no such text file"),
    ("train", ["--data", "a_dir"], "--data a_dir: is a directory"),
    ("train", ["--model", "missing.pt"], "--model missing.pt: unknown model"),
    ("train", ["--model", "a_dir"], "--model a_dir: is a directory"),
    ("train", ["--model_path", "missing"], "--model_path missing: no such Hugging Face weights"),
    ("train", ["--out_dir", "a_file"], "--out_dir a_file: a_file is a file, not a directory"),
    ("train", ["--out_dir", "a_file/runs"], "--out_dir a_file/runs: a_file is a file"),
    ("train", ["--cache", "a_file"], "--cache a_file: a_file is a file"),
    ("train", ["--cache", "/proc/nope"], "--cache /proc/nope: cannot write in /proc"),
    ("train", ["--run", "../x"], "--run ../x: use a name"),
    ("train", ["--device", "cuda:7"], "--device cuda:7: no such CUDA device"),
    ("train", ["--device", "gpu"], "--device gpu: not a torch device"),
    ("evals", ["--data", "a_dir"], "--data a_dir: is a directory"),
    ("evals", ["--export", "a_file"], "--export a_file: a_file is a file"),
    ("evals", ["--model", "gpt7"], "--model gpt7: unknown model"),
    ("evals", ["--skip", "probes"], "--skip probes: unknown section(s) probes"),
    ("gpt", ["--out_dir", "/proc/x"], "--out_dir /proc/x: cannot write in /proc"),
    ("gpt", ["--data", "missing.txt"], "--data missing.txt: no such text file"),
    ("bench", ["--shapes", "1,2,3"], "--shapes 1,2,3: entry 1,2,3 is not d_model,n_latents,k,batch"),
    ("bench", ["--shapes", "64,128,4,32", "8,4,5,2"], "entry 8,4,5,2 needs every value >= 1 and k <= n_latents"),
])
def test_bad_paths_are_one_line_user_errors_that_make_nothing(cli, argv, message, tmp_path, monkeypatch):
    """Missing, a directory where a file is expected and the reverse, unwritable."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir").mkdir()
    with pytest.raises(UserError) as e:
        CLIS[cli][2](argv)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["a_dir", "a_file"] and os.listdir(tmp_path / "a_dir") == []


def test_evals_refuses_a_missing_checkpoint_path(tmp_path):
    with pytest.raises(UserError, match="path .*nope.pt: no such checkpoint"):
        gpt.parse_args(evals.build_parser(), evals.RULES, [str(tmp_path / "nope.pt")], ("path",))
