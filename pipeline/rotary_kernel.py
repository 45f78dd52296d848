"""The DiT's query/key RMS norm and rotary embedding as one Triton kernel, for its compiled blocks.

Inductor fuses the norm, pipeline/rotary.py's real-arithmetic rotation and the cast back into one kernel, but as a
looped two-pass reduction: the rotation reads each element's pair partner, which its code generator reaches only by
loading the row again. At 1024² on an H200 that kernel took 0.049 ms a call, 544 calls an image. This one holds each
head's row in registers, normalises it and swaps its pairs there (`tl.split`, `tl.join`): 0.0225 ms. Written by hand
because neither PyTorch nor diffusers has this fusion. A `triton_op`, so torch.compile traces the kernel into the
block's one graph instead of breaking it.

The casts fall where diffusers' `RMSNorm` and the stock rotation put them (the norm in float32, rounded to the weight's
dtype, times the weight, rounded again; the rotation in float32, rounded to the input's dtype), so only the order of
the sum of squares differs from the stock numbers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

ROWS_PER_PROGRAM = 16  # with 2 warps: the fastest of 4–64 rows × 2–8 warps at 30 heads × 4128 tokens (H200)
WARPS = 2


@triton.jit
def rms_norm_rotate_kernel(x_ptr, weight_ptr, cos_sin_ptr, out_ptr, rows, heads, eps,
                            ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    in_range = (row < rows)[:, None]
    column = tl.arange(0, HEAD_DIM)
    offsets = row[:, None] * HEAD_DIM + column[None, :]
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)
    inverse_rms = tl.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)
    normed = (x * inverse_rms[:, None]).to(dtype).to(tl.float32)
    weight = tl.load(weight_ptr + column).to(tl.float32)
    normed = (normed * weight[None, :]).to(dtype).to(tl.float32)
    real, imaginary = tl.split(tl.reshape(normed, (ROWS, HEAD_DIM // 2, 2)))
    # One (cos, sin) pair per token and pair index, shared by the token's heads (rows are token-major).
    pair_offsets = (row // heads)[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM // 2)[None, :] * 2
    cos = tl.load(cos_sin_ptr + pair_offsets, mask=in_range, other=0.0)
    sin = tl.load(cos_sin_ptr + pair_offsets + 1, mask=in_range, other=0.0)
    rotated = tl.join(real * cos - imaginary * sin, real * sin + imaginary * cos)
    tl.store(out_ptr + offsets, tl.reshape(rotated, (ROWS, HEAD_DIM)).to(dtype), mask=in_range)


@triton_op("zimage::rms_norm_rotate", mutates_args=())
def rms_norm_rotate(x: torch.Tensor, weight: torch.Tensor, eps: float, cos_sin: torch.Tensor) -> torch.Tensor:
    """x (batch, tokens, heads, head_dim), contiguous, RMS-normalised over head_dim with `weight` (x's dtype), then
    rotated pairwise by cos_sin (batch, tokens, head_dim / 2, 2: the rotary factors as float32 pairs)."""
    return launch(wrap_triton(rms_norm_rotate_kernel), x, weight, eps, cos_sin)


def launch(kernel, x: torch.Tensor, weight: torch.Tensor, eps: float, cos_sin: torch.Tensor) -> torch.Tensor:
    """`kernel` over x's rows: the op passes it wrapped for torch.compile; Triton's CPU interpreter (the tests) runs
    it as it is, since torch 2.11's wrapper refuses an interpreted kernel."""
    out = torch.empty_like(x)
    rows = x.numel() // x.shape[-1]
    kernel[(triton.cdiv(rows, ROWS_PER_PROGRAM),)](
        x, weight, cos_sin, out, rows, x.shape[2], eps, ROWS=ROWS_PER_PROGRAM, HEAD_DIM=x.shape[-1], num_warps=WARPS)
    return out
