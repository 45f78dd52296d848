"""The DiT's attention processor with a rotary embedding Inductor can fuse: the stock processor's numbers, eager and
compiled, and no complex-number operation left in the compiled graph."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

import pipeline  # noqa: F401  (offline flags before any Hugging Face import)
from pipeline.random_model import TINY, build_components
from pipeline.rotary import FusableRotaryProcessor, use_fusable_rotary
from tests.helpers import compiled_graph_ops, rotary_attention_inputs

TOKENS = 40


@pytest.fixture(scope="module")
def transformer():
    """A tiny DiT of its own: use_fusable_rotary changes modules, and the session's loaded pipeline is shared."""
    return build_components(TINY, "cpu")["transformer"].float()


def run(attention, processor, hidden, freqs_cis):
    with torch.inference_mode():
        return processor(attention, hidden, freqs_cis=freqs_cis)


def test_eager_it_computes_exactly_what_the_stock_processor_computes(transformer):
    attention = transformer.layers[0].attention
    hidden, freqs_cis = rotary_attention_inputs(transformer, TOKENS)
    for dtype in (torch.float32, torch.bfloat16):
        attention.to(dtype)
        try:
            stock = run(attention, ZSingleStreamAttnProcessor(), hidden.to(dtype), freqs_cis)
            ours = run(attention, FusableRotaryProcessor(), hidden.to(dtype), freqs_cis)
        finally:
            attention.float()
        assert torch.equal(ours, stock), dtype


def test_compiled_it_rotates_in_real_arithmetic_with_the_stock_numbers(transformer):
    attention = transformer.layers[1].attention
    hidden, freqs_cis = rotary_attention_inputs(transformer, TOKENS, seed=1)
    stock_ops, _ = compiled_graph_ops(attention, ZSingleStreamAttnProcessor(), hidden, freqs_cis)
    assert torch.view_as_complex in stock_ops  # what Inductor cannot generate code for
    ours_ops, compiled = compiled_graph_ops(attention, FusableRotaryProcessor(), hidden, freqs_cis)
    assert torch.view_as_complex not in ours_ops
    stock = run(attention, ZSingleStreamAttnProcessor(), hidden, freqs_cis)
    assert torch.allclose(compiled, stock, rtol=1e-4, atol=1e-5)


def test_every_stock_processor_is_replaced_and_keeps_its_attention_backend(transformer):
    transformer.set_attention_backend("native")
    blocks = [*transformer.noise_refiner, *transformer.context_refiner, *transformer.layers]
    assert use_fusable_rotary(transformer) == len(blocks)
    assert all(type(block.attention.processor) is FusableRotaryProcessor for block in blocks)
    assert {block.attention.processor._attention_backend for block in blocks} == {
        transformer.layers[0].attention.processor._attention_backend} != {None}
    assert use_fusable_rotary(transformer) == 0  # a second compile of the same pipeline finds them replaced
