"""
bench.py: how close a TopK SAE training step comes to the hardware's floor.

    python bench.py                                  # the default grid on this machine, as a table
    python bench.py --device cuda --json             # on a GPU (bf16 autocast, TF32), as JSON
    python bench.py --shapes 768,32768,32,2048       # only these (d_model,n_latents,k,batch) shapes
    python bench.py --quick                          # a tiny grid in seconds (the smoke test)
    python bench.py --shapes 768,32768,32,2048 --profile   # and where the fast step's time goes
                                                     # (on CUDA: kernels a step, GPU-busy share)
    python bench.py --latent_shards 1 2 4 --shapes 256,65536,32,1024   # train.py --latent_shards: memory, time

A TopK SAE must compute every pre-activation, the encoder matmul (batch x d_model x n_latents),
so that matmul (then matmul + TopK) is the floor for a training step. For each shape this
times, in one process, warm-up runs first, then the median of --runs timed runs, interleaved,
each straight after an untimed run of the same entry (see time_all):
  mm       the encoder matmul alone, into a reused buffer (fp32 on CPU, bf16 operands on CUDA)
  mm+topk  the same, then torch.topk over its output
  mm bf16  (CPU) the matmul with bf16 operands and output: the floor of the fast step's encoder
           where it runs as kernels.py's bf16 screen (CPUs with AMX), whose tokens past each
           of its tiers are counted
  fast     a full training step as train.py runs it on the sparse fast path: forward with AuxK
           over --dead_frac dead latents, backward, decoder-gradient projection, fused Adam,
           decoder renormalization; fast0 is the same with no dead latents (no AuxK)
  fast csr (CUDA) the fast step with the CPU's CSR backward kernels instead of CUDA's dense ones
  fast gather (CUDA) the same with the backward by gathered rows and index_add_ (kernels.py's
           _GATHER_BACKWARD, off by default until measured)
  fast graph (CUDA) the fast step captured once as a CUDA graph (kernels.py's static route) and
           replayed: no kernel launches from Python, no host syncs; fast graph gather, the same
           with the gather backward
  dense    the same step on sae.py's dense reference path (dense=True)
and reports tokens/s, each step against mm, mm+topk, mm bf16 and dense, the fast step's peak
memory against parameters + Adam state + one micro-batch of pre-activations, and on CUDA the
host syncs in one step (torch's sync debug mode). A batch whose (batch, n_latents)
pre-activations pass 2^31 elements runs as micro-batches whose gradients add up before one
optimizer step (gradient accumulation: micro_batch), so GPU-sized batches fit. With a subject model
(--model) it also measures its activation generation (blocks up to train.py's default layer)
and an end-to-end train.py run of the default configuration, with the share of the training
loop spent in SAE steps or in the subject model's forward.

Peak memory: on CUDA, torch.cuda.max_memory_allocated; on CPU, the peak resident set of this
process (VmHWM in /proc/self/status, reset by writing 5 to /proc/self/clear_refs) above the
resident set before the shape's SAE was built: all memory the step touches, allocator slack
included. Measured on the second of two runs in a row, after the timed ones: the first may
still hold the previous entry's gradients, which train.py's loop never has.
"""

import argparse
import contextlib
import io
import itertools
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import warnings

import torch

import cudagraph
import gpt
import train
import kernels
import sharding
from sae import SAE, SAEConfig

GRIDS = {  # (d_model, n_latents, k, batch)
    # the reference shape (GPT-2 small width), the default run, and a larger k
    "cpu": [(768, 32768, 32, 2048), (128, 32768, 32, 4096), (768, 32768, 128, 2048)],
    # GPT-2 small at 32k latents from train.py's batch to the paper's (131072), at 128k latents and
    # at k 64, then GPT-2 XL's width; the goal is at the second
    "cuda": [(768, 32768, 32, 4096), (768, 32768, 32, 32768), (768, 32768, 32, 131072), (768, 131072, 32, 32768),
             (768, 32768, 64, 32768), (1600, 131072, 64, 32768)],
    "quick": [(32, 1024, 8, 256)],
}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rss_kb(field):
    """VmRSS or VmHWM of this process in kB, or None off Linux."""
    try:
        return int(re.search(field + r":\s+(\d+)", open("/proc/self/status").read()).group(1))
    except (OSError, AttributeError):
        return None


def reset_peak(device):
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
    except OSError:
        pass


def memory_now(device):
    """Bytes in use now: CUDA tensors, or this process's resident set."""
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated()
    kb = rss_kb("VmRSS")
    return None if kb is None else kb * 1024


def memory_peak(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    kb = rss_kb("VmHWM")
    return None if kb is None else kb * 1024


def time_all(fns, device, warmup, runs):
    """{name: fn} -> {name: (median seconds, peak bytes)}, runs interleaved so that a change
    in machine load hits every entry alike. Each timed run follows an untimed run of the same
    entry, as a training step follows a step: right after other work a step runs slower (its
    caches and buffers hold the other entry's data). Peak memory likewise from a second run in
    a row: the first may still hold the previous entry's gradients (the dense step's, say)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            fn()
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    peaks = {}
    for name, fn in fns.items():
        fn()
        sync(device)
        reset_peak(device)
        fn()
        sync(device)
        peaks[name] = memory_peak(device) or 0
    return {name: (statistics.median(times[name]), peaks[name]) for name in fns}


PHASES = ("forward", "backward", "projection", "adam", "renormalization")


def profile_step(fn, device, steps=3, top=12):
    """Where a fast step's time goes, from torch.profiler over `steps` steps: ms a step in each
    phase of step() (CPU wall time inside it; on CUDA the GPU finishes later) and the `top`
    operators by self time (the GPU's on CUDA, else the CPU's), each with its input shapes. On
    CUDA also the kernels a step launches (memory copies and fills included) and the GPU-busy
    fraction: their time over the steps' wall time. The profiler adds overhead: its sum runs
    above the timed step."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda
    fn()
    sync(device)
    # acc_events: one cycle, so nothing to clear; it keeps torch 2.11 from warning that it would
    with profile(activities=activities, record_shapes=True, acc_events=True) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        wall = time.perf_counter() - t0
    self_us = lambda e: getattr(e, "self_device_time_total", 0) if cuda else e.self_cpu_time_total
    phases = {e.key: e.cpu_time_total / 1e3 / steps for e in prof.key_averages() if e.key in PHASES}
    ops = sorted((e for e in prof.key_averages(group_by_input_shape=True) if e.key not in PHASES),
                 key=self_us, reverse=True)[:top]
    kernels_, busy = None, None
    if cuda:  # device-side events: kernels, memcpy, memset
        on_gpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        kernels_ = len(on_gpu) / steps
        busy = sum(e.time_range.elapsed_us() for e in on_gpu) / 1e6 / wall
    return {"phases_ms": {p: phases.get(p, 0.0) for p in PHASES}, "wall_ms": wall * 1e3 / steps,
            "kernels_per_step": kernels_, "gpu_busy": busy,
            "top_ops": [{"op": e.key, "shapes": str(e.input_shapes), "calls": e.count // steps,
                         "ms": self_us(e) / 1e3 / steps} for e in ops]}


def micro_batch(B, n, limit=1 << 31):
    """Tokens per micro-batch for a step of B tokens at n latents: B halved until a (tokens, n)
    matrix of pre-activations has at most `limit` elements (4 GiB in bf16), so that the
    largest batches fit an 80 GB GPU with the dense reference's several such matrices; a step
    accumulates the micro-batches' gradients (each micro-batch's loss weighted by its share of
    B) before one optimizer step."""
    mb = B
    while mb * n > limit and mb % 2 == 0:
        mb //= 2
    return mb


def throughput_ratios(ms):
    """Each step's throughput against the floors and the dense reference: {name}_over_{floor}
    is the floor's time over the step's, so 1 is the floor's speed."""
    return {f"{name}_over_{floor}": ms[floor] / ms[name] for name in STEPS if name in ms
            for floor in ("mm", "mm_topk", "mm_bf16", "dense") if floor in ms}


def profiles(step, graph, device, errors):
    """--profile: the fast step's profile, and the replayed CUDA graph's where there is one."""
    out = {"profile": profile_step(step, device)}
    if graph is not None:
        try:  # the profiler's view of a replayed graph depends on the torch and CUDA versions
            out["profile_graph"] = profile_step(graph, device)
        except Exception as e:
            errors["profile_graph"] = f"{type(e).__name__}: {e}"
    return out


def bench_shape(d, n, k, B, args):
    device, cuda = args.device, args.device.startswith("cuda")
    torch.manual_seed(0)
    mb = micro_batch(B, n)
    # a stream of batches, as in training: a step repeated on one batch overfits it, which
    # bunches its tokens' pre-activations at the TopK threshold and makes the CPU's bf16
    # screen (kernels.py) send most of them to its second tier; at most 1 GiB of them
    xs = itertools.cycle(torch.randn(max(2, min(16, (1 << 30) // (4 * B * d))), B, d, device=device).unbind())
    x = next(xs)
    # the floor, with bf16 operands on CUDA as the autocast encoder matmul; random weights (its
    # speed does not depend on them), made before the SAE so as not to count in its memory
    mm_dtype = torch.bfloat16 if cuda else torch.float32
    W, xc = torch.randn(n, d, device=device, dtype=mm_dtype), x.to(mm_dtype)
    buf = torch.zeros(mb, n, dtype=mm_dtype, device=device)  # zeros: its pages are resident before `base`
    # on CPU also the bf16 matmul, the floor of the encoder's bf16 screen (kernels.py) on AMX
    W16, x16, buf16 = W.bfloat16(), xc.bfloat16(), torch.zeros(mb, n, dtype=torch.bfloat16, device=device)
    base = memory_now(device)
    sae = SAE(SAEConfig(d_model=d, n_latents=n, k=k, activation=args.activation,
                        matryoshka=train.prefixes(args.matryoshka))).to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=6.25e-10, fused=True)  # as train.py
    dead = torch.rand(n, generator=torch.Generator().manual_seed(0)) < args.dead_frac
    dead = dead.to(device)
    no_dead = torch.zeros_like(dead)
    step = make_step(sae, opt, xs, mb, cuda)
    chunks = lambda a, b, out: [torch.mm(a[s:s + mb], b, out=out[:len(a[s:s + mb])]) for s in range(0, B, mb)]
    fns = {"mm": lambda: chunks(xc, W.t(), buf),
           "mm_topk": lambda: [p.topk(k, dim=1) for p in chunks(xc, W.t(), buf)],
           "mm_bf16": lambda: chunks(x16, W16.t(), buf16),
           "fast": lambda: step(dead),
           "fast0": lambda: step(no_dead)}
    errors = {}
    if cuda:  # mm is already bf16 there; the other backward kernels, and the step as one CUDA graph
        del fns["mm_bf16"]
        fns["fast_csr"] = lambda: step(dead, backward="csr")
        fns["fast_gather"] = lambda: step(dead, backward="gather")
        if args.activation == "topk":
            fns["fast_graph"] = graph_step(sae, xs, mb, dead, errors, "auto", "fast_graph")
            fns["fast_graph_gather"] = graph_step(sae, xs, mb, dead, errors, "gather", "fast_graph_gather")
    if not args.no_dense:
        fns["dense"] = lambda: step(dead, dense=True)
    fns = {name: fn for name, fn in fns.items() if fn is not None}
    res = time_all(fns, device, args.warmup, args.runs)
    del W, xc, buf, W16, x16, buf16
    params = sum(p.numel() * p.element_size() for p in sae.parameters())
    budget = 3 * params + mb * n * torch.finfo(mm_dtype).bits // 8  # params + Adam's two moments + pre
    ms = {name: 1e3 * t for name, (t, _) in res.items()}
    r = {"d_model": d, "n_latents": n, "k": k, "batch": B, "micro_batch": mb, "k_aux": sae.cfg.k_aux,
         "n_dead": int(dead.sum()), "ms": ms, "tokens_per_s": {name: B / t for name, (t, _) in res.items()},
         "memory_gb": None, "screen": None, "errors": errors,
         "syncs_per_step": {name: count_syncs(fns[name]) for name in STEPS if name in fns and cuda}}
    r.update(throughput_ratios(ms))
    screened, past_1, past_2 = sae._scratch.get("screen_counts", (0, 0, 0))
    if screened:  # the bf16 screen's tokens past tier 1 and past tier 2 (to the fp32 encoder)
        r["screen"] = {"tokens": screened, "past_tier_1": past_1 / screened, "past_tier_2": past_2 / screened}
    if args.profile:
        r.update(profiles(lambda: step(dead), fns.get("fast_graph"), device, errors))
    if base is not None:
        peak = {name: (p - base) / 2**30 for name, (_, p) in res.items()}
        r["memory_gb"] = {"fast": peak["fast"], "dense": peak.get("dense"), "budget": budget / 2**30,
                          "fast_over_budget": peak["fast"] * 2**30 / budget}
    return r


# the training steps bench_shape may time (fast_csr and on: CUDA only)
STEPS = ("fast", "fast0", "fast_csr", "fast_gather", "fast_graph", "fast_graph_gather")


def make_step(sae, opt, xs, mb, cuda):
    """step(dead_mask, dense=False, backward="auto", x=None): a training step as train.py runs it
    on the batch x (default: the next of xs), in micro-batches of mb tokens: forward with AuxK
    over the latents dead_mask, backward (kernels.py's on CUDA: "auto" its dense matmuls, "csr"
    the CPU's CSR kernels, "gather" its gathers and index_add_), decoder-gradient projection,
    fused Adam, decoder renormalization."""
    phase = torch.profiler.record_function  # labels for --profile; no cost without a profiler

    def step(dead_mask, dense=False, backward="auto", x=None, cache=True):
        x = next(xs) if x is None else x
        saved = kernels._dense_backward, kernels._GATHER_BACKWARD
        if backward == "csr":
            kernels._dense_backward = lambda t: False
        kernels._GATHER_BACKWARD = backward == "gather" or kernels._GATHER_BACKWARD
        try:
            opt.zero_grad(set_to_none=True)
            for s in range(0, len(x), mb):
                # cache_enabled=False under a CUDA graph: autocast's cast weights must not outlive a capture
                with phase("forward"), torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16,
                                                       enabled=cuda, cache_enabled=cache):
                    out = sae(x[s:s + mb], dead_mask=dead_mask, dense=dense)
                with phase("backward"):
                    (out.loss * (mb / len(x)) if mb < len(x) else out.loss).backward()
        finally:
            kernels._dense_backward, kernels._GATHER_BACKWARD = saved
        with phase("projection"):
            sae.project_decoder_grad()
        with phase("adam"):
            opt.step()
        with phase("renormalization"):
            sae.normalize_decoder()

    return step


def graph_step(sae, xs, mb, dead, errors, backward, name):
    """The fast step on CUDA, with the backward kernels `backward` (make_step), captured once as a
    CUDA graph (kernels.py's static route, AuxK's candidates as train.py --cuda_graph sets them,
    a fused Adam of its own made capturable), replayed per call after copying the next batch into
    the graph's input: no kernel launches from Python and no host syncs. -> the call, or None
    with the reason in errors[name] if capture fails."""
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=6.25e-10, fused=True, capturable=True)
    step = make_step(sae, opt, xs, mb, cuda=True)
    x = next(xs).clone()  # the graph's input: each call copies a batch into it
    cfg = sae.cfg
    sae._scratch["aux_candidates"] = kernels.aux_candidates(cfg.n_latents, cfg.k_aux, int(dead.sum()))  # as train.py
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        kernels._STATIC = True  # warm-up on the route the graph takes (Adam's state, cuBLAS's workspaces)
        with torch.cuda.stream(side):
            for _ in range(3):
                step(dead, backward=backward, x=x, cache=False)
        torch.cuda.current_stream().wait_stream(side)
        replay_graph = cudagraph.record(lambda: step(dead, backward=backward, x=x, cache=False))
    except Exception as e:  # reported, not fatal: the other entries still run
        errors[name] = f"{type(e).__name__}: {e}"
        return None
    finally:
        kernels._STATIC = False

    def replay():
        x.copy_(next(xs))
        replay_graph()

    return replay


def count_syncs(fn):
    """Host syncs in one call of fn on CUDA: the warnings of torch's sync debug mode."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def bench_activations(model, args):
    """tokens/s of the subject model up to train.py's default layer, as the activation stream runs it."""
    layer = model.config.n_layer * 2 // 3
    ctx_len = min(64, model.config.block_size)
    contexts = torch.randint(model.config.vocab_size, (args.act_contexts, ctx_len), generator=torch.Generator().manual_seed(0))
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    fn = lambda: train.activations(model, contexts, layer, False, args.device, dtype)
    t, _ = time_all({"acts": fn}, args.device, args.warmup, args.runs)["acts"]
    return {"layer": layer, "tokens": args.act_contexts * (ctx_len - 1), "tokens_per_s": args.act_contexts * (ctx_len - 1) / t}


def bench_train(args):
    """train.py end to end on the default configuration (a --e2e_tokens run, no intermediate
    checkpoints, activation chunks of --e2e_shuffle tokens so that a short run crosses several),
    with --e2e_args added. Instrumented from outside: SAE steps are train.train_step (the
    update, eager or a CUDA graph's replay, then the EMA, dead-latent counts and restarts), the
    subject model's forward is train.activations; the rest of the training loop (context
    sampling, shuffling, logging) is the pipeline's overhead."""
    spans = {"step": [], "subject": []}
    train_step, activations = train.train_step, train.activations

    def timed(fn, kind):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            sync(args.device)
            spans[kind].append((t0, time.perf_counter()))
            return out
        return wrapper

    argv = ["--model", args.model, "--device", args.device, "--tokens", str(args.e2e_tokens),
            "--shuffle_tokens", str(args.e2e_shuffle), "--ckpt_every", str(args.e2e_tokens),
            "--eval_tokens", "4096", "--run", "bench"] + (QUICK_TRAIN if args.quick else []) + args.e2e_args.split()
    train.train_step, train.activations = timed(train_step, "step"), timed(activations, "subject")
    try:
        with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            t0 = time.perf_counter()
            ck = train.main(argv + ["--out_dir", out])
            total = time.perf_counter() - t0
    finally:
        train.train_step, train.activations = train_step, activations
    loop0, loop1 = spans["step"][0][0], spans["step"][-1][1]
    inside = lambda kind: sum(b - a for a, b in spans[kind] if a >= loop0 and b <= loop1)
    loop = loop1 - loop0
    return {"argv": argv, "tokens_per_s": ck["metrics"]["tokens_per_s"], "dead_frac": ck["metrics"]["dead_frac"],
            "total_s": total, "loop_s": loop,
            "sae_step_s": inside("step"), "subject_forward_s": inside("subject"),
            "useful_share": (inside("step") + inside("subject")) / loop}


QUICK_TRAIN = ["--n_latents", "256", "--k", "4", "--batch_size", "256", "--ctx_len", "32"]


def print_table(res):
    print(f"device: {res['device']}; torch {res['torch']}; {res['threads']} threads; load average "
          f"{res['load_avg'][0]:.1f} -> {res['load_avg'][1]:.1f}; dead latents {res['dead_frac']:.0%}; "
          f"bf16 screen {'on' if res['bf16_screen'] else 'off'}; "
          f"SAE {res['activation']}" + (f", Matryoshka {res['matryoshka']}" if res["matryoshka"] else "") + "; "
          f"THP_MEM_ALLOC_ENABLE={res['thp']}")
    names = ("mm", "mm_topk", "mm_bf16") + STEPS + ("dense",)
    ratios = ("fast_over_mm", "fast_over_mm_topk", "fast0_over_mm", "fast_over_mm_bf16", "fast_gather_over_mm",
              "fast_graph_over_mm", "fast_graph_gather_over_mm", "fast_over_dense", "fast_graph_over_dense")
    head = ["d_model", "n", "k", "batch"] + [n.replace("_", " ") for n in names] + \
        [r.replace("_over_", "/").replace("_", " ") for r in ratios] + ["mem GB", "mem/budget"]
    print("tokens/s for mm ... dense; ratios of throughput; mem: fast step's peak; fast csr and later: CUDA only")
    print(" | ".join(head))
    for r in res["shapes"]:
        if "error" in r:
            print(f"{r['d_model']} | {r['n_latents']} | {r['k']} | {r['batch']} | {r['error']}")
            continue
        tps, mem = r["tokens_per_s"], r["memory_gb"] or {}
        f = lambda v, fmt: "-" if v is None else format(v, fmt)
        batch = str(r["batch"]) + ("" if r["micro_batch"] == r["batch"] else f" ({r['micro_batch']})")
        print(" | ".join([str(r["d_model"]), str(r["n_latents"]), str(r["k"]), batch]
                         + [f(tps.get(name), ",.0f") for name in names] + [f(r.get(name), ".2f") for name in ratios]
                         + [f(mem.get("fast"), ".2f"), f(mem.get("fast_over_budget"), ".2f")]))
        for name, err in r["errors"].items():
            print(f"  {name} failed: {err}")
        if r["syncs_per_step"]:
            print("  host syncs a step: " + ", ".join(f"{k} {v}" for k, v in r["syncs_per_step"].items()))
    for r in res["shapes"]:
        if r.get("screen"):
            sc = r["screen"]
            print(f"bf16 screen at {r['d_model']},{r['n_latents']},{r['k']},{r['batch']}: of {sc['tokens']:,} tokens, "
                  f"{sc['past_tier_1']:.2%} past tier 1, {sc['past_tier_2']:.2%} past tier 2 (to the fp32 encoder)")
    for r in res["shapes"]:
        if "profile" in r:
            for name in ("profile", "profile_graph"):
                if name not in r:
                    continue
                pr = r[name]
                gpu = (f"; {pr['kernels_per_step']:.0f} kernels a step, GPU busy {pr['gpu_busy']:.0%}"
                       if pr["kernels_per_step"] is not None else "")
                print(f"{name} of the fast step{' as a CUDA graph' if name == 'profile_graph' else ''} at "
                      f"{r['d_model']},{r['n_latents']},{r['k']},{r['batch']} (ms a step): {pr['wall_ms']:.1f} in all"
                      + "".join(f", {p} {ms:.1f}" for p, ms in pr["phases_ms"].items()) + gpu)
                for o in pr["top_ops"]:
                    print(f"  {o['ms']:8.2f} ms  {o['calls']:3d} x {o['op']} {o['shapes']}")
    for name in ("activations", "train"):
        if isinstance(res[name], str):
            print(f"{name}: skipped ({res[name]})")
    if isinstance(res["activations"], dict):
        a = res["activations"]
        print(f"activation generation (blocks 0..{a['layer']}): {a['tokens_per_s']:,.0f} tokens/s")
    if isinstance(res["train"], dict):
        t = res["train"]
        print(f"train.py end to end ({' '.join(t['argv'])}): {t['tokens_per_s']:,} tokens/s; training loop "
              f"{t['loop_s']:.1f} s, of which SAE steps {t['sae_step_s']:.1f} s and subject forward "
              f"{t['subject_forward_s']:.1f} s = {t['useful_share']:.0%}; whole run {t['total_s']:.1f} s; "
              f"{t['dead_frac']:.0%} dead at the end")


# -----------------------------------------------------------------------------
# Latent sharding (train.py --latent_shards): per-process memory and step time against M


def _shard_worker(rank, M, port, shape, args, q):
    """One process of M (gloo): a training step as train.py's sharded run takes it (M = 1: the
    unsharded SAE), with Adam and the EMA; -> q: (rank, median step s, peak bytes above the
    resident set before the SAE was built)."""
    import torch.distributed as dist
    torch.set_num_threads(args.threads or 1)
    d, n, k, B = shape
    if M > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=M)
    torch.manual_seed(0)
    xs = itertools.cycle(torch.randn(4, B, d).unbind())  # the same batches on every shard
    dead = torch.rand(n, generator=torch.Generator().manual_seed(0)) < args.dead_frac


    def build(n):
        cfg = SAEConfig(d_model=d, n_latents=n, k=min(k, n // M))
        rows = n // M
        return (sharding.ShardedSAE(cfg, kernels.Shard(rank, M, rank * rows, rows, None)) if M > 1 else SAE(cfg),
                slice(rank * rows, (rank + 1) * rows))

    # a step of a tiny SAE first, so that the libraries a step loads are resident before `base`
    tiny, _ = build(16 * M)
    tiny(next(xs), dead_mask=torch.ones(16, dtype=torch.bool)).loss.backward()
    del tiny
    base = memory_now("cpu")
    sae, rows = build(n)
    dead = dead[rows]
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=6.25e-10, fused=True)
    ema = train.EMA(sae, 0.999)

    def step():
        out = sae(next(xs), dead_mask=dead)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.project_decoder_grad()
        opt.step()
        sae.normalize_decoder()
        ema.update(sae)

    step()
    reset_peak("cpu")
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = memory_peak("cpu")
    q.put((rank, statistics.median(times), None if base is None else peak - base))
    if M > 1:
        dist.barrier()  # every rank done before any tears gloo down: a peer gone mid-exit aborts the others
        dist.destroy_process_group()


def bench_latent_shards(shape, counts, args):
    """For each shard count M: M processes of one thread each (args.threads) -> rows of M, the
    slowest process's median step ms and the largest per-process peak memory, beside the model's
    sharded state, 40 n d / M bytes (W_enc, W_dec: weights, gradients, Adam's two moments, EMA)."""
    import socket
    import torch.multiprocessing as mp
    d, n, k, B = shape
    rows = []
    for M in counts:
        if n % M:
            raise gpt.UserError(f"--latent_shards {M} does not divide n_latents {n} of --shapes: use a divisor")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        q = mp.get_context("spawn").SimpleQueue()
        mp.spawn(_shard_worker, args=(M, port, shape, args, q), nprocs=M)
        got = [q.get() for _ in range(M)]
        peaks = [p for _, _, p in got if p is not None]
        rows.append({"shards": M, "step_ms": 1e3 * max(t for _, t, _ in got),
                     "peak_gb": max(peaks) / 2**30 if peaks else None, "state_gb": 40 * n * d / M / 2**30})
    return {"d_model": d, "n_latents": n, "k": k, "batch": B, "threads_per_process": args.threads or 1,
            "rows": rows}


def print_shard_table(res):
    r = res["latent_shards"]
    print(f"device: {res['device']}; torch {res['torch']}; latent shards at d_model {r['d_model']}, n {r['n_latents']}, "
          f"k {r['k']}, batch {r['batch']}, {r['threads_per_process']} thread(s) a process, dead latents "
          f"{res['dead_frac']:.0%}; load average {res['load_avg'][0]:.1f} -> {res['load_avg'][1]:.1f}")
    print("shards | step ms (slowest process) | peak GB a process | sharded state GB (40 n d / M)")
    for row in r["rows"]:
        peak = "-" if row["peak_gb"] is None else f"{row['peak_gb']:.3f}"
        print(f"{row['shards']} | {row['step_ms']:.0f} | {peak} | {row['state_gb']:.3f}")


def check_shapes(shapes):
    """--shapes: entries d_model,n_latents,k,batch, positive integers with k <= n_latents."""
    for s in shapes:
        try:
            d, n, k, b = (int(v) for v in s.split(","))
        except ValueError:
            return f"entry {s} is not d_model,n_latents,k,batch (four integers, commas, no spaces)"
        if min(d, n, k, b) < 1 or k > n:
            return f"entry {s} needs every value >= 1 and k <= n_latents"
    return None


def check_shard_counts(counts):
    """--latent_shards: counts >= 1 (each divides the first shape's n_latents: checked when run)."""
    return None if all(m >= 1 for m in counts) else "use shard counts >= 1"


def check_json_out(path):
    """--json_out: a file in a directory this process can write in."""
    return gpt.OutputDir()(os.path.dirname(path) or ".")


def check_e2e_args(v):
    """--e2e_args: flags that train.py knows (their values are checked when it runs)."""
    names = {o for a in train.build_parser()._actions for o in a.option_strings}
    unknown = [w for w in v.split() if w.startswith("--") and w.split("=")[0] not in names]
    return f"train.py has no flag {unknown[0]}: see python train.py --help" if unknown else None


# what each flag accepts (gpt.check_flags); --screen is an argparse choice
RULES = {"device": gpt.check_device, "shapes": check_shapes, "dead_frac": gpt.Number(0, 1), "warmup": gpt.Number(0, 1000),
         "runs": gpt.Number(1, 1000), "model": None,  # any: a missing model skips its rows, as --help says
         "act_contexts": gpt.Number(1, 1 << 20), "e2e_tokens": gpt.Number(1, 10 ** 10),
         "e2e_shuffle": gpt.Number(1, 1 << 28), "threads": gpt.Number(0, 4096), "latent_shards": check_shard_counts,
         "matryoshka": train.check_prefixes, "json_out": check_json_out, "e2e_args": check_e2e_args}


def build_parser():
    p = gpt.ArgumentParser(description="Benchmark the SAE training step against the encoder-matmul floor.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--shapes", nargs="+", metavar="D,N,K,B",
                   help="shapes d_model,n_latents,k,batch; default: the device's grid (see GRIDS)")
    p.add_argument("--quick", action="store_true", help="a tiny grid and a tiny train.py run: a smoke test in seconds")
    p.add_argument("--dead_frac", type=float, default=0.05,
                   help="fraction of latents marked dead for AuxK (the README's Results give the "
                        "dead fractions real runs end at)")

    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each measurement")
    p.add_argument("--runs", type=int, default=3, help="timed runs of each measurement (the median is reported)")
    p.add_argument("--no_dense", action="store_true", help="skip the dense reference step (slow at large shapes)")
    p.add_argument("--model", default=gpt.DEFAULT_CKPT,
                   help="subject model for the activation and train.py rows (as train.py --model); skipped if missing")
    p.add_argument("--no_train", action="store_true", help="skip the activation and end-to-end train.py rows")
    p.add_argument("--act_contexts", type=int, default=1024, help="contexts of 64 tokens per activation-generation run")
    p.add_argument("--e2e_tokens", type=int, default=262144, help="training tokens of the end-to-end train.py run")
    p.add_argument("--e2e_shuffle", type=int, default=65536, help="--shuffle_tokens of the end-to-end run")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    p.add_argument("--profile", action="store_true",
                   help="also profile the fast step: ms a step per phase and the costliest operators")
    p.add_argument("--screen", choices=["auto", "on", "off"], default="auto",
                   help="the encoder's bf16 screen on CPU (kernels.py): auto uses it where the CPU has native "
                        "bf16 matmuls (AMX or AVX512-BF16); on and off force it, to compare on one machine")
    p.add_argument("--activation", choices=["topk", "batchtopk"], default="topk", help=train.HELP["activation"])
    p.add_argument("--matryoshka", default="", help=train.HELP["matryoshka"])
    p.add_argument("--latent_shards", type=int, nargs="+", metavar="M",
                   help="instead of the grid: train.py --latent_shards steps with M gloo processes of --threads "
                        "(default 1) threads each, for each M, at the first shape: per-process peak memory and step time")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--json_out", default="", help="also write the results as JSON to this file, after each shape")
    p.add_argument("--e2e_args", default="", help="more train.py flags for the end-to-end run, e.g. --e2e_args='--cuda_graph'")
    return p


def bench_shape_or_error(shape, args):
    """bench_shape, or the shape with the error that stopped it (on a GPU, out of memory, say):
    the other shapes still run, on a GPU with its cached memory handed back in between."""
    d, n, k, B = shape
    try:
        return bench_shape(d, n, k, B, args)
    except torch.OutOfMemoryError as e:
        return {"d_model": d, "n_latents": n, "k": k, "batch": B, "error": f"out of memory: {str(e).splitlines()[0]}"}
    except Exception as e:  # a GPU run is scarce: keep the other shapes, say what broke
        return {"d_model": d, "n_latents": n, "k": k, "batch": B, "error": f"{type(e).__name__}: {e}"}
    finally:
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


def save_partial(res, path):
    """res as JSON at path (if given), written atomically: after each shape, so that a run that
    is stopped keeps the shapes it finished."""
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, path)


def main(argv=None):
    args = gpt.parse_args(build_parser(), RULES, argv)
    if args.quick:
        args.runs, args.act_contexts, args.e2e_tokens, args.e2e_shuffle = 2, 16, 2048, 1024
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.screen != "auto":
        kernels._BF16_SCREEN = args.screen == "on"
    if args.device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls outside autocast (the AuxK block's)
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        try:
            name = re.search(r"model name\s*:\s*(.+)", open("/proc/cpuinfo").read()).group(1)
        except (OSError, AttributeError):
            pass
    grid = "quick" if args.quick else ("cuda" if args.device.startswith("cuda") else "cpu")
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else GRIDS[grid]
    load = os.getloadavg()[0]  # other work on the machine skews every timing: reported with them
    if args.latent_shards:  # only the sharding table, at the first shape, on CPU processes
        res = {"device": f"cpu ({name})", "torch": torch.__version__, "dead_frac": args.dead_frac,
               "latent_shards": bench_latent_shards(shapes[0], args.latent_shards, args)}
        res["load_avg"] = [load, os.getloadavg()[0]]
        print(json.dumps(res, indent=1)) if args.json else print_shard_table(res)
        return res
    res = {"device": f"{args.device} ({name})", "torch": torch.__version__, "threads": torch.get_num_threads(),
           "dead_frac": args.dead_frac, "activation": args.activation, "matryoshka": args.matryoshka,
           "thp": os.environ.get("THP_MEM_ALLOC_ENABLE"),
           "bf16_screen": kernels._BF16_SCREEN, "argv": argv if argv is not None else sys.argv[1:],
           "shapes": [], "activations": None, "train": None}
    for s in shapes:
        res["shapes"].append(bench_shape_or_error(s, args))
        save_partial(res, args.json_out)  # a run stopped early keeps its finished shapes
    if args.no_train:
        res["activations"] = res["train"] = "--no_train"
    else:
        try:
            model = gpt.load_subject_model(args.model)[0].to(args.device)
        except gpt.UserError as e:
            res["activations"] = res["train"] = f"no subject model: {e}"
        else:
            res["activations"] = bench_activations(model, args)
            del model
            res["train"] = bench_train(args)
    res["load_avg"] = [load, os.getloadavg()[0]]  # 1-minute load average at the start and the end
    save_partial(res, args.json_out)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print_table(res)
    return res


if __name__ == "__main__":
    gpt.run_cli(main)
