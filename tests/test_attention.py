import logging
import threading

import torch

from pipeline import attention
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
