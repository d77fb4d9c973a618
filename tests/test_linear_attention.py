"""Tests for linear_attention.py against independent references.

- linear attention: the explicit quadratic form of its definition, A = phi(Q) phi(K)^T masked, with phi
  written out by hand (x + 1 for x > 0, exp(x) otherwise);
- softmax attention: an explicit softmax(Q K^T / sqrt(D)) V, and torch.nn.MultiheadAttention;
- the Fourier mixer: a circular convolution of the grid with irfft2 of the filter, by explicit rolls.
"""
import math

import pytest
import torch
from torch import nn

import linear_attention as la


def phi(x):
    return torch.where(x > 0, x + 1, torch.exp(x))


def quadratic_linear(q, k, v, mask=None, causal=False, eps=1e-6):
    """The definition: A = phi(Q) phi(K)^T, padded columns and the future zeroed, out = AV / (rowsum A + eps)."""
    a = phi(q) @ phi(k).transpose(-2, -1)                            # (B, H, Nq, Nk)
    if mask is not None:
        a = a * (~mask)[:, None, None, :]
    if causal:
        a = a * torch.ones(a.shape[-2:], dtype=a.dtype).tril()
    return (a @ v) / (a.sum(-1, keepdim=True) + eps)


def quadratic_softmax(q, k, v, mask=None, causal=False):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    keep = torch.ones(s.shape, dtype=torch.bool)
    if mask is not None:
        keep = keep & (~mask)[:, None, None, :]
    if causal:
        keep = keep & torch.ones(s.shape[-2:], dtype=torch.bool).tril()
    p = torch.softmax(s.masked_fill(~keep, -math.inf), dim=-1)
    return torch.nan_to_num(p, nan=0.0) @ v                           # rows with no key -> 0


def qkv(B=2, H=3, Nq=11, Nk=11, D=5, Dv=5, dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(B, H, Nq, D, generator=g, dtype=dtype),
            scale * torch.randn(B, H, Nk, D, generator=g, dtype=dtype),
            scale * torch.randn(B, H, Nk, Dv, generator=g, dtype=dtype))


def padding(B, N, seed=1):
    """Random padding with at least one kept key per row, plus a fully padded last row."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, N, generator=g) < 0.4
    mask[:, 0] = False
    mask[-1] = True
    return mask


TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
CASES = {  # name: (Nq, Nk, D, Dv, masked, causal)
    "self": (11, 11, 5, 5, False, False),
    "cross": (7, 13, 5, 5, False, False),
    "cross_masked": (7, 13, 4, 6, True, False),
    "self_masked_d_ne_dv": (11, 11, 3, 8, True, False),
    "causal": (11, 11, 5, 5, False, True),
    "causal_masked_d_ne_dv": (11, 11, 4, 7, True, True),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_linear_matches_quadratic_definition(case, dtype):
    Nq, Nk, D, Dv, masked, causal = CASES[case]
    q, k, v = qkv(Nq=Nq, Nk=Nk, D=D, Dv=Dv, dtype=dtype)
    mask = padding(2, Nk) if masked else None
    ref = quadratic_linear(q.double(), k.double(), v.double(), mask, causal)
    out = la.linear_attention(q, k, v, key_padding_mask=mask, causal=causal)
    assert out.dtype == dtype and out.shape == (2, 3, Nq, Dv)
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 4, 10, 64])
def test_causal_chunk_boundaries(chunk_size):
    q, k, v = qkv(Nq=10, Nk=10, D=4, Dv=6)                         # 10 is not a multiple of 3, 4 or 64
    mask = padding(2, 10)
    out = la.linear_attention(q, k, v, key_padding_mask=mask, causal=True, chunk_size=chunk_size)
    torch.testing.assert_close(out, quadratic_linear(q, k, v, mask, causal=True), atol=1e-10, rtol=0)


def test_causal_does_not_look_ahead():
    q, k, v = qkv(Nq=9, Nk=9)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 6:] += 3.0
    v2[:, :, 6:] -= 5.0
    a = la.linear_attention(q, k, v, causal=True, chunk_size=4)
    b = la.linear_attention(q, k2, v2, causal=True, chunk_size=4)
    torch.testing.assert_close(a[:, :, :6], b[:, :, :6], atol=1e-12, rtol=0)
    assert (a[:, :, 6:] - b[:, :, 6:]).abs().max() > 1e-2


def test_padded_keys_do_not_leak():
    """Changing padded keys and values changes nothing (phi(0) = 1 would leak them without masking after phi)."""
    q, k, v = qkv(B=1, Nq=5, Nk=8)
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, 5:] = True
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 5:] = torch.randn_like(k2[:, :, 5:])
    v2[:, :, 5:] = 100.0
    a = la.linear_attention(q, k, v, key_padding_mask=mask)
    torch.testing.assert_close(a, la.linear_attention(q, k2, v2, key_padding_mask=mask), atol=1e-12, rtol=0)
    torch.testing.assert_close(a, la.linear_attention(q, k[:, :, :5], v[:, :, :5]), atol=1e-12, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("fn", [la.linear_attention, la.softmax_attention])
def test_fully_padded_rows_are_zero_with_finite_grads(fn, causal):
    q, k, v = qkv(B=2, Nq=6, Nk=6, dtype=torch.float32)
    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1] = True                                                  # batch 1: every key is padding
    mask[0, :2] = True                                              # batch 0, causal: queries 0, 1 see none
    out = fn(q, k, v, key_padding_mask=mask, causal=causal)
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all()
    if causal:
        assert (out[0, :, :2] == 0).all()
    assert (out[0, :, 2:].abs().sum(-1) > 0).all()
    out.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(causal):
    q, k, v = qkv(B=1, H=2, Nq=5, Nk=5, D=3, Dv=2)
    mask = torch.tensor([[False, False, True, False, True]])
    inputs = tuple(t.requires_grad_(True) for t in (q, k, v))
    fn = lambda q, k, v: la.linear_attention(q, k, v, key_padding_mask=mask, causal=causal, chunk_size=2)
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_softmax_matches_explicit(masked, causal):
    q, k, v = qkv(Nq=9, Nk=9, D=4, Dv=6)
    mask = padding(2, 9) if masked else None
    out = la.softmax_attention(q, k, v, key_padding_mask=mask, causal=causal)
    torch.testing.assert_close(out, quadratic_softmax(q, k, v, mask, causal), atol=1e-10, rtol=0)


def test_softmax_cross_attention():
    q, k, v = qkv(Nq=4, Nk=9, D=4, Dv=6)
    mask = padding(2, 9)
    out = la.softmax_attention(q, k, v, key_padding_mask=mask)
    torch.testing.assert_close(out, quadratic_softmax(q, k, v, mask), atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_half_precision_autocast_large_inputs(dtype, causal):
    """Inputs of magnitude ~100 in bf16/fp16 (as an autocast projection yields them) stay finite and agree
    with float32 on the same rounded inputs to half precision."""
    q, k, v = qkv(B=1, H=2, Nq=256, Nk=256, D=16, Dv=16, dtype=torch.float32, scale=100.0)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    mask = padding(1, 256)
    mask[-1, :] = False
    mask[0, 3] = True
    with torch.autocast("cpu", dtype=dtype):
        out = la.linear_attention(q, k, v, key_padding_mask=mask, causal=causal)
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref = quadratic_linear(q.double(), k.double(), v.double(), mask, causal)
    assert ((out.double() - ref).abs() <= 2 ** -7 * ref.abs() + 1e-2).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_half_precision_64k_tokens(dtype, causal):
    """64k tokens of magnitude 100: the sums reach ~1e9 (fp16 overflows at 65504) and must stay finite."""
    N = 65536
    q, k, v = qkv(B=1, H=1, Nq=N, Nk=N, D=4, Dv=4, dtype=torch.float32, scale=100.0)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    with torch.autocast("cpu", dtype=dtype):
        out = la.linear_attention(q, k, v, causal=causal)
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref = la.linear_attention(q.float(), k.float(), v.float(), causal=causal)
    assert ((out.float() - ref).abs() <= 2 ** -7 * ref.abs() + 1e-3).all()
    assert (phi(k.float()).sum(-2).abs().max() > 65504)              # the normaliser alone overflows fp16


def test_linear_attention_module_under_bf16_autocast():
    """The module as model.py uses it: bf16 projections of large inputs, float32 sums inside."""
    torch.manual_seed(0)
    m = la.LinearAttention(16, 2, context_dim=8)
    x, c = 100 * torch.randn(2, 4096, 16), 100 * torch.randn(2, 300, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, context=c)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    ref = m(x, context=c)
    # On average to bf16 precision; single outputs can move more, as bf16 rounding of projections of
    # size ~500 shifts exp(q) in phi by up to e^2 (the rounding of the inputs, not of the sums).
    assert (out.float() - ref).abs().mean() < 2 ** -6 * ref.abs().mean()


@pytest.mark.parametrize("bias", [True, False])
def test_linear_attention_module_matches_reference(bias):
    torch.manual_seed(0)
    dim, heads, cdim = 12, 3, 7
    m = la.LinearAttention(dim, heads, context_dim=cdim, bias=bias).double()
    x = torch.randn(2, 5, dim, dtype=torch.float64)
    c = torch.randn(2, 9, cdim, dtype=torch.float64)
    mask = padding(2, 9)

    def proj(lin, t):  # hand-written y = t W^T + b, split into heads
        y = t @ lin.weight.T + (lin.bias if bias else 0)
        return y.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

    ref = quadratic_linear(proj(m.q_proj, x), proj(m.k_proj, c), proj(m.v_proj, c), mask)
    ref = ref.transpose(1, 2).reshape(2, 5, dim) @ m.out_proj.weight.T + (m.out_proj.bias if bias else 0)
    torch.testing.assert_close(m(x, context=c, key_padding_mask=mask, grid_size=(3, 3)), ref, atol=1e-10, rtol=0)
    # self-attention: the context is x
    m2 = la.LinearAttention(dim, heads).double()
    ref = quadratic_linear(*(proj(lin, x) for lin in (m2.q_proj, m2.k_proj, m2.v_proj)))
    ref = ref.transpose(1, 2).reshape(2, 5, dim) @ m2.out_proj.weight.T + m2.out_proj.bias
    torch.testing.assert_close(m2(x), ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("cdim", [None, 7])
def test_softmax_attention_module_matches_multihead_attention(cdim):
    torch.manual_seed(0)
    dim, heads = 12, 3
    m = la.SoftmaxAttention(dim, heads, context_dim=cdim).double()
    mha = nn.MultiheadAttention(dim, heads, kdim=cdim, vdim=cdim, batch_first=True).double()
    with torch.no_grad():
        for p in m.parameters():                                     # non-zero biases, so they are tested too
            p.add_(0.1 * torch.randn_like(p))
        if cdim is None:
            mha.in_proj_weight.copy_(torch.cat([m.q_proj.weight, m.k_proj.weight, m.v_proj.weight]))
        else:
            mha.q_proj_weight.copy_(m.q_proj.weight)
            mha.k_proj_weight.copy_(m.k_proj.weight)
            mha.v_proj_weight.copy_(m.v_proj.weight)
        mha.in_proj_bias.copy_(torch.cat([m.q_proj.bias, m.k_proj.bias, m.v_proj.bias]))
        mha.out_proj.weight.copy_(m.out_proj.weight)
        mha.out_proj.bias.copy_(m.out_proj.bias)
    x = torch.randn(2, 5, dim, dtype=torch.float64)
    c = x if cdim is None else torch.randn(2, 9, cdim, dtype=torch.float64)
    mask = torch.zeros(2, c.shape[1], dtype=torch.bool)
    mask[0, -2:] = True                                             # MultiheadAttention gives NaN on empty rows
    ref, _ = mha(x, c, c, key_padding_mask=mask, need_weights=False)
    out = m(x, context=None if cdim is None else c, key_padding_mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)


def circular_conv(grid, kernel):
    """out[i, j] = sum_{a, b} kernel[a, b] grid[i - a, j - b] (indices mod h, w), per channel, by rolls."""
    h, w = kernel.shape[:2]
    out = torch.zeros_like(grid)
    for a in range(h):
        for b in range(w):
            out += kernel[a, b] * torch.roll(grid, shifts=(a, b), dims=(1, 2))
    return out


def random_fourier(dim, grid, G, seed=0):
    torch.manual_seed(seed)
    m = la.FourierMixer(dim, grid, num_global_tokens=G).double()
    with torch.no_grad():
        m.complex_weight.normal_()                                  # far from identity, so the test bites
    return m


@pytest.mark.parametrize("grid,G", [((4, 4), 0), ((3, 5), 1), ((6, 4), 2)])
def test_fourier_is_circular_convolution(grid, G):
    h, w = grid
    m = random_fourier(3, grid, G)
    x = torch.randn(2, G + h * w, 3, dtype=torch.float64)
    out = m(x, grid_size=grid)
    kernel = torch.fft.irfft2(m.filter(grid), s=grid, dim=(0, 1))    # (h, w, dim) spatial kernel
    ref = circular_conv(x[:, G:].reshape(2, h, w, 3), kernel).reshape(2, h * w, 3)
    torch.testing.assert_close(out[:, G:], ref, atol=1e-10, rtol=0)
    assert torch.equal(out[:, :G], torch.zeros_like(x[:, :G]))       # global tokens: a zero residual branch
    assert (out[:, G:] - x[:, G:]).abs().max() > 0.1


def test_fourier_resampled_filter():
    m = random_fourier(2, (4, 6), 1)
    base = m.filter()                                                # (4, 4, 2): rows k = 0, 1, -2|2, -1
    assert torch.equal(m.filter((4, 6)), base)
    up = m.filter((8, 12))                                           # rows k = 0, 1, 2, 3, -4|4, -3, -2, -1
    assert up.shape == (8, 7, 2)
    # The same k cycles per image reads the same value; past the built grid's Nyquist (2 rows, 3 columns)
    # the value at the Nyquist frequency (row 2 = -2, column 3) is kept.
    for (r, c), (r0, c0) in {(1, 2): (1, 2), (2, 3): (2, 3), (6, 1): (2, 1), (7, 0): (3, 0),
                             (3, 0): (2, 0), (5, 6): (2, 3), (4, 4): (2, 3), (0, 5): (0, 3)}.items():
        assert torch.equal(up[r, c], base[r0, c0]), (r, c)
    down = m.filter((3, 5))                                          # rows k = 0, 1, -1; columns 0..2
    assert down.shape == (3, 3, 2)
    assert torch.equal(down[1, 2], base[1, 2]) and torch.equal(down[2, 1], base[3, 1])


@pytest.mark.parametrize("run_grid", [(8, 8), (16, 16), (12, 10), (7, 9)])
def test_fourier_pass_band_is_in_cycles_per_image(run_grid):
    """A filter built on 8x8 that passes only 2 cycles per image (down the rows) passes a 2-cycle pattern
    whole and blocks 1- and 3-cycle patterns on any grid: the same face structure at any resolution."""
    m = la.FourierMixer(1, (8, 8), num_global_tokens=1).double()
    with torch.no_grad():
        m.complex_weight.zero_()
        m.complex_weight[[2, -2], 0, 0, 0] = 1.0                     # rows k = +-2, column 0: real gain 1
    h, w = run_grid
    rows = torch.arange(h, dtype=torch.float64)[:, None].expand(h, w)
    for cycles, gain in ((2, 1.0), (1, 0.0), (3, 0.0)):
        pattern = torch.cos(2 * math.pi * cycles * rows / h + 0.3)   # (h, w), `cycles` periods down the image
        x = torch.cat([torch.zeros(1), pattern.flatten()]).reshape(1, 1 + h * w, 1)
        out = m(x, grid_size=run_grid)[0, 1:, 0].reshape(h, w)
        torch.testing.assert_close(out, gain * pattern, atol=1e-10, rtol=0, msg=f"{cycles} cycles on {run_grid}")


@pytest.mark.parametrize("run_grid", [(5, 7), (2, 3), (8, 8)])
def test_fourier_runs_on_other_grids_as_convolution(run_grid):
    m = random_fourier(3, (4, 6), 1)
    h, w = run_grid
    x = torch.randn(1, 1 + h * w, 3, dtype=torch.float64)
    out = m(x, grid_size=run_grid)
    kernel = torch.fft.irfft2(m.filter(run_grid), s=run_grid, dim=(0, 1))
    ref = circular_conv(x[:, 1:].reshape(1, h, w, 3), kernel).reshape(1, h * w, 3)
    torch.testing.assert_close(out[:, 1:], ref, atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="expected 1 global"):
        m(x[:, 1:], grid_size=run_grid)


def test_fourier_bf16_autocast():
    m = la.FourierMixer(8, (4, 5), 1)
    x = torch.randn(2, 21, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), m(x.float()), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("name", la.MIXERS)
def test_build_token_mixer_residual_friendly(name):
    torch.manual_seed(0)
    m = la.build_token_mixer(name, dim=32, num_heads=4, grid_size=(3, 5), num_global_tokens=1)
    assert isinstance(m, {"linear": la.LinearAttention, "fourier": la.FourierMixer,
                          "softmax": la.SoftmaxAttention}[name])
    x = torch.nn.functional.layer_norm(torch.randn(2, 16, 32), (32,))
    out = m(x, grid_size=(3, 5))
    assert out.shape == x.shape
    ratio = out.std() / x.std()                                      # a residual branch of unit scale
    assert 0.1 < ratio < 3, ratio
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    if name == "fourier":            # near-identity initialisation of the grid; a zero branch for the global token
        assert (out[:, 1:] - x[:, 1:]).abs().max() < 0.5 and torch.equal(out[:, 0], torch.zeros_like(x[:, 0]))


def test_bad_inputs_raise_clear_errors():
    q, k, v = qkv(Nq=4, Nk=6)
    with pytest.raises(ValueError, match="causal"):
        la.linear_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="key_padding_mask"):
        la.linear_attention(q, k, v, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask"):
        la.softmax_attention(q, k, v, key_padding_mask=torch.zeros(2, 6))
    with pytest.raises(ValueError, match=r"\(B, H, N, D\)"):
        la.linear_attention(q[0], k, v)
    with pytest.raises(ValueError, match="unknown token mixer"):
        la.build_token_mixer("performer", 8, 2, (2, 2))
    with pytest.raises(ValueError, match="divisible"):
        la.LinearAttention(10, 3)
