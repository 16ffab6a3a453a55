"""
train.py: train a sparse autoencoder on a language model's residual stream.

    python train.py --n_latents 32768 --k 32          # the default: bundled char-level Shakespeare GPT
    python train.py --model gpt2 --layer 8 --n_latents 32768 --k 32 --tokens 200_000_000   # on a GPU
    torchrun --nproc_per_node=8 train.py -- --model gpt2 --layer 8 ...   # data-parallel on 8 GPUs
    torchrun --nproc_per_node=8 train.py -- ... --latent_shards 8        # the latents split over 8 GPUs (sharding.py)

Pipeline, top to bottom: the subject model and its text (gpt.py) -> an activation stream
(residuals after block `layer`, generated in chunks or read from an on-disk cache, shuffled
within each chunk) -> the SAE (sae.py) trained with Adam, the decoder constraint, an EMA of
the weights and dead-latent tracking for AuxK -> out/<run>/ckpt.pt and log.jsonl.
"""

import json
import math
import os
import time
import zlib
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import cudagraph
import gpt
import sharding
from sharding import all_ranks, any_rank, any_rank_max, barrier, setup_distributed, step_loss, world_size
from gpt import UserError, claim_run_dir, discard_failed_start, lock_file  # the run directory's
from sae import SAE, SAEConfig, fvu


def paper_lr(n_latents):
    """The paper's learning rate for n latents: 2e-4 / sqrt(n / 2^14) ([code + peers], Fig. 3)."""
    return 2e-4 / math.sqrt(n_latents / 2 ** 14)


def flag(default, help):
    """A TrainConfig field and its --help text: the one place each flag is described."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # subject model and site
    model: str = flag(gpt.DEFAULT_CKPT, "subject model: a gpt.py checkpoint (default: the shipped char "
                      "GPT, data/gpt.pt) or gpt2, gpt2-medium, gpt2-large, gpt2-xl")
    model_path: str = flag("", "local Hugging Face GPT-2 weights (directory or model.safetensors / "
                           "pytorch_model.bin); default out/hf/<name>/, downloaded when online")
    data: str = flag("", "UTF-8 text the contexts are drawn from (its last ~10%% is held out); "
                     "default: the bundled Shakespeare")
    layer: int = flag(-1, "residual stream after this block, 0-based; -1 picks 2/3 of the depth "
                      "(the paper's layer 8 of 12)")
    ctx_len: int = flag(64, "tokens per context (paper: 64)")
    include_first: bool = flag(False, "also train on position 0 of each context (excluded by default: "
                               "its activations are outliers)")
    # the SAE (sae.py)
    n_latents: int = flag(32768, "number of latents n")
    k: int = flag(32, "active latents per token (TopK)")
    k_aux: int = flag(0, "dead latents used by AuxK; 0 uses sae.py's default")
    auxk_coef: float = flag(1 / 32, "weight of the AuxK loss (paper App. A.2: 1/32)")
    activation: str = flag("topk", "topk (the paper's SAE); batchtopk (BatchTopK, arXiv 2412.06410: the top "
                           "k*B pre-activations of each batch of B tokens in training, a JumpReLU at a threshold "
                           "estimated in training when evaluated); or relu (ReLU + L1 baseline, needs --l1_coef)")
    l1_coef: float = flag(0.0, "L1 penalty weight for --activation relu")
    multi_topk: bool = flag(False, "train with Multi-TopK, L(k) + L(4k)/8 (paper §5.3)")
    matryoshka: str = flag("", "Matryoshka SAE (arXiv 2503.09532): comma-separated inner prefix sizes, e.g. "
                           "2048,8192; latents 0..m-1 of each prefix m also reconstruct alone, each with its own "
                           "FVU term; with --activation topk or batchtopk (the libraries pair it with batchtopk)")
    auxk: bool = flag(True, "turn off the AuxK loss (ablation of paper §2.4)")  # the flag is --no_auxk
    no_init_tricks: bool = flag(False, "ablation (paper §2.4): b_pre starts at 0 and the encoder at random "
                                "unit rows, instead of the geometric median, the decoder's transpose and "
                                "the encoder rescale")
    # optimization (paper App. A)
    tokens: int = flag(4_000_000, "training tokens")
    batch_size: int = flag(4096, "tokens per optimizer step, all processes together (under torchrun each "
                           "process takes batch_size / processes)")
    lr: float = flag(0.0, "Adam learning rate; 0 means --lr_scale times the paper's 2e-4 / sqrt(n_latents / 2^14)")
    lr_scale: float = flag(4.0, "with --lr 0, the learning rate in multiples of the paper's rule; 1 is the paper's "
                           "(README: the default recipe)")
    lr_warmup: float = flag(0.0, "share of the steps over which the learning rate rises linearly from 0 "
                            "at the start; 0: none")
    lr_decay: float = flag(0.0, "share of the steps over which the learning rate falls linearly to 0 at "
                           "the end; 0: none (with --lr_warmup 0, the paper's constant learning rate)")
    ema_decay: float = flag(0.999, "decay of the weight EMA that is evaluated and saved (paper: 0.999)")
    grad_clip: float = flag(0.0, "clip the gradient norm to this; 0 is off")
    dead_tokens: int = flag(0, "a latent is dead after this many tokens without firing; 0 means "
                            "min(10M, tokens/4)")
    resample_every: int = flag(-1, "tokens between restarts of the dead latents on badly reconstructed inputs "
                               "(Bricken et al. 2023; train.restart_latents); 0 is off (the paper's recipe); -1 "
                               "means every third step for a TopK SAE in one latent group, else off")
    shuffle_tokens: int = flag(1 << 18, "activations generated per chunk and shuffled together (rounded "
                               "to a multiple of --batch_size)")
    seed: int = flag(0, "random seed (SAE init, contexts, shuffling)")
    shards: int = flag(0, "independent data shards; each process generates or reads its own share, so a "
                       "run with the same --shards gives the same batches on any number of processes; "
                       "0 means one per process")
    latent_shards: int = flag(1, "split the latents over this many processes (tensor parallel: each holds n_latents / "
                              "this rows of the encoder and decoder); under torchrun the processes form "
                              "processes / latent_shards data-parallel replicas of that many shards; 1: off")
    # bookkeeping
    cache: str = flag("", "directory for an on-disk activation cache (float32, a checksum per chunk): written once, then "
                      "read by later runs")
    out_dir: str = flag("out", "parent directory of run directories")
    run: str = flag("", "run name: writes OUT_DIR/RUN/ckpt.pt and log.jsonl; default from activation, n, k")
    device: str = flag("", "torch device; default cuda when available, else cpu")
    dtype: str = flag("", "autocast dtype for the subject model and the encoder matmul; default bfloat16 "
                      "on cuda, float32 on cpu")
    log_every: int = flag(20, "steps between log.jsonl records and progress-bar metrics")
    ckpt_every: int = flag(0, "tokens between checkpoints (written atomically, for --resume); 0 means a "
                           "tenth of the run")
    eval_tokens: int = flag(1 << 16, "held-out tokens for the final summary")
    skip_nonfinite: bool = flag(False, "skip batches whose loss is NaN/inf (counted in the log) instead of "
                                "stopping")
    cuda_graph: bool = flag(False, "replay the SAE's update (forward, backward, Adam) as one recorded CUDA graph "
                            "(cudagraph.py): no kernel launches from Python, no host syncs inside a step; "
                            "a TopK SAE in one process on CUDA, without --skip_nonfinite")

    def resolve(self):
        """Fill the defaults that depend on other fields."""
        if not self.lr:
            self.lr = self.lr_scale * paper_lr(self.n_latents)
        if self.resample_every == -1:
            self.resample_every = 3 * self.batch_size if self.activation == "topk" and self.latent_shards == 1 else 0
        if not self.dead_tokens:
            # The paper's 10M tokens, capped at a quarter of the run so that AuxK can start in a
            # short one. Not shorter: a rare latent of a short run (n 32768, k 32: 4 firings per
            # latent per 4096-token step on average) can go 100 steps without firing and still
            # be alive; AuxK then trains its activations to the residual's smaller scale, below
            # the TopK threshold, and it stops firing (README: "Dead latents and AuxK").
            self.dead_tokens = min(10_000_000, max(self.batch_size, self.tokens // 4))
        if not self.ckpt_every:
            self.ckpt_every = max(self.batch_size, self.tokens // 10)
        if not self.shards:
            self.shards = world_size() // self.latent_shards  # one per data-parallel replica
        if not self.device:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if not self.dtype:
            self.dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        if not self.run:
            self.run = f"{self.activation}_n{self.n_latents}_k{self.k}" + ("_multi" if self.multi_topk else "") \
                + ("_matryoshka" if self.matryoshka else "")
        return self


# each flag's --help text, read from TrainConfig (scaling.py's CLI reuses it)
HELP = {f.name: f.metadata["help"] for f in fields(TrainConfig)}


def check_run_name(run):
    parts = run.replace(os.sep, "/").split("/")
    if os.path.isabs(run) or any(p in ("", ".", "..") for p in parts):
        return "use a name (or sub/name) inside --out_dir: no leading /, no . or .. parts, no empty parts"
    return None


def check_prefixes(s):
    """--matryoshka: '' or increasing positive integers separated by commas -> an error or None."""
    try:
        m = prefixes(s)
    except ValueError:
        m = (0,)
    if not all(0 < a < b for a, b in zip(m, m[1:] + (math.inf,))):
        return "use increasing positive prefix sizes separated by commas, e.g. 2048,8192"
    return None


def prefixes(s):
    """--matryoshka's text -> the tuple of prefix sizes (() for '')."""
    return tuple(int(p) for p in s.split(",")) if s.strip() else ()


# What each flag accepts, checked by check_config before anything is loaded or created
# (gpt.check_flags; "" means the default, chosen by resolve). Bounds past any sensible run
# are there to catch typos (1e30 tokens) before they become allocation failures.
RULES = {
    "model": gpt.Model(), "model_path": gpt.InputFile("Hugging Face weights", dirs_too=True),
    "data": gpt.InputFile("text file"), "layer": gpt.Number(-1, 10_000, note="-1: 2/3 of the depth"),
    "ctx_len": gpt.Number(1, 1 << 20),
    "n_latents": gpt.Number(1, 1 << 24),  # the paper's largest SAE: 16M latents
    "k": gpt.Number(1, 1 << 24), "k_aux": gpt.Number(0, 1 << 24, note="0: sae.py's default"),
    "auxk_coef": gpt.Number(0, 1e3), "activation": gpt.OneOf(("topk", "batchtopk", "relu")),
    "l1_coef": gpt.Number(0, 1e6), "matryoshka": check_prefixes,
    "tokens": gpt.Number(1, 10 ** 13), "batch_size": gpt.Number(2, 1 << 24),
    "lr": gpt.Number(0, 1, note="0: --lr_scale times 2e-4 / sqrt(n_latents / 2^14)"),
    "lr_warmup": gpt.Number(0, 1, note="a share of the steps"), "lr_decay": gpt.Number(0, 1, note="a share of the steps"),
    "ema_decay": gpt.Number(0, 1, open_hi=True), "grad_clip": gpt.Number(0, 1e6, note="0: off"),
    "dead_tokens": gpt.Number(0, 10 ** 13, note="0: min(10M, tokens / 4)"),
    "resample_every": gpt.Number(-1, 10 ** 13, note="0: off, -1: every third step"),
    "lr_scale": gpt.Number(0, 1e3, open_lo=True), "shuffle_tokens": gpt.Number(1, 1 << 30),
    "seed": gpt.SEED, "shards": gpt.Number(0, 1 << 16, note="0: one per process"),
    "latent_shards": gpt.Number(1, 1 << 16, note="1: off"),
    "cache": gpt.OutputDir(), "out_dir": gpt.OutputDir(), "run": check_run_name,
    "device": gpt.check_device, "dtype": gpt.OneOf(("float32", "bfloat16", "float16")),
    "log_every": gpt.Number(1, 10 ** 9), "ckpt_every": gpt.Number(0, 10 ** 13, note="0: a tenth of the run"),
    "eval_tokens": gpt.Number(1, 1 << 24),
}


def check_config(c):
    """One-line errors naming the flag and the fix: each flag's RULES, then what flags need of each other."""
    gpt.check_flags(c, RULES)
    if c.activation != "relu" and not 1 <= c.k <= c.n_latents:
        raise UserError(f"--k {c.k} is out of range: need 1 <= k <= n_latents ({c.n_latents})")
    if prefixes(c.matryoshka) and prefixes(c.matryoshka)[-1] >= c.n_latents:
        raise UserError(f"--matryoshka {c.matryoshka}: each inner prefix must be smaller than --n_latents "
                        f"({c.n_latents}), which is the last prefix")
    if c.ctx_len < 2 and not c.include_first:
        raise UserError(f"--ctx_len {c.ctx_len} leaves no tokens once position 0 is excluded: use 2 or more")
    sharding.check_latent_shards(c, world_size())
    if c.resample_every > 0 and (c.activation != "topk" or c.latent_shards > 1):  # -1: on where it can be
        raise UserError(f"--resample_every {c.resample_every} restarts the latents of a TopK SAE in one process's "
                        f"latent group: pass --resample_every 0, or --activation topk with --latent_shards 1")
    cudagraph.check_config(c)
    world = world_size() // c.latent_shards  # the data-parallel replicas: a latent group reads one batch
    shards = c.shards or world
    if c.shards < 0 or shards % world:
        raise UserError(f"--shards {c.shards}: use a multiple of the number of processes ({world}), or 0 for one each")
    if c.batch_size % shards or c.batch_size // world < 2:
        raise UserError(f"--batch_size {c.batch_size} (tokens per step, all processes together) must split into "
                        f"{shards} equal shard batches and give each of the {world} processes 2 or more tokens")


# -----------------------------------------------------------------------------
# Subject model and activations


def load_subject(c):
    """(model, tokenizer, train token ids, held-out token ids, reference dict)."""
    model, tok, ref = gpt.load_subject_model(c.model, c.model_path or None)
    if c.layer == -1:
        c.layer = model.config.n_layer * 2 // 3  # the paper's layer 8 of GPT-2 small's 12
    model.check_layer(c.layer)
    if c.ctx_len > model.config.block_size:
        raise UserError(f"--ctx_len {c.ctx_len} is longer than the model's block_size {model.config.block_size}")
    text = gpt.load_text(c.data or gpt.CORPUS)
    train_text, val_text = gpt.split_text(text)
    train_ids, val_ids = gpt.encode_text(train_text, tok), gpt.encode_text(val_text, tok)
    ref.update(layer=c.layer, ctx_len=c.ctx_len, include_first=c.include_first, tokenizer=tok.to_dict(),
               d_model=model.config.n_embd, data=os.path.abspath(c.data or gpt.CORPUS))
    return model.to(c.device), tok, train_ids, val_ids, ref


@torch.no_grad()
def activations(model, contexts, layer, include_first, device, dtype, batch=256):
    """Residuals after block `layer` for (N, ctx_len) token contexts -> (N * T', d_model)
    float32, T' = ctx_len - 1 when position 0 is excluded (its norm is an outlier)."""
    out = []
    for i in range(0, len(contexts), batch):
        idx = contexts[i:i + batch].to(device)
        with torch.autocast(device_type=idx.device.type, dtype=getattr(torch, dtype), enabled=dtype != "float32"):
            h = model.resid(idx, layer)
        if not include_first:
            h = h[:, 1:]
        out.append(h.float().reshape(-1, h.size(-1)))
    return torch.cat(out)


class ActivationStream:
    """Training batches of activations, (batch_size, d_model) float32.

    The data come in c.shards shards, and a step's batch is the concatenation, in shard
    order, of batch_size / shards rows from each. A process reads only the shards it is given
    (`shards`, default all): under DDP each rank generates its own, and one process reading
    every shard sees the same global batches as several ranks reading one each.

    Chunk c of shard r (chunk_tokens rows, a multiple of the shard's rows per step) holds the
    residuals of contexts drawn at random from the training ids with a generator seeded by
    (seed, c, r); its rows are shuffled by a permutation from the same seed, so each batch
    mixes thousands of contexts. Shard 0 keeps the seeds of the unsharded stream, so
    --shards 1 gives the batches (and reads the caches) it always did. Everything is a pure
    function of (seed, step): resuming at any step is exact, and a `--cache` directory, which
    stores the chunks' rows unshuffled in acts.f32 and a CRC32 of each in meta.json (one
    subdirectory per shard when there are several), gives the same batches as generating them
    on the fly."""

    def __init__(self, c, model, train_ids, subject, shards=None):
        self.c, self.model, self.ids, self.subject, self.d = c, model, train_ids, subject, subject["d_model"]
        self.shards = range(c.shards) if shards is None else shards
        self.shard_batch = c.batch_size // c.shards
        self.chunk_tokens = max(1, c.shuffle_tokens // c.batch_size) * self.shard_batch
        self.n_chunks = math.ceil(c.tokens / (self.chunk_tokens * c.shards))
        self.per_ctx = c.ctx_len - (0 if c.include_first else 1)
        self.chunk_bytes = self.chunk_tokens * self.d * 4  # float32 rows in the cache
        self.cache = {r: self._open_cache(r) for r in self.shards} if c.cache else None
        self._chunk_index, self._chunk = -1, None

    def _seed(self, base, chunk, shard):
        # torch's CPU generator keeps a seed's low 32 bits: shards sit 2^20 chunks apart there
        return self.c.seed * base + chunk + (shard << 20)

    def _generate(self, chunk, shard):
        g = torch.Generator().manual_seed(self._seed(1_000_003, chunk, shard))
        n_ctx = math.ceil(self.chunk_tokens / self.per_ctx)
        starts = torch.randint(len(self.ids) - self.c.ctx_len, (n_ctx,), generator=g).numpy()
        contexts = torch.from_numpy(np.stack([self.ids[s:s + self.c.ctx_len] for s in starts]))
        acts = activations(self.model, contexts, self.c.layer, self.c.include_first, self.c.device, self.c.dtype)
        return acts[: self.chunk_tokens].cpu()

    def _open_cache(self, shard):
        """The cache of `shard`, {dir, CRC32 of each chunk}, its missing chunks written first.
        One process writes a cache directory at a time (an OS file lock, which dies with its
        holder); another waits for it rather than read or write chunks half-done."""
        meta = {"model_sha256": self.subject["sha256"], "layer": self.c.layer, "ctx_len": self.c.ctx_len,
                "include_first": self.c.include_first, "seed": self.c.seed, "chunk_tokens": self.chunk_tokens,
                "d_model": self.d}
        cache = self.c.cache
        if self.c.shards > 1:  # each rank writes only its own shards' directories
            cache = os.path.join(cache, f"shard{shard}of{self.c.shards}")
            meta["shard"] = f"{shard} of {self.c.shards}"
        try:
            os.makedirs(cache, exist_ok=True)
        except OSError as e:
            raise UserError(f"--cache {cache}: cannot create it ({e.strerror}); pass a writable directory") from None
        lock, holder = lock_file(os.path.join(cache, ".lock"))
        if lock is None:
            print(f"waiting for process {holder}, which is writing the activation cache {cache}")
            lock, _ = lock_file(os.path.join(cache, ".lock"), wait=True)
        with lock:
            old = self._cache_meta(cache, meta)
            sums = old["crc32"] if old else []
            if len(sums) < self.n_chunks:
                self._write_cache(cache, meta, sums, shard)
        return {"dir": cache, "crc32": sums}

    def _cache_meta(self, cache, meta):
        """The cache's meta.json, checked against this run's setup and acts.f32's size; None if new."""
        meta_path, data_path = os.path.join(cache, "meta.json"), os.path.join(cache, "acts.f32")
        if not os.path.isfile(meta_path):
            return None
        fix = f"delete {cache} (it is rebuilt) or pass another --cache"
        try:
            old = json.load(open(meta_path))
        except (ValueError, OSError):
            raise UserError(f"--cache {cache}: meta.json is unreadable; {fix}") from None
        diff = [k for k in meta if old.get(k) != meta[k]]
        if diff:
            raise UserError(f"--cache {cache} was built for a different setup ({', '.join(diff)} differ): "
                            f"use another directory or delete it")
        if len(old.get("crc32", ())) != old.get("chunks_done"):
            raise UserError(f"--cache {cache} has no chunk checksums (written by an older train.py); {fix}")
        size = os.path.getsize(data_path) if os.path.isfile(data_path) else 0
        if size < old["chunks_done"] * self.chunk_bytes:
            raise UserError(f"--cache {cache}: acts.f32 is truncated ({size:,} bytes, meta.json records "
                            f"{old['chunks_done'] * self.chunk_bytes:,}); {fix}")
        return old

    def _write_cache(self, cache, meta, sums, shard):
        """Write the chunks after the len(sums) done, each flushed to disk before meta.json
        (replaced atomically) records it and its CRC32: the meta names only whole chunks."""
        from tqdm import tqdm
        meta_path, data_path = os.path.join(cache, "meta.json"), os.path.join(cache, "acts.f32")
        print(f"writing activation cache {cache}: {self.n_chunks * self.chunk_tokens:,} tokens "
              f"({self.n_chunks * self.chunk_bytes / 2**30:.2f} GiB)")
        try:
            with open(data_path, "r+b" if sums else "wb") as f:
                for chunk in tqdm(range(len(sums), self.n_chunks), desc="cache", unit="chunk"):
                    data = self._generate(chunk, shard).numpy().tobytes()
                    f.seek(chunk * self.chunk_bytes)
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                    sums.append(zlib.crc32(data))
                    with open(meta_path + ".tmp", "w") as m:
                        json.dump({**meta, "chunks_done": len(sums), "crc32": sums}, m)
                    os.replace(meta_path + ".tmp", meta_path)
        except OSError as e:
            raise UserError(f"--cache {cache}: cannot write it ({e.strerror}); free space on that disk or pass "
                            f"another --cache") from None

    def _read_cached(self, chunk, shard):
        """Chunk `chunk` of the shard's cache, refused unless all of it is there with its CRC32."""
        cache, buf = self.cache[shard], bytearray(self.chunk_bytes)
        with open(os.path.join(cache["dir"], "acts.f32"), "rb") as f:
            f.seek(chunk * self.chunk_bytes)
            got = f.readinto(buf)
        if got < len(buf) or zlib.crc32(buf) != cache["crc32"][chunk]:
            what = "is cut short" if got < len(buf) else "does not match its checksum"
            raise UserError(f"--cache {cache['dir']}: chunk {chunk} of acts.f32 {what} (the file was truncated or "
                            f"overwritten); delete {cache['dir']} (it is rebuilt) or pass another --cache")
        return torch.from_numpy(np.frombuffer(buf, dtype=np.float32).reshape(self.chunk_tokens, self.d))

    def _load_chunk(self, chunk, shard):
        rows = self._read_cached(chunk, shard) if self.cache is not None else self._generate(chunk, shard)
        perm = torch.randperm(self.chunk_tokens, generator=torch.Generator().manual_seed(self._seed(7919, chunk, shard)))
        return rows[perm]

    def _get_chunk(self, chunk):
        """The rows of chunk `chunk` of each shard read here, in shard order."""
        if chunk != self._chunk_index:
            self._chunk_index, self._chunk = chunk, [self._load_chunk(chunk, r) for r in self.shards]
        return self._chunk

    def batch(self, step):
        """The batch of training step `step` (0-based): this process's shards' part of it."""
        chunk, offset = divmod(step * self.shard_batch, self.chunk_tokens)
        return torch.cat([rows[offset:offset + self.shard_batch] for rows in self._get_chunk(chunk)])

    def sample(self, n):
        """Up to n activations from the first chunk of the first shard read here (for
        initialization; under DDP rank 0's, which reads shard 0, reach every rank)."""
        return self._get_chunk(0)[0][:n]


def heldout_windows(val_ids, ctx_len, n_tokens, include_first):
    """Fixed held-out contexts holding about n_tokens evaluated tokens."""
    per_ctx = ctx_len - (0 if include_first else 1)
    return gpt.fixed_windows(val_ids, ctx_len, max(1, math.ceil(n_tokens / per_ctx)))


# -----------------------------------------------------------------------------
# The EMA of the weights (paper App. A: decay 0.999)


class EMA:
    """Exponential moving average of the SAE's weights, what the paper evaluates. The decay
    warms up as min(decay, (1 + t) / (10 + t)) at step t: a run much shorter than
    1 / (1 - decay) = 1000 steps (every CPU run here) would otherwise average in its first,
    untrained steps (README: the EMA's warm-up); long runs get the paper's 0.999."""

    def __init__(self, module, decay):
        self.decay, self.steps = decay, 0
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module):
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for k, v in module.state_dict().items():
            self.shadow[k].lerp_(v, 1 - d)

    def state_dict(self):
        return {k: v.clone() for k, v in self.shadow.items()}

    def load(self, shadow, steps):
        self.shadow, self.steps = {k: v.clone() for k, v in shadow.items()}, steps


# -----------------------------------------------------------------------------
# Held-out summary (evals.py has the full set of metrics)


@torch.no_grad()
def heldout_summary(sae, model, windows, layer, include_first, device, batch=64):
    """FVU and L0 of the SAE on held-out residuals (normalized space, paper §2.1), and the
    cross-entropy of the model with the reconstruction spliced in at `layer` (paper §4.1),
    position 0 left clean when excluded from training."""
    sae.eval()
    xs, xhats, l0s, ce_clean, ce_sae, n = [], [], [], 0.0, 0.0, 0
    first = 0 if include_first else 1
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch].to(device)
        idx, tgt = w[:, :-1], w[:, 1:]
        h = model.resid(idx, layer).float()
        x = h[:, first:].reshape(-1, h.size(-1))
        out = sae(x)
        x_n, mu, scale = sae.normalize_input(x)
        xs.append(x_n)
        xhats.append((out.x_hat - mu) / scale)  # the reconstruction in the same normalized space
        l0s.append(out.l0 * len(x))
        spliced = h.clone()
        spliced[:, first:] = out.x_hat.view(h.size(0), -1, h.size(-1))
        logits_clean = model.logits_from_resid(h, layer)[:, first:]
        logits_sae = model.logits_from_resid(spliced, layer)[:, first:]
        t = tgt[:, first:].reshape(-1)
        ce_clean += torch.nn.functional.cross_entropy(logits_clean.reshape(len(t), -1), t, reduction="sum").item()
        ce_sae += torch.nn.functional.cross_entropy(logits_sae.reshape(len(t), -1), t, reduction="sum").item()
        n += len(t)
    x, x_hat = torch.cat(xs), torch.cat(xhats)
    sae.train()
    return {"fvu": fvu(x, x_hat).item(), "l0": float(sum(l0s) / len(x)), "ce_clean": ce_clean / n,
            "ce_sae": ce_sae / n, "delta_ce": (ce_sae - ce_clean) / n, "eval_tokens": n}


# -----------------------------------------------------------------------------
# Training


def make_sae(c, d_model):
    try:
        return SAE(SAEConfig(d_model=d_model, n_latents=c.n_latents, k=c.k, k_aux=c.k_aux or None,
                             auxk_coef=c.auxk_coef,
                             activation=c.activation, l1_coef=c.l1_coef, multi_topk=c.multi_topk,
                             matryoshka=prefixes(c.matryoshka)))
    except ValueError as e:
        raise UserError(f"bad SAE setting: {e}") from None


@dataclass
class Run:
    """What a training run carries from step to step; train() and its parts share it."""
    c: TrainConfig
    model: torch.nn.Module  # the subject model
    subject: dict  # its reference, saved with every checkpoint
    val_ids: torch.Tensor  # held-out token ids, for the final summary
    stream: "ActivationStream"
    sae: SAE
    net: torch.nn.Module  # the SAE, or its DDP wrapper
    opt: torch.optim.Optimizer
    ema: EMA
    tokens_since_fired: torch.Tensor  # (n_latents,) long: paper §2.4's dead-latent counter
    ckpt_path: str
    log_path: str
    main_rank: bool  # rank 0 alone writes and prints
    total_steps: int
    step: int = 0
    skipped: int = 0  # non-finite batches skipped (--skip_nonfinite)
    restarts: int = 0  # latents restarted (--resample_every)
    grid: "sharding.LatentGrid | None" = None  # --latent_shards > 1: this process's place among the shards
    graph: "cudagraph.GraphedStep | None" = None  # --cuda_graph: the update, recorded

    def checkpoint(self, metrics):
        c, sae = self.c, self.sae
        return {"sae_config": asdict(sae.cfg), "sae": sae.state_dict(), "ema": self.ema.shadow,
                "ema_steps": self.ema.steps, "train_config": asdict(c), "subject": self.subject,
                "step": self.step, "tokens_seen": self.step * c.batch_size, "optimizer": cudagraph.portable(self.opt),
                "tokens_since_fired": self.tokens_since_fired, "skipped": self.skipped, "restarts": self.restarts,
                "metrics": metrics}


def start_run(c, resume):
    """The subject model, the activation stream, the SAE initialized as the paper does (or
    restored from the run's checkpoint), Adam and the EMA -> Run. Under torchrun every rank
    calls this; rank 0 loads the subject model first (it may download it)."""
    torch.manual_seed(c.seed)
    if c.device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls outside autocast
    run_dir = os.path.join(c.out_dir, c.run)
    distributed = dist.is_initialized()
    ranks, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    grid = sharding.latent_grid(c) if distributed else None  # None unless --latent_shards > 1
    if rank:
        barrier(c)
    model, tok, train_ids, val_ids, subject = load_subject(c)
    if distributed and not rank:
        barrier(c)
    replicas, replica = (grid.replicas, grid.replica) if grid else (ranks, rank)
    per_rank = c.shards // replicas
    stream = ActivationStream(c, model, train_ids, subject, shards=range(replica * per_rank, (replica + 1) * per_rank))
    sae = (sharding.make_sharded_sae(c, subject["d_model"], grid) if grid
           else make_sae(c, subject["d_model"])).to(c.device)
    os.makedirs(run_dir, exist_ok=True)  # main has claimed it (claim_run_dir); this is for direct callers
    opt = torch.optim.Adam(sae.parameters(), lr=c.lr, betas=(0.9, 0.999), eps=6.25e-10,  # [code]
                           fused=True if c.device.startswith("cuda") or c.device == "cpu" else None)
    run = Run(c, model, subject, val_ids, stream, sae, sae, opt, None,
              torch.zeros(grid.shard.rows if grid else c.n_latents, dtype=torch.long, device=c.device),
              os.path.join(run_dir, "ckpt.pt"), os.path.join(run_dir, "log.jsonl"), rank == 0,
              math.ceil(c.tokens / c.batch_size), grid=grid)
    ck = restore(run) if resume else init_sae(run)
    if distributed and not grid:
        # DDP starts by copying rank 0's parameters to every rank (b_pre came from each rank's own shard)
        run.net = DDP(sae, device_ids=[torch.device(c.device).index] if c.device.startswith("cuda") else None)
    run.ema = EMA(sae, c.ema_decay)
    if ck is not None:
        run.ema.load(ck["ema"], ck["ema_steps"])
    if c.cuda_graph:
        run.graph = cudagraph.GraphedStep(run)
    return run


def init_sae(run):
    """paper §2.4, App. A.1: b_pre at the geometric median of a sample of inputs ([code]: 32,768
    of them), the encoder at the decoder's transpose (sae.py), rescaled; or the ablation. A new
    run's log starts empty."""
    c, sae = run.c, run.sae
    if run.grid:
        return sharding.init_sae(run)
    if c.no_init_tricks:  # b_pre = 0, encoder rows independent of the decoder's
        with torch.no_grad():
            sae.W_enc.copy_(torch.nn.functional.normalize(torch.randn_like(sae.W_enc), dim=1))
    else:
        sae.init_b_pre(run.stream.sample(32768).to(c.device))
        sae.init_encoder_scale()
    if run.main_rank:
        with open(run.log_path, "w"):
            pass


def restore(run):
    """Load the run's last checkpoint into run (weights, Adam, dead-latent counters, position);
    -> the checkpoint, whose EMA start_run restores once the EMA exists."""
    if run.grid:
        return sharding.restore(run)
    ck = gpt.load_checkpoint(run.ckpt_path)
    if ck["subject"]["sha256"] != run.subject["sha256"]:
        raise UserError(f"{run.ckpt_path} was trained on another subject model ({ck['subject']['model']})")
    run.sae.load_state_dict(ck["sae"])
    run.opt.load_state_dict(ck["optimizer"])
    run.tokens_since_fired = ck["tokens_since_fired"].to(run.c.device)
    run.step, run.skipped, run.restarts = ck["step"], ck["skipped"], ck.get("restarts", 0)
    if run.main_rank:
        print(f"resuming {run.ckpt_path} at step {run.step} ({run.step * run.c.batch_size:,} tokens) "
              f"with the run's saved settings")
    return ck


def lr_at(c, step, total_steps):
    """The learning rate of step `step` (0-based) of total_steps: c.lr, ramped up linearly over
    the first lr_warmup share of the steps and down to 0 over the last lr_decay share."""
    warm, decay = c.lr_warmup * total_steps, c.lr_decay * total_steps
    factor = 1.0
    if step < warm:
        factor = (step + 1) / warm
    if step >= total_steps - decay:
        factor = min(factor, (total_steps - step) / decay)
    return c.lr * factor


def train_step(run, x, dead):
    """One step of the paper's training on the batch x (B, d_model), dead (n_latents,) the
    latents that have not fired for dead_tokens tokens -> the global batch's [loss, fvu,
    aux_loss, l0], or None for a batch skipped as non-finite (--skip_nonfinite). A sharded
    run's step is sharding.train_step; --cuda_graph's update is run.graph's (cudagraph.py)."""
    if run.grid:
        return sharding.train_step(run, x, dead)
    c, sae = run.c, run.sae
    stepped = run.graph(run, x, dead) if run.graph else update(run, x, dead)
    if stepped is None:
        return None
    out, logged = stepped
    if sae.cfg.activation == "batchtopk":  # its inference threshold: the same on every rank
        sae.update_threshold(-any_rank_max(-torch.where(out.vals > 0, out.vals, torch.inf).amin()))
    run.ema.update(sae)
    # paper §2.4: a latent is dead once it has not fired for dead_tokens tokens
    # (fired on any rank: the ranks agree on which latents are dead)
    run.tokens_since_fired += c.batch_size
    run.tokens_since_fired.masked_fill_(any_rank(out.fired), 0)
    tokens = (run.step + 1) * c.batch_size
    if c.resample_every and tokens // c.resample_every > (tokens - c.batch_size) // c.resample_every:
        run.restarts += resample_dead(run, x, out)
    return logged


def update(run, x, dead):
    """train_step's update of the SAE: forward, backward, decoder-gradient projection, clipping,
    Adam, renormalization -> (SAEOutput, logged), or None for a batch skipped as non-finite."""
    c, sae = run.c, run.sae
    out = None
    if all_ranks(torch.isfinite(x).all()):
        with torch.autocast(device_type=torch.device(c.device).type, dtype=getattr(torch, c.dtype),
                            enabled=c.dtype != "float32"):
            out = run.net(x, dead_mask=dead if c.auxk else None)
        loss, logged, finite = step_loss(sae, x, out)
    if out is None or not finite:
        return skip_nonfinite(run, "activations" if out is None else "loss")
    for g in run.opt.param_groups:
        g["lr"] = lr_at(c, run.step, run.total_steps)
    descend(run, loss)
    return out, logged


def descend(run, loss):
    """The gradient of loss, then Adam's step on the SAE with the decoder kept unit-norm."""
    run.opt.zero_grad(set_to_none=True)
    loss.backward()                   # DDP: the gradients arrive averaged over the ranks
    run.sae.project_decoder_grad()    # paper App. A.1 / [code]: keep decoder rows on the unit sphere
    if run.c.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.sae.parameters(), run.c.grad_clip)
    run.opt.step()
    run.sae.normalize_decoder()


# -----------------------------------------------------------------------------
# Restarting dead latents: the default recipe's remedy for what AuxK does not revive at 4x the
# paper's learning rate (README: "The default recipe"), after Bricken et al. 2023's resampling,
# which the paper's AuxK replaced


@torch.no_grad()
def restart_latents(sae, idx, x_n, code=None, generator=None):
    """Restart the latents idx (m,) of sae on inputs of x_n (B, d, normalized) that the other
    latents' TopK code reconstructs worst: at most B // 2 inputs, drawn without replacement
    with probability proportional to ||e||^2, e = x_n - x_hat_n. Each restarted latent's
    decoder row is its input's e / ||e|| (it adds what the input lacks); its encoder row
    points at the input, x_n - b_pre, at the other latents' mean encoder norm, and b_enc
    puts its pre-activation there a tenth of the way from the input's k-th largest to its
    largest, so that it fires there and on near neighbours only. code: that code's values
    (B, k), ReLU'd and sorted descending, and x_hat_n (B, d), if the caller has them (a
    training step in which the latents idx did not fire); else computed here. -> the
    latents restarted, the first of idx."""
    n, k = sae.cfg.n_latents, sae.cfg.k
    idx = idx[:max(0, min(len(x_n) // 2, n - k))]  # n - k: the others still fill a TopK code
    others = torch.ones(n, dtype=torch.bool, device=idx.device).index_fill_(0, idx, False)
    if code is None:
        vals, top = sae.preacts(x_n).masked_fill_(~others, float("-inf")).topk(k, dim=1)  # the others' only
        code = vals.relu(), sae.decode_sparse(vals.relu(), top)  # the code's values, as forward's
    vals, x_hat_n = code
    e = x_n - x_hat_n  # (B, d)
    w = e.pow(2).sum(1)  # (B,)
    idx = idx[:int((w > 0).sum())]  # an input reconstructed exactly has no residual to start on
    if not len(idx):
        return idx
    pick = torch.multinomial(w, len(idx), replacement=False, generator=generator)  # (m,) inputs
    r = x_n[pick] - sae.b_pre  # (m, d): the inputs as the encoder sees them
    scale = sae.W_enc[others].norm(dim=1).mean()
    sae.W_dec[idx] = F.normalize(e[pick], dim=1)
    sae.W_enc[idx] = F.normalize(r, dim=1) * scale
    kth, top1 = vals[pick, -1], vals[pick, 0]
    sae.b_enc[idx] = kth + 0.1 * (top1 - kth) - scale * r.norm(dim=1)
    return idx


def resample_dead(run, x, out):
    """Restart the latents dead now (restart_latents), longest dead first, on inputs of the batch x
    (all ranks' under DDP) that this step's code `out` reconstructed worst (a dead latent is not
    in it), with fresh Adam moments (m 0, v the other rows' mean, so that the first steps are
    not outsized) and the EMA's rows set to the new weights -> how many were restarted."""
    c, sae = run.c, run.sae
    dead = (run.tokens_since_fired >= c.dead_tokens).nonzero().squeeze(1)
    if not len(dead):
        return 0
    dead = dead[run.tokens_since_fired[dead].argsort(descending=True, stable=True)]
    g = torch.Generator(device=x.device).manual_seed(c.seed * 1_000_003 + run.step)  # resumable
    x_n, mu, scale = sae.normalize_input(x)
    # DDP: every rank draws from the whole batch, as one process would, so the ranks restart alike
    x_n, vals, x_hat_n = (sharding.global_batch(t) for t in (x_n, out.vals, (out.x_hat - mu) / scale))
    idx = restart_latents(sae, dead, x_n, code=(vals, x_hat_n), generator=g)
    others = torch.ones(c.n_latents, dtype=torch.bool, device=idx.device).index_fill_(0, idx, False)
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc"):
            p = getattr(sae, name)
            st = run.opt.state[p]
            st["exp_avg"][idx] = 0
            st["exp_avg_sq"][idx] = st["exp_avg_sq"][others].mean(0)
            run.ema.shadow[name][idx] = p[idx]
    return len(idx)


def skip_nonfinite(run, what):
    """A batch whose activations or loss (what) are not finite: stop with the fix, or with
    --skip_nonfinite count it and go on -> None."""
    c = run.c
    if not c.skip_nonfinite:
        raise UserError(f"non-finite {what} at step {run.step} (tokens {run.step * c.batch_size:,}); the last "
                        f"checkpoint ({run.ckpt_path}) is kept. Lower --lr, set --grad_clip, or pass --skip_nonfinite")
    run.skipped += 1
    return None


def train(c, resume=False):
    """Run training for the resolved config `c`; returns the final checkpoint dict. Under
    torchrun (setup_distributed first) every rank runs this; rank 0 alone writes and prints."""
    from tqdm import tqdm
    run = start_run(c, resume)
    total_steps = run.total_steps
    t0 = time.time()
    bar = tqdm(total=total_steps * c.batch_size, initial=run.step * c.batch_size, unit="tok", unit_scale=True,
               desc=c.run, dynamic_ncols=True, disable=not run.main_rank)
    start_step, last_ckpt_tokens = run.step, run.step * c.batch_size
    while run.step < total_steps:
        x = run.stream.batch(run.step).to(c.device, non_blocking=True)
        dead = run.tokens_since_fired >= c.dead_tokens
        logged = train_step(run, x, dead)
        run.step += 1
        if logged is None:
            continue
        bar.update(c.batch_size)
        if (run.main_rank or run.grid) and (run.step % c.log_every == 0 or run.step == total_steps):
            dead_all = sharding.group_latents(run, dead)  # sharded: every shard's part, a collective
            if run.main_rank:
                log_step(run, logged, dead_all, time.time() - t0, bar)
        if c.ckpt_every and run.step * c.batch_size - last_ckpt_tokens >= c.ckpt_every and run.step < total_steps:
            if run.grid:
                sharding.save_checkpoint(run, {})
            elif run.main_rank:
                gpt.save_checkpoint(run.checkpoint({}), run.ckpt_path)
            last_ckpt_tokens = run.step * c.batch_size
    bar.close()
    return finish(run, time.time() - t0, (total_steps - start_step) * c.batch_size)


def log_step(run, logged, dead, elapsed, bar):
    """A log.jsonl record and the progress bar's metrics."""
    rec = {"step": run.step, "tokens": run.step * run.c.batch_size,
           **dict(zip(("loss", "fvu", "aux_loss", "l0"), logged.tolist())),
           "dead_frac": dead.float().mean().item(), "skipped": run.skipped, "restarts": run.restarts,
           "elapsed_s": round(elapsed, 2)}
    bar.set_postfix(fvu=f"{rec['fvu']:.3f}", l0=f"{rec['l0']:.1f}", dead=f"{rec['dead_frac']:.3f}",
                    aux=f"{rec['aux_loss']:.3f}")
    with open(run.log_path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def finish(run, train_s, tokens_trained):
    """The held-out summary with the EMA weights (paper App. A), the final checkpoint and its
    printout -> the checkpoint dict. Every rank computes the same numbers, so none waits."""
    c = run.c
    if run.grid:  # the held-out summary runs sharded too: no process holds every latent
        eval_sae = sharding.ShardedSAE(run.sae.cfg, run.grid.shard, draw=False).to(c.device)
    else:
        eval_sae = make_sae(c, run.subject["d_model"]).to(c.device)
    eval_sae.load_state_dict(run.ema.state_dict())
    windows = heldout_windows(run.val_ids, c.ctx_len, c.eval_tokens, c.include_first)
    metrics = heldout_summary(eval_sae, run.model, windows, c.layer, c.include_first, c.device)
    dead = sharding.group_latents(run, run.tokens_since_fired >= c.dead_tokens)  # sharded: a collective
    metrics.update(dead_frac=dead.float().mean().item(), train_seconds=round(train_s, 1),
                   tokens_per_s=round(tokens_trained / max(train_s, 1e-9)),
                   skipped=run.skipped, restarts=run.restarts)
    ck = run.checkpoint(metrics)
    if run.grid:
        sharding.save_checkpoint(run, metrics)
    if not run.main_rank:
        return ck
    if not run.grid:
        gpt.save_checkpoint(ck, run.ckpt_path)
    print(f"held-out ({metrics['eval_tokens']:,} tokens, EMA weights): FVU {metrics['fvu']:.4f}  L0 {metrics['l0']:.1f}  "
          f"delta CE {metrics['delta_ce']:+.4f} nats ({metrics['ce_clean']:.4f} -> {metrics['ce_sae']:.4f})  "
          f"dead {metrics['dead_frac']:.2%} (no fire in {c.dead_tokens:,} tokens)  "
          f"train {train_s / 60:.1f} min, {metrics['tokens_per_s']:,} tok/s")
    print(f"wrote {run.ckpt_path}")
    return ck


def load_sae(path, ema=True):
    """An SAE checkpoint from train.py -> (SAE in eval mode, checkpoint dict). ema: use the
    EMA weights (what the paper evaluates), else the raw final weights."""
    ck = gpt.load_checkpoint(path)
    if isinstance(ck, dict) and "latent_shards" in ck:  # a sharded run's manifest: its shards, joined
        ck = sharding.load_checkpoint(path, ck)
    if not isinstance(ck, dict) or "sae_config" not in ck or "sae" not in ck:
        raise UserError(f"{path}: not an SAE checkpoint (no sae_config/sae); pass the ckpt.pt that train.py "
                        f"writes (out/<run>/ckpt.pt)")
    sae = SAE(SAEConfig(**ck["sae_config"]))
    sae.load_state_dict(ck["ema"] if ema else ck["sae"])
    return sae.eval(), ck


# -----------------------------------------------------------------------------
# Command line

def build_parser():
    p = gpt.ArgumentParser(description="Train a TopK sparse autoencoder on a GPT's residual stream.")
    for f in fields(TrainConfig):
        if f.name == "auxk":
            p.add_argument("--no_auxk", dest="auxk", action="store_false", help=f.metadata["help"])
        elif f.type is bool:
            p.add_argument(f"--{f.name}", action="store_true", help=f.metadata["help"])
        else:
            shown = f" (default: {f.default})" if f.default not in ("", 0, -1) else ""
            p.add_argument(f"--{f.name}", type=gpt.integer if f.type is int else f.type, default=f.default,
                           choices=RULES["activation"].choices if f.name == "activation" else None, help=f.metadata["help"] + shown)
    p.add_argument("--resume", action="store_true", help="continue OUT_DIR/RUN/ckpt.pt where it stopped")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    return p


def parse(argv=None):
    """-> (the flags, the resolved TrainConfig), every value checked (RULES, check_config)
    before anything is loaded or created."""
    args = build_parser().parse_args(argv)
    c = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    check_config(c)
    return args, c.resolve()


def resumed_config(c):
    """The configuration c's run was started with, which a resumed run continues with, in the
    directory it is found in now."""
    ck_path = os.path.join(c.out_dir, c.run, "ckpt.pt")
    if not os.path.isfile(ck_path):
        raise UserError(f"--resume: {ck_path} does not exist; start the run without --resume")
    saved = gpt.load_checkpoint(ck_path)["train_config"]
    saved.setdefault("shards", 1)  # runs from before data shards read one
    saved.update(out_dir=c.out_dir, run=c.run)
    return TrainConfig(**{f.name: saved.get(f.name, f.default) for f in fields(TrainConfig)})


def main(argv=None):
    args, c = parse(argv)
    if args.resume:
        c = resumed_config(c)
    check_config(c)
    run_dir = os.path.join(c.out_dir, c.run)
    # under torchrun rank 0 alone claims the run directory: the other ranks never write in it
    claim = claim_run_dir(run_dir, args.resume, args.overwrite) if int(os.environ.get("RANK", "0")) == 0 else None
    try:
        if world_size() == 1:
            return train(c, resume=args.resume)
        setup_distributed(c)
        try:
            return train(c, resume=args.resume)
        finally:
            dist.destroy_process_group()
    except BaseException:
        if claim and not args.resume:
            discard_failed_start(run_dir, claim[1])
        raise
    finally:
        if claim:
            claim[0].close()


if __name__ == "__main__":
    gpt.run_cli(main)
