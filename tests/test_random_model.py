import pytest

from pipeline.layouts import LayoutKind, find_weights
from pipeline.manifest import MANIFEST_NAME
from pipeline.random_model import (
    FULL_SIZE,
    TINY,
    build_components,
    build_tokenizer,
    ensure_demo_model,
    write_random_model,
)


def test_demo_model_is_built_once_then_reused(tmp_path):
    demo_dir = tmp_path / "demo"
    ensure_demo_model(demo_dir)
    assert find_weights(demo_dir).kind is LayoutKind.SINGLE_FILE
    stamp = (demo_dir / MANIFEST_NAME).stat().st_mtime_ns
    ensure_demo_model(demo_dir)
    assert (demo_dir / MANIFEST_NAME).stat().st_mtime_ns == stamp


def test_half_built_demo_model_is_rebuilt(tmp_path):
    demo_dir = tmp_path / "demo"
    demo_dir.mkdir()
    (demo_dir / "ae.safetensors").write_bytes(b"partial")
    ensure_demo_model(demo_dir)
    assert find_weights(demo_dir).kind is LayoutKind.SINGLE_FILE


def test_make_tiny_model_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "file").write_text("keep")
    with pytest.raises(FileExistsError):
        write_random_model(tmp_path, LayoutKind.DIFFUSERS)


def test_building_is_deterministic():
    first, second = build_components(), build_components()
    for name in ("transformer", "text_encoder", "vae"):
        a, b = first[name].state_dict(), second[name].state_dict()
        assert all((a[key] == b[key]).all() for key in a), name


def test_tokenizer_has_the_qwen_chat_format_and_reads_chinese():
    tokenizer = build_tokenizer()
    text = tokenizer.apply_chat_template([{"role": "user", "content": "雪地里的猫"}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=True)
    assert text == "<|im_start|>user\n雪地里的猫<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text and tokenizer.unk_token_id not in ids


def test_full_size_spec_is_the_published_architecture():
    assert FULL_SIZE.transformer["dim"] == 3840 and FULL_SIZE.transformer["n_layers"] == 30
    assert FULL_SIZE.transformer["cap_feat_dim"] == FULL_SIZE.text_encoder["hidden_size"] == 2560
    assert FULL_SIZE.vae["block_out_channels"] == (128, 256, 512, 512)
    assert TINY.transformer["cap_feat_dim"] == TINY.text_encoder["hidden_size"]
