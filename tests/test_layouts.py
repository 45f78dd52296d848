import json
import os

import pytest

from pipeline.layouts import DIT_FILE, TEXT_ENCODER_FILE, VAE_FILE, LayoutKind, WeightsError, find_weights


def _truncate(path, keep_fraction=0.5):
    with path.open("r+b") as handle:
        handle.truncate(int(path.stat().st_size * keep_fraction))


@pytest.mark.parametrize("layout", list(LayoutKind))
def test_both_layouts_are_detected(tiny_models, layout):
    found = find_weights(tiny_models[layout])
    assert found.kind is layout
    assert all(path.is_file() for path in found.weight_files())


def test_empty_directory_names_both_layouts_and_the_demo(tmp_path):
    with pytest.raises(WeightsError) as caught:
        find_weights(tmp_path)
    message = str(caught.value)
    assert DIT_FILE in message and "model_index.json" in message and "--demo" in message
    assert "\n" not in message


def test_missing_directory_says_what_to_do(tmp_path):
    with pytest.raises(WeightsError, match="does not exist.*--model-dir.*--demo"):
        find_weights(tmp_path / "nowhere")


@pytest.mark.parametrize("name", [DIT_FILE, TEXT_ENCODER_FILE, VAE_FILE, "tokenizer/tokenizer.json",
                                  "vae/config.json"])
def test_missing_single_file_is_named(tiny_copy, name):
    root = tiny_copy(LayoutKind.SINGLE_FILE)
    (root / name).unlink()
    with pytest.raises(WeightsError, match=f"missing file {root / name}"):
        find_weights(root)


@pytest.mark.parametrize("name", [DIT_FILE, TEXT_ENCODER_FILE, VAE_FILE])
def test_truncated_single_file_is_named(tiny_copy, name):
    root = tiny_copy(LayoutKind.SINGLE_FILE)
    _truncate(root / name)
    with pytest.raises(WeightsError, match=f"{root / name} is truncated: .* bytes on disk, .* expected"):
        find_weights(root)


def test_file_cut_inside_its_header_is_named(tiny_copy):
    root = tiny_copy(LayoutKind.SINGLE_FILE)
    _truncate(root / VAE_FILE, keep_fraction=0.0001)
    with pytest.raises(WeightsError, match=str(root / VAE_FILE)):
        find_weights(root)


def test_swapped_files_are_recognised_as_the_wrong_file(tiny_copy):
    root = tiny_copy(LayoutKind.SINGLE_FILE)
    os.replace(root / VAE_FILE, root / DIT_FILE)
    (root / VAE_FILE).write_bytes((root / DIT_FILE).read_bytes())
    with pytest.raises(WeightsError, match=f"{root / DIT_FILE} does not hold a Z-Image DiT"):
        find_weights(root)


def test_non_safetensors_file_is_named(tiny_copy):
    root = tiny_copy(LayoutKind.SINGLE_FILE)
    (root / TEXT_ENCODER_FILE).write_bytes(b"<html>404 Not Found</html>" * 10)
    with pytest.raises(WeightsError, match=f"{root / TEXT_ENCODER_FILE} is not a safetensors file"):
        find_weights(root)


def test_truncated_diffusers_weights_are_named(tiny_copy):
    root = tiny_copy(LayoutKind.DIFFUSERS)
    shard = root / "vae" / "diffusion_pytorch_model.safetensors"
    _truncate(shard)
    with pytest.raises(WeightsError, match=f"{shard} is truncated"):
        find_weights(root)


def test_missing_diffusers_component_is_named(tiny_copy):
    root = tiny_copy(LayoutKind.DIFFUSERS)
    (root / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="missing file .*text_encoder/model.safetensors"):
        find_weights(root)


def test_sharded_diffusers_weights_check_every_shard(tiny_copy):
    root = tiny_copy(LayoutKind.DIFFUSERS)
    single = root / "transformer" / "diffusion_pytorch_model.safetensors"
    shard_name = "diffusion_pytorch_model-00001-of-00002.safetensors"
    single.rename(root / "transformer" / shard_name)
    index = {"metadata": {}, "weight_map": {"a": shard_name, "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}
    (root / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="missing file .*00002-of-00002.safetensors .*a shard listed"):
        find_weights(root)


def test_damaged_config_json_is_named(tiny_copy):
    root = tiny_copy(LayoutKind.SINGLE_FILE)
    (root / "transformer" / "config.json").write_text('{"dim": 64,')
    with pytest.raises(WeightsError, match="transformer/config.json is not valid JSON"):
        find_weights(root)
