"""The fast path of sae.py's SAE, as the paper's released code keeps kernels.py beside
model.py: the same numbers as the dense reference (SAE.recon_dense), up to floating-point
rounding and the order of tied latents, in O(B * (k + k_aux) * d_model) work after one dense
encoder matmul. test_kernels.py proves the equality on every route below.

What is here, in the order a step runs it:
- sparse_recon: the entry sae.py calls, returning what SAE.recon_dense returns.
- the encoder (_SparseEncode): pre-activations in cache-sized chunks, a two-stage TopK
  (topk), AuxK's code over the dead latents (in fixed shapes, with no value read back, while a
  CUDA graph records the step or torch.compile traces it: static_shapes); on CPUs with native
  bf16 matmuls (AMX or AVX512-BF16) the TopK comes from a bf16 screen checked in fp32
  (_screened_topk), exact all the same. Its backward touches only the selected latents.
- the decoder (_SparseDecode): embedding_bag sums of the selected rows; backward by CSR
  matrices on CPU and dense matmuls on CUDA.
- buffers kept across steps on CPU, so that a step does not fault in fresh memory.
The reasons for each choice are in the comments; the measurements behind them are in the
README's Performance section. Citation tags as in sae.py ([code]: openai/sparse_autoencoder).
"""
import warnings

import torch
import torch.nn.functional as F

# Elements per chunk for CPU work done in chunks that stay in cache: the encoder's (~16 MB of
# fp32, a chunk of pre-activations) and the row-wise decoder ops' (~1 MB, within one core's L2).
_CHUNK = 1 << 22
_ROW_CHUNK = 1 << 18


def static_shapes(t):
    """Whether the step that t (a tensor of it) belongs to must keep every shape fixed by its
    arguments and never wait for the device to read a value back: while a CUDA graph records it
    or torch.compile traces it (a graph replays what it recorded, shapes and all, and a sync
    inside either breaks it), or whenever _STATIC is set. Then sae.py passes AuxK the dead
    latents as a mask (_static_codes), not as indices whose count the host must read, and skips
    its finite-input check (its caller checks: train.py checks each batch). BatchTopK's code
    has a varying width: it has no static route."""
    recording = t.is_cuda and torch.cuda.is_current_stream_capturing()
    return _STATIC or recording or torch.compiler.is_compiling()


_STATIC = False  # the static route everywhere: tests, and the eager steps around a recorded graph


def auxk_latents(dead, k_aux, static):
    """The dead latents (n_latents,) bool -> AuxK's latents and width as sparse_recon and the
    dense reference take them: the dead latents' indices and min(k_aux, n_dead), a count read
    back from the device; on the static route (static_shapes) the mask itself and k_aux."""
    if static:
        return dead, k_aux
    dead_idx = dead.nonzero().squeeze(1)
    return dead_idx, min(k_aux, len(dead_idx))


def sparse_recon(sae, x_n, k_top, dead_idx, k_aux):
    """SAE.recon_dense's (vals, idx, x_hat, x_hat_multi, e_hat) for the SAE sae, from one
    dense encoder matmul; everything after it costs O(B * (k_top + k_aux) * d), or
    O(B * n_dead * d) in dense matmuls while few latents are dead. dead_idx: the dead latents'
    indices (n_dead,), or on the static route their mask (n_latents,) bool (static_shapes)."""
    k = sae.cfg.k
    if sae.cfg.activation == "batchtopk":
        vals, idx, aux_vals, aux_idx = _batch_topk_encode(sae, x_n, dead_idx, k_aux)
        k = k_top = vals.shape[1]
    else:
        vals, idx, aux_vals, aux_idx = _SparseEncode.apply(
            x_n, sae.W_enc, sae.b_enc, sae.b_pre, k_top, dead_idx, k_aux, sae._scratch)
    codes = [(vals[:, :k], idx[:, :k])]
    if k_top > k:  # L(4k) reuses the k-code reconstruction and adds the next 3k latents
        codes.append((vals[:, k:], idx[:, k:]))
    if k_aux:
        codes.append((aux_vals, aux_idx))
    outs = sparse_decode(sae.W_dec, codes, sae._scratch)  # one (B, d) per code
    x_hat = outs[0] + sae.b_pre
    x_hat_multi = x_hat + outs[1] if k_top > k else x_hat
    e_hat = outs[-1] if k_aux else None
    if k_aux and dead_idx.dtype == torch.bool:  # static route, nothing dead: AuxK's FVU 0, as with k_aux 0
        e_hat = torch.where(dead_idx.any(), e_hat, (x_n - x_hat).detach())
    return vals, idx, x_hat, x_hat_multi, e_hat


def _batch_topk_encode(sae, x_n, dead_idx, k_aux):
    """BatchTopK's code (sae.py): vals, idx (B, K), each token's share of the batch's top k * B,
    sorted and zero-padded to the largest share K, and the AuxK code. From each token's top K_c
    candidates (the TopK encoder's), of which the batch keeps its top k * B: exact unless a
    token's K_c-th candidate is above the batch's threshold, when the token may hold more
    winners than it has candidates; then K_c doubles and the encoder runs again. The K_c that
    sufficed is kept for the next step."""
    B, n, k = len(x_n), sae.cfg.n_latents, sae.cfg.k
    K_c = min(n, sae._scratch.get("batch_candidates", 2 * k))
    while True:
        vals, idx, aux_vals, aux_idx = _SparseEncode.apply(
            x_n, sae.W_enc, sae.b_enc, sae.b_pre, K_c, dead_idx, k_aux, sae._scratch)
        v = vals.detach()
        top = v.flatten().topk(k * B)  # the batch's winners among the candidates
        if K_c == n or not bool((v[:, -1] > top.values[-1]).any()):
            break
        K_c = min(n, 2 * K_c)
    sae._scratch["batch_candidates"] = K_c
    # each token keeps a prefix of its sorted candidates, as many as it has winners (between
    # tied values the prefix, not topk's pick: the same values)
    share = torch.zeros(B * K_c, dtype=torch.int32, device=v.device).index_fill_(0, top.indices, 1).view(B, K_c).sum(1)
    K = max(1, int(share.max()))
    keep = torch.arange(K, device=v.device) < share.unsqueeze(1)  # (B, K)
    return vals[:, :K] * keep, idx[:, :K], aux_vals, aux_idx


def row_chunks(m):
    """An (n, d) matrix as chunks of rows, _ROW_CHUNK elements each on CPU: a row-wise op done
    chunk by chunk reads each chunk back from cache instead of memory, and a temporary such
    as vecdot's product stays small and is reused from the heap instead of mapped afresh.
    On GPU, one chunk: chunks would only add kernel launches."""
    return m.split(max(1, _ROW_CHUNK // m.shape[1]) if m.device.type == "cpu" else len(m))


# The AuxK code is a dense block over the dead latents while there are at most this many
# times k_aux of them: every token then picks a large share of them, and dense matmuls beat
# per-entry gathers (README, Performance, has the break-even).
_AUXK_BLOCK_RATIO = 12


def topk(x, k, block=16):
    """torch.topk(x, k, dim=1) for x (B, n): values sorted descending, indices into dim 1.
    In two stages when n is large: the maximum of each of n // block strided blocks of
    columns, then the top k among the k best blocks' columns and the n % block leftover ones
    (on CPU the k best blocks are found the same way, recursively). Every value of the top k
    lies in those (a block holding one but not chosen would give k + 1 values above the k-th),
    so values are exact; indices can differ from torch.topk only between ties. It sorts only
    k * block values a row, where torch.topk partially sorts the whole row on CPU and runs a
    radix select over it on GPU."""
    B, n = x.shape
    if 4 * block * k > n:
        return x.topk(k, dim=1)
    nb = n // block
    blocks = x[:, :nb * block].view(B, block, nb)  # blocks[b, t, j] = x[b, t * nb + j]: block j
    maxima = blocks.amax(1)  # (B, nb)
    # (B, k) block ids; on CPU by the same two stages while there are many blocks; on GPU
    # each level would add kernel launches
    best = (topk(maxima, k, block) if x.device.type == "cpu" else maxima.topk(k, dim=1, sorted=False))[1]
    cols = (best.unsqueeze(1) + nb * torch.arange(block, device=x.device).view(1, block, 1)).view(B, block * k)
    if nb * block < n:
        cols = torch.cat([cols, torch.arange(nb * block, n, device=x.device).expand(B, -1)], 1)
    vals, pos = x.gather(1, cols).topk(k, dim=1)
    return vals, cols.gather(1, pos)


def _auxk_code(pre_dead, dead_idx, k_aux):
    """The dead latents' pre-activations (B, n_dead) -> the AuxK code (paper §2.4): each
    token's top k_aux of them, ReLU'd, as aux_vals, aux_idx. With few dead latents it is a
    dense block, aux_vals (B, n_dead) over the columns aux_idx = dead_idx, zero outside each
    token's top k_aux; otherwise sparse, (B, k_aux) each."""
    n_dead = len(dead_idx)
    if n_dead > _AUXK_BLOCK_RATIO * k_aux:
        aux_vals, local = topk(pre_dead, k_aux)
        return aux_vals.relu(), dead_idx[local]
    if k_aux < n_dead:
        top, local = pre_dead.topk(k_aux, dim=1, sorted=False)
        return torch.zeros_like(pre_dead).scatter_(1, local, top).relu_(), dead_idx
    return pre_dead.relu(), dead_idx


# ---- the encoder ----

class _SparseEncode(torch.autograd.Function):
    """(x_n, W_enc, b_enc, b_pre) -> the TopK code vals, idx (B, k_top), ReLU'd and sorted
    descending, and the AuxK code aux_vals, aux_idx (see _auxk_code; on the static route, where
    dead_idx is a mask, _static_codes).
    The one dense matmul of a step; under torch.autocast it runs in the autocast dtype
    (addmm is on autocast's low-precision list) and the codes come back in W_enc's dtype; in
    fp32 on a CPU with native bf16 matmuls it runs in bf16 as a screen checked in fp32
    (_screened_topk).
    Backward touches only the selected latents and computes no input gradient."""

    @staticmethod
    def forward(ctx, x_n, W_enc, b_enc, b_pre, k_top, dead_idx, k_aux, scratch):
        ctx.set_materialize_grads(False)
        x_c = x_n - b_pre  # (B, d)
        if dead_idx.dtype == torch.bool:  # static_shapes: AuxK over a mask of the dead latents
            vals, idx, aux_vals, aux_idx = _static_codes(x_c, W_enc, b_enc, k_top, dead_idx, k_aux,
                                                         scratch.get("aux_candidates", len(W_enc)))
        else:
            vals, idx, aux_vals, aux_idx = _dynamic_codes(x_c, W_enc, b_enc, k_top, dead_idx, k_aux, scratch)
        ctx.mm_dtype, ctx.scratch = _backward_dtype(W_enc), scratch
        vals, aux_vals = vals.relu().to(W_enc.dtype), aux_vals.to(W_enc.dtype)
        ctx.save_for_backward(x_c, W_enc, vals, idx, aux_vals, aux_idx)
        ctx.mark_non_differentiable(idx, aux_idx)
        return vals, idx, aux_vals, aux_idx

    @staticmethod
    def backward(ctx, g_vals, _, g_aux, __):
        x_c, W_enc, vals, idx, aux_vals, aux_idx = ctx.saved_tensors
        # The gradient w.r.t. the pre-activations at the selected entries, 0 where the
        # ReLU clipped or (in a block) the latent was not selected.
        codes = [(i, g * (v > 0)) for v, i, g in ((vals, idx, g_vals), (aux_vals, aux_idx, g_aux))
                 if g is not None and i.numel() > 0]
        if not codes:
            return (None,) * 8
        if _dense_backward(x_c) and _GATHER_BACKWARD:  # rows += g x_c at each entry (_scatter_outer)
            grad_W_enc = x_c.new_zeros(W_enc.shape)
            for i, g in codes:
                if i.dim() == 2:
                    _scatter_outer(grad_W_enc, i, g, x_c)
                else:  # a dense block over the latents i: (n_i, B) @ (B, d)
                    grad_W_enc.index_add_(0, i, g.t() @ x_c)
        elif _dense_backward(x_c):
            # G (B, n_latents), zero off the codes: forward's matmul transposed. scatter_add_:
            # a dead latent in a token's TopK and AuxK codes gets both gradients.
            G = x_c.new_zeros(len(x_c), len(W_enc), dtype=ctx.mm_dtype)
            for i, g in codes:
                if i.dim() == 2:
                    G.scatter_add_(1, i, g.to(G.dtype))
                else:  # a dense block: its columns i
                    G.index_add_(1, i, g.to(G.dtype))
            grad_W_enc = (G.t() @ x_c.to(G.dtype)).to(W_enc.dtype)  # (n_latents, d)
        else:
            sparse = [(i, g) for i, g in codes if i.dim() == 2]
            if sparse:  # AuxK's sparse entries join the TopK ones in one sparse matrix
                S_t, _ = _codes_csr_t([i for i, _ in sparse], [g for _, g in sparse], W_enc.shape[0])
                grad_W_enc = _spmm(S_t, x_c.repeat(len(sparse), 1),  # (n_latents, d)
                                   _grad_buffer(ctx.scratch, "W_enc", x_c, W_enc.shape))
            else:
                grad_W_enc = x_c.new_zeros(W_enc.shape)
            for i, g in codes:
                if i.dim() == 1:  # a dense block over the latents i: (n_i, B) @ (B, d)
                    grad_W_enc.index_add_(0, i, g.t() @ x_c)
        grad_b_enc = x_c.new_zeros(W_enc.shape[0])  # (n_latents,)
        for i, g in codes:  # not G.sum(0, dtype=...): on CUDA that made an fp32 copy of G
            if i.dim() == 2:
                grad_b_enc.index_add_(0, i.reshape(-1), g.reshape(-1))
            else:
                grad_b_enc.index_add_(0, i, g.sum(0))
        # [code] b_pre (encoder side): d pre / d b_pre = -W_enc, so one mat-vec.
        grad_b_pre = -(grad_b_enc @ W_enc) if ctx.needs_input_grad[3] else None
        return None, grad_W_enc, grad_b_enc, grad_b_pre, None, None, None, None


def _dynamic_codes(x_c, W_enc, b_enc, k_top, dead_idx, k_aux, scratch):
    """_SparseEncode's codes (vals before the ReLU) for the dead latents' indices dead_idx
    (n_dead,). AuxK reads the same pre-activations: one encoder pass serves both losses. When the dead
    latents' (B, n_dead) outweigh W_enc, the encoder's rows go dead latents first, so that
    theirs are pre's leading columns, for the price of copying W_enc; else a second, small
    matmul recomputes them. Either beats gathering scattered columns of pre, a strided read of
    all of it. Under the bf16 screen pre's values are bf16, so always the second matmul."""
    n_dead, W, b = len(dead_idx), W_enc, b_enc
    screen = _screen(x_c, len(W_enc), k_top)
    permute = k_aux and not screen and W_enc.numel() <= len(x_c) * n_dead
    if permute:
        live = torch.ones(len(W_enc), dtype=torch.bool, device=W_enc.device).index_fill_(0, dead_idx, False)
        order = torch.cat([dead_idx, live.nonzero().squeeze(1)])
        W, b = W_enc[order], b_enc[order]  # (n, d) copy
    # The one dense matmul, then TopK; sorted: Multi-TopK's top k come first.
    if screen:
        (vals, idx), pre_dead = _screened_topk(scratch, x_c, W_enc, b_enc, k_top), x_c[:, :0]
    else:
        vals, idx, pre_dead = _preacts_topk(scratch, x_c, W, b, k_top, n_dead if permute else 0)
    if permute:
        idx = order[idx]
    elif k_aux:
        pre_dead = torch.addmm(b_enc[dead_idx], x_c, W_enc[dead_idx].t())
    if k_aux:
        return vals, idx, *_auxk_code(pre_dead, dead_idx, k_aux)
    return vals, idx, pre_dead, dead_idx  # (B, 0)


def _static_codes(x_c, W_enc, b_enc, k_top, dead, k_aux, n_cand):
    """_SparseEncode's codes (vals before the ReLU) for the dead latents' mask dead (n_latents,)
    bool, in shapes fixed by the arguments alone and without reading anything back from the
    device, as a CUDA graph or torch.compile needs (static_shapes). AuxK looks at n_cand
    candidate latents, the dead ones first (scratch["aux_candidates"], default all): with all
    n_latents, each token's top k_aux of the pre-activations with the live latents' at -inf, as
    [code] does, aux_vals, aux_idx (B, k_aux); with fewer, a second small matmul over the
    candidates and _auxk_code's code over them, the live ones at -inf. Either way ReLU'd, so
    that a live latent in the code holds 0: while at most n_cand latents are dead, the same
    reconstruction as _dynamic_codes' top min(k_aux, n_dead); past that, AuxK draws on n_cand
    of the dead latents (train.py's CUDA graph widens n_cand before that happens)."""
    n = len(W_enc)
    pre = torch.addmm(b_enc, x_c, W_enc.t())  # (B, n_latents)
    vals, idx = topk(pre, k_top)  # sorted: Multi-TopK's top k come first
    if not k_aux:
        return vals, idx, pre[:, :0], idx.new_zeros(0)  # (B, 0), (0,): a block over no latents
    if n_cand >= n:  # in place: pre is done with
        aux_vals, aux_idx = topk(pre.masked_fill_(~dead, float("-inf")), k_aux)
        return vals, idx, aux_vals.relu(), aux_idx
    cand = dead.to(x_c.dtype).topk(n_cand, sorted=False).indices  # (n_cand,): every dead latent, if they fit
    pre_cand = torch.addmm(b_enc[cand], x_c, W_enc[cand].t()).masked_fill_(~dead[cand], float("-inf"))
    return vals, idx, *_auxk_code(pre_cand, cand, min(k_aux, n_cand))


def aux_candidates(n_latents, k_aux, n_dead):
    """How many candidate latents the static route's AuxK should look at (_static_codes) when
    at most n_dead are dead: twice that, so that a graph recorded with it serves while more
    die, at least 8 k_aux, at most every latent."""
    return min(n_latents, max(8 * k_aux, 2 * n_dead))


def _preacts_topk(scratch, x_c, W_enc, b_enc, k_top, n_lead):
    """The encoder and TopK: pre-activations pre = x_c W_enc^T + b_enc (B, n_latents) -> vals,
    idx (B, k_top), each token's top k_top sorted descending, and pre[:, :n_lead].

    On CPU, in chunks of rows, each selected from right after its matmul, into a buffer kept
    in scratch across steps (a fresh buffer costs page faults on top of the write). A chunk
    has max(d_model, _CHUNK / n_latents) rows: with a small W_enc the matmul is bound by
    writing pre, and the chunk is still in cache for TopK instead of read back from memory;
    with at least d_model rows, re-reading W_enc per chunk costs no more than the chunk
    itself. No (B, n) buffer either way. On GPU, and
    under CPU autocast (which out= bypasses), a plain addmm: CUDA's caching allocator already
    reuses memory."""
    B, n = len(x_c), len(W_enc)
    if x_c.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        pre = torch.addmm(b_enc, x_c, W_enc.t())
        return *topk(pre, k_top), pre[:, :n_lead]
    rows = min(B, max(_CHUNK // n, x_c.shape[1]))
    buf = _kept(scratch, "pre", x_c, (rows, n), x_c.dtype)
    vals, lead = x_c.new_empty(B, k_top), x_c.new_empty(B, n_lead)
    idx = torch.empty(B, k_top, dtype=torch.long, device=x_c.device)
    for s in range(0, B, rows):
        pre = torch.addmm(b_enc, x_c[s:s + rows], W_enc.t(), out=buf[:min(rows, B - s)])
        vals[s:s + rows], idx[s:s + rows] = topk(pre, k_top)
        lead[s:s + rows] = pre[:, :n_lead]
    return vals, idx, lead


# ---- the bf16 screen (CPUs with native bf16 matmuls) ----


def _native_bf16_matmul():
    """Whether this CPU multiplies bf16 matrices in hardware: AMX tiles (Intel, Sapphire Rapids
    on) or AVX512-BF16 dot products (Intel Cooper Lake, AMD Zen 4 on), the two paths oneDNN's
    bf16 matmul takes. There it runs several times faster than fp32 (README, Performance);
    elsewhere torch emulates bf16, slower than fp32. Read from the CPU's flags, not timed at
    first use: the choice is then the same in every run on a machine, whatever its load."""
    return any(getattr(torch.cpu, probe, lambda: False)()
               for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


# Where bf16 matmuls are native the encoder's TopK is a bf16 screen checked in fp32, which
# returns fp32's exact top k (_screened_topk); elsewhere the plain fp32 encoder (_preacts_topk).
_BF16_SCREEN = _native_bf16_matmul()
_SCREEN_CHUNK = 1 << 25  # bf16 pre-activations at a time (64 MB): bounds the peak memory
_SCREEN_K = 2  # tier 1's candidates per token, in multiples of k
_BF16_U = 2.0 ** -7  # bf16's unit roundoff 2^-8 (8-bit significand), doubled to spare


def _screen(x_c, n, k_top):
    """Whether the encoder's TopK runs as _screened_topk: fp32 on a CPU with native bf16 matmuls, outside

    autocast, and n_latents large enough that the candidates (up to 8 k_top, in tier 2) are a
    small share of them."""
    return (_BF16_SCREEN and x_c.device.type == "cpu" and x_c.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and n >= 8 * k_top)


def _bf16_operands(scratch, x_c, W_enc, b_enc):
    """The screen's operands: x16 (B, d + 1) = [bf16(x_c), 1], W16 (n, d + 1) = [bf16(W_enc),
    bf16(b_enc)] (kept in scratch), and A (B,) with |pre - acc| <= A_b for every latent,
    pre = x_c W_enc^T + b_enc exactly and acc = x16 W16^T accumulated in fp32, as a bf16
    matmul does before rounding its output. Cauchy-Schwarz: x W_j - x~ W~_j = r W_j + x~ R_j,
    with r, R_j what rounding x_c and W_enc's rows drops, so it is at most
    ||r|| ||W_j|| + ||x~|| ||R_j||; plus b_enc's rounding and fp32 accumulation (here and in the
    fp32 values the screen checks against), with 0.1% to spare for the norms' own rounding
    and 1e-30 for denormals that bf16 hardware flushes."""
    B, d = x_c.shape
    n = len(W_enc)
    W16 = _kept(scratch, "W16", W_enc, (n, d + 1), torch.bfloat16)
    # max_j ||R_j|| and max_j ||W_j||, ||R_j|| = ||bf16(W_j) - W_j|| (exact in fp32), in row
    # chunks, so that each is read back from cache
    rows = max(1, _ROW_CHUNK // d)
    tmp, norms = x_c.new_empty(min(rows, n), d), x_c.new_empty(2, n)
    for s in range(0, n, rows):
        W_c, W16_c, R_c = W_enc[s:s + rows], W16[s:s + rows, :d], tmp[:min(rows, n - s)]
        W16_c.copy_(W_c)
        torch.linalg.vector_norm(R_c.copy_(W16_c).sub_(W_c), dim=1, out=norms[0, s:s + rows])
        torch.linalg.vector_norm(W_c, dim=1, out=norms[1, s:s + rows])
    R, W_norm = norms.amax(1)
    W16[:, d].copy_(b_enc)
    b_err = (b_enc - W16[:, d].float()).abs().max()
    x16 = torch.ones(B, d + 1, dtype=torch.bfloat16, device=x_c.device)
    x16[:, :d].copy_(x_c)
    r = torch.linalg.vector_norm(x_c - x16[:, :d].float(), dim=1)  # (B,)
    x_norm = torch.linalg.vector_norm(x_c, dim=1) + r  # >= ||x~||
    gamma = 2 * (d + 1) * 2.0 ** -24
    accumulation = gamma * (x_norm * (W_norm + R) + b_enc.abs().max() + b_err)
    A = (r * W_norm + x_norm * R + b_err + accumulation) * (1 + 1e-3) + 1e-30
    return x16, W16, A


def _screened_topk(scratch, x_c, W_enc, b_enc, k_top):
    """_preacts_topk's vals, idx (B, k_top) for fp32 inputs, exactly (up to fp32 rounding
    and ties), from a bf16 matmul and a check:
      1. the screen: pre~ = x16 W16^T (B, n) in bf16 (_bf16_operands: b_enc folded in as a
         column), in row chunks; each token's top K of pre~ are its candidates, t_b the
         smallest of their pre~;
      2. the candidates' fp32 pre-activations (B * K dot products) and their top k_top;
      3. the check: every latent has pre <= pre~ + u |pre~| + A_b (u: the output's rounding),
         so one outside the candidates has pre <= T_b = t_b + u |t_b| + A_b, and a token
         whose k_top-th fp32 value is >= T_b has its exact top k_top.
    Tier 1 takes K = _SCREEN_K k_top = 2 k_top candidates; tier 2, 8 k_top for the tokens tier
    1 left unsure; the fp32 encoder decides any left after that (how many reach each tier:
    README, Performance). scratch["screen_counts"] counts tokens in and past each tier."""
    B, d = x_c.shape
    n = len(W_enc)
    x16, W16, A = _bf16_operands(scratch, x_c, W_enc, b_enc)
    # tier 1 in chunks of _SCREEN_CHUNK elements, at least d rows (fewer would re-read W16 once
    # per chunk for little work)
    rows = min(B, max(_SCREEN_CHUNK // n, d))
    buf = _kept(scratch, "pre16", x16, (rows, n), torch.bfloat16)
    cand, t = _bf16_candidates(x16, W16, buf, _SCREEN_K * k_top)
    vals, idx, unsure = _settle(x_c, W_enc, b_enc, cand, t, A, k_top)
    counts = scratch.setdefault("screen_counts", [0, 0, 0])  # over calls: tokens in, past tier 1, 2
    counts[0] += B
    counts[1] += len(unsure)
    # tier 2, for the tokens tier 1 left unsure: their pre~ again, 8 k_top candidates. It matters
    # where pre-activations bunch at the threshold, as on a batch trained on repeatedly.
    if len(unsure) and 8 * k_top <= n:  # (_screen makes sure)
        cand, t = _bf16_candidates(x16[unsure], W16, buf, 8 * k_top)
        v, i, still = _settle(x_c[unsure], W_enc, b_enc, cand, t, A[unsure], k_top)
        vals[unsure], idx[unsure] = v, i
        unsure = unsure[still]
    counts[2] += len(unsure)
    if len(unsure):  # the fp32 encoder decides the rest
        vals[unsure], idx[unsure], _ = _preacts_topk(scratch, x_c[unsure], W_enc, b_enc, k_top, 0)
    return vals, idx


def _bf16_candidates(x16, W16, buf, K):
    """Step 1 of _screened_topk: each row's top K of pre~ = x16 W16^T -> cand (B, K) and t (B,),
    the smallest of their pre~ in fp32. In chunks of buf's rows, into buf: tier 1 and tier 2
    share it, so no bf16 rows are allocated by a size that varies from step to step."""
    B, rows = len(x16), len(buf)
    cand = torch.empty(B, K, dtype=torch.long, device=x16.device)
    t = torch.empty(B, dtype=torch.float32, device=x16.device)
    for s in range(0, B, rows):
        pre16 = torch.mm(x16[s:s + rows], W16.t(), out=buf[:min(rows, B - s)])
        top16, cand[s:s + rows] = topk(pre16, K, block=8)  # bf16 rows: smaller blocks pay here

        t[s:s + rows] = top16[:, -1]
    return cand, t


def _settle(x_c, W_enc, b_enc, cand, t, A, k_top):
    """Step 2 and 3 of _screened_topk for candidates cand (B, K), t (B,) the smallest of their
    pre~ -> vals, idx (B, k_top), the top k_top of the candidates' fp32 values, and the
    tokens (indices into B) for which the check fails, whose vals, idx may be wrong."""
    vals, idx = _candidates_topk(x_c, W_enc, b_enc, cand, k_top)
    T = t + _BF16_U * t.abs() + A  # every latent outside the candidates has pre <= T
    return vals, idx, (vals[:, -1] < T).nonzero().squeeze(1)


def _candidates_topk(x_c, W_enc, b_enc, cand, k_top):
    """The top k_top of each token's fp32 pre-activations at its candidate latents cand (B, K),
    sorted descending: a CSR pattern (B, n) with K entries a row holding b_enc at the
    candidates, plus x_c W_enc^T sampled there (B * K dot products)."""
    B, K = cand.shape
    S = _csr(torch.arange(0, B * K + 1, K, device=x_c.device), cand.reshape(-1),
             b_enc[cand].reshape(-1), (B, len(W_enc)))

    pre = torch.sparse.sampled_addmm(S, x_c, W_enc.t()).values().view(B, K)
    vals, pos = pre.topk(k_top, dim=1)
    return vals, cand.gather(1, pos)


# ---- the decoder ----

class _SparseDecode(torch.autograd.Function):
    """W_dec (n, d) and codes vals_0, idx_0, vals_1, idx_1, ... -> one (B, d) per code,
    sum_j vals_i[:, j] W_dec[idx_i[:, j]], no bias. A code is sparse, vals and idx (B, K),
    or a dense block, vals (B, m) over the latents idx (m,). All of a step's codes go
    through one call so that backward makes one W_dec gradient buffer."""

    @staticmethod
    def forward(ctx, W_dec, scratch, *codes):
        ctx.save_for_backward(W_dec, *codes)
        ctx.scratch = scratch
        ctx.mm_dtype = _backward_dtype(W_dec)  # the forward runs in W_dec's dtype; its backward may not
        with torch.autocast(W_dec.device.type, enabled=False):  # in W_dec's dtype, as the sparse codes
            return tuple(F.embedding_bag(i, W_dec, per_sample_weights=v, mode="sum") if i.dim() == 2
                         else v @ W_dec.index_select(0, i)
                         for v, i in zip(codes[0::2], codes[1::2]))

    @staticmethod
    def backward(ctx, *grads):
        W_dec, *codes = ctx.saved_tensors
        sparse = [(v, i, g) for v, i, g in zip(codes[0::2], codes[1::2], grads) if i.dim() == 2]
        if _dense_backward(W_dec):
            # each code as a dense Z (B, n): grad W_dec += Z^T g, and vals' gradient is
            # (g W_dec^T) at the code's entries; matmuls in _backward_dtype
            lp = ctx.mm_dtype
            grad_W_dec, W_lp, dots = torch.zeros_like(W_dec), W_dec.to(lp), []
            for v, i, g in sparse:  # one (B, n) temporary at a time: peak memory
                if _GATHER_BACKWARD:  # the code's rows gathered, no (B, n) matrices
                    dots.append(_gather_dots(W_dec, i, g).to(v.dtype))
                    _scatter_outer(grad_W_dec, i, v, g)
                    continue
                g = g.to(lp)
                dots.append((g @ W_lp.t()).gather(1, i).to(v.dtype))
                grad_W_dec += g.new_zeros(len(v), len(W_dec)).scatter_(1, i, v.to(lp)).t() @ g
            dots = iter(dots)
        else:
            vals, idx, G = zip(*sparse)
            S_t, order = _codes_csr_t(idx, vals, W_dec.shape[0])  # (n, n_sparse * B)
            G = torch.cat(G)  # (n_sparse * B, d), the output gradients stacked like S's rows
            grad_W_dec = _spmm(S_t, G, _grad_buffer(ctx.scratch, "W_dec", G, W_dec.shape))  # (n, d)
            # vals: <W_dec[idx[b, j]], g[b]> at each entry, computed in S_t's latent order
            dots = torch.sparse.sampled_addmm(S_t, W_dec, G.t(), beta=0.0).values()
            dots = iter(torch.empty_like(dots).scatter_(0, order, dots).split([v.numel() for v in vals]))
        grad_codes = []
        for v, i, g in zip(codes[0::2], codes[1::2], grads):
            if i.dim() == 2:
                grad_codes += [next(dots).view_as(v), None]
            else:  # a dense block: (B, d) @ (d, m), and (m, B) @ (B, d) into the rows i
                W_i = W_dec.index_select(0, i)
                grad_W_dec.index_add_(0, i, v.t() @ g)
                grad_codes += [g @ W_i.t(), None]
        return grad_W_dec, None, *grad_codes


def sparse_decode(W_dec, codes, scratch=None):
    """codes: a list of (vals, idx) -> a list of (B, d) reconstructions, no bias. scratch:
    where backward keeps W_dec's gradient buffer between steps (the SAE's)."""
    return list(_SparseDecode.apply(W_dec, {} if scratch is None else scratch, *[t for code in codes for t in code]))


# ---- backward: CSR matrices on CPU, dense matmuls on CUDA ----

def _dense_backward(t):
    """Whether the backward kernels below go through dense (B, n_latents) matrices and
    matmuls instead of CSR ones: on CUDA. There a step is bound by kernel launches and host
    syncs, not arithmetic (the CSR path's sort, bincount and cuSPARSE calls), and a (B, n) x
    (B, d) matmul costs about what the forward's does. On CPU the matmuls would cost
    B * n * d each, the CSR ones B * k * d."""
    return t.device.type == "cuda"


# CUDA's backward by gathered rows and index_add_ instead of dense (B, n) matrices and matmuls:
# B * K * d work a code instead of B * n * d, in memory-bound gathers and atomic adds instead of
# a matmul. Off until a GPU measures it (bench.py's fast_gather entry); its tests run it on CPU.
_GATHER_BACKWARD = False
_GATHER_CHUNK = 1 << 26  # elements of a (tokens, K, d) temporary at a time: bounds the peak memory


def _gather_dots(W, idx, g):
    """<W[idx[b, j]], g[b]> for idx (B, K), g (B, d) -> (B, K), by the gathered rows, in chunks."""
    B, K = idx.shape
    step = max(1, _GATHER_CHUNK // (K * W.shape[1]))
    return torch.cat([torch.bmm(F.embedding(idx[s:s + step], W), g[s:s + step].to(W.dtype).unsqueeze(2)).squeeze(2)
                      for s in range(0, B, step)])


def _scatter_outer(out, idx, coef, rows):
    """out[idx[b, j]] += coef[b, j] * rows[b] for idx, coef (B, K), rows (B, d): index_add_ of the
    (tokens, K, d) products, in chunks."""
    B, K = idx.shape
    d = rows.shape[1]
    step = max(1, _GATHER_CHUNK // (K * d))
    for s in range(0, B, step):
        prod = coef[s:s + step].unsqueeze(2).to(out.dtype) * rows[s:s + step].unsqueeze(1).to(out.dtype)
        out.index_add_(0, idx[s:s + step].reshape(-1), prod.reshape(-1, d))


def _backward_dtype(W):
    """The dtype of the dense backward's matmuls for weights W, read in the forward: bfloat16
    under bfloat16 autocast (as autocast's backward of a matmul runs), else W's own. Not
    float16: without loss scaling, gradients that are means over thousands of tokens underflow it."""
    dev = W.device.type
    bf16 = torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.bfloat16
    return torch.bfloat16 if bf16 else W.dtype


def _codes_csr_t(idx, vals, n):
    """Codes idx[i], vals[i] (B, K_i) as row blocks of a sparse S (len(idx) * B, n) with
    S[B * i + b, idx[i][b, j]] = vals[i][b, j]. Returns S^T (n, len(idx) * B) in CSR and
    the order sorting the flattened entries by latent. A latent in two codes of a token
    sits in two blocks, so no (row, latent) pair repeats."""
    B = idx[0].shape[0]
    rows = torch.cat([torch.arange(B * i, B * (i + 1), device=ix.device).repeat_interleave(ix.shape[1])
                      for i, ix in enumerate(idx)])
    cols = torch.cat([ix.reshape(-1) for ix in idx])
    order = torch.argsort(cols, stable=True)  # stable: rows stay sorted within a latent
    crow = F.pad(torch.bincount(cols, minlength=n).cumsum(0), (1, 0))
    values = torch.cat([v.reshape(-1) for v in vals])[order]
    return _csr(crow, rows[order], values, (n, B * len(idx))), order


def _csr(crow, col, values, shape):
    """A CSR tensor, without torch's one-time warnings that CSR support is in beta and (torch
    2.11) that its invariant checks are off: the kernels here use only its stable core
    (construction, addmm, sampled_addmm), and build valid CSR themselves. The filters are
    local, so importing this module changes no global warning state."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _spmm(S_t, dense, out):
    """S_t (n, R) CSR @ dense (R, d) -> out (n, d): the sum over entries of value * dense[row]
    into each latent's row; no (R, K, d) tensor. Written over out with beta=0, which skips
    the zero-fill and copy that S_t @ dense makes on CPU."""
    return torch.addmm(out, S_t, dense, beta=0.0, out=out)


# ---- buffers kept across steps (CPU) ----

def _grad_buffer(scratch, key, like, shape):
    """An uninitialized tensor of `shape` for a weight's gradient on CPU: the memory of the one
    returned for it last step once nothing holds that any more (zero_grad(set_to_none=True)
    dropped it), else new memory, which Linux maps and faults in page by page every step.
    A gradient still held, by a caller or by .grad while gradients accumulate, is never
    written over: its storage's use count is then above buf's own reference plus the one this
    check makes. Needs torch's private use-count query; without it, always new memory."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    buf = scratch.get(key)
    if (use_count is None or buf is None or buf.shape != shape or buf.dtype != like.dtype
            or buf.device != like.device or use_count(buf.untyped_storage()._cdata) > 2):
        buf = like.new_empty(shape)
        if use_count is not None:
            scratch[key] = buf
    return buf.view(shape)  # a second tensor on buf's memory: autograd keeps it as .grad


def _kept(scratch, key, like, shape, dtype):
    """scratch[key], an uninitialized buffer of shape and dtype on like's device kept across
    steps, made anew only when those change (a fresh one costs page faults each step)."""
    buf = scratch.get(key)
    if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != like.device:
        scratch[key] = buf = like.new_empty(shape, dtype=dtype)
    return buf


# ---- latent sharding (sharding.py, train.py --latent_shards): the TopK and the decoder across shards ----
#
# Each of M processes of a latent group holds n / M consecutive rows of W_enc, b_enc, W_dec
# (shard s: global latents s * n / M onwards). The TopK is exact: every global winner is in its
# own shard's local top k, so the top k of the M * k gathered candidates is the full SAE's.
# [code] (sharded_topk) instead keeps k * capacity_factor // M candidates a shard (4 for the main
# code, 2 for AuxK), gathers only the values and keeps local entries at or above the global k-th:
# approximate whenever one shard holds more winners than that (those past its share are lost,
# and the k-th value taken from the gathered ones is too low). Here a shard decodes its own
# winners; the partial (B, d) reconstructions are summed by one all-reduce.


class Shard:
    """Where a process sits in its latent group: index (0..count-1) of count shards, its
    global latents lo..lo + rows - 1, and the torch.distributed group of the count processes."""

    def __init__(self, index, count, lo, rows, group):
        self.index, self.count, self.lo, self.rows, self.group = index, count, lo, rows, group


def merge_topk(vals, ids, k):
    """Candidates vals (B, C) with global latent ids (B, C) -> the top k of each row, sorted
    descending: values (B, k), ids (B, k) and positions (B, k) into C. Among equal values the
    lower id comes first, so the result does not depend on the candidates' order. (torch.topk
    has no such rule: the single-process path's tied latents come in its implementation's
    order; with distinct values both give the same latents.)"""
    C = vals.shape[1]
    top, pos = vals.topk(min(k + 1, C), dim=1)  # one more: a row whose k-th and (k+1)-th tie is unsure
    pos = pos[:, :k]
    if C > k:
        tied = (top[:, k - 1] == top[:, k]).nonzero().squeeze(1)
        if len(tied):  # which of the tied values are kept: by whole sorts, on those rows only
            order = ids[tied].argsort(dim=1, stable=True)  # (T, C): candidates by id
            best = vals[tied].gather(1, order).sort(dim=1, descending=True, stable=True).indices[:, :k]
            pos[tied] = order.gather(1, best)
    # the k in order: by id, then stably by value, so equal values keep the lower id first
    pos = pos.gather(1, ids.gather(1, pos).argsort(dim=1, stable=True))
    pos = pos.gather(1, vals.gather(1, pos).sort(dim=1, descending=True, stable=True).indices)
    return vals.gather(1, pos), ids.gather(1, pos), pos


def _gather_merge(vals, ids, k, width, shard):
    """This shard's candidates vals, ids (B, K), K <= width, ids global -> the group's top k
    (merge_topk of all shards' candidates: values and ids (B, k)) and each local candidate's
    rank in it (B, K), -1 when it is not among the top k. Padded to width with -inf so that
    every shard sends the same shape; the pads' id n_total sorts them after any latent."""
    B, K = vals.shape
    pad = width - K
    if pad:
        vals = torch.cat([vals, vals.new_full((B, pad), float("-inf"))], 1)
        ids = torch.cat([ids, ids.new_full((B, pad), shard.count * shard.rows)], 1)
    all_vals = [torch.empty_like(vals) for _ in range(shard.count)]
    all_ids = [torch.empty_like(ids) for _ in range(shard.count)]
    torch.distributed.all_gather(all_vals, vals.contiguous(), group=shard.group)
    torch.distributed.all_gather(all_ids, ids.contiguous(), group=shard.group)
    top_vals, top_ids, pos = merge_topk(torch.cat(all_vals, 1), torch.cat(all_ids, 1), k)  # of (B, M * width)
    rank = candidate_ranks(pos, shard.count * width)
    return top_vals, top_ids, rank[:, shard.index * width:shard.index * width + K]


def candidate_ranks(pos, C):
    """merge_topk's positions pos (B, k) among C candidates -> (B, C): each candidate's place
    in the top k, -1 for those left out."""
    B, k = pos.shape
    rank = torch.full((B, C), -1, dtype=torch.long, device=pos.device)
    return rank.scatter_(1, pos, torch.arange(k, device=pos.device).expand(B, k))


class _ShardEncode(_SparseEncode):
    """_SparseEncode on one shard's rows: (x_n, W_enc, b_enc, b_pre) of the shard -> its part of
    the group's TopK code, vals, idx (B, K) (K = min(k_top, rows), local ids, ReLU'd, zero
    where the latent is not among the group's top k_top) and of the AuxK code, aux_vals,
    aux_idx (B, min(k_aux, n_dead here)), likewise over the group's dead latents; then rank
    (B, K), each entry's place in the group's top k_top (-1: none), and top_vals, top_ids
    (B, k_top), the group's code itself (global ids, pre-activations before the ReLU).
    Backward is _SparseEncode's, unchanged: only this shard's rows, and b_pre's partial
    gradient (the caller sums it over the group)."""

    @staticmethod
    def forward(ctx, x_n, W_enc, b_enc, b_pre, k_top, dead_idx, k_aux, scratch, shard):
        ctx.set_materialize_grads(False)
        x_c = x_n - b_pre  # (B, d)
        K = min(k_top, len(W_enc))
        if _screen(x_c, len(W_enc), K):
            vals, idx = _screened_topk(scratch, x_c, W_enc, b_enc, K)
        else:
            vals, idx, _ = _preacts_topk(scratch, x_c, W_enc, b_enc, K, 0)
        top_vals, top_ids, rank = _gather_merge(vals, idx + shard.lo, k_top, K, shard)
        vals = vals.relu().masked_fill_(rank < 0, 0)
        # AuxK: a (B, 0) dense block over no latents where nothing is dead here (embedding_bag
        # refuses empty bags); every shard joins the gather all the same
        aux_vals, aux_idx = vals.new_zeros(len(x_c), 0), dead_idx
        if k_aux:
            pre_dead = torch.addmm(b_enc[dead_idx], x_c, W_enc[dead_idx].t())  # (B, n_dead here)
            cand, local = (topk(pre_dead, min(k_aux, len(dead_idx))) if len(dead_idx)
                           else (pre_dead, dead_idx.new_zeros(len(x_c), 0)))
            _, _, aux_rank = _gather_merge(cand, dead_idx[local] + shard.lo, k_aux, k_aux, shard)
            if len(dead_idx):
                aux_vals, aux_idx = cand.relu().masked_fill_(aux_rank < 0, 0), dead_idx[local]
        ctx.mm_dtype, ctx.scratch = _backward_dtype(W_enc), scratch
        vals, aux_vals = vals.to(W_enc.dtype), aux_vals.to(W_enc.dtype)
        ctx.save_for_backward(x_c, W_enc, vals, idx, aux_vals, aux_idx)
        ctx.mark_non_differentiable(idx, aux_idx, rank, top_vals, top_ids)
        return vals, idx, aux_vals, aux_idx, rank, top_vals.to(W_enc.dtype), top_ids

    @staticmethod
    def backward(ctx, g_vals, _, g_aux, *__):
        return *_SparseEncode.backward(ctx, g_vals, None, g_aux, None), None


class _SumOverShards(torch.autograd.Function):
    """Forward: the sum of a tensor over the group (all-reduce). Backward: the gradient as it
    is, since every shard computes the same loss from the sum, so each holds d loss / d sum."""

    @staticmethod
    def forward(ctx, t, group):
        t = t.clone()
        torch.distributed.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, g):
        return g, None


class _CopyToShards(torch.autograd.Function):
    """Forward: the tensor as it is (replicated on the group). Backward: the gradient summed
    over the group, for a replicated input that each shard uses for its own rows only."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        torch.distributed.all_reduce(g, group=ctx.group)
        return g, None


def sharded_recon(sae, x_n, k_top, dead_idx, k_aux, shard):
    """sparse_recon for one shard's rows of an SAE (W_enc, b_enc, W_dec: (shard.rows, d)), every
    process of shard.group calling it on the same x_n -> vals, idx (B, k_top) the group's code
    (global ids), x_hat, x_hat_multi, e_hat as sparse_recon's (the whole group's, the same on
    every shard), and fired (shard.rows,) bool, this shard's latents in the top k code with a
    value > 0. dead_idx: this shard's dead latents (local ids); k_aux: the group's AuxK width."""
    k = sae.cfg.k
    # [code]: the encoder's use of b_pre differs per shard (its rows), the decoder's does not:
    # only the first is summed over the group in backward
    b_pre_enc = _CopyToShards.apply(sae.b_pre, shard.group)
    vals, idx, aux_vals, aux_idx, rank, top_vals, top_ids = _ShardEncode.apply(
        x_n, sae.W_enc, sae.b_enc, b_pre_enc, k_top, dead_idx, k_aux, sae._scratch, shard)
    main = rank < k  # (B, K): entries of the top k code; the rest (rank >= k) is Multi-TopK's
    codes = [(vals * main if k_top > k else vals, idx)]
    if k_top > k:
        codes.append((vals * (rank >= k), idx))
    if k_aux:
        codes.append((aux_vals, aux_idx))
    outs = sparse_decode(sae.W_dec, codes, sae._scratch)  # this shard's part of each (B, d)
    outs = _SumOverShards.apply(torch.cat(outs, 1), shard.group).split(x_n.shape[1], 1)  # one all-reduce
    x_hat = outs[0] + sae.b_pre
    x_hat_multi = x_hat + outs[1] if k_top > k else x_hat
    e_hat = outs[-1] if k_aux else None
    won = (main & (rank >= 0) & (vals > 0)).reshape(-1).int()
    fired = torch.zeros(shard.rows, dtype=torch.int32, device=idx.device).index_add_(0, idx.reshape(-1), won) > 0
    return top_vals.relu(), top_ids, x_hat, x_hat_multi, e_hat, fired
