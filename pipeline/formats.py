"""Key formats of the real single files, and the conversions between them and diffusers/transformers modules.

Loading the DiT and the VAE uses diffusers' own single-file converters (`from_single_file`); the inverse
conversions here exist so the project can *write* files in the real formats (the tiny model in layout A, and the
full-size random weights the GPU benchmark loads), and so the tests prove that the real loader path reads them.
The text encoder has no single-file loader in transformers, so its (small) conversion lives here in both directions.
"""

from __future__ import annotations

import re

import torch

# Keys of the real z_image_turbo_bf16.safetensors carry no prefix; diffusers strips "model.diffusion_model." too.
_DIT_RENAMES = (
    ("all_x_embedder.2-1.", "x_embedder."),
    ("all_final_layer.2-1.", "final_layer."),
    (".attention.to_out.0.", ".attention.out."),
    (".attention.norm_q.", ".attention.q_norm."),
    (".attention.norm_k.", ".attention.k_norm."),
)
_QKV = re.compile(r"^(?P<block>.+\.attention)\.to_q\.weight$")

QWEN_PREFIX = "model."
QWEN_TIED_HEAD = "lm_head.weight"


def transformer_to_comfy(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ZImageTransformer2DModel state dict in the ComfyUI layout of z_image_turbo_bf16.safetensors."""
    remaining = dict(state_dict)
    converted: dict[str, torch.Tensor] = {}
    for key in list(remaining):
        match = _QKV.match(key)
        if match:
            block = match["block"]
            parts = [remaining.pop(f"{block}.to_{name}.weight") for name in ("q", "k", "v")]
            converted[f"{block}.qkv.weight"] = torch.cat(parts, dim=0)
    for key, tensor in remaining.items():
        for diffusers_name, comfy_name in _DIT_RENAMES:
            key = key.replace(diffusers_name, comfy_name)
        converted[key] = tensor
    return converted


def text_encoder_to_comfy(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers Qwen3Model state dict with the `model.` keys of qwen_3_4b.safetensors."""
    return {QWEN_PREFIX + key: tensor for key, tensor in state_dict.items()}


def text_encoder_from_comfy(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """qwen_3_4b.safetensors keys → Qwen3Model keys. The LM head, if a file carries one, is tied and unused here."""
    return {
        key.removeprefix(QWEN_PREFIX): tensor for key, tensor in checkpoint.items() if key != QWEN_TIED_HEAD
    }


def vae_to_ldm(state_dict: dict[str, torch.Tensor], num_up_blocks: int) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in the LDM layout of the Flux ae.safetensors (attention as 1×1 convs)."""
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", new)
        new = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", new)
        up = re.match(r"decoder\.up_blocks\.(\d+)\.(.*)$", new)
        if up:
            # diffusers counts decoder blocks from the bottleneck up; LDM counts them from the image down.
            rest = up[2].replace("resnets.", "block.").replace("upsamplers.0.", "upsample.")
            new = f"decoder.up.{num_up_blocks - 1 - int(up[1])}.{rest}"
        new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
        if ".mid_block.attentions.0." in new:
            new = new.replace(".mid_block.attentions.0.", ".mid.attn_1.")
            new = new.replace("group_norm.", "norm.").replace("to_out.0.", "proj_out.")
            new = re.sub(r"\.to_([qkv])\.", r".\1.", new)
            if tensor.ndim == 2:
                tensor = tensor[:, :, None, None]
        converted[new] = tensor
    return converted
