import socket

import numpy as np
import pytest
import torch
from diffusers.loaders import single_file_model
from safetensors.torch import load_file, save_file

from pipeline.layouts import DIT_FILE, TEXT_ENCODER_FILE, LayoutKind, WeightsError
from pipeline.loader import DeviceError, _give_each_parameter_its_storage, dtype_for, load_pipeline, resolve_device
from tests.helpers import assert_holds_the_built_weights


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt during the test fails loudly instead of quietly reaching a hub."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _image(loaded, seed=7):
    generator = torch.Generator("cpu").manual_seed(seed)
    return loaded.pipe("a lighthouse 灯塔", height=128, width=128, num_inference_steps=2, guidance_scale=0.0,
                       generator=generator, output_type="np").images[0]


@pytest.mark.parametrize("layout", list(LayoutKind))
def test_each_layout_loads_offline_into_a_working_pipeline(tiny_models, layout, no_network):
    loaded = load_pipeline(tiny_models[layout], torch.device("cpu"), verify=True)
    assert loaded.dtype == torch.float32 and loaded.source.startswith(layout.value)
    image = _image(loaded)
    assert image.shape == (128, 128, 3) and np.isfinite(image).all() and image.std() > 0.01


def test_both_layouts_hold_the_same_model(tiny_models):
    images = [_image(load_pipeline(tiny_models[layout], torch.device("cpu"))) for layout in LayoutKind]
    np.testing.assert_array_equal(*images)


def test_single_file_layout_goes_through_the_diffusers_converter(tiny_models, monkeypatch):
    entry = single_file_model.SINGLE_FILE_LOADABLE_CLASSES["ZImageTransformer2DModel"]
    converter = entry["checkpoint_mapping_fn"]
    seen_keys = []

    def recording_converter(checkpoint, **kwargs):
        seen_keys.extend(checkpoint)
        return converter(checkpoint=checkpoint, **kwargs)

    monkeypatch.setitem(entry, "checkpoint_mapping_fn", recording_converter)
    load_pipeline(tiny_models[LayoutKind.SINGLE_FILE], torch.device("cpu"))
    assert "layers.0.attention.qkv.weight" in seen_keys


def test_loaded_weights_equal_the_built_ones(tiny_models):
    assert_holds_the_built_weights(load_pipeline(tiny_models[LayoutKind.SINGLE_FILE], torch.device("cpu")).pipe)


def test_verify_weights_names_a_damaged_file(tiny_copy):
    root = tiny_copy(LayoutKind.SINGLE_FILE)
    tokenizer = root / "tokenizer" / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace('"a"', '"b"', 1))
    with pytest.raises(WeightsError, match=f"weights verification failed: {tokenizer}: sha256 differs"):
        load_pipeline(root, torch.device("cpu"), verify=True)


def _drop_tensor(path, name):
    tensors = load_file(path)
    del tensors[name]
    save_file(tensors, path)


def test_text_encoder_file_for_another_config_is_refused(tiny_copy):
    root = tiny_copy(LayoutKind.SINGLE_FILE)
    _drop_tensor(root / TEXT_ENCODER_FILE, "model.layers.1.mlp.up_proj.weight")
    with pytest.raises(WeightsError, match=f"{root / TEXT_ENCODER_FILE} does not match the text encoder config"):
        load_pipeline(root, torch.device("cpu"))


def test_dit_file_missing_tensors_is_refused(tiny_copy):
    root = tiny_copy(LayoutKind.SINGLE_FILE)
    _drop_tensor(root / DIT_FILE, "layers.1.feed_forward.w2.weight")
    with pytest.raises(WeightsError, match=f"{root / DIT_FILE} lacks tensors the transformer needs"):
        load_pipeline(root, torch.device("cpu"))


def test_cpu_computes_in_float32_and_cuda_in_bfloat16():
    assert dtype_for(torch.device("cpu")) == torch.float32
    assert dtype_for(torch.device("cuda")) == torch.bfloat16
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(DeviceError, match="--device cuda .* no CUDA GPU"):
        resolve_device("cuda")


def test_parameters_that_are_views_of_one_tensor_get_storage_of_their_own():
    """As diffusers leaves the DiT's q, k and v built from tensors already on their device: three views of the
    file's fused qkv."""
    fused = torch.arange(12.0).reshape(6, 2)
    module = torch.nn.ModuleDict({name: torch.nn.Linear(2, 2, bias=False) for name in "qkv"})
    for name, view in zip("qkv", fused.chunk(3), strict=True):
        module[name].weight = torch.nn.Parameter(view)
    _give_each_parameter_its_storage(module)
    for name, expected in zip("qkv", fused.chunk(3), strict=True):
        weight = module[name].weight
        assert weight.untyped_storage().nbytes() == weight.nbytes and torch.equal(weight, expected)
        assert isinstance(weight, torch.nn.Parameter)
