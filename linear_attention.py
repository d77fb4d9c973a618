"""Token mixers of (log-)linear cost for the CILF-CIAE fusion Transformer, and the quadratic baseline.

The paper's complaint about CLIP-based age estimators is the quadratic memory of modelling an image
globally; its answer is a Transformer of linear (or linear-log) cost. This file holds the two mixers
that answer it, written by hand, and the softmax attention they are measured against:

- kernelized linear attention (Katharopoulos et al. 2020), phi(x) = elu(x) + 1, O(N D Dv);
- a Fourier global filter on the token grid (GFNet, Rao et al. 2021; the abstract's "FourierFormer"),
  O(N log N);
- softmax attention through torch's scaled_dot_product_attention, O(N^2) time.

It imports only torch, so it can be copied into other code as it is.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["linear_attention", "softmax_attention", "LinearAttention", "SoftmaxAttention", "FourierMixer",
           "build_token_mixer", "MIXERS"]

MIXERS = ("linear", "fourier", "softmax")


def _feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1: positive everywhere, so every similarity phi(q).phi(k) is > 0."""
    return F.elu(x).add_(1)                                        # in place: one N x D buffer, not two


def _check_qkv(q, k, v, key_padding_mask, causal):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, N, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"need q (B,H,Nq,D), k (B,H,Nk,D), v (B,H,Nk,Dv); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2]):
            raise ValueError(f"key_padding_mask must be bool (B, Nk) = {(k.shape[0], k.shape[2])} with True "
                             f"marking padding; got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal attention needs as many queries as keys; got Nq={q.shape[2]}, Nk={k.shape[2]}")


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     key_padding_mask: Optional[torch.Tensor] = None, causal: bool = False,
                     eps: float = 1e-6, chunk_size: int = 64) -> torch.Tensor:
    """Kernelized linear attention with phi(x) = elu(x) + 1.

    q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv); key_padding_mask bool (B, Nk), True = padding.
    Returns (B, H, Nq, Dv) in the inputs' (promoted) dtype.

    Definition (the quadratic form the tests compare against):
        A = phi(Q) phi(K)^T                                  (B, H, Nq, Nk)
        A[..., j] = 0 for every padded key j; A[i, j] = 0 for j > i when causal
        out = (A V) / (rowsum(A) + eps)

    Computed without forming A: phi(Q) (phi(K)^T V) / (phi(Q) (phi(K)^T 1) + eps), O(N D Dv) time and
    O(N (D + Dv) + D Dv) memory. Padded keys are zeroed after phi, because phi(0) = 1 would still leak
    them into both sums. A query that sees no key gets 0 / eps = 0, not NaN.

    causal: chunked prefix sums. Within a chunk of C = chunk_size tokens the masked quadratic form is
    used; across chunks a running state phi(K)^T V (D, Dv) and normaliser phi(K)^T 1 (D,) are carried.
    Memory stays O(N (D + Dv) + C^3 + C D Dv) (see _causal_linear) instead of the O(N D Dv) of a
    cumulative sum of outer products.

    The sums run in float32 (float64 if an input is float64) with autocast disabled: over 64k tokens of
    magnitude 100 they reach ~1e9, far beyond float16's 65504 and bfloat16's 8 significant bits.
    """
    _check_qkv(q, k, v, key_padding_mask, causal)
    out_dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    compute_dtype = torch.promote_types(out_dtype, torch.float32)
    with torch.autocast(device_type=q.device.type, enabled=False):
        k = _feature_map(k.to(compute_dtype))
        v = v.to(compute_dtype)
        if key_padding_mask is not None:
            k.masked_fill_(key_padding_mask[:, None, :, None], 0.0)
        if causal:
            out = _causal_linear(_feature_map(q.to(compute_dtype)), k, v, eps, chunk_size)
        else:
            kv = k.transpose(-2, -1) @ v                           # (B, H, D, Dv)
            z = k.sum(dim=-2, keepdim=True).transpose(-2, -1)      # (B, H, D, 1)
            del k  # without autograd phi(K) is freed here: two N x D buffers at the peak, not three
            q = _feature_map(q.to(compute_dtype))
            out = (q @ kv).div_(q @ z + eps)                       # (B, H, Nq, Dv)
    return out.to(out_dtype)


def _causal_linear(q, k, v, eps, chunk_size):
    """Causal linear attention on feature-mapped q, k (B, H, N, D) and v (B, H, N, Dv).

    Tokens are cut into chunks of C = chunk_size. Inside a chunk: the masked quadratic form. Between
    chunks: each chunk's state phi(K_c)^T V_c (D, Dv) and normaliser phi(K_c)^T 1 (D, 1), summed over the
    chunks before it. C chunks at a time are handled in one batch of matrix products (exclusive prefix sums
    over that block, plus the running state carried from earlier blocks), so a Python loop runs N / C^2
    times rather than N / C, and the extra memory is O(C^3 + C D Dv) per batch and head on top of the
    O(N (D + Dv)) of inputs and output.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    B, H, N, D = q.shape
    Dv = v.shape[-1]
    C = chunk_size
    pad = -N % C
    if pad:  # zero keys (phi already applied) add nothing; the padded queries' outputs are dropped
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    n = (N + pad) // C
    q, k, v = (t.reshape(B, H, n, C, -1) for t in (q, k, v))      # (B, H, chunks, C, D or Dv)
    future = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)
    state = q.new_zeros(B, H, 1, D, Dv)                            # sum of phi(k) v^T over earlier blocks
    norm = q.new_zeros(B, H, 1, D, 1)                              # sum of phi(k) over earlier blocks
    outs = []
    for s in range(0, n, C):
        qb, kb, vb = q[:, :, s:s + C], k[:, :, s:s + C], v[:, :, s:s + C]
        a = (qb @ kb.transpose(-2, -1)).masked_fill(future, 0.0)   # (B, H, c, C, C)
        kv = (kb.transpose(-2, -1) @ vb).cumsum(dim=2)             # (B, H, c, D, Dv) inclusive prefix
        z = kb.sum(dim=-2).unsqueeze(-1).cumsum(dim=2)             # (B, H, c, D, 1)
        kv_before = torch.cat([state, state + kv[:, :, :-1]], dim=2)   # exclusive: chunks before each
        z_before = torch.cat([norm, norm + z[:, :, :-1]], dim=2)
        num = a @ vb + qb @ kv_before                              # (B, H, c, C, Dv)
        den = a.sum(dim=-1, keepdim=True) + qb @ z_before          # (B, H, c, C, 1)
        outs.append(num / (den + eps))
        state, norm = state + kv[:, :, -1:], norm + z[:, :, -1:]
    return torch.cat(outs, dim=2).reshape(B, H, n * C, Dv)[:, :, :N]   # (B, H, N, Dv)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      key_padding_mask: Optional[torch.Tensor] = None, causal: bool = False) -> torch.Tensor:
    """softmax(Q K^T / sqrt(D)) V through F.scaled_dot_product_attention: the quadratic baseline.

    Same shapes and mask convention as linear_attention. A query that sees no key gets zeros: such rows
    are given every key inside SDPA (a softmax over only -inf is NaN, and NaN would also poison the
    gradients) and their output is zeroed afterwards.
    """
    _check_qkv(q, k, v, key_padding_mask, causal)
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    keep = ~key_padding_mask[:, None, None, :]                     # (B, 1, 1, Nk)
    if causal:
        n = q.shape[2]
        keep = keep & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()   # (B, 1, N, N)
    empty = ~keep.any(dim=-1, keepdim=True)                        # (B, 1, Nq or 1, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep | empty)
    return out.masked_fill(empty, 0.0)


class _MultiHead(nn.Module):
    """Shared projections of multi-head attention: q from x, k and v from the context (x by default)."""

    def __init__(self, dim: int, num_heads: int = 8, context_dim: Optional[int] = None, bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        context_dim = dim if context_dim is None else context_dim
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(context_dim, dim, bias=bias)
        self.v_proj = nn.Linear(context_dim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        # nn.MultiheadAttention's initialisation: a residual branch of unit-scale output at the start.
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(lin.weight)
            if bias:
                nn.init.zeros_(lin.bias)

    def _attend(self, q, k, v, key_padding_mask):
        raise NotImplementedError

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None,
                grid_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """x (B, N, dim), context (B, M, context_dim) or None (self-attention); grid_size is ignored."""
        context = x if context is None else context
        B, N, _ = x.shape
        M = context.shape[1]
        h = self.num_heads
        q = self.q_proj(x).view(B, N, h, -1).transpose(1, 2)       # (B, h, N, dim/h)
        k = self.k_proj(context).view(B, M, h, -1).transpose(1, 2)  # (B, h, M, dim/h)
        v = self.v_proj(context).view(B, M, h, -1).transpose(1, 2)  # (B, h, M, dim/h)
        out = self._attend(q, k, v, key_padding_mask)               # (B, h, N, dim/h)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, -1))  # (B, N, dim)


class LinearAttention(_MultiHead):
    """Multi-head kernelized linear attention; self-attention, or cross-attention to a context."""

    def __init__(self, dim: int, num_heads: int = 8, context_dim: Optional[int] = None, bias: bool = True,
                 eps: float = 1e-6):
        super().__init__(dim, num_heads, context_dim, bias)
        self.eps = eps

    def _attend(self, q, k, v, key_padding_mask):
        return linear_attention(q, k, v, key_padding_mask=key_padding_mask, eps=self.eps)


class SoftmaxAttention(_MultiHead):
    """Multi-head softmax attention (SDPA), the quadratic baseline; same interface as LinearAttention."""

    def __init__(self, dim: int, num_heads: int = 8, context_dim: Optional[int] = None, bias: bool = True,
                 eps: float = 1e-6):
        super().__init__(dim, num_heads, context_dim, bias)     # eps kept for a shared signature; unused

    def _attend(self, q, k, v, key_padding_mask):
        return softmax_attention(q, k, v, key_padding_mask=key_padding_mask)


class FourierMixer(nn.Module):
    """Learnable global filter on the 2-D FFT of the token grid (GFNet): x -> irfft2(rfft2(x) * W).

    x (B, G + h*w, dim): the first G = num_global_tokens tokens (e.g. CLIP's global embedding) bypass the
    filter; the rest are a row-major h x w grid. W is one complex filter per channel, (h, w//2 + 1, dim);
    multiplying spectra is a circular convolution of every channel of the grid with the spatial kernel
    irfft2(W), in O(N log N).

    The mixer is a residual branch (z + mixer(LN(z))): the global tokens' output is 0, so a block's mixing
    step leaves them exactly as they were (a true bypass), while the grid tokens get the filtered grid.

    Initialisation: W = 1 + small complex noise (std 0.02), a near-identity filter, so the grid's branch
    starts at the unit scale of an attention branch's output. (GFNet draws W = 0.02 randn, a near-zero
    branch.) Being the identity, not 0, at rest, W must not be weight-decayed (model.param_groups).

    A grid of another size at run time (the same face at another input resolution) keeps the filter's
    response in cycles per image: FFT index k of any grid is k cycles across the image, so the new grid's
    frequency k reads W at the same k. Frequencies the built grid cannot represent (above its Nyquist
    frequency, only on a larger grid) take the value at the built grid's highest frequency of that sign;
    on a smaller grid the filter is W at the frequencies that grid has. No interpolation is needed, and
    at the built size the filter is W exactly.
    """

    def __init__(self, dim: int, grid_size: Tuple[int, int] = (14, 14), num_global_tokens: int = 1):
        super().__init__()
        h, w = grid_size
        self.dim = dim
        self.grid_size = (int(h), int(w))
        self.num_global_tokens = num_global_tokens
        weight = torch.zeros(h, w // 2 + 1, dim, 2)                # real and imaginary parts
        weight[..., 0] = 1.0
        self.complex_weight = nn.Parameter(weight + 0.02 * torch.randn_like(weight))

    def filter(self, grid_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """The complex filter (h, w//2 + 1, dim) for a grid of grid_size, in cycles per image (class docstring)."""
        param = self.complex_weight
        weight = torch.view_as_complex(param.to(torch.promote_types(param.dtype, torch.float32)))
        # weight: (h0, w0//2 + 1, dim) complex
        h, w = self.grid_size if grid_size is None else grid_size
        if (h, w) == self.grid_size:
            return weight
        h0, w0 = self.grid_size
        # Rows: the full FFT, row r holds the signed frequency k = r, or r - h past the middle (fftfreq
        # order 0, 1, .., -1), k cycles per image. Clamp k to the built grid's range [-(h0//2), h0//2]
        # (for even h0 both ends are its one Nyquist row) and read that row.
        k = (torch.arange(h, device=weight.device) + h // 2) % h - h // 2
        weight = weight[k.clamp(-(h0 // 2), h0 // 2) % h0]                        # (h, w0//2+1, dim)
        # Columns: the half spectrum, column j is j cycles per image; past the built Nyquist, clamp.
        j = torch.arange(w // 2 + 1, device=weight.device)
        return weight[:, j.clamp(max=w0 // 2)]                                    # (h, w//2+1, dim)

    def forward(self, x: torch.Tensor, grid_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """x (B, G + h*w, dim) -> same shape; grid_size (h, w) defaults to the built one."""
        h, w = self.grid_size if grid_size is None else grid_size
        G = self.num_global_tokens
        B, N, C = x.shape
        if N != G + h * w:
            raise ValueError(f"FourierMixer: got {N} tokens, expected {G} global + {h}x{w} grid = {G + h * w}")
        # FFTs have no bfloat16 kernels and float16 ones lose the spectrum: run them in float32 (or 64).
        with torch.autocast(device_type=x.device.type, enabled=False):
            dtype = torch.promote_types(x.dtype, torch.float32)
            grid = x[:, G:].to(dtype).reshape(B, h, w, C)                          # (B, h, w, C)
            spec = torch.fft.rfft2(grid, dim=(1, 2))                               # (B, h, w//2+1, C)
            grid = torch.fft.irfft2(spec * self.filter((h, w)), s=(h, w), dim=(1, 2))
        # zeros for the global tokens: the residual z + 0 passes them through the block's mixing unchanged
        return torch.cat([torch.zeros_like(x[:, :G]), grid.reshape(B, h * w, C).to(x.dtype)], dim=1)  # (B, G+h*w, C)


def build_token_mixer(name: str, dim: int, num_heads: int, grid_size: Tuple[int, int],
                      num_global_tokens: int = 1) -> nn.Module:
    """The token mixer called `name` (one of MIXERS); each is called as mixer(x, grid_size=(h, w))."""
    if name == "linear":
        return LinearAttention(dim, num_heads)
    if name == "fourier":
        return FourierMixer(dim, grid_size, num_global_tokens)
    if name == "softmax":
        return SoftmaxAttention(dim, num_heads)
    raise ValueError(f"unknown token mixer {name!r}; choose one of {MIXERS}")
