import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.layouts import DIT_FILE, TEXT_ENCODER_FILE, VAE_FILE, LayoutKind
from pipeline.loader import load_pipeline
from pipeline.read_ahead import ReadAhead
from tests.helpers import assert_holds_the_built_weights, wait_until

CPU = torch.device("cpu")


def test_each_file_is_read_onto_its_device_and_handed_over_once(tiny_models):
    root = tiny_models[LayoutKind.SINGLE_FILE]
    read_ahead = ReadAhead.of_model(root, CPU)
    for name in (DIT_FILE, TEXT_ENCODER_FILE, VAE_FILE):
        tensors = read_ahead.take(root / name)
        expected = load_file(root / name)
        assert tensors.keys() == expected.keys()
        for key, tensor in expected.items():
            assert torch.equal(tensors[key], tensor), key
        assert read_ahead.take(root / name) is None
        assert read_ahead.seconds[root / name] >= 0


def test_nothing_is_read_ahead_without_the_single_files(tiny_models, tmp_path):
    assert ReadAhead.of_model(tiny_models[LayoutKind.DIFFUSERS], CPU) is None
    assert ReadAhead.of_model(tmp_path / "none", CPU) is None


def test_the_loader_builds_the_same_model_from_tensors_read_ahead(tiny_models, caplog):
    root = tiny_models[LayoutKind.SINGLE_FILE]
    with caplog.at_level(logging.INFO, logger="zimage.loader"):
        loaded = load_pipeline(root, CPU, read_ahead=ReadAhead.of_model(root, CPU))
    assert caplog.text.count("read_ahead_s=") == 3
    assert_holds_the_built_weights(loaded.pipe)


def test_a_file_whose_read_failed_is_read_by_the_loader_itself(tiny_models, caplog):
    root = tiny_models[LayoutKind.SINGLE_FILE]
    # safetensors refuses the meta device: the VAE's read fails in the background thread.
    read_ahead = ReadAhead({root / DIT_FILE: CPU, root / TEXT_ENCODER_FILE: CPU, root / VAE_FILE: torch.device("meta")})
    with caplog.at_level(logging.INFO, logger="zimage.loader"):
        loaded = load_pipeline(root, CPU, read_ahead=read_ahead)
    vae_line = next(line for line in caplog.text.splitlines() if "component=vae" in line)
    assert caplog.text.count("read_ahead_s=") == 2 and "read_ahead_s=" not in vae_line
    assert_holds_the_built_weights(loaded.pipe, ["vae"])


def test_a_build_from_tensors_read_ahead_that_fails_reads_the_file_again(tiny_models, tiny_copy, caplog):
    """The tensors were read from a damaged DiT file, which was then put right before loading: building from them
    fails, and the loader builds from the file instead of failing the start."""
    root = tiny_copy(LayoutKind.SINGLE_FILE)
    damaged = load_file(root / DIT_FILE)
    del damaged["layers.1.feed_forward.w2.weight"]
    save_file(damaged, root / DIT_FILE)
    read_ahead = ReadAhead.of_model(root, CPU)
    wait_until(lambda: root / DIT_FILE in read_ahead.seconds, 60, "the damaged file read")
    shutil.copyfile(tiny_models[LayoutKind.SINGLE_FILE] / DIT_FILE, root / DIT_FILE)
    with caplog.at_level(logging.INFO, logger="zimage.loader"):
        loaded = load_pipeline(root, CPU, read_ahead=read_ahead)
    assert f"building from the tensors read ahead from {root / DIT_FILE} failed" in caplog.text
    transformer_line = next(line for line in caplog.text.splitlines() if "loaded component=transformer" in line)
    assert "read_ahead_s=" not in transformer_line
    assert_holds_the_built_weights(loaded.pipe, ["transformer"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_the_gpu_the_model_built_from_tensors_read_ahead_is_the_files(tiny_models):
    """Built on the GPU from tensors already there (no copy), every parameter equal to the file's build, and each in
    storage of its own, as a copy to the GPU leaves them (diffusers splits the file's fused qkv into views)."""
    root, cuda = tiny_models[LayoutKind.SINGLE_FILE], torch.device("cuda")
    ahead = load_pipeline(root, cuda, read_ahead=ReadAhead.of_model(root, cuda)).pipe
    from_files = load_pipeline(root, cuda).pipe
    for name in ("transformer", "text_encoder", "vae"):
        theirs = getattr(from_files, name).state_dict()
        for key, parameter in getattr(ahead, name).named_parameters():
            assert parameter.device.type == "cuda" and parameter.dtype == torch.bfloat16, key
            assert parameter.untyped_storage().nbytes() == parameter.nbytes, key
            assert torch.equal(parameter, theirs[key]), key
