"""
cudagraph.py: train.py --cuda_graph, a step's update recorded once as a CUDA graph and replayed.

    python train.py --model gpt2 --layer 8 --n_latents 32768 --k 32 --cuda_graph   # TopK, one process, CUDA

Its own file, as sharding.py is: one way of running train.py's step (train.update), not part of
every run. A replay launches no kernels from Python, and nothing inside it waits on the host:
the recorded step takes kernels.py's static route (kernels.static_shapes). test_cudagraph.py runs
this logic on CPU, with recording replaced by that route, and with a real graph where a GPU is.
"""
import contextlib
import types

import torch

import kernels
import sharding
import train
from gpt import UserError


def check_config(c):
    """--cuda_graph's needs, before anything is loaded (c's device may still be unresolved)."""
    device = c.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if c.cuda_graph and (not device.startswith("cuda") or c.activation != "topk" or sharding.world_size() > 1
                         or c.skip_nonfinite):
        raise UserError("--cuda_graph records the step of a TopK SAE in one process on CUDA, which cannot skip a "
                        "batch it has already applied: use --device cuda and --activation topk, one process, no "
                        "--skip_nonfinite; or drop --cuda_graph")


def portable(opt):
    """Adam's state dict with the plain learning rate and capturable flag that any run resumes with:
    GraphedStep keeps the rate in a device tensor and makes Adam capturable, both for the graph."""
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        g["lr"], g["capturable"] = float(g["lr"]), False
    return sd


def record(body):
    """body() recorded as a CUDA graph, which runs nothing yet -> a function that replays it.
    The tests put a stand-in here that runs body on kernels.py's static route instead."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph.replay


class GraphedStep:
    """train.update as one CUDA graph, recorded once and replayed each step on its own input
    tensors (the batch and the dead-latent mask are copied in, the learning rate filled in). One
    sync after each replay reads back its losses, whether the batch and the loss were finite (if
    not, the run stops: the update is already applied, the last checkpoint is kept) and a bound
    on the latents dead at the next step, those within one batch of dead_tokens. AuxK looks at a
    fixed number of candidate latents (kernels._static_codes); when the bound passes it, the next
    step runs eagerly and the graph is recorded again with more, so that AuxK sees every dead
    latent, as train.update does. The first `warmup` steps run train.update eagerly on the same
    route, on a side stream, as CUDA graphs need (Adam's state and cuBLAS's workspaces exist
    before recording)."""

    def __init__(self, run, warmup=3):
        c, cfg = run.c, run.sae.cfg
        new = lambda *shape, dtype=torch.float32: torch.zeros(*shape, dtype=dtype, device=c.device)
        self.x, self.dead, self.lr = new(c.batch_size, cfg.d_model), new(c.n_latents, dtype=torch.bool), new(())
        for g in run.opt.param_groups:  # Adam inside a graph keeps its step count on the device
            g["capturable"] = True
        # what a replay leaves for train_step and the log: the code's values (resample_dead), the
        # reconstruction, the fired latents; [loss, fvu, aux_loss, l0]; [batch finite, loss finite, bound]
        self.vals, self.x_hat, self.fired = new(c.batch_size, cfg.k), new(c.batch_size, cfg.d_model), new(
            c.n_latents, dtype=torch.bool)
        self.logged, self.flags = new(4), new(3, dtype=torch.float64)
        self.replay, self.eager_left = None, warmup

    def __call__(self, run, x, dead):
        """-> (the step's code, logged) as train.update returns them, for the batch x and mask dead."""
        if self.replay is None and self.eager_left:
            self.eager_left -= 1
            return self.eager(run, x, dead)
        self.x.copy_(x)
        self.dead.copy_(dead)
        self.lr.fill_(train.lr_at(run.c, run.step, run.total_steps))
        if self.replay is None:
            self.widen(run, int(self.bound(run)))
            for g in run.opt.param_groups:  # the recorded Adam reads its learning rate from the device
                g["lr"] = self.lr
            self.replay = record(lambda: self.body(run))
        self.replay()
        finite_x, finite_loss, bound = self.flags.tolist()  # the one host sync of a step
        if not (finite_x and finite_loss):
            train.skip_nonfinite(run, "activations" if not finite_x else "loss")  # raises: no skipping here
        if bound > run.sae._scratch["aux_candidates"]:
            self.replay, self.eager_left = None, 1
        return types.SimpleNamespace(vals=self.vals, x_hat=self.x_hat, fired=self.fired), self.logged

    def eager(self, run, x, dead):
        """train.update on the route the graph records (kernels.py's static route, AuxK's
        candidates widened for the latents dead now), on a side stream on CUDA."""
        self.widen(run, int(self.bound(run)))
        side = torch.cuda.Stream() if x.is_cuda else None
        if side:
            side.wait_stream(torch.cuda.current_stream())
        saved, kernels._STATIC = kernels._STATIC, True
        try:
            with torch.cuda.stream(side) if side else contextlib.nullcontext():
                stepped = train.update(run, x, dead)
        finally:
            kernels._STATIC = saved
        if side:
            torch.cuda.current_stream().wait_stream(side)
        return stepped

    def body(self, run):
        """train.update on the graph's inputs, its results copied into the graph's outputs."""
        c, sae = run.c, run.sae
        with torch.autocast(device_type=torch.device(c.device).type, dtype=getattr(torch, c.dtype),
                            enabled=c.dtype != "float32", cache_enabled=False):  # no cast weights kept past a replay
            out = sae(self.x, dead_mask=self.dead if c.auxk else None)
        train.descend(run, out.loss)
        self.logged.copy_(torch.stack([out.loss, out.fvu, out.aux_loss, out.l0]).detach())
        self.flags.copy_(torch.stack([torch.isfinite(self.x).all(), torch.isfinite(self.logged).all(),
                                      self.bound(run)]))
        for mine, theirs in ((self.vals, out.vals), (self.x_hat, out.x_hat), (self.fired, out.fired)):
            mine.copy_(theirs)

    @staticmethod
    def bound(run):
        """How many latents can be dead at this step or the next: within a batch of dead_tokens."""
        return (run.tokens_since_fired >= run.c.dead_tokens - run.c.batch_size).sum()

    @staticmethod
    def widen(run, bound):
        """AuxK's candidates (kernels._static_codes) for at most `bound` dead latents."""
        cfg = run.sae.cfg
        run.sae._scratch["aux_candidates"] = kernels.aux_candidates(cfg.n_latents, cfg.k_aux, bound)
