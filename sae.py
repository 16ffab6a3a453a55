"""A TopK sparse autoencoder, after Gao et al. 2024, "Scaling and evaluating sparse
autoencoders" (arXiv 2406.04093), in the paper's order: input normalization (§2.1), the
TopK encoder (§2.3), the decoder and the FVU loss (§2.1), AuxK for dead latents (§2.4,
App. A.2), Multi-TopK (§5.3), the ReLU + L1 baseline (§2.2), TopK's successors since the
paper (BatchTopK, Matryoshka), then the initialization and the decoder constraint (App. A.1).
SAE.recon_dense is the whole training forward in plain torch ops; the fast path that
training runs (kernels.py) gives the same numbers.

Citation tags, used the same way in every file of the project:
  paper §N   the paper's text, section N (or App. A.N);
  [code]     the released openai/sparse_autoencoder, where it differs from or adds to the text;
  [peers]    what EleutherAI's sparsify, SAELens and dictionary_learning do;
  BatchTopK  Bussmann et al. 2024 (arXiv 2412.06410); Matryoshka: Bussmann et al. 2025
             (arXiv 2503.09532), both of them since the paper;
  [recalled] a figure of the paper as its readers' notes give it, not checked against the text
             (only scaling.py's joint-law coefficients, printed beside this project's fit).

Training loop sketch (train.py owns the dead-latent counter, paper §2.4):

    sae = SAE(SAEConfig(d_model=768, n_latents=32768, k=32))
    sae.init_b_pre(x_sample); sae.init_encoder_scale()  # once, before training
    out = sae(x, dead_mask=steps_since_fired > threshold)
    out.loss.backward(); sae.project_decoder_grad(); opt.step(); sae.normalize_decoder()
    steps_since_fired[out.fired] = 0
"""
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels  # the fast path, chosen here and nowhere else: same numbers as SAE.recon_dense


@dataclass
class SAEConfig:
    d_model: int  # width of the activations the SAE reads
    n_latents: int  # number of latents (dictionary size)
    k: int = 32  # active latents per token (TopK)
    k_aux: int | None = None  # AuxK latents per token; None -> min(d_model // 2, n_latents)
    auxk_coef: float = 1 / 32  # alpha: paper App. A.2, as [code]
    activation: str = "topk"  # or "batchtopk" (top k * B of a batch of B), "relu" (ReLU + L1, §2.2)
    l1_coef: float = 0.0  # L1 weight, ReLU baseline only
    multi_topk: bool = False  # paper §5.3: train on L(k) + L(4k)/8
    matryoshka: tuple = ()  # Matryoshka's inner prefix sizes m_1 < m_2 < ... < n_latents; () off
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
            # with d_model: d_model // 2, as [peers] (sparsify, dictionary_learning); [code]
            # fixes 256. It sets AuxK's cost in the fast path: B * k_aux * d_model.
            self.k_aux = max(1, min(self.d_model // 2, self.n_latents))
        check("k_aux", 1 <= self.k_aux <= self.n_latents, f"in [1, n_latents={self.n_latents}]")
        check("auxk_coef", self.auxk_coef >= 0, ">= 0")
        check("activation", self.activation in ("topk", "batchtopk", "relu"), "'topk', 'batchtopk' or 'relu'")
        check("l1_coef", self.l1_coef >= 0 and (self.l1_coef == 0 or self.activation == "relu"),
              ">= 0, and 0 unless activation='relu'")
        check("multi_topk", not self.multi_topk or self.activation == "topk", "False unless activation='topk'")
        m = self.matryoshka = tuple(int(m) for m in self.matryoshka)  # a checkpoint's JSON gives a list
        check("matryoshka", not m or (self.activation != "relu" and not self.multi_topk and
                                      all(0 < a < b for a, b in zip(m, m[1:] + (self.n_latents,)))),
              f"increasing sizes in [1, n_latents={self.n_latents}), with a TopK or BatchTopK code and no Multi-TopK")


@dataclass
class SAEOutput:
    """The scalar losses carry gradients (log them with .item()); the rest is detached."""
    loss: torch.Tensor  # fvu + multi_loss / 8 + nested_loss + auxk_coef * aux_loss + l1_coef * l1
    fvu: torch.Tensor  # main reconstruction FVU, k code, normalized space
    aux_loss: torch.Tensor  # AuxK FVU of the residual, 0 when nothing is dead
    multi_loss: torch.Tensor  # FVU of the 4k code, 0 unless multi_topk
    nested_loss: torch.Tensor  # sum of the inner Matryoshka prefixes' FVUs, 0 unless matryoshka
    l1: torch.Tensor  # decoder-norm-weighted L1 of the code, 0 unless relu
    l0: torch.Tensor  # scalar, mean number of non-zero latents per token
    vals: torch.Tensor  # (B, k) code values >= 0 (relu: (B, n_latents) dense; batchtopk: (B, K), zero-padded)
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
        # paper App. A.1: decoder rows are random unit directions; paper §2.4 and App. A.1:
        # the encoder starts as the decoder's transpose (same rows in this storage; a copy,
        # not tied). init_encoder_scale then sets the encoder's magnitude (App. A.1).
        W_dec = F.normalize(torch.randn(cfg.n_latents, cfg.d_model), dim=1)
        self.W_dec = nn.Parameter(W_dec)  # (n_latents, d_model)
        self.W_enc = nn.Parameter(W_dec.clone())  # (n_latents, d_model)
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents))
        self.b_pre = nn.Parameter(torch.zeros(cfg.d_model))  # set by init_b_pre
        if cfg.activation == "batchtopk":  # BatchTopK's inference threshold (update_threshold); < 0: none yet
            self.register_buffer("threshold", torch.tensor(-1.0))
        self._scratch = {}  # the fast path's buffers kept across steps on CPU (kernels.py); not state

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
        if k is None and self.cfg.activation == "batchtopk":  # per token, no batch: JumpReLU, (B, K) padded
            pre = self.preacts(x_n)
            vals, idx = kernels.topk(pre, max(1, int((pre > self.threshold).sum(1).max())))
            return self.jumprelu(vals), idx
        k = self._check_k(self.cfg.k if k is None else k)
        # [code]: z = ReLU(TopK(W_enc (x - b_pre) + b_enc)). The paper's equation has no
        # b_enc and no ReLU; the ReLU zeroes kept values that are negative.
        vals, idx = kernels.topk(self.preacts(x_n), k)
        return vals.relu(), idx

    def encode(self, x, k=None):
        """Caller's-space x (B, d) -> dense code z (B, n_latents). For evals and tests."""
        x_n = self.normalize_input(x)[0]
        vals, idx = self.encode_sparse(x_n, k)
        return vals.new_zeros(len(vals), self.cfg.n_latents).scatter(1, idx, vals)

    # ---- decoder: x_hat = W_dec^T z + b_pre ----

    def decode_sparse(self, vals, idx):
        """(vals, idx) each (B, K) -> x_hat_n (B, d) in the normalized space; cost B*K*d."""
        return kernels.sparse_decode(self.W_dec, [(vals, idx)])[0] + self.b_pre

    def decode(self, z, mu=None, scale=None):
        """Dense code z (B, n_latents) -> x_hat (B, d), normalized (or caller's, given mu, scale)."""
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

    # ---- the loss: FVU (paper §2.1), AuxK (§2.4), Multi-TopK (§5.3); ReLU baseline (§2.2) ----

    def forward(self, x, dead_mask=None, dense=False):
        """Training forward on caller's-space x (B >= 2, d_model) -> SAEOutput. dead_mask (n_latents,)
        bool: the latents the trainer counts as dead, for AuxK (not ReLU's: a dead ReLU latent has
        no positive pre-activation). dense=True: the dense reference, the same numbers."""
        cfg = self.cfg
        # The SAE trains on fixed activations: no gradient flows back to their producer.
        x_n, mu, scale = self.normalize_input(x.detach())
        if x_n.shape[0] < 2:
            raise ValueError(f"forward needs a batch of >= 2 tokens (FVU divides by the "
                             f"batch variance), got {x_n.shape[0]}")
        zero = x_n.new_zeros(())
        if cfg.activation == "relu":
            return self._forward_relu(x_n, mu, scale, zero)
        if cfg.activation == "batchtopk" and not self.training:  # evaluated: the JumpReLU code alone
            vals, idx = self.encode_sparse(x_n)
            x_hat = self.decode_sparse(vals, idx)
            main = fvu(x_n, x_hat)
            return self._output((main, main, zero, zero, zero, zero), vals, idx, x_hat, mu, scale)
        static = not dense and cfg.activation == "topk" and kernels.static_shapes(x_n)  # CUDA graphs, compile
        dead_idx, k_aux = kernels.auxk_latents(self._check_dead_mask(dead_mask, x_n.device), cfg.k_aux, static)
        k_top = min(4 * cfg.k, cfg.n_latents) if cfg.multi_topk else cfg.k
        if dense:
            vals, idx, x_hat, x_hat_multi, e_hat = self.recon_dense(x_n, k_top, dead_idx, k_aux)
        else:  # the fast path: the same numbers, O(B (k_top + k_aux) d) after the encoder matmul
            vals, idx, x_hat, x_hat_multi, e_hat = kernels.sparse_recon(self, x_n, k_top, dead_idx, k_aux)

        if cfg.activation == "topk":  # BatchTopK's code is all of vals, a varying count per token
            vals, idx = vals[:, :cfg.k], idx[:, :cfg.k]
        main = fvu(x_n, x_hat)
        multi = nested = zero
        if cfg.multi_topk:  # paper §5.3: L(k) + L(4k) / 8, for progressive codes
            multi = fvu(x_n, x_hat_multi)
        if cfg.matryoshka:  # Matryoshka: each inner prefix of the dictionary reconstructs alone
            nested = sum(fvu(x_n, x_hat_m) for x_hat_m in self.prefix_recons(vals, idx, dense))
        aux = zero
        if k_aux > 0:
            # paper §2.4, App. A.2: the top-k_aux dead latents model the detached residual
            # e, with no b_pre; [code]: normalized like the main loss and zeroed if NaN.
            e = (x_n - x_hat).detach()
            aux = fvu(e, e_hat).nan_to_num(0.0, 0.0, 0.0)
        loss = self.total_loss(main, multi, aux, zero, nested=nested)
        return self._output((loss, main, aux, multi, nested, zero), vals, idx, x_hat, mu, scale)

    def _output(self, losses, vals, idx, x_hat_n, mu, scale):
        """SAEOutput from its loss terms and the code: L0, fired (a scatter, not fired[idx[vals > 0]]
        = True, whose boolean indexing makes a GPU wait for the whole step), x_hat, detached."""
        vals = vals.detach()
        fired = torch.zeros(self.cfg.n_latents, dtype=torch.int32, device=idx.device).index_add_(
            0, idx.reshape(-1), (vals > 0).reshape(-1).int()) > 0
        return SAEOutput(*losses, (vals > 0).sum(1).float().mean(), vals, idx, fired,
                         self.denormalize(x_hat_n.detach(), mu, scale))

    def recon_dense(self, x_n, k_top, dead_idx, k_aux):
        """The reference for forward's codes and reconstructions, in dense (B, n_latents)
        codes and matmuls; autograd does the rest. Normalized x_n (B, d) -> vals, idx (B, k_top)
        sorted descending (the top k first, then Multi-TopK's next latents), x_hat (k code),
        x_hat_multi (k_top code), e_hat (AuxK's k_aux code over the dead latents, no b_pre).
        BatchTopK: vals, idx (B, K), each token's share of the batch's top k * B, zero-padded."""
        k = self.cfg.k
        pre = self.preacts(x_n)  # (B, n_latents)

        def dense_code(i):  # (B, n_latents): ReLU'd pre-activations at i, zero elsewhere
            return torch.zeros_like(pre).scatter(1, i, pre.gather(1, i)).relu()

        if self.cfg.activation == "batchtopk":  # the top k * B pre-activations of the whole batch
            top = pre.detach().flatten().topk(k * len(pre)).indices  # (k * B,) into the flattened pre
            keep = torch.zeros(pre.numel(), dtype=torch.bool, device=pre.device).index_fill_(0, top, True).view_as(pre)
            z = pre.relu() * keep  # (B, n_latents)
            k = k_top = max(1, int(keep.sum(1).max()))  # the largest share of a token
            idx = z.detach().topk(k_top, dim=1).indices
            x_hat = z @ self.W_dec + self.b_pre
        else:
            idx = pre.detach().topk(k_top, dim=1).indices  # sorted: the top k come first
            z = pre.relu()  # where vals are read
            x_hat = dense_code(idx[:, :k]) @ self.W_dec + self.b_pre
        x_hat_multi = dense_code(idx) @ self.W_dec + self.b_pre if k_top > k else x_hat
        e_hat = None
        if k_aux:  # the top k_aux among the dead latents only
            live = torch.ones(pre.shape[1], dtype=torch.bool, device=pre.device).index_fill_(0, dead_idx, False)
            aux_idx = pre.detach().masked_fill(live, float("-inf")).topk(k_aux, dim=1).indices
            e_hat = dense_code(aux_idx) @ self.W_dec
        return z.gather(1, idx), idx, x_hat, x_hat_multi, e_hat

    def total_loss(self, fvu_k, fvu_4k, aux, l1, w_x=1.0, w_e=1.0, nested=0.0):
        """The training loss: FVU + FVU(4k) / 8 (Multi-TopK) + the inner prefixes' FVUs (Matryoshka)
        + auxk_coef * AuxK + l1_coef * L1 (ReLU baseline). w_x, w_e rescale the terms normalized by
        the input's and the residual's variance (the data-parallel loss, sharding.step_loss)."""
        return w_x * (fvu_k + fvu_4k / 8 + nested) + self.cfg.auxk_coef * w_e * aux + self.cfg.l1_coef * l1

    def _forward_relu(self, x_n, mu, scale, zero):
        z = self.preacts(x_n).relu()  # (B, n_latents), the dense ReLU code
        x_hat = self.decode(z)
        main = fvu(x_n, x_hat)
        # paper §2.2: L1 weighted by decoder row norms, so shrinking z and growing W_dec
        # rows cannot lower it; mean over the batch of sum_i z_i ||W_dec_i||.
        l1 = (z @ self.W_dec.norm(dim=1)).mean()
        idx = torch.arange(self.cfg.n_latents, device=z.device).expand_as(z)
        losses = (self.total_loss(main, zero, zero, l1), main, zero, zero, zero, l1)
        return self._output(losses, z, idx, x_hat, mu, scale)

    # ---- since the paper: BatchTopK and Matryoshka ----
    # BatchTopK's code (recon_dense) needs a batch: the evaluated SAE is a JumpReLU at a tracked
    # threshold. Matryoshka's prefixes each reconstruct (forward adds their FVUs).

    def jumprelu(self, pre):
        """BatchTopK at inference: pre-activations (any shape) -> pre where above the threshold, else 0."""
        if self.threshold < 0:
            raise ValueError("this BatchTopK SAE has no inference threshold yet: train it first, or pass k")
        return pre * (pre > self.threshold)

    @torch.no_grad()
    def update_threshold(self, kept_min, lr=0.1):
        """BatchTopK's threshold, as [peers] estimate it: a moving average of each batch's smallest kept
        activation (the first taken as it is), faster than theirs, which lag in short runs (README)."""
        if torch.isfinite(kept_min):  # inf: nothing fired in the batch
            self.threshold.copy_(kept_min if self.threshold < 0 else self.threshold.lerp(kept_min, lr))

    def prefix_recons(self, vals, idx, dense=False):
        """Matryoshka: the code (vals, idx) (B, K) -> each inner prefix m's reconstruction (B, d),
        normalized space, from the code's latents < m alone; dense: the reference, by dense codes."""
        codes = [(vals * (idx < m), idx) for m in self.cfg.matryoshka]
        if dense:
            return [self.decode(vals.new_zeros(len(vals), self.cfg.n_latents).scatter(1, i, v)) for v, i in codes]
        return [x + self.b_pre for x in kernels.sparse_decode(self.W_dec, codes)]

    # ---- paper App. A.1: initialization and the decoder constraint ----

    @torch.no_grad()
    def init_b_pre(self, x_sample):
        """b_pre := the geometric median of a sample (B, d) of caller's-space inputs (paper App.
        A.1; [code] uses 32768 samples), taken in the normalized space where the SAE works."""
        self.b_pre.copy_(geometric_median(self.normalize_input(x_sample)[0]))

    @torch.no_grad()
    def init_encoder_scale(self, n_samples=256):
        """paper App. A.1, [code] init_from_data_: rescale W_enc so that random unit inputs around
        b_pre reconstruct with mean norm 1 (not counting b_pre), a normalized input's. The paper's
        ablation finds no or a weakly negative effect; here it helps short runs, where the top k
        of W_enc = W_dec overshoot (README, Results). Call after init_b_pre."""
        # its own generator, seeded from the global one: a fixed seed would repeat the stream
        # that drew W_dec under the same global seed, and the samples would be decoder rows
        seed = int(torch.randint(2**62, (1,)))
        g = torch.Generator(device=self.W_enc.device).manual_seed(seed)
        u = F.normalize(torch.randn(n_samples, self.cfg.d_model, generator=g, device=self.W_enc.device), dim=1)
        k = None if self.cfg.activation == "relu" else self.cfg.k  # BatchTopK: k per token, its mean
        x_hat_n = self.decode_sparse(*self.encode_sparse(u + self.b_pre, k)) - self.b_pre  # (n_samples, d)

        self.W_enc.div_(x_hat_n.norm(dim=1).mean().clamp_min(1e-12))

    @torch.no_grad()
    def project_decoder_grad(self):
        """After backward: remove from each decoder row's gradient its component along the
        row, so Adam moves rows along the unit sphere. Rows are unit (normalize_decoder)."""
        g = self.W_dec.grad
        if g is not None:
            for g_c, W_c in zip(kernels.row_chunks(g), kernels.row_chunks(self.W_dec)):
                g_c.addcmul_(W_c, torch.linalg.vecdot(g_c, W_c).unsqueeze(1), value=-1)

    @torch.no_grad()
    def normalize_decoder(self, eps=1e-12):
        """After the optimizer step: decoder rows back to unit norm (paper App. A.1)."""
        for W_c in kernels.row_chunks(self.W_dec):
            W_c.div_(torch.linalg.vector_norm(W_c, dim=1, keepdim=True).clamp_min(eps))

    # ---- checks and checkpoints ----

    def _check_input(self, x):
        d = self.cfg.d_model
        if x.dim() != 2 or x.shape[1] != d:
            raise ValueError(f"x must have shape (batch, d_model={d}), got {tuple(x.shape)}")
        if not kernels.static_shapes(x) and not torch.isfinite(x).all():  # static: the caller checks
            raise ValueError("x must be finite, got NaN or inf values")
        return x.to(self.b_pre.dtype)

    def _check_k(self, k):
        if not 1 <= k <= self.cfg.n_latents:
            raise ValueError(f"k must be in [1, n_latents={self.cfg.n_latents}], got {k}")
        return k

    def _check_dead_mask(self, dead_mask, device):
        """-> (n_latents,) bool: the dead latents, none if dead_mask is None."""
        n = self.cfg.n_latents
        if dead_mask is None:
            return torch.zeros(n, dtype=torch.bool, device=device)
        if dead_mask.shape != (n,) or dead_mask.dtype != torch.bool:
            raise ValueError(f"dead_mask must be a bool tensor of shape ({n},), "
                             f"got {dead_mask.dtype} {tuple(dead_mask.shape)}")
        return dead_mask.to(device)

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
