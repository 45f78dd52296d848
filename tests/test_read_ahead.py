import logging

import torch
from safetensors.torch import load_file

from pipeline.layouts import DIT_FILE, TEXT_ENCODER_FILE, VAE_FILE, LayoutKind
from pipeline.loader import load_pipeline
from pipeline.read_ahead import ReadAhead
from pipeline.random_model import build_components

CPU = torch.device("cpu")


def test_each_file_is_read_onto_its_device_and_handed_over_once(tiny_models):
    root = tiny_models[LayoutKind.SINGLE_FILE]
    read_ahead = ReadAhead.of_model(root, CPU, CPU)
    for name in (DIT_FILE, TEXT_ENCODER_FILE, VAE_FILE):
        tensors = read_ahead.take(root / name)
        expected = load_file(root / name)
        assert tensors.keys() == expected.keys()
        for key, tensor in expected.items():
            assert torch.equal(tensors[key], tensor), key
        assert read_ahead.take(root / name) is None
        assert read_ahead.seconds[root / name] >= 0


def test_nothing_is_read_ahead_without_the_single_files(tiny_models, tmp_path):
    assert ReadAhead.of_model(tiny_models[LayoutKind.DIFFUSERS], CPU, CPU) is None
    assert ReadAhead.of_model(tmp_path / "none", CPU, CPU) is None


def test_the_loader_builds_the_same_model_from_tensors_read_ahead(tiny_models, caplog):
    root = tiny_models[LayoutKind.SINGLE_FILE]
    with caplog.at_level(logging.INFO, logger="zimage.loader"):
        loaded = load_pipeline(root, CPU, read_ahead=ReadAhead.of_model(root, CPU, CPU))
    assert caplog.text.count("read_ahead_s=") == 3
    built = build_components()
    for name in ("transformer", "text_encoder", "vae"):
        ours = getattr(loaded.pipe, name).state_dict()
        theirs = built[name].state_dict()
        assert ours.keys() == theirs.keys()
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key].float(), rtol=0, atol=0, msg=f"{name}.{key}")


def test_a_file_whose_read_failed_is_read_by_the_loader_itself(tiny_models, caplog):
    root = tiny_models[LayoutKind.SINGLE_FILE]
    # safetensors refuses the meta device: the VAE's read fails in the background thread.
    read_ahead = ReadAhead({root / DIT_FILE: CPU, root / TEXT_ENCODER_FILE: CPU, root / VAE_FILE: torch.device("meta")})
    with caplog.at_level(logging.INFO, logger="zimage.loader"):
        loaded = load_pipeline(root, CPU, read_ahead=read_ahead)
    vae_line = next(line for line in caplog.text.splitlines() if "component=vae" in line)
    assert caplog.text.count("read_ahead_s=") == 2 and "read_ahead_s=" not in vae_line
    built = build_components()["vae"].state_dict()
    for key, tensor in loaded.pipe.vae.state_dict().items():
        torch.testing.assert_close(tensor, built[key].float(), rtol=0, atol=0, msg=key)
