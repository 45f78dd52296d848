"""The DiT's query/key norm and rotary embedding as one Triton kernel: the stock numbers, on the CPU through Triton's
interpreter, and on a GPU inside the compiled blocks' one graph."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

import pipeline  # noqa: F401  (offline flags before any Hugging Face import)
from pipeline.random_model import TINY, build_components
from pipeline.rotary import FusableRotaryProcessor, kernel_applies, rotate
from tests.helpers import PROJECT_DIR, compiled_graph_ops, rotary_attention_inputs

triton = pytest.importorskip("triton", reason="the kernel is Triton's")
on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="compiles the kernel for a GPU")

# (dtype, batch, tokens, heads, head_dim): rows that do not fill the last program, a batch of two (each its own
# rotary factors), and bf16, whose casts the kernel places where the stock modules do.
CASES = [("float32", 1, 37, 3, 16), ("float32", 2, 20, 5, 32), ("bfloat16", 1, 37, 3, 16)]

INTERPRETED = textwrap.dedent("""
    import json, sys
    import torch
    import pipeline
    from diffusers.models.normalization import RMSNorm
    from pipeline.rotary import rotate
    from pipeline.rotary_kernel import launch, rms_norm_rotate_kernel

    differences = []
    for dtype, batch, tokens, heads, head_dim in json.loads(sys.argv[1]):
        generator = torch.Generator().manual_seed(tokens)
        dtype = getattr(torch, dtype)
        norm = RMSNorm(head_dim, eps=1e-5).to(dtype)
        norm.weight.data = (1 + 0.1 * torch.randn(head_dim, generator=generator)).to(dtype)
        x = (3 * torch.randn(batch, tokens, heads, head_dim, generator=generator)).to(dtype)
        angles = 6.28 * torch.rand(batch, tokens, head_dim // 2, generator=generator)
        freqs_cis = torch.polar(torch.ones_like(angles), angles)
        with torch.inference_mode():
            stock = rotate(norm(x), freqs_cis).float()
            ours = launch(rms_norm_rotate_kernel, x, norm.weight, norm.eps,
                          torch.view_as_real(freqs_cis).contiguous())
        assert ours.dtype == dtype and ours.shape == x.shape
        differences.append(float((ours.float() - stock).norm() / stock.norm()))
    print(json.dumps(differences))
""")


def test_the_kernel_computes_the_stock_norm_and_rotation_in_tritons_interpreter():
    # A process of its own: Triton reads TRITON_INTERPRET when the kernel is defined, at rotary_kernel's import.
    done = subprocess.run([sys.executable, "-c", INTERPRETED, json.dumps(CASES)], cwd=PROJECT_DIR,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    differences = dict(zip((case[0] + str(case[1:]) for case in CASES), json.loads(done.stdout), strict=True))
    for case, difference in differences.items():
        # float32: the sum of squares in another order. bf16: the interpreter truncates where a GPU rounds to
        # nearest, twice per element; a wrong pair, head or token is off by more than 0.1.
        assert difference < (1e-6 if case.startswith("float32") else 0.02), differences


def test_it_applies_only_to_the_norm_it_reproduces():
    x, freqs_cis = torch.zeros(1, 4, 2, 16), torch.zeros(1, 4, 8, dtype=torch.complex64)
    meta = x.to("meta")  # off CUDA: never the kernel, whatever the norm
    assert not kernel_applies(meta, RMSNorm(16, eps=1e-6), freqs_cis.to("meta"))
    if torch.cuda.is_available():
        x, freqs_cis = x.cuda(), freqs_cis.cuda()
        assert kernel_applies(x, RMSNorm(16, eps=1e-6).cuda(), freqs_cis)
        assert not kernel_applies(x, RMSNorm(16, eps=1e-6, elementwise_affine=False).cuda(), freqs_cis)
        assert not kernel_applies(x, RMSNorm(16, eps=1e-6).cuda().to(torch.bfloat16), freqs_cis)  # weight's dtype
        assert not kernel_applies(x, torch.nn.LayerNorm(16).cuda(), freqs_cis)
        assert not kernel_applies(x, RMSNorm(16, eps=1e-6).cuda(), freqs_cis[:, :3])  # a factor per token


@on_gpu
def test_on_a_gpu_the_compiled_attention_runs_the_kernel_in_its_graph_with_the_stock_numbers():
    transformer = build_components(TINY, "cuda")["transformer"].to(torch.bfloat16)
    attention = transformer.layers[0].attention
    hidden, freqs_cis = rotary_attention_inputs(transformer, 40)
    hidden = hidden.to(torch.bfloat16)
    seen, ours = compiled_graph_ops(attention, FusableRotaryProcessor(), hidden, freqs_cis)
    with torch.inference_mode():
        stock = ZSingleStreamAttnProcessor()(attention, hidden, freqs_cis=freqs_cis).float()
    ours = ours.float()
    assert torch.ops.zimage.rms_norm_rotate.default in seen
    assert float((ours - stock).norm() / stock.norm()) < 0.01


@on_gpu
def test_on_a_gpu_the_kernel_matches_the_stock_modules_at_the_dits_shape():
    from pipeline.rotary_kernel import rms_norm_rotate

    generator = torch.Generator(device="cuda").manual_seed(0)
    norm = RMSNorm(128, eps=1e-5).cuda().to(torch.bfloat16)
    norm.weight.data = (1 + 0.1 * torch.randn(128, device="cuda", generator=generator)).to(torch.bfloat16)
    x = (3 * torch.randn(1, 4128, 30, 128, device="cuda", generator=generator)).to(torch.bfloat16)
    angles = 6.28 * torch.rand(1, 4128, 64, device="cuda", generator=generator)
    freqs_cis = torch.polar(torch.ones_like(angles), angles)
    with torch.inference_mode():
        stock = rotate(norm(x), freqs_cis)
        ours = rms_norm_rotate(x, norm.weight, norm.eps, torch.view_as_real(freqs_cis).contiguous())
    # Only the sum of squares' order differs: about one element in 10⁵ lands one bf16 step away (an H200).
    assert (ours == stock).float().mean() > 0.999
    assert float((ours.float() - stock.float()).norm() / stock.float().norm()) < 1e-4
