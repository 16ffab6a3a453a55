"""A TopK sparse autoencoder, after Gao et al. 2024, "Scaling and evaluating sparse
autoencoders" (arXiv 2406.04093). Comments cite the paper as "paper §N" and mark with
[code] the places that follow the released openai/sparse_autoencoder instead of the text.

Training loop sketch (train.py owns the dead-latent counter, paper §2.4):

    sae = SAE(SAEConfig(d_model=768, n_latents=32768, k=32))
    sae.init_b_pre(x_sample); sae.init_encoder_scale()  # once, before training
    out = sae(x, dead_mask=steps_since_fired > threshold)
    out.loss.backward(); sae.project_decoder_grad(); opt.step(); sae.normalize_decoder()
    steps_since_fired[out.fired] = 0
"""
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# The sparse backward (CPU) builds CSR matrices; torch warns once that CSR support is "beta".
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


@dataclass
class SAEConfig:
    d_model: int  # width of the activations the SAE reads
    n_latents: int  # number of latents (dictionary size)
    k: int = 32  # active latents per token (TopK)
    k_aux: int | None = None  # AuxK latents per token; None -> min(d_model // 2, n_latents)
    auxk_coef: float = 1 / 32  # alpha: paper App. A.2 [recalled] and [code]
    activation: str = "topk"  # "topk" or "relu" (the ReLU + L1 baseline, paper §2.2)
    l1_coef: float = 0.0  # L1 weight, ReLU baseline only
    multi_topk: bool = False  # paper §5.3 [recalled]: train on L(k) + L(4k)/8
    normalize: bool = True  # paper §2.1: per-token mean removal and unit norm

    def __post_init__(self):
        def check(name, ok, valid):
            if not ok:
                raise ValueError(f"{name} must be {valid}, got {getattr(self, name)!r}")

        check("d_model", self.d_model >= 1, ">= 1")
        check("n_latents", self.n_latents >= 1, ">= 1")
        check("k", 1 <= self.k <= self.n_latents, f"in [1, n_latents={self.n_latents}]")
        if self.k_aux is None:
            # The AuxK latents model the residual e, a d_model-dim vector, so k_aux scales
            # with d_model: d_model // 2 is what sparsify and dictionary_learning use and,
            # for GPT-2 small (384), sits between [code]'s 256 and the paper's 512
            # ([recalled]). It sets AuxK's cost in the fast path: B * k_aux * d_model.
            self.k_aux = max(1, min(self.d_model // 2, self.n_latents))
        check("k_aux", 1 <= self.k_aux <= self.n_latents, f"in [1, n_latents={self.n_latents}]")
        check("auxk_coef", self.auxk_coef >= 0, ">= 0")
        check("activation", self.activation in ("topk", "relu"), "'topk' or 'relu'")
        check("l1_coef", self.l1_coef >= 0 and (self.l1_coef == 0 or self.activation == "relu"),
              ">= 0, and 0 unless activation='relu'")
        check("multi_topk", not (self.multi_topk and self.activation == "relu"),
              "False when activation='relu'")


@dataclass
class SAEOutput:
    """The scalar losses carry gradients (log them with .item()); the rest is detached."""
    loss: torch.Tensor  # fvu + multi_loss / 8 + auxk_coef * aux_loss + l1_coef * l1
    fvu: torch.Tensor  # main reconstruction FVU, k code, normalized space
    aux_loss: torch.Tensor  # AuxK FVU of the residual, 0 when nothing is dead
    multi_loss: torch.Tensor  # FVU of the 4k code, 0 unless multi_topk
    l1: torch.Tensor  # decoder-norm-weighted L1 of the code, 0 unless relu
    l0: torch.Tensor  # scalar, mean number of non-zero latents per token
    vals: torch.Tensor  # (B, k) code values >= 0 (relu: (B, n_latents) dense)
    idx: torch.Tensor  # (B, k) latent indices of vals
    fired: torch.Tensor  # (n_latents,) bool: some token has a value > 0 in this batch
    x_hat: torch.Tensor  # (B, d_model) reconstruction in the caller's space (detached)


class SAE(nn.Module):
    """Weights are stored as W_enc, W_dec: (n_latents, d_model); b_enc: (n_latents,);
    b_pre: (d_model,). Methods ending in _sparse and preacts work in the normalized space
    (the output of normalize_input); encode, reconstruct and forward take the caller's x."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        # paper App. A.1: decoder rows are random unit directions; paper §2.4 [recalled]: the
        # encoder starts as the decoder's transpose (same rows in this storage; a copy, not
        # tied). [code] then rescales the encoder: init_encoder_scale, called after init_b_pre.
        W_dec = F.normalize(torch.randn(cfg.n_latents, cfg.d_model), dim=1)
        self.W_dec = nn.Parameter(W_dec)  # (n_latents, d_model)
        self.W_enc = nn.Parameter(W_dec.clone())  # (n_latents, d_model)
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents))
        self.b_pre = nn.Parameter(torch.zeros(cfg.d_model))  # set by init_b_pre
        self._scratch = {}  # the fast path's buffers kept across steps on CPU (see _grad_buffer); not state

    # ---- paper §2.1: input normalization ----

    def normalize_input(self, x, eps=1e-8):
        """(B, d) -> x_n (B, d), mu (B, 1), scale (B, 1): each token minus its mean over
        d_model, scaled to unit norm. Reconstruction errors are measured on x_n."""
        x = self._check_input(x)
        if not self.cfg.normalize:
            return x, x.new_zeros(x.shape[0], 1), x.new_ones(x.shape[0], 1)
        mu = x.mean(dim=1, keepdim=True)
        scale = (x - mu).norm(dim=1, keepdim=True).clamp_min(eps)  # eps: constant tokens
        return (x - mu) / scale, mu, scale

    def denormalize(self, x_n, mu, scale):
        """Undo normalize_input: back to the caller's space."""
        return x_n * scale + mu

    # ---- paper §2.3: TopK encoder ----

    def preacts(self, x_n):
        """(B, d) normalized -> (B, n_latents): W_enc (x_n - b_pre) + b_enc, dense."""
        return torch.addmm(self.b_enc, x_n - self.b_pre, self.W_enc.t())

    def encode_sparse(self, x_n, k=None):
        """Normalized (B, d) -> (vals, idx), each (B, k), vals >= 0. k defaults to cfg.k;
        any k in [1, n_latents] is allowed at test time (paper §5.3). The ReLU baseline
        with k=None returns its dense code as (B, n_latents) vals with idx = 0..n-1."""
        if k is None and self.cfg.activation == "relu":
            vals = self.preacts(x_n).relu()
            return vals, torch.arange(self.cfg.n_latents, device=vals.device).expand_as(vals)
        k = self._check_k(self.cfg.k if k is None else k)
        # [code]: z = ReLU(TopK(W_enc (x - b_pre) + b_enc)). The paper's equation has no
        # b_enc and no ReLU; the ReLU zeroes kept values that are negative.
        vals, idx = _topk(self.preacts(x_n), k)
        return vals.relu(), idx

    def encode(self, x, k=None):
        """Caller's-space x (B, d) -> dense code z (B, n_latents). For evals and tests."""
        x_n = self.normalize_input(x)[0]
        vals, idx = self.encode_sparse(x_n, k)
        return torch.zeros(x_n.shape[0], self.cfg.n_latents, dtype=vals.dtype,
                           device=vals.device).scatter(1, idx, vals)

    # ---- decoder: x_hat = W_dec^T z + b_pre ----

    def decode_sparse(self, vals, idx):
        """(vals, idx) each (B, K) -> x_hat_n (B, d) in the normalized space; cost B*K*d."""
        return _sparse_decode(self.W_dec, [(vals, idx)])[0] + self.b_pre

    def decode(self, z, mu=None, scale=None):
        """Dense code z (B, n_latents) -> x_hat (B, d): normalized space, or the caller's
        space when given mu and scale from normalize_input."""
        x_hat_n = z @ self.W_dec + self.b_pre
        return x_hat_n if mu is None else self.denormalize(x_hat_n, mu, scale)

    def reconstruct(self, x, k=None):
        """Caller's-space x (B, d) -> x_hat (B, d) in the caller's space, with test-time k."""
        x_n, mu, scale = self.normalize_input(x)
        if self.cfg.activation == "relu" and k is None:
            x_hat_n = self.decode(self.preacts(x_n).relu())
        else:
            x_hat_n = self.decode_sparse(*self.encode_sparse(x_n, k))
        return self.denormalize(x_hat_n, mu, scale)

    # ---- loss (paper §2.1), AuxK (§2.4), Multi-TopK (§5.3), ReLU baseline (§2.2) ----

    def forward(self, x, dead_mask=None, dense=False):
        """Training forward on caller's-space x (B >= 2, d_model) -> SAEOutput. dead_mask
        (n_latents,) bool marks latents the trainer counts as dead, for AuxK (TopK only: a
        dead ReLU latent has no positive pre-activation to learn from). dense=True runs the
        plain dense reference instead of the sparse fast path; both give the same numbers."""
        cfg = self.cfg
        # The SAE trains on fixed activations: no gradient flows back to their producer.
        x_n, mu, scale = self.normalize_input(x.detach())
        if x_n.shape[0] < 2:
            raise ValueError(f"forward needs a batch of >= 2 tokens (FVU divides by the "
                             f"batch variance), got {x_n.shape[0]}")
        zero = x_n.new_zeros(())
        if cfg.activation == "relu":
            return self._forward_relu(x_n, mu, scale, zero)
        dead_idx = self._check_dead_mask(dead_mask, x_n.device)
        k_aux = min(cfg.k_aux, dead_idx.numel())  # 0 when nothing is dead
        k_top = min(4 * cfg.k, cfg.n_latents) if cfg.multi_topk else cfg.k
        recon = self._recon_dense if dense else self._recon_fast
        vals, idx, x_hat, x_hat_multi, e_hat = recon(x_n, k_top, dead_idx, k_aux)

        main = fvu(x_n, x_hat)
        multi = zero
        if cfg.multi_topk:  # paper §5.3 [recalled]: L(k) + L(4k) / 8, for progressive codes
            multi = fvu(x_n, x_hat_multi)
        aux = zero
        if k_aux > 0:
            # paper §2.4, App. A.2 [recalled]: the top-k_aux dead latents model the detached
            # residual e, with no b_pre; normalized like the main loss and zeroed if NaN [code].
            e = (x_n - x_hat).detach()
            aux = fvu(e, e_hat).nan_to_num(0.0, 0.0, 0.0)
        loss = self.total_loss(main, multi, aux, zero)
        vals, idx = vals[:, :cfg.k].detach(), idx[:, :cfg.k]
        # (n_latents,) bool; a scatter, not fired[idx[vals > 0]] = True, whose boolean
        # indexing makes a GPU wait for the whole step before queueing the next
        fired = torch.zeros(cfg.n_latents, dtype=torch.int32, device=idx.device).index_add_(
            0, idx.reshape(-1), (vals > 0).reshape(-1).int()) > 0
        return SAEOutput(loss, main, aux, multi, zero,
                         (vals > 0).sum(1).float().mean(), vals, idx, fired,
                         self.denormalize(x_hat.detach(), mu, scale))

    def total_loss(self, fvu_k, fvu_4k, aux, l1, w_x=1.0, w_e=1.0):
        """The training loss from its terms: FVU + FVU(4k) / 8 (Multi-TopK) + auxk_coef * AuxK
        + l1_coef * L1 (ReLU baseline). w_x, w_e rescale the terms normalized by the input's
        and the residual's variance (train.py's data-parallel loss uses them)."""
        return w_x * (fvu_k + fvu_4k / 8) + self.cfg.auxk_coef * w_e * aux + self.cfg.l1_coef * l1

    def _forward_relu(self, x_n, mu, scale, zero):
        z = self.preacts(x_n).relu()  # (B, n_latents), the dense ReLU code
        x_hat = self.decode(z)
        main = fvu(x_n, x_hat)
        # paper §2.2: L1 weighted by decoder row norms, so shrinking z and growing W_dec
        # rows cannot lower it; mean over the batch of sum_i z_i ||W_dec_i||.
        l1 = (z @ self.W_dec.norm(dim=1)).mean()
        idx = torch.arange(self.cfg.n_latents, device=z.device).expand_as(z)
        return SAEOutput(self.total_loss(main, zero, zero, l1), main, zero, zero, l1,
                         (z > 0).sum(1).float().mean(), z.detach(), idx, (z > 0).any(0),
                         self.denormalize(x_hat.detach(), mu, scale))

    # ---- paper §2.4 / App. A: init of b_pre and the decoder constraint ----

    @torch.no_grad()
    def init_b_pre(self, x_sample):
        """Set b_pre to the geometric median of a sample (B, d) of caller's-space inputs,
        taken in the normalized space where the SAE works (paper [recalled] and [code],
        which uses 32768 samples)."""
        self.b_pre.copy_(geometric_median(self.normalize_input(x_sample)[0]))

    @torch.no_grad()
    def init_encoder_scale(self, n_samples=256):
        """[code] init_from_data_: rescale W_enc so that random unit inputs around b_pre are
        reconstructed with mean norm 1 (not counting b_pre), the norm of a normalized input.
        The released code says it found no clear evidence this helps; here it does: with
        W_enc = W_dec, the top k of n_latents random directions overshoot (an initial FVU
        of ~3 at d_model 128, n 32768, k 32), which a short run spends hundreds of steps
        undoing (measured: held-out FVU 0.12 after 600k tokens with it, 0.8 after 1.2M
        without). Call after init_b_pre."""
        g = torch.Generator(device=self.W_enc.device).manual_seed(0)
        u = F.normalize(torch.randn(n_samples, self.cfg.d_model, generator=g, device=self.W_enc.device), dim=1)
        x_hat_n = self.decode_sparse(*self.encode_sparse(u + self.b_pre)) - self.b_pre  # (n_samples, d)
        self.W_enc.div_(x_hat_n.norm(dim=1).mean().clamp_min(1e-12))

    @torch.no_grad()
    def project_decoder_grad(self):
        """After backward: remove from each decoder row's gradient its component along the
        row, so Adam moves rows along the unit sphere. Rows are unit (normalize_decoder)."""
        g = self.W_dec.grad
        if g is not None:
            for g_c, W_c in zip(_row_chunks(g), _row_chunks(self.W_dec)):
                g_c.addcmul_(W_c, torch.linalg.vecdot(g_c, W_c).unsqueeze(1), value=-1)

    @torch.no_grad()
    def normalize_decoder(self, eps=1e-12):
        """After the optimizer step: decoder rows back to unit norm (paper App. A.1)."""
        for W_c in _row_chunks(self.W_dec):
            W_c.div_(torch.linalg.vector_norm(W_c, dim=1, keepdim=True).clamp_min(eps))

    # ---- fast path and dense reference: (vals, idx, x_hat, x_hat_multi, e_hat) ----

    def _recon_fast(self, x_n, k_top, dead_idx, k_aux):
        """One dense encoder matmul; everything after it costs O(B * (k_top + k_aux) * d),
        or O(B * n_dead * d) in dense matmuls while few latents are dead."""
        k = self.cfg.k
        vals, idx, aux_vals, aux_idx = _SparseEncode.apply(
            x_n, self.W_enc, self.b_enc, self.b_pre, k_top, dead_idx, k_aux, self._scratch)
        codes = [(vals[:, :k], idx[:, :k])]
        if k_top > k:  # L(4k) reuses the k-code reconstruction and adds the next 3k latents
            codes.append((vals[:, k:], idx[:, k:]))
        if k_aux:
            codes.append((aux_vals, aux_idx))
        outs = _sparse_decode(self.W_dec, codes, self._scratch)  # one (B, d) per code
        x_hat = outs[0] + self.b_pre
        x_hat_multi = x_hat + outs[1] if k_top > k else x_hat
        e_hat = outs[-1] if k_aux else None
        return vals, idx, x_hat, x_hat_multi, e_hat

    def _recon_dense(self, x_n, k_top, dead_idx, k_aux):
        """Readable reference: dense (B, n_latents) codes and matmuls; autograd does the rest."""
        k = self.cfg.k
        pre = self.preacts(x_n)  # (B, n_latents)
        idx = pre.detach().topk(k_top, dim=1).indices  # sorted: the top k come first

        def dense_code(i):  # (B, n_latents): ReLU'd pre-activations at i, zero elsewhere
            return torch.zeros_like(pre).scatter(1, i, pre.gather(1, i)).relu()

        x_hat = dense_code(idx[:, :k]) @ self.W_dec + self.b_pre
        x_hat_multi = dense_code(idx) @ self.W_dec + self.b_pre if k_top > k else x_hat
        e_hat = None
        if k_aux:  # the top k_aux among the dead latents only
            live = torch.ones(pre.shape[1], dtype=torch.bool, device=pre.device).index_fill_(0, dead_idx, False)
            aux_idx = pre.detach().masked_fill(live, float("-inf")).topk(k_aux, dim=1).indices
            e_hat = dense_code(aux_idx) @ self.W_dec
        return pre.gather(1, idx).relu().detach(), idx, x_hat, x_hat_multi, e_hat

    # ---- checks and checkpoints ----

    def _check_input(self, x):
        d = self.cfg.d_model
        if x.dim() != 2 or x.shape[1] != d:
            raise ValueError(f"x must have shape (batch, d_model={d}), got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("x must be finite, got NaN or inf values")
        return x.to(self.b_pre.dtype)

    def _check_k(self, k):
        if not 1 <= k <= self.cfg.n_latents:
            raise ValueError(f"k must be in [1, n_latents={self.cfg.n_latents}], got {k}")
        return k

    def _check_dead_mask(self, dead_mask, device):
        """-> (n_dead,) indices of dead latents."""
        if dead_mask is None:
            return torch.zeros(0, dtype=torch.long, device=device)
        n = self.cfg.n_latents
        if dead_mask.shape != (n,) or dead_mask.dtype != torch.bool:
            raise ValueError(f"dead_mask must be a bool tensor of shape ({n},), "
                             f"got {dead_mask.dtype} {tuple(dead_mask.shape)}")
        return dead_mask.to(device).nonzero().squeeze(1)

    def to_checkpoint(self):
        return {"config": asdict(self.cfg), "state_dict": self.state_dict()}

    @classmethod
    def from_checkpoint(cls, ckpt):
        sae = cls(SAEConfig(**ckpt["config"]))
        sae.load_state_dict(ckpt["state_dict"])
        return sae


def fvu(x, x_hat):
    """Fraction of variance unexplained, the paper's normalized MSE (§2.1):
    sum ||x - x_hat||^2 / sum ||x - mean_batch(x)||^2 over a (B, d) batch. 0 is perfect,
    1 is as good as predicting the batch mean; undefined when x has no batch variance."""
    return (x - x_hat).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum()


@torch.no_grad()
def geometric_median(points, max_iter=1000, tol=1e-7, eps=1e-12):
    """The point minimizing the sum of Euclidean distances to points (N, d), by
    Weiszfeld's iteration (re-weighted means, weights 1 / distance), started at the mean.
    Stops when a step is below tol times the mean distance (translation and scale free)."""
    y = points.mean(dim=0)
    for _ in range(max_iter):
        dist = (points - y).norm(dim=1)
        w = 1 / dist.clamp_min(eps)  # eps: y sitting exactly on a data point
        y_next = (w.unsqueeze(1) * points).sum(dim=0) / w.sum()
        done = (y_next - y).norm() <= tol * dist.mean()
        y = y_next
        if done:
            break
    # Weiszfeld crawls towards a minimizer that is a data point: take the nearest point
    # if it is better by more than tol (not on ties, e.g. 2 points: keep the midpoint).
    dist = (points - y).norm(dim=1)
    nearest = points[dist.argmin()]
    return nearest if (points - nearest).norm(dim=1).sum() < (1 - tol) * dist.sum() else y


# Elements per chunk for CPU work done in chunks that stay in cache: the encoder's (~16 MB of
# fp32, a chunk of pre-activations) and the row-wise decoder ops' (~1 MB, within one core's L2).
_CHUNK = 1 << 22
_ROW_CHUNK = 1 << 18


def _row_chunks(m):
    """An (n, d) matrix as chunks of rows, _ROW_CHUNK elements each on CPU: a row-wise op done
    chunk by chunk reads each chunk back from cache instead of memory, and a temporary such
    as vecdot's product stays small and is reused from the heap instead of mapped afresh
    (measured at (32768, 768), 2 threads: projecting the decoder gradient 70 ms in one piece,
    19-20 in chunks of 2^22 elements, 13-14 of 2^18; renormalizing 8.8 -> 8.0 ms; 2^16 to
    2^20 all within 4 ms of the best). On GPU, one chunk: chunks would only add kernel launches."""
    return m.split(max(1, _ROW_CHUNK // m.shape[1]) if m.device.type == "cpu" else len(m))


# ---- fast path: [code] kernels.py's sparse kernels, written with torch ops ----

# The AuxK code is a dense block over the dead latents while there are at most this many
# times k_aux of them: every token then picks a large share of them, and dense matmuls beat
# per-entry gathers. Measured break-even near 14x at d_model 768 (k_aux 384) and 128 (k_aux
# 64); at d_model 768 and 5% dead (4x) AuxK adds 225 ms to a step as a block, 620 sparse.
_AUXK_BLOCK_RATIO = 12


def _topk(x, k, block=16):
    """torch.topk(x, k, dim=1) for x (B, n): values sorted descending, indices into dim 1.
    In two stages when n is large: the maximum of each of n // block strided blocks of
    columns, then the top k among the k best blocks' columns and the n % block leftover ones
    (on CPU the k best blocks are found the same way, recursively). Every value of the top k
    lies in those (a block holding one but not chosen would give k + 1 values above the k-th),
    so values are exact; indices can differ from torch.topk only between ties. Measured on
    CPU at (2048, 32768), k 32: half torch.topk's time, a partial sort per row. On an H200 at
    (4096, 32768) in bf16: 0.43 ms, torch.topk's radix select 1.07 (at n 131072: 1.03 vs 3.89)."""
    B, n = x.shape
    if 4 * block * k > n:
        return x.topk(k, dim=1)
    nb = n // block
    blocks = x[:, :nb * block].view(B, block, nb)  # blocks[b, t, j] = x[b, t * nb + j]: block j
    maxima = blocks.amax(1)  # (B, nb)
    # (B, k) block ids; on CPU by the same two stages while there are many blocks (measured in
    # bf16 at (512, 32768), k 64, blocks of 8: 9.1 -> 7.4 ms); on GPU each level adds launches
    best = (_topk(maxima, k, block) if x.device.type == "cpu" else maxima.topk(k, dim=1, sorted=False))[1]
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
        aux_vals, local = _topk(pre_dead, k_aux)
        return aux_vals.relu(), dead_idx[local]
    if k_aux < n_dead:
        top, local = pre_dead.topk(k_aux, dim=1, sorted=False)
        return torch.zeros_like(pre_dead).scatter_(1, local, top).relu_(), dead_idx
    return pre_dead.relu(), dead_idx


def _dense_backward(t):
    """Whether the backward kernels below go through dense (B, n_latents) matrices and
    matmuls instead of CSR ones: on CUDA. There a step is bound by kernel launches and host
    syncs, not arithmetic (the CSR path's sort, bincount and cuSPARSE calls: measured on an
    H200 at (768, 32768, 32, 4096): ~200 kernels and 6.8 ms a step for 4 ms of GPU work;
    6.1 ms this way), and a (B, n) x (B, d) matmul costs about what the forward's does
    (0.4 ms in bf16). On CPU the matmuls would cost B * n * d each (~0.5 s at that shape on
    2 cores), the CSR ones B * k * d."""
    return t.device.type == "cuda"


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
    return torch.sparse_csr_tensor(crow, rows[order], values, (n, B * len(idx)),
                                   check_invariants=False), order


def _spmm(S_t, dense, out):
    """S_t (n, R) CSR @ dense (R, d) -> out (n, d): the sum over entries of value * dense[row]
    into each latent's row; no (R, K, d) tensor. Written over out with beta=0, which skips
    the zero-fill and copy that S_t @ dense makes on CPU."""
    return torch.addmm(out, S_t, dense, beta=0.0, out=out)


def _grad_buffer(scratch, key, like, shape):
    """An uninitialized tensor of `shape` for a weight's gradient on CPU: the memory of the one
    returned for it last step once nothing holds that any more (zero_grad(set_to_none=True)
    dropped it), else new memory, which Linux maps and faults in page by page every step
    (measured at (768, 32768, 32, 2048), 2 threads: the two CSR gradient products 74 -> 16 ms
    a step; bench.py's step without AuxK +6%, with AuxK within noise; README, Performance).
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


def _preacts_topk(scratch, x_c, W_enc, b_enc, k_top, n_lead):
    """The encoder and TopK: pre-activations pre = x_c W_enc^T + b_enc (B, n_latents) -> vals,
    idx (B, k_top), each token's top k_top sorted descending, and pre[:, :n_lead].

    On CPU, in chunks of rows, each selected from right after its matmul, into a buffer kept
    in scratch across steps (a fresh buffer costs page faults on top of the write: measured
    at (2048, 32768), 140 ms fresh, 53 reused). A chunk has max(d_model, _CHUNK / n_latents)
    rows: with a small W_enc (d_model 128: 128 rows, 16 MB) the matmul is bound by writing
    pre, and the chunk is still in cache for TopK instead of read back from memory (measured
    at d_model 128, batch 4096: matmul + TopK 436 -> 347 ms, 237 for the matmul alone); with
    at least d_model rows, re-reading W_enc per chunk costs no more than the chunk itself
    (measured at d_model 768: as fast as one chunk). No (B, n) buffer either way. On GPU, and
    under CPU autocast (which out= bypasses), a plain addmm: CUDA's caching allocator already
    reuses memory."""
    B, n = len(x_c), len(W_enc)
    if x_c.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        pre = torch.addmm(b_enc, x_c, W_enc.t())
        return *_topk(pre, k_top), pre[:, :n_lead]
    rows = min(B, max(_CHUNK // n, x_c.shape[1]))
    buf = _kept(scratch, "pre", x_c, (rows, n), x_c.dtype)
    vals, lead = x_c.new_empty(B, k_top), x_c.new_empty(B, n_lead)
    idx = torch.empty(B, k_top, dtype=torch.long, device=x_c.device)
    for s in range(0, B, rows):
        pre = torch.addmm(b_enc, x_c[s:s + rows], W_enc.t(), out=buf[:min(rows, B - s)])
        vals[s:s + rows], idx[s:s + rows] = _topk(pre, k_top)
        lead[s:s + rows] = pre[:, :n_lead]
    return vals, idx, lead


# On a CPU with AMX (bf16 matrix units) a bf16 matmul runs ~7x faster than fp32 (measured at
# (2048, 768) x (768, 32768), 2 threads: 39 vs 279 ms); there the encoder's TopK is a bf16
# screen checked in fp32, which returns fp32's exact top k (_screened_topk). Without AMX, bf16
# matmuls are emulated and slower than fp32: the plain fp32 encoder (_preacts_topk).
_BF16_SCREEN = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
_SCREEN_CHUNK = 1 << 25  # 64 MB of bf16 pre-activations at a time (bench.py's peak memory)
_SCREEN_K = 2  # tier 1's candidates per token, in multiples of k
_BF16_U = 2.0 ** -7  # bf16's unit roundoff 2^-8 (8-bit significand), doubled to spare


def _screen(x_c, n, k_top):
    """Whether the encoder's TopK runs as _screened_topk: fp32 on a CPU with AMX, outside
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
    # max_j ||R_j|| and max_j ||W_j||, ||R_j|| = ||bf16(W_j) - W_j|| (exact in fp32), in row chunks:
    # each is read back from cache (measured at 32768 x 768: 17 ms with the rounding)
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
    1 left unsure; the fp32 encoder decides any left after that. Measured: at d_model 768 with
    random inputs, 0.2-2% of tokens past tier 1, none past tier 2; the default run's trained
    SAE (d_model 128) on 61,440 training activations, 7.6% past tier 1 and 0.05% past tier 2,
    in 145 ms a batch of 4,096 (with 3 k_top candidates: 1.2% and 0.05%, in 150 ms).
    scratch["screen_counts"] counts tokens in and past each tier."""
    B, d = x_c.shape
    n = len(W_enc)
    x16, W16, A = _bf16_operands(scratch, x_c, W_enc, b_enc)
    # tier 1 in chunks of _SCREEN_CHUNK elements, at least d rows (fewer would re-read W16 once
    # per chunk for little work: measured at d_model 128, 256 rows: 53 ms, 512 or more: 33-35)
    rows = min(B, max(_SCREEN_CHUNK // n, d))
    buf = _kept(scratch, "pre16", x16, (rows, n), torch.bfloat16)
    cand, t = _bf16_candidates(x16, W16, buf, _SCREEN_K * k_top)
    vals, idx, unsure = _settle(x_c, W_enc, b_enc, cand, t, A, k_top)
    counts = scratch.setdefault("screen_counts", [0, 0, 0])  # over calls: tokens in, past tier 1, 2
    counts[0] += B
    counts[1] += len(unsure)
    # tier 2, for the tokens tier 1 left unsure: their pre~ again, 8 k_top candidates. It matters
    # where pre-activations bunch at the threshold: measured on a batch trained on repeatedly,
    # 15% of its tokens past tier 1 after four steps, all after ten, and none past tier 2.
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
        top16, cand[s:s + rows] = _topk(pre16, K, block=8)  # blocks of 8: 12 ms less than 16 at d_model 768
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
    S = torch.sparse_csr_tensor(torch.arange(0, B * K + 1, K, device=x_c.device), cand.reshape(-1),
                                b_enc[cand].reshape(-1), (B, len(W_enc)), check_invariants=False)
    pre = torch.sparse.sampled_addmm(S, x_c, W_enc.t()).values().view(B, K)
    vals, pos = pre.topk(k_top, dim=1)
    return vals, cand.gather(1, pos)


class _SparseEncode(torch.autograd.Function):
    """(x_n, W_enc, b_enc, b_pre) -> the TopK code vals, idx (B, k_top), ReLU'd and sorted
    descending, and the AuxK code aux_vals, aux_idx (see _auxk_code).
    The one dense matmul of a step; under torch.autocast it runs in the autocast dtype
    (addmm is on autocast's low-precision list) and the codes come back in W_enc's dtype; in
    fp32 on a CPU with AMX it runs in bf16 as a screen checked in fp32 (_screened_topk).
    Backward touches only the selected latents and computes no input gradient."""

    @staticmethod
    def forward(ctx, x_n, W_enc, b_enc, b_pre, k_top, dead_idx, k_aux, scratch):
        ctx.set_materialize_grads(False)
        x_c = x_n - b_pre  # (B, d)
        # AuxK reads the same pre-activations: one encoder pass serves both losses. When the
        # dead latents' (B, n_dead) outweigh W_enc, the encoder's rows go dead latents first,
        # so that theirs are pre's leading columns, for the price of copying W_enc; else a
        # second, small matmul recomputes them. Either beats gathering scattered columns of
        # pre (measured at d_model 128, 20% dead: a step 462 -> 306 ms). Under the bf16 screen
        # pre's values are bf16, so always the second matmul.
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
            aux_vals, aux_idx = _auxk_code(pre_dead, dead_idx, k_aux)
        else:
            aux_vals, aux_idx = pre_dead, dead_idx  # (B, 0)
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
        if _dense_backward(x_c):
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


def _sparse_decode(W_dec, codes, scratch=None):
    """codes: a list of (vals, idx) -> a list of (B, d) reconstructions, no bias. scratch:
    where backward keeps W_dec's gradient buffer between steps (the SAE's)."""
    return list(_SparseDecode.apply(W_dec, {} if scratch is None else scratch, *[t for code in codes for t in code]))
