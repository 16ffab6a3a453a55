"""
interchange.py: EleutherAI sparsify's on-disk layout for an SAE, DIR/sae.safetensors and
DIR/cfg.json: the export of a train.py checkpoint to it, and the import of any SAE in it
(ours, or another trainer's) for evals.py.

    python evals.py out/RUN/ckpt.pt --export DIR     # DIR/sae.safetensors + DIR/cfg.json
    python evals.py DIR --model gpt2 --layer 8       # evaluate an SAE in that layout

Its own file because it is a file format, not one of the paper's evaluations: evals.py keeps
to the paper's metrics and only calls export_sparsify and import_sparsify, and anyone who wants
this project's SAEs in sparsify's layout (or the reverse) reads this file alone.

sparsify's SAE: top_acts, top_indices = TopK(ReLU(encoder(x - b_dec))), x_hat = sum_j
top_acts_j W_dec[top_indices_j] + b_dec, with encoder.weight and W_dec (num_latents, d_in).
Ours is the same map of the normalized input x_n, with encoder.weight = W_enc, encoder.bias
= b_enc, W_dec = W_dec, b_dec = b_pre; ReLU then TopK keeps the same values as our TopK then
ReLU, and lists different (zero-valued) latents only when fewer than k pre-activations are
positive. What the layout cannot hold is the input normalization (paper §2.1), x_n =
(x - mean(x)) / |x - mean(x)| per token: the mean removal is linear, but the division by
each token's own norm is not, so no weights or biases can apply it. The export is exact on
normalized inputs: a user normalizes x first and maps sparsify's output back with
x_hat = sae_out * |x - mean(x)| + mean(x), as cfg.json's "nanosae" block (which sparsify
ignores) spells out. That block also names the subject model; an import with it normalizes
as we do, one without it (another trainer's SAE) reads the raw residuals, as sparsify does.
"""

import json
import os

import torch

import gpt
import train
from gpt import UserError
from sae import SAE, SAEConfig

SPARSIFY_FILES = ("sae.safetensors", "cfg.json")
NORMALIZATION = "per-token mean removal and unit norm"


def export_sparsify(path, out_dir, raw=False):
    """A train.py checkpoint -> out_dir/sae.safetensors and out_dir/cfg.json in sparsify's
    layout, the EMA weights unless raw. -> the cfg dict written."""
    from safetensors.torch import save_file
    sae, ck = train.load_sae(path, ema=not raw)
    if sae.cfg.activation != "topk":
        kind = {"relu": "a ReLU SAE", "batchtopk": "a BatchTopK SAE (a JumpReLU once trained)"}[sae.cfg.activation]
        raise UserError(f"{path}: {kind} has no sparsify equivalent (sparsify's SAEs are TopK); export a TopK one")
    subject = ck.get("subject") or {}
    cfg = {"d_in": sae.cfg.d_model, "num_latents": sae.cfg.n_latents, "k": sae.cfg.k,
           "expansion_factor": max(1, sae.cfg.n_latents // sae.cfg.d_model),  # an int there; num_latents rules
           "normalize_decoder": True, "multi_topk": sae.cfg.multi_topk, "activation": "topk",
           "nanosae": {"normalization": NORMALIZATION if sae.cfg.normalize else "none",
                       "input": "mu = x.mean(-1, keepdim=True); s = (x - mu).norm(dim=-1, keepdim=True); x_n = (x - mu) / s",
                       "output": "x_hat = sae_out * s + mu",
                       "checkpoint": os.path.abspath(path), "weights": "raw" if raw else "EMA",
                       "subject": {key: subject.get(key) for key in
                                   ("model", "path", "sha256", "layer", "ctx_len", "include_first", "data")}}}
    if not sae.cfg.normalize:
        del cfg["nanosae"]["input"], cfg["nanosae"]["output"]
    os.makedirs(out_dir, exist_ok=True)
    weights = {"encoder.weight": sae.W_enc, "encoder.bias": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_pre}
    save_file({key: w.detach().float().contiguous() for key, w in weights.items()},
              os.path.join(out_dir, SPARSIFY_FILES[0]))
    with open(os.path.join(out_dir, SPARSIFY_FILES[1]), "w") as f:
        json.dump(cfg, f, indent=1)
    print(f"wrote {out_dir}/{SPARSIFY_FILES[0]} and {SPARSIFY_FILES[1]} in sparsify's layout"
          + (": normalize inputs per token first, see cfg.json's nanosae block" if sae.cfg.normalize else ""))
    return cfg


def import_sparsify(path, model="", layer=None, ctx_len=None, data=""):
    """A directory in sparsify's layout -> (SAE, subject dict as train.py records it). The
    subject model and site come from the flags, else from cfg.json's nanosae block (our
    exports); another trainer's SAE needs --model and --layer."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    weights_path, cfg_path = (os.path.join(path, f) for f in SPARSIFY_FILES)
    if not (os.path.isfile(weights_path) and os.path.isfile(cfg_path)):
        raise UserError(f"{path}: an SAE directory needs {' and '.join(SPARSIFY_FILES)} "
                        f"(sparsify's layout, as --export writes)")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
        w = load_file(weights_path)
    except (ValueError, SafetensorError) as e:
        raise UserError(f"{path}: unreadable {SPARSIFY_FILES[1]} or {SPARSIFY_FILES[0]} ({str(e)[:120]})") from None
    if cfg.get("activation", "topk") != "topk" or cfg.get("transcode") or cfg.get("skip_connection"):
        raise UserError(f"{cfg_path}: only plain TopK SAEs can be read (activation topk, no transcoder or skip connection)")
    ours = cfg.get("nanosae") or {}
    try:
        d = cfg["d_in"]
        n = cfg.get("num_latents") or d * cfg.get("expansion_factor", 32)  # sparsify's default factor
        sae = SAE(SAEConfig(d_model=d, n_latents=n, k=cfg["k"], multi_topk=cfg.get("multi_topk", False),
                            normalize=ours.get("normalization") == NORMALIZATION))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{cfg_path}: not a sparsify SAE config ({type(e).__name__}: {e})") from None
    shapes = {"encoder.weight": (n, d), "encoder.bias": (n,), "W_dec": (n, d), "b_dec": (d,)}
    bad = [f"{key} {tuple(w[key].shape) if key in w else 'missing'}" for key in shapes
           if key not in w or tuple(w[key].shape) != shapes[key]]
    if bad:
        raise UserError(f"{weights_path}: expected " + ", ".join(f"{key} {s}" for key, s in shapes.items()) +
                        f" for d_in {d}, num_latents {n}; got " + ", ".join(bad))
    with torch.no_grad():
        for name, key in (("W_enc", "encoder.weight"), ("b_enc", "encoder.bias"), ("W_dec", "W_dec"), ("b_pre", "b_dec")):
            getattr(sae, name).copy_(w[key].float())
    subject = dict(ours.get("subject") or {})
    if model:  # another subject model than the recorded one: no hash to check it against
        subject.update(model=model, path=None if model in gpt.GPT.PRETRAINED else model, sha256=None)
    subject.update({key: v for key, v in (("layer", layer), ("ctx_len", ctx_len), ("data", data)) if v not in (None, "")})
    if not subject.get("model") or subject.get("layer") is None:
        raise UserError(f"{path}: no subject model recorded (an SAE from another trainer): pass --model "
                        f"(gpt2, gpt2-medium, ... or a gpt.py checkpoint) and --layer")
    subject.setdefault("ctx_len", 64)  # the paper's
    subject.setdefault("include_first", False)
    subject["data"] = os.path.abspath(subject.get("data") or gpt.CORPUS)
    return sae.eval(), subject


def import_flags(args):
    """evals.py's --model, --layer, --ctx_len, --data, which only an SAE directory takes."""
    flags = {f: getattr(args, f) for f in ("model", "layer", "ctx_len", "data")}
    given = [f"--{f}" for f, v in flags.items() if v not in (None, "")]
    if os.path.isdir(args.path):
        if args.raw:
            raise UserError(f"--raw: {args.path} holds one set of weights (no EMA); leave --raw out")
    elif given:
        raise UserError(f"{', '.join(given)}: only for an SAE directory in sparsify's layout; {args.path} is a "
                        f"train.py checkpoint, which records its subject model")
    return flags
