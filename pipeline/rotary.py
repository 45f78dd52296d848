"""The DiT's attention processor with a rotary embedding that torch.compile can fuse.

diffusers' `ZSingleStreamAttnProcessor` rotates queries and keys as complex numbers (`view_as_complex`, a complex
multiply, `view_as_real`). Inductor generates no code for complex operators: in the compiled blocks that multiply
runs as its own eager kernel, with a float32 copy of the query or key written before it and read after it, twice per
layer, 34 layers, every step. Written by hand because neither library offers another formulation: this processor is
the stock one with the same rotation in real arithmetic while compiling, which Inductor fuses with the
query/key norm and the cast back to bf16 into one kernel. The products and sums are the complex multiply's own
((a + bi)(c + di) = (ac - bd) + (ad + bc)i, in float32), so only the compiler's rounding can differ; run eagerly
(the eager pipeline shares these modules) it takes the stock complex path, one kernel instead of several.

Where Triton runs, the compiled blocks go one step further: the norm and the rotation are one hand-written kernel
(pipeline/rotary_kernel.py), which keeps each row in registers where Inductor's fusion reads it twice.
"""

from __future__ import annotations

import importlib.util

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor


def rotate(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """x (batch, tokens, heads, head_dim) rotated pairwise by freqs_cis (batch, tokens, head_dim / 2, complex64)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    if not torch.compiler.is_compiling():
        rotated = torch.view_as_real(torch.view_as_complex(pairs) * freqs_cis.unsqueeze(2))
        return rotated.flatten(3).type_as(x)
    cos_sin = torch.view_as_real(freqs_cis).unsqueeze(2)  # (batch, tokens, 1, pairs, 2): (c, d) of each pair
    cos, sin = cos_sin[..., :1], cos_sin[..., 1:]
    # (a, b) → (a·c − b·d, b·c + a·d): the pair swapped and its first member negated, times d.
    swapped = pairs.flip(-1) * torch.tensor([-1.0, 1.0], device=x.device)
    return (pairs * cos + swapped * sin).flatten(3).type_as(x)


# Where rotary_kernel runs inside a compiled graph: Triton compiles for CUDA (its CPU interpreter runs the kernel
# eagerly, as the tests do, but torch.compile cannot trace an interpreted kernel). Decided at import: Dynamo, tracing
# the processor, would otherwise trace the lookup too.
KERNEL_DEVICE_TYPES = ("cuda",) if importlib.util.find_spec("triton") is not None else ()


def kernel_applies(x: torch.Tensor, norm: torch.nn.Module | None, freqs_cis: torch.Tensor) -> bool:
    """Whether rotary_kernel computes what `norm` then `rotate` would for these inputs."""
    head_dim = x.shape[-1]
    return (isinstance(norm, RMSNorm) and norm.weight is not None and norm.bias is None
            and norm.weight.dtype == x.dtype and x.ndim == 4 and head_dim & (head_dim - 1) == 0
            and freqs_cis.shape == (*x.shape[:2], head_dim // 2) and x.device.type in KERNEL_DEVICE_TYPES)


def norm_and_rotate(x: torch.Tensor, norm: torch.nn.Module | None, freqs_cis: torch.Tensor | None,
                    use_kernel: bool) -> torch.Tensor:
    """The query's or key's norm, then its rotary embedding: compiled, through rotary_kernel where it applies and
    `use_kernel` allows it."""
    if freqs_cis is not None and use_kernel and torch.compiler.is_compiling() and kernel_applies(x, norm, freqs_cis):
        from pipeline.rotary_kernel import rms_norm_rotate

        return rms_norm_rotate(x.contiguous(), norm.weight, norm.eps, torch.view_as_real(freqs_cis).contiguous())
    if norm is not None:
        x = norm(x)
    return x if freqs_cis is None else rotate(x, freqs_cis)


class FusableRotaryProcessor(ZSingleStreamAttnProcessor):
    """ZSingleStreamAttnProcessor with `norm_and_rotate` for its query/key norm and rotary embedding; every other
    step is the stock one's. `use_kernel` False keeps Inductor's own fusion of them (for comparing the two)."""

    use_kernel = True

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 freqs_cis: torch.Tensor | None = None) -> torch.Tensor:
        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        query = norm_and_rotate(query, attn.norm_q, freqs_cis, self.use_kernel)
        key = norm_and_rotate(key, attn.norm_k, freqs_cis, self.use_kernel)
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]  # (batch, tokens) → broadcast over heads and queries
        hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                              is_causal=False, backend=self._attention_backend,
                                              parallel_config=self._parallel_config)
        output = attn.to_out[0](hidden_states.flatten(2, 3).to(query.dtype))
        if len(attn.to_out) > 1:  # dropout
            output = attn.to_out[1](output)
        return output


def use_fusable_rotary(transformer: torch.nn.Module) -> int:
    """Give each of the DiT's stock attention processors this module's, with the same attention backend; returns
    how many were replaced."""
    return replace_processors(transformer, ZSingleStreamAttnProcessor, FusableRotaryProcessor)


def replace_processors(transformer: torch.nn.Module, old: type, new: type) -> int:
    """Each attention processor of exactly type `old` replaced by a `new` one with the same attention backend;
    returns how many were replaced."""
    replaced = 0
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if type(processor) is old:
            replacement = new()
            replacement._attention_backend = processor._attention_backend
            replacement._parallel_config = processor._parallel_config
            module.processor = replacement
            replaced += 1
    return replaced
