"""LoRA adapters: the folder's files read in every key format and checked, and the engine's slots giving each request
its own adapters, on the tiny model and tiny random adapters."""

from __future__ import annotations

import logging
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from pipeline import engine as engine_module
from pipeline.adapters import AdapterLibrary, AdapterSlots, linear_layers, lora_view
from pipeline.random_adapters import KeyFormat, adapter_state_dict, random_adapter, write_random_adapter
from pipeline.random_model import TINY
from pipeline.requests import GenerationRequest, RequestError
from pipeline.storage import read_parameters
from tests.helpers import engine_with

STRONG = 0.2  # adapter weights large enough to change the tiny model's image plainly


def _request(prompt="a red fox in the snow", **fields) -> GenerationRequest:
    return GenerationRequest(prompt, width=256, height=256, steps=2, seed=7, **fields)


def _pixels(result) -> np.ndarray:
    return np.asarray(result.image)


@pytest.fixture
def library_of(loaded_tiny):
    def make(folder, max_rank=16):
        library = AdapterLibrary(folder, linear_layers(loaded_tiny.pipe.transformer), max_rank, torch.float32,
                                 pin=False)
        library.refresh()
        return library

    return make


def test_every_key_format_reads_as_the_same_adapter(tmp_path, library_of):
    for key_format in KeyFormat:
        write_random_adapter(tmp_path / f"{key_format.value}.safetensors", key_format, rank=4, seed=1, alpha=2.0)
    library = library_of(tmp_path)
    assert [info.name for info in library.infos()] == sorted(key_format.value for key_format in KeyFormat)
    layers = random_adapter(TINY, rank=4, seed=1, alpha=2.0)
    for key_format in KeyFormat:
        adapter = library.get(key_format.value)
        assert adapter.info.rank == 4 and adapter.info.layers == len(layers) == 28
        assert re.fullmatch(r"[0-9a-f]{12}", adapter.info.short_hash)
        for name, (down, up, alpha) in layers.items():
            wanted = up.float() @ down.float() * (alpha / 4)
            got_down, got_up = adapter.weights[name]
            torch.testing.assert_close(got_up @ got_down, wanted, rtol=1e-2, atol=1e-6, msg=key_format.value)


def _write(folder, name, state):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / f"{name}.safetensors")


def test_a_file_that_does_not_fit_is_left_out_with_a_line_naming_it_and_why(tmp_path, library_of, caplog):
    good = adapter_state_dict(random_adapter(TINY, rank=4, seed=1), KeyFormat.DIFFUSERS)
    write_random_adapter(tmp_path / "good.safetensors", KeyFormat.KOHYA, rank=4, seed=1)
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    _write(tmp_path, "foreign", {"text_model.layers.0.q_proj.weight": torch.zeros(4, 4)})
    _write(tmp_path, "unknown-layer", {**good, "transformer.layers.9.attention.to_q.lora_A.weight": torch.zeros(4, 64),
                                       "transformer.layers.9.attention.to_q.lora_B.weight": torch.zeros(64, 4)})
    wrong = dict(good)
    wrong["transformer.layers.0.attention.to_q.lora_A.weight"] = torch.zeros(4, 65)
    _write(tmp_path, "wrong-shape", wrong)
    _write(tmp_path, "too-big", adapter_state_dict(random_adapter(TINY, rank=32, seed=1), KeyFormat.DIFFUSERS))
    nan = dict(good)
    nan["transformer.layers.0.attention.to_q.lora_B.weight"] = torch.full((64, 4), float("nan"))
    _write(tmp_path, "nan", nan)
    _write(tmp_path, "dora", {**good, "transformer.layers.0.attention.to_q.lora_magnitude_vector.dora_scale":
                              torch.ones(64)})
    _write(tmp_path, "lokr", {"diffusion_model.layers.0.attention.to_q.lokr_w1": torch.ones(2, 2),
                              "diffusion_model.layers.0.attention.to_q.lokr_w2": torch.ones(32, 32)})
    (tmp_path / "notes.txt").write_text("not an adapter")
    caplog.set_level(logging.INFO, logger="zimage.adapters")
    library = library_of(tmp_path)
    assert [info.name for info in library.infos()] == ["good"]
    reasons = {name: reason for name, reason in re.findall(r"adapter left out file=\S+/([\w-]+)\.safetensors "
                                                           r"reason=(.*)", caplog.text)}
    assert sorted(reasons) == ["corrupt", "dora", "foreign", "lokr", "nan", "too-big", "unknown-layer",
                               "wrong-shape"]
    assert "not a readable safetensors file" in reasons["corrupt"]
    assert "'layers.9.attention.to_q'" in reasons["unknown-layer"] and "no linear layer" in reasons["unknown-layer"]
    assert "(4, 65)" in reasons["wrong-shape"] and "(rank, 64)" in reasons["wrong-shape"]
    assert "rank 32 is over" in reasons["too-big"] and "--lora-max-rank of 16" in reasons["too-big"]
    assert "NaN" in reasons["nan"] and "DoRA" in reasons["dora"] and "LoKr" in reasons["lokr"]
    assert "not a LoRA layer's weight" in reasons["foreign"] or "not a LoRA adapter" in reasons["foreign"]
    # Each bad file is told once: looked at again unchanged, it is not read or logged again.
    caplog.clear()
    assert library.refresh() is False and "left out" not in caplog.text


def test_the_folder_is_followed_added_changed_and_removed_files(tmp_path, library_of):
    write_random_adapter(tmp_path / "a.safetensors", KeyFormat.DIFFUSERS, rank=4, seed=1)
    library = library_of(tmp_path)
    first = library.get("a")
    assert library.refresh() is False and library.get("a") is first
    write_random_adapter(tmp_path / "b.safetensors", KeyFormat.KOHYA, rank=8, seed=2)
    assert library.refresh() is True and [info.name for info in library.infos()] == ["a", "b"]
    write_random_adapter(tmp_path / "a.safetensors", KeyFormat.DIFFUSERS, rank=2, seed=3)
    os.utime(tmp_path / "a.safetensors", ns=(1, 1))  # a new modification time, whatever the clock's resolution
    assert library.refresh() is True and library.get("a").info.rank == 2
    (tmp_path / "b.safetensors").unlink()
    assert library.refresh() is True and [info.name for info in library.infos()] == ["a"]


def test_the_slots_view_leaves_the_transformer_as_it_was(loaded_tiny):
    transformer = loaded_tiny.pipe.transformer
    before = {name: type(module) for name, module in transformer.named_modules()}
    trainable = {name: parameter.requires_grad for name, parameter in transformer.named_parameters()}
    view = lora_view(transformer, 8)
    assert {name: type(module) for name, module in transformer.named_modules()} == before
    assert {name: parameter.requires_grad for name, parameter in transformer.named_parameters()} == trainable
    # The view shares every weight: no second copy of the DiT.
    base = view.layers[0].attention.to_q.base_layer
    assert base is transformer.layers[0].attention.to_q
    slots = AdapterSlots(view, 8)
    assert slots.slot_bytes() == 8 * 4 * sum(i + o for i, o in linear_layers(transformer).values())


@pytest.fixture
def adapters_folder(tmp_path):
    folder = tmp_path / "loras"
    write_random_adapter(folder / "a.safetensors", KeyFormat.KOHYA, rank=4, seed=1, std=STRONG)
    write_random_adapter(folder / "b.safetensors", KeyFormat.DIFFUSERS, rank=8, seed=2, std=STRONG)
    return folder


@pytest.fixture
def lora_engine(loaded_tiny, tmp_path, adapters_folder):
    engine = engine_with(loaded_tiny, tmp_path, lora_dir=adapters_folder, lora_max_rank=16)
    engine.warm_up()
    return engine


def test_each_request_gets_its_own_adapters_and_nothing_leaks_into_the_next(lora_engine):
    before = _pixels(lora_engine.generate(_request()))
    with_a = _pixels(lora_engine.generate(_request(loras=[{"name": "a", "scale": 1.0}])))
    assert np.abs(with_a.astype(int) - before).max() > 20  # the adapter changes the image
    at_zero = _pixels(lora_engine.generate(_request(loras=[{"name": "a", "scale": 0}])))
    after = _pixels(lora_engine.generate(_request()))
    assert np.array_equal(at_zero, before) and np.array_equal(after, before)  # bit for bit
    # The same adapter again, after another set was in the slots: the same image.
    lora_engine.generate(_request(loras=[{"name": "b", "scale": -0.5}]))
    again = _pixels(lora_engine.generate(_request(loras=[{"name": "a", "scale": 1.0}])))
    assert np.array_equal(again, with_a)
    # A1111's tag in the prompt asks for the same thing, and is not part of the text the encoder reads.
    tagged = lora_engine.generate(_request("a red fox <lora:a:1> in the snow"))
    assert tagged.request.prompt == "a red fox in the snow" and np.array_equal(_pixels(tagged), with_a)


def test_two_adapters_at_once_equal_diffusers_own_set_adapters(lora_engine, loaded_tiny, adapters_folder):
    from diffusers import ZImagePipeline

    ours = lora_engine.generate(_request(loras=[{"name": "a", "scale": 0.8}, {"name": "b", "scale": -0.5}]))
    pipe = loaded_tiny.pipe
    reference = ZImagePipeline(scheduler=type(pipe.scheduler).from_config(pipe.scheduler.config), vae=pipe.vae,
                               text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                               transformer=lora_view(pipe.transformer, 1))  # a private tree diffusers may change
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(str(adapters_folder / "a.safetensors"), adapter_name="a")
    reference.load_lora_weights(str(adapters_folder / "b.safetensors"), adapter_name="b")
    reference.set_adapters(["a", "b"], [0.8, -0.5])
    theirs = reference(prompt_embeds=lora_engine.encode_prompt(ours.request.prompt)[0], height=256, width=256,
                       num_inference_steps=2, guidance_scale=0.0, generator=torch.Generator().manual_seed(7)).images[0]
    difference = np.abs(_pixels(ours).astype(int) - np.asarray(theirs, dtype=int))
    assert difference.max() <= 2


def test_the_saved_image_records_its_adapters_as_a1111_writes_them(lora_engine):
    from sd_parsers import ParserManager

    result = lora_engine.generate(_request(loras=[{"name": "a", "scale": 0.8}, {"name": "b", "scale": 0}]))
    hashes = {info.name: info.short_hash for info in lora_engine.adapters()}
    parameters = read_parameters(result.path)
    assert parameters["loras"] == [{"name": "a", "scale": 0.8, "hash": hashes["a"]},
                                   {"name": "b", "scale": 0.0, "hash": hashes["b"]}]
    (sampler,) = ParserManager().parse(result.path).samplers
    assert sampler.prompts[0].value == "a red fox in the snow <lora:a:0.8> <lora:b:0>"
    # A1111's own reading of an infotext line (modules/infotext_utils.py, re_param_code).
    with Image.open(result.path) as saved:
        infotext = saved.info["parameters"]
    fields = dict(re.findall(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', infotext.splitlines()[-1]))
    assert fields["Lora hashes"] == f'"a: {hashes["a"]}, b: {hashes["b"]}"'


def test_a_request_naming_what_is_not_served_is_refused_naming_the_field(lora_engine, loaded_tiny, tmp_path,
                                                                        adapters_folder, monkeypatch):
    with pytest.raises(RequestError, match=r"no adapter is named 'nope'; available: a, b") as refused:
        lora_engine.generate(_request(loras=[{"name": "nope"}]))
    assert refused.value.field == "loras"
    monkeypatch.setattr(engine_module, "ADAPTER_RESCAN_S", 0.0)  # the folder looked at on every request
    write_random_adapter(adapters_folder / "c.safetensors", KeyFormat.DIFFUSERS, rank=8, seed=3)
    with pytest.raises(RequestError, match="ranks add up to 20; .* at most 16") as refused:
        lora_engine.generate(_request(loras=[{"name": "a"}, {"name": "b"}, {"name": "c"}]))
    assert refused.value.field == "loras"
    assert lora_engine.served == 0 and not list(lora_engine.output_dir.rglob("*.png"))
    without = engine_with(loaded_tiny, tmp_path / "without")
    with pytest.raises(RequestError, match="serves no LoRA adapters") as refused:
        without.generate(_request(loras=[{"name": "a"}]))
    assert refused.value.field == "loras" and without.adapters() == []


def test_an_adapter_replaced_on_disk_serves_its_new_weights(lora_engine, loaded_tiny, tmp_path, adapters_folder,
                                                           monkeypatch):
    monkeypatch.setattr(engine_module, "ADAPTER_RESCAN_S", 0.0)
    before = _pixels(lora_engine.generate(_request(loras=[{"name": "a"}])))
    write_random_adapter(adapters_folder / "a.safetensors", KeyFormat.KOHYA, rank=4, seed=5, std=STRONG)
    os.utime(adapters_folder / "a.safetensors", ns=(1, 1))  # a new modification time, whatever the clock's resolution
    after = _pixels(lora_engine.generate(_request(loras=[{"name": "a"}])))
    fresh = engine_with(loaded_tiny, tmp_path / "fresh", lora_dir=adapters_folder, lora_max_rank=16)
    assert not np.array_equal(after, before)
    assert np.array_equal(after, _pixels(fresh.generate(_request(loras=[{"name": "a"}]))))
