"""The writers of the real key formats are checked against diffusers' own readers of those formats."""

import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_vae_checkpoint,
    convert_z_image_transformer_checkpoint_to_diffusers,
)
from safetensors import safe_open

from pipeline.formats import text_encoder_from_comfy, text_encoder_to_comfy, transformer_to_comfy, vae_to_ldm
from pipeline.layouts import DIT_FILE, TEXT_ENCODER_FILE, VAE_FILE, LayoutKind
from pipeline.random_model import build_components


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_transformer_round_trips_through_the_diffusers_converter():
    state = build_components()["transformer"].state_dict()
    comfy = transformer_to_comfy(state)
    assert any(key.endswith(".attention.qkv.weight") for key in comfy)
    assert not any(".to_q." in key or "all_x_embedder" in key for key in comfy)
    assert _same(convert_z_image_transformer_checkpoint_to_diffusers(dict(comfy)), state)


def test_vae_round_trips_through_the_diffusers_ldm_converter():
    vae = build_components()["vae"]
    state = vae.state_dict()
    ldm = vae_to_ldm(state, num_up_blocks=len(vae.config.up_block_types))
    assert ldm["encoder.mid.attn_1.q.weight"].ndim == 4  # Flux's ae keeps attention as 1×1 convolutions
    assert "decoder.up.0.block.0.conv1.weight" in ldm and "quant_conv.weight" not in ldm
    assert _same(convert_ldm_vae_checkpoint(ldm, dict(vae.config)), state)


def test_text_encoder_keys_round_trip():
    state = build_components()["text_encoder"].state_dict()
    comfy = text_encoder_to_comfy(state)
    assert all(key.startswith("model.") for key in comfy)
    assert _same(text_encoder_from_comfy({**comfy, "lm_head.weight": torch.zeros(1)}), state)


def test_tiny_single_files_use_the_real_key_formats(tiny_models):
    root = tiny_models[LayoutKind.SINGLE_FILE]
    keys = {name: set(safe_open(root / name, "pt").keys()) for name in (DIT_FILE, TEXT_ENCODER_FILE, VAE_FILE)}
    assert {"x_pad_token", "cap_pad_token", "x_embedder.weight", "final_layer.linear.weight",
            "layers.0.attention.qkv.weight", "layers.0.attention.out.weight",
            "layers.0.attention.q_norm.weight"} <= keys[DIT_FILE]
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.q_norm.weight"} \
        <= keys[TEXT_ENCODER_FILE]
    assert {"encoder.down.0.block.0.conv1.weight", "decoder.mid.attn_1.proj_out.weight",
            "decoder.up.3.upsample.conv.weight", "encoder.norm_out.weight"} <= keys[VAE_FILE]
