import logging
import sys
import threading
import types

import pytest
import torch

from pipeline import attention, flash4
from pipeline.text_encoder import MAX_SEQUENCE_LENGTH
from pipeline.requests import GenerationRequest

SIZES = [(128, 128), (192, 128), (128, 256)]
PROMPTS = ["fox", " ".join(["a long prompt that crosses several blocks of thirty-two caption tokens"] * 6)]


def _lengths_the_dit_meets(engine, width, height, prompt):
    seen = set()
    hooks = [module.register_forward_pre_hook(lambda _module, args, kwargs: seen.add(
                 (kwargs.get("hidden_states") if "hidden_states" in kwargs else args[0]).shape[1]), with_kwargs=True)
             for name, module in engine.pipeline.transformer.named_modules() if name.endswith(".attention")]
    try:
        engine.generate(GenerationRequest(prompt, width=width, height=height, steps=1, seed=1))
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def test_the_lengths_built_ahead_are_every_length_the_dit_meets_at_those_sizes(engine):
    planned = attention.dit_sequence_lengths(engine.pipeline, SIZES, MAX_SEQUENCE_LENGTH)
    met = set()
    for width, height in SIZES:
        for prompt in PROMPTS:
            met |= _lengths_the_dit_meets(engine, width, height, prompt)
    assert len(met) > len(SIZES) and met <= set(planned)
    # The first size's lengths come first: the default size is ready soonest.
    first = set(attention.dit_sequence_lengths(engine.pipeline, SIZES[:1], MAX_SEQUENCE_LENGTH))
    assert set(planned[:len(first)]) == first
    assert len(planned) == len(set(planned))


def test_only_sdpa_on_cuda_builds_plans():
    assert attention.builds_plans(attention.SDPA, torch.device("cuda"))
    assert not attention.builds_plans("_flash_3", torch.device("cuda"))
    assert not attention.builds_plans(attention.SDPA, torch.device("cpu"))


def test_the_engine_builds_no_plans_where_the_backend_keeps_none(engine):
    assert engine.build_attention_plans(SIZES) is None


def test_plans_are_built_on_the_gpu_thread_one_length_at_a_time(engine, monkeypatch, caplog):
    monkeypatch.setattr(attention, "builds_plans", lambda _backend, _device: True)
    threads, built = set(), []
    real_build = attention.build_plan

    def build_and_note(backend, tokens, *args):
        threads.add(threading.get_ident())
        built.append(tokens)
        real_build(backend, tokens, *args)

    monkeypatch.setattr(attention, "build_plan", build_and_note)
    ran_on = []
    hook = engine.pipeline.transformer.register_forward_pre_hook(
        lambda _module, _args: ran_on.append(threading.get_ident()))
    try:
        with caplog.at_level(logging.INFO, logger="zimage.engine"):
            engine.build_attention_plans(SIZES[:1]).join(timeout=60)
            engine.generate(GenerationRequest("fox", width=128, height=128, steps=1, seed=1))
    finally:
        hook.remove()
    assert built == attention.dit_sequence_lengths(engine.pipeline, SIZES[:1], MAX_SEQUENCE_LENGTH)
    assert threads == set(ran_on) and len(threads) == 1
    assert f"attention plans built lengths={len(built)}" in caplog.text


def test_a_stopping_engine_stops_building(engine, monkeypatch):
    monkeypatch.setattr(attention, "builds_plans", lambda _backend, _device: True)
    engine.stop_accepting()
    built = []
    monkeypatch.setattr(attention, "build_plan", lambda *args: built.append(args))
    engine.build_attention_plans(SIZES).join(timeout=60)
    assert built == []


def test_flash_4_is_not_a_candidate_off_cuda_and_a_flash_request_falls_back_naming_why(loaded_tiny, caplog):
    transformer = loaded_tiny.pipe.transformer
    assert flash4.unusable_reason(torch.device("cpu")) == "needs CUDA"
    try:
        with caplog.at_level(logging.WARNING, logger="zimage.attention"):
            assert attention.apply_backend(transformer, "flash", torch.device("cpu")) == attention.SDPA
    finally:
        transformer.set_attention_backend(attention.SDPA)
    assert "attention=flash is not usable or not faster here" in caplog.text
    assert f"{flash4.BACKEND}: needs CUDA" in caplog.text


class StandInFlash4:
    """FlashAttention's contract on (batch, tokens, heads, head_dim) tensors, with PyTorch's SDPA inside: stands in
    for the FA4 wheel, which needs a Hopper GPU, and counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, query, key, value, softmax_scale=None, causal=False):
        self.calls += 1
        out = torch.nn.functional.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale=softmax_scale, is_causal=causal)
        return out.transpose(1, 2), None


@pytest.fixture
def stand_in_flash_4(monkeypatch):
    kernel = StandInFlash4()
    package, cute = types.ModuleType("flash_attn"), types.ModuleType("flash_attn.cute")
    cute.flash_attn_func = kernel
    package.cute = cute
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    return kernel


def _dit_inputs(transformer):
    generator = torch.Generator().manual_seed(0)
    latents = [torch.randn(transformer.config.in_channels, 1, 16, 16, generator=generator)]
    caption = [torch.randn(7, transformer.config.cap_feat_dim, generator=generator)]
    return latents, torch.tensor([0.5]), caption


def test_the_dit_on_diffusers_flash_4_backend_runs_the_local_kernel_and_matches_sdpa(loaded_tiny, stand_in_flash_4):
    transformer = loaded_tiny.pipe.transformer
    inputs = _dit_inputs(transformer)
    attention_layers = sum(1 for name, _ in transformer.named_modules() if name.endswith(".attention"))
    with torch.no_grad():
        expected = transformer(*inputs, return_dict=False)[0][0]
        flash4.install()
        flash4.point_processors_at_backend(transformer)
        try:
            got = transformer(*inputs, return_dict=False)[0][0]
        finally:
            transformer.set_attention_backend(attention.SDPA)
    assert stand_in_flash_4.calls == attention_layers
    torch.testing.assert_close(got, expected)


def test_the_flash_4_op_traces_as_one_opaque_op_in_a_full_graph(stand_in_flash_4):
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    flash4.install()
    query, key, value = (torch.randn(1, 64, 2, 16) for _ in range(3))
    attend = torch.compile(lambda q, k, v: dispatch_attention_fn(q, k, v, backend=flash4.BACKEND),
                           fullgraph=True, backend="eager")
    torch.testing.assert_close(attend(query, key, value),
                               dispatch_attention_fn(query, key, value, backend=attention.SDPA))
    assert stand_in_flash_4.calls == 1  # Dynamo traced the op on fake tensors; only the compiled call ran the kernel


@pytest.mark.skipif(not torch.cuda.is_available() or flash4.unusable_reason(torch.device("cuda")) is not None,
                    reason="needs FA4 on a Hopper or newer GPU")
def test_flash_4_on_the_gpu_matches_sdpa_at_the_dits_shape():
    flash4.install()
    runs = {name: attention.time_backend(name, 30, 128, torch.device("cuda"), torch.bfloat16)
            for name in (attention.SDPA, flash4.BACKEND)}
    difference = attention.relative_difference(runs[flash4.BACKEND][1], runs[attention.SDPA][1])
    print(f"flash4 {runs[flash4.BACKEND][0]:.3f} ms, sdpa {runs[attention.SDPA][0]:.3f} ms, difference {difference:.4f}")
    assert difference < attention.MATCH_TOLERANCE / 4
