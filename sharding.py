"""
sharding.py: the SAE trained by several processes under torchrun: data parallelism (the
replicated SAE's collectives and its global-batch loss, step_loss), then the latents sharded
over processes (train.py --latent_shards M): tensor parallel over the latents, the process
grid, the sharded SAE, its training step and its sharded checkpoints.

    torchrun --nproc_per_node=8 train.py -- ... --latent_shards 8        # the latents split over 8 GPUs

The grid: the N processes form N / M data-parallel replicas x M latent shards; shard s of
every replica holds latents s * n / M .. (s + 1) * n / M - 1: their rows of W_enc, b_enc, W_dec,
the gradients, Adam moments, EMA and dead-latent counters. b_pre is replicated. Ranks
r * M .. r * M + M - 1 are replica r's latent group (on GPUs, one node's: the group talks at
every step); shard s's replicas average gradients.

Exactness: the TopK is exact (kernels.sharded_recon, with the collectives beside the rest of
the fast path): a run with M shards computes what one process does, up to the order of
floating-point sums, and starts from the same initial weights (randn_rows).

Checkpoints: OUT_DIR/RUN/ckpt.pt is a small manifest naming one file per shard,
ckpt.step<S>.shard<s>of<M>.pt, with that shard's rows (below, at SHARD_FILE); train.load_sae
joins them into the whole SAE.

Its own file because it is one concept, the processes of a run, that a single-process run
never uses: train.py keeps the run and calls in here (its collectives, and `if run.grid`).
"""

import os

import torch
import torch.distributed as dist

import gpt
import kernels
from gpt import UserError
from sae import SAE, SAEOutput, fvu

# -----------------------------------------------------------------------------
# Data parallelism (torchrun): the SAE replicated on every rank, each rank reading its own
# data shards; DDP averages the gradients in backward, so the decoder projection, the
# optimizer step and the renormalization see the same numbers everywhere and the replicas
# stay identical.


def world_size():
    """Processes of the run: torchrun's WORLD_SIZE, 1 under a plain `python train.py`."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup_distributed(c):
    """Join torchrun's process group: nccl with the GPU LOCAL_RANK on CUDA, gloo on CPU."""
    if c.device.startswith("cuda"):
        c.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(c.device)
    dist.init_process_group("nccl" if c.device.startswith("cuda") else "gloo")


def barrier(c):
    dist.barrier(device_ids=[torch.device(c.device).index] if c.device.startswith("cuda") else None)


def all_ranks(flag):
    """A bool tensor -> True if it is true on every rank (so that all ranks take the same branch)."""
    t = flag.to(torch.int32).reshape(1)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t)


def any_rank(mask):
    """Elementwise OR of a bool tensor over the ranks."""
    if not dist.is_initialized():
        return mask
    t = mask.to(torch.uint8)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.bool()


def any_rank_max(t):
    """The largest value of a tensor over the ranks."""
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def global_batch(t):
    """This rank's rows of a batch (B_rank, ...) -> every rank's, in rank order (B, ...): the batch
    one process reading every data shard would have (each rank holds an equal share)."""
    if not dist.is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def step_loss(sae, x, out, group=None):
    """-> (the loss this rank backpropagates, the global batch's [loss, fvu, aux_loss, l0], whether
    the loss is finite on every rank). Without DDP: out's own numbers. With DDP: the FVU terms
    divide by the variance of the batch they are taken over, so DDP's average of each rank's own
    gradient is not the gradient of the loss on the global batch, the one a single process
    reading every shard sees (a rank's variance differs from the global one by a few percent).
    Weighting each FVU term by world * (rank variance) / (global variance) makes it that gradient,
    up to rounding, through SAE.total_loss. group: the data-parallel processes (default all; a
    sharded run's replicas of this shard)."""
    if not dist.is_initialized():
        logged = torch.stack([t.detach().float() for t in (out.loss, out.fvu, out.aux_loss, out.l0)])
        return out.loss, logged, bool(torch.isfinite(out.loss))
    world = dist.get_world_size(group)
    with torch.no_grad():
        x_n, mu, scale = sae.normalize_input(x)
        e = x_n - (out.x_hat - mu) / scale  # the residual AuxK models
        var_x, var_e = ((t - t.mean(0)).pow(2).sum() for t in (x_n, e))  # as sae.fvu's denominator
        # float64 sums of the global batch: its variances are sum |t|^2 - |sum t|^2 / N
        stats = torch.cat([x_n.double().sum(0), e.double().sum(0), torch.stack([t.double() for t in (
            x_n.double().pow(2).sum(), e.double().pow(2).sum(), out.fvu * var_x, out.multi_loss * var_x,
            out.nested_loss * var_x, out.aux_loss * var_e, out.l0, out.l1, out.loss)])])
        dist.all_reduce(stats, group=group)
        d, n = x_n.shape[1], len(x) * world
        sq_x, sq_e, sse, sse_multi, sse_nested, sse_aux, l0, l1, loss_sum = stats[2 * d:]
        var_x_all = sq_x - stats[:d].square().sum() / n
        var_e_all = (sq_e - stats[d:2 * d].square().sum() / n).clamp_min(1e-30)  # 0 when reconstruction is exact
        w_x, w_e = ((world * v / v_all).to(out.fvu.dtype) for v, v_all in ((var_x, var_x_all), (var_e, var_e_all)))
        fvu_all, aux_all = sse / var_x_all, sse_aux / var_e_all
        logged = torch.stack([sae.total_loss(fvu_all, sse_multi / var_x_all, aux_all, l1 / world,
                                             nested=sse_nested / var_x_all), fvu_all, aux_all, l0 / world]).float()
    loss = sae.total_loss(out.fvu, out.multi_loss, out.aux_loss, out.l1, w_x, w_e, nested=out.nested_loss)
    return loss, logged, bool(torch.isfinite(loss_sum))


# train.py imports this file at its top and calls it at its many dispatch points (`if run.grid`);
# the few train.py helpers used here (make_sae, lr_at, skip_nonfinite) are
# imported inside the three functions that use them: no import cycle, and three lazy imports
# rather than one per dispatch point. (Under `python train.py` that import loads train.py a
# second time, as the module `train`: the same code, and train.py keeps no state.)


class LatentGrid:
    """This process's place: replica (of replicas) and shard (a kernels.Shard: index, count,
    first latent lo, rows, latent group); data: the group of this shard's replicas, None if one."""

    def __init__(self, replicas, replica, shard, data):
        self.replicas, self.replica, self.shard, self.data = replicas, replica, shard, data


def check_latent_shards(c, world):
    """--latent_shards M for a run of `world` processes: M processes per latent group, so
    torchrun with a multiple of M; M divides n_latents; TopK only."""
    m = c.latent_shards
    if m == 1:
        return
    if "WORLD_SIZE" not in os.environ:
        raise UserError(f"--latent_shards {m} needs one process per shard: run it under torchrun "
                        f"--nproc_per_node={m} train.py -- ... (or a multiple of {m} processes)")
    if world % m:
        raise UserError(f"--latent_shards {m} does not divide the {world} processes: use a divisor of {world}, "
                        f"or torchrun --nproc_per_node with a multiple of {m}")
    if c.n_latents % m:
        raise UserError(f"--latent_shards {m} does not divide --n_latents {c.n_latents}: use a divisor of "
                        f"n_latents, or n_latents a multiple of {m}")
    if c.activation != "topk" or c.matryoshka:
        raise UserError(f"--latent_shards {m} shards the TopK SAE only: pass --activation topk without --matryoshka, "
                        f"or --latent_shards 1")


def latent_grid(c):
    """-> this process's LatentGrid under --latent_shards M > 1 (every rank makes every group, in
    the same order, as torch.distributed requires), else None."""
    m = c.latent_shards
    if m == 1:
        return None
    world, rank = dist.get_world_size(), dist.get_rank()
    replicas, rows = world // m, c.n_latents // m
    latent = [dist.new_group(list(range(r * m, (r + 1) * m))) for r in range(replicas)]
    data = [dist.new_group(list(range(s, world, m))) for s in range(m)] if replicas > 1 else [None] * m
    replica, s = divmod(rank, m)
    return LatentGrid(replicas, replica, kernels.Shard(s, m, s * rows, rows, latent[replica]), data[s])


def randn_rows(n, d, lo, hi, chunk=1 << 18):
    """Rows lo..hi-1 of torch.randn(n, d) from the global generator, drawn in chunks of rows and
    advancing the generator as that call would: CPU normal sampling fills 16 values at a time,
    so chunks of a multiple of 16 values give the same stream (test_sharding checks it). Memory:
    one chunk plus the rows kept, where the whole (n, d) would not fit at the paper's scale."""
    rows = 16 * max(1, chunk // (16 * d))
    out = torch.empty(hi - lo, d)
    for s in range(0, n, rows):
        block = torch.randn(min(rows, n - s), d)
        a, b = max(s, lo), min(s + len(block), hi)
        if a < b:
            out[a - lo:b - lo] = block[a - s:b - s]
    return out


class ShardedSAE(torch.nn.Module):
    """One shard of an SAE (sae.py's SAE, cfg its whole configuration): W_enc, W_dec
    (shard.rows, d_model) and b_enc (shard.rows,), rows shard.lo onwards of the full SAE's,
    initialized as those (draw=False: left uninitialized, for loading), and b_pre (d_model,).
    Its forward gives the whole SAE's SAEOutput on every shard, except fired, this shard's
    (shard.rows,); dead_mask is this shard's too."""

    def __init__(self, cfg, shard, draw=True):
        super().__init__()
        self.cfg, self.shard = cfg, shard
        rows = shard.rows
        # paper App. A.1 as sae.SAE: unit decoder rows, the encoder their copy; the same rows
        W_dec = (torch.nn.functional.normalize(randn_rows(cfg.n_latents, cfg.d_model, shard.lo, shard.lo + rows), dim=1)
                 if draw else torch.empty(rows, cfg.d_model))
        self.W_dec = torch.nn.Parameter(W_dec)  # (rows, d_model)
        self.W_enc = torch.nn.Parameter(W_dec.clone())  # (rows, d_model)
        self.b_enc = torch.nn.Parameter(torch.zeros(rows))
        self.b_pre = torch.nn.Parameter(torch.zeros(cfg.d_model))
        self._scratch = {}

    # the row-wise and per-token parts of sae.SAE are the same on a shard
    normalize_input, denormalize, total_loss = SAE.normalize_input, SAE.denormalize, SAE.total_loss
    project_decoder_grad, normalize_decoder = SAE.project_decoder_grad, SAE.normalize_decoder
    init_b_pre, _check_input = SAE.init_b_pre, SAE._check_input

    def forward(self, x, dead_mask=None):
        """As SAE.forward (the TopK SAE) on caller's-space x (B >= 2, d_model), the same x on
        every shard of the group."""
        cfg, shard = self.cfg, self.shard
        x_n, mu, scale = self.normalize_input(x.detach())
        if x_n.shape[0] < 2:
            raise ValueError(f"forward needs a batch of >= 2 tokens, got {x_n.shape[0]}")
        zero = x_n.new_zeros(())
        dead_idx, k_aux = torch.zeros(0, dtype=torch.long, device=x_n.device), 0
        if dead_mask is not None:  # AuxK's width comes from the group's count of dead latents
            dead_idx = dead_mask.to(x_n.device).nonzero().squeeze(1)
            n_dead = torch.tensor([len(dead_idx)], device=x_n.device)
            dist.all_reduce(n_dead, group=shard.group)
            k_aux = min(cfg.k_aux, int(n_dead))
        k_top = min(4 * cfg.k, cfg.n_latents) if cfg.multi_topk else cfg.k
        vals, idx, x_hat, x_hat_multi, e_hat, fired = kernels.sharded_recon(self, x_n, k_top, dead_idx, k_aux, shard)
        main = fvu(x_n, x_hat)
        multi = fvu(x_n, x_hat_multi) if cfg.multi_topk else zero  # paper §5.3
        aux = zero
        if k_aux > 0:  # paper §2.4 as SAE.forward
            e = (x_n - x_hat).detach()
            aux = fvu(e, e_hat).nan_to_num(0.0, 0.0, 0.0)
        vals, idx = vals[:, :cfg.k].detach(), idx[:, :cfg.k]
        return SAEOutput(loss=self.total_loss(main, multi, aux, zero), fvu=main, aux_loss=aux, multi_loss=multi,
                         nested_loss=zero, l1=zero, l0=(vals > 0).sum(1).float().mean(), vals=vals, idx=idx,
                         fired=fired, x_hat=self.denormalize(x_hat.detach(), mu, scale))

    @torch.no_grad()
    def init_encoder_scale(self, n_samples=256):
        """SAE.init_encoder_scale over the group: the same samples on every shard, the norm of
        the whole reconstruction (all-reduced), so every shard divides by the same number."""
        seed = int(torch.randint(2**62, (1,)))  # as SAE's: the same draws from the same generator
        g = torch.Generator(device=self.W_enc.device).manual_seed(seed)
        u = torch.nn.functional.normalize(torch.randn(n_samples, self.cfg.d_model, generator=g,
                                                      device=self.W_enc.device), dim=1)
        empty = torch.zeros(0, dtype=torch.long, device=u.device)
        x_hat_n = kernels.sharded_recon(self, u + self.b_pre, self.cfg.k, empty, 0, self.shard)[2] - self.b_pre
        self.W_enc.div_(x_hat_n.norm(dim=1).mean().clamp_min(1e-12))


def make_sharded_sae(c, d_model, grid):
    """train.make_sae's SAE, this process's shard of it. The configuration is checked by make_sae
    on the meta device, which allocates and draws nothing."""
    import train
    with torch.device("meta"):
        cfg = train.make_sae(c, d_model).cfg
    return ShardedSAE(cfg, grid.shard)


@torch.no_grad()
def sync_replicas(run):
    """Every replica's shard s to replica 0's (as DDP does at its start: b_pre came from each
    replica's own data)."""
    if run.grid.data is not None:
        src = run.grid.shard.index  # replica 0's rank for this shard
        for p in run.sae.parameters():
            dist.broadcast(p.data, src, group=run.grid.data)


def init_sae(run):
    """train.init_sae over the latent group: b_pre the geometric median of the same sample on
    every shard, the encoder rescale from the whole reconstruction; the ablation draws the
    encoder's rows as the single-process run does (the full stream, this shard's rows kept)."""
    c, sae, shard = run.c, run.sae, run.grid.shard
    if c.no_init_tricks:
        with torch.no_grad():
            rows = randn_rows(c.n_latents, sae.cfg.d_model, shard.lo, shard.lo + shard.rows)
            sae.W_enc.copy_(torch.nn.functional.normalize(rows, dim=1))
    else:
        sae.init_b_pre(run.stream.sample(32768).to(c.device))
        sae.init_encoder_scale()
    sync_replicas(run)
    if run.main_rank:
        with open(run.log_path, "w"):
            pass


def group_latents(run, t):
    """A per-latent tensor (rows,) of this shard -> the group's (n_latents,), in latent order
    (all-gathered; every process of the group must call it). Unsharded: t itself."""
    if not run.grid:
        return t
    parts = [torch.empty_like(t, dtype=torch.uint8 if t.dtype == torch.bool else t.dtype)
             for _ in range(run.grid.shard.count)]
    dist.all_gather(parts, t.to(parts[0].dtype), group=run.grid.shard.group)
    return torch.cat(parts).to(t.dtype)


def train_step(run, x, dead):
    """train.train_step for a sharded run: the same step, with the replicas' gradients averaged
    by hand (the replicas of a shard hold the same rows; DDP would expect every rank to), the
    gradient norm and the fired latents taken over the right groups."""
    import train
    c, sae, grid = run.c, run.sae, run.grid
    out = None
    if all_ranks(torch.isfinite(x).all()):
        with torch.autocast(device_type=torch.device(c.device).type, dtype=getattr(torch, c.dtype),
                            enabled=c.dtype != "float32"):
            out = sae(x, dead_mask=dead if c.auxk else None)
        if grid.data is None:  # one replica: its batch is the global one
            loss, finite = out.loss, bool(torch.isfinite(out.loss))
            logged = torch.stack([t.detach().float() for t in (out.loss, out.fvu, out.aux_loss, out.l0)])
        else:
            loss, logged, finite = step_loss(sae, x, out, grid.data)
    if out is None or not finite:
        return train.skip_nonfinite(run, "activations" if out is None else "loss")
    for g in run.opt.param_groups:
        g["lr"] = train.lr_at(c, run.step, run.total_steps)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()  # each shard's own rows; b_pre's gradient, summed over the group, is whole
    if grid.data is not None:  # the replicas' mean, as DDP's
        for p in sae.parameters():
            dist.all_reduce(p.grad, group=grid.data)
            p.grad.div_(grid.replicas)
    sae.project_decoder_grad()
    if c.grad_clip:
        clip_grad_norm(sae, grid, c.grad_clip)
    run.opt.step()
    sae.normalize_decoder()
    run.ema.update(sae)
    fired = out.fired
    if grid.data is not None:  # fired on any replica
        fired = fired.to(torch.uint8)
        dist.all_reduce(fired, op=dist.ReduceOp.MAX, group=grid.data)
    run.tokens_since_fired += c.batch_size
    run.tokens_since_fired.masked_fill_(fired.bool(), 0)
    return logged


@torch.no_grad()
def clip_grad_norm(sae, grid, max_norm):
    """torch.nn.utils.clip_grad_norm_ over the whole SAE: the sharded rows' squared norms summed
    over the group, b_pre's (replicated) counted once."""
    rows = [sae.W_dec.grad, sae.W_enc.grad, sae.b_enc.grad]
    sq = torch.stack([torch.linalg.vector_norm(g) for g in rows]).square().sum().reshape(1)
    dist.all_reduce(sq, group=grid.shard.group)
    total = (sq[0] + torch.linalg.vector_norm(sae.b_pre.grad).square()).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in rows + [sae.b_pre.grad]:
        g.mul_(coef)


# Sharded checkpoints: OUT_DIR/RUN/ckpt.pt is a small manifest (everything of a checkpoint but
# the per-latent tensors) naming one file per shard, ckpt.step<S>.shard<s>of<M>.pt, with that
# shard's rows of the weights, EMA, Adam state and dead-latent counters. Replica 0's shards
# write theirs (each atomically), then rank 0 the manifest: a crash leaves the last manifest and
# the files it names, whose names carry their step. train.load_sae (so evals.py and --export)
# joins them.

SHARD_FILE = "ckpt.step{step}.shard{s}of{m}.pt"
_PER_LATENT = ("sae", "ema", "optimizer", "tokens_since_fired")


def save_checkpoint(run, metrics):
    """Write this shard's file (replica 0 only), then the manifest (rank 0), and remove the
    shard files of earlier checkpoints; every process calls it. -> run.checkpoint(metrics),
    this shard's rows (what train() returns on each process)."""
    import train
    grid, run_dir = run.grid, os.path.dirname(run.ckpt_path)
    m, shard = grid.shard.count, grid.shard
    ck = run.checkpoint(metrics)
    names = [SHARD_FILE.format(step=run.step, s=s, m=m) for s in range(m)]
    if grid.replica == 0:
        part = {k: ck[k] for k in _PER_LATENT}
        part.update(step=run.step, shard=shard.index, shards=m, rows=[shard.lo, shard.lo + shard.rows])
        gpt.save_checkpoint(part, os.path.join(run_dir, names[shard.index]))
    barrier(run.c)  # every shard's file is on disk before the manifest names it
    if run.main_rank:
        manifest = {k: v for k, v in ck.items() if k not in _PER_LATENT}
        manifest["latent_shards"] = {"count": m, "files": names,
                                     "rows": [[s * shard.rows, (s + 1) * shard.rows] for s in range(m)]}
        gpt.save_checkpoint(manifest, run.ckpt_path)
        for name in os.listdir(run_dir):
            if name.startswith("ckpt.step") and ".shard" in name and name not in names:
                os.remove(os.path.join(run_dir, name))
    return ck


def _load_shard_file(path, manifest, s):
    """Shard s's file named by the manifest at path, checked against it."""
    info = manifest["latent_shards"]
    file = os.path.join(os.path.dirname(path), info["files"][s])
    if not os.path.isfile(file):
        raise UserError(f"{path} names the latent shard file {file}, which is missing: restore it from the same "
                        f"run (every shard file the manifest names is needed)")
    part = gpt.load_checkpoint(file)
    if part.get("step") != manifest["step"] or part.get("rows") != info["rows"][s]:
        raise UserError(f"{file} does not belong to {path} (another step or rows); restore the run's files together")
    return part


def load_checkpoint(path, manifest):
    """A sharded run's manifest -> the checkpoint of the whole SAE, as an unsharded run writes it
    (no optimizer state): the shards' rows joined in latent order, b_pre from shard 0."""
    parts = [_load_shard_file(path, manifest, s) for s in range(manifest["latent_shards"]["count"])]
    ck = dict(manifest)
    for key in ("sae", "ema"):
        ck[key] = {name: (parts[0][key][name] if name == "b_pre" else torch.cat([p[key][name] for p in parts]))
                   for name in parts[0][key]}
    ck["tokens_since_fired"] = torch.cat([p["tokens_since_fired"] for p in parts])
    return ck


def restore(run):
    """train.restore for a sharded run: the manifest, then this shard's file (the same
    --latent_shards, which --resume takes from the manifest's train_config)."""
    manifest = gpt.load_checkpoint(run.ckpt_path)
    if manifest["subject"]["sha256"] != run.subject["sha256"]:
        raise UserError(f"{run.ckpt_path} was trained on another subject model ({manifest['subject']['model']})")
    if manifest.get("latent_shards", {}).get("count") != run.grid.shard.count:
        raise UserError(f"{run.ckpt_path} was not written with --latent_shards {run.grid.shard.count}: resume it "
                        f"with the shard count it was trained with")
    part = _load_shard_file(run.ckpt_path, manifest, run.grid.shard.index)
    run.sae.load_state_dict(part["sae"])
    run.opt.load_state_dict(part["optimizer"])
    run.tokens_since_fired = part["tokens_since_fired"].to(run.c.device)
    run.step, run.skipped = manifest["step"], manifest["skipped"]
    if run.main_rank:
        print(f"resuming {run.ckpt_path} at step {run.step} ({run.step * run.c.batch_size:,} tokens), "
              f"{run.grid.shard.count} latent shards, with the run's saved settings")
    return {"ema": part["ema"], "ema_steps": manifest["ema_steps"]}
