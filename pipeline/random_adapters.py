"""Random-weight LoRA adapters for the random models of pipeline.random_model, in each key format people share
adapters for this model in (for tests, and for measuring the adapters' cost on a GPU without real ones)."""

from __future__ import annotations

import enum
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.random_model import FULL_SIZE, TINY, ModelSpec

# The projections trainers adapt (ai-toolkit's and musubi-tuner's defaults): attention and feed-forward, in every
# block of the DiT, the refiners' too.
_PROJECTIONS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "feed_forward.w1",
                "feed_forward.w2", "feed_forward.w3")


class KeyFormat(enum.Enum):
    DIFFUSERS = "diffusers"  # transformer.<module>.lora_A.weight, lora_B (diffusers' save_lora_weights)
    PEFT = "peft"  # diffusion_model.<module>.lora_A.default.weight (a PEFT model's state dict, ComfyUI-prefixed)
    COMFYUI = "comfyui"  # diffusion_model.<module>.lora_down.weight, lora_up, alpha
    KOHYA = "kohya"  # lora_unet_<module with _>.lora_down.weight, lora_up, alpha (kohya's sd-scripts, musubi)


def adapted_layers(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """The projections of `spec`'s DiT an adapter changes: name → (in_features, out_features)."""
    dim = spec.transformer["dim"]
    hidden = int(dim / 3 * 8)  # ZImageTransformerBlock's feed-forward width
    shapes = {"attention.to_q": (dim, dim), "attention.to_k": (dim, dim), "attention.to_v": (dim, dim),
              "attention.to_out.0": (dim, dim), "feed_forward.w1": (dim, hidden), "feed_forward.w2": (hidden, dim),
              "feed_forward.w3": (dim, hidden)}
    blocks = ([f"layers.{index}" for index in range(spec.transformer["n_layers"])]
              + [f"{refiner}.{index}" for refiner in ("noise_refiner", "context_refiner")
                 for index in range(spec.transformer["n_refiner_layers"])])
    return {f"{block}.{projection}": shapes[projection] for block in blocks for projection in _PROJECTIONS}


def random_adapter(spec: ModelSpec, rank: int, seed: int, alpha: float | None = None,
                   std: float = 0.05) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """module → (A, B, alpha) of a random adapter of `rank` (alpha: `rank` unless given, so a scale of 1)."""
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for name, (in_features, out_features) in adapted_layers(spec).items():
        down = torch.randn(rank, in_features, generator=generator) * std
        up = torch.randn(out_features, rank, generator=generator) * std
        layers[name] = (down.to(torch.bfloat16), up.to(torch.bfloat16), float(rank if alpha is None else alpha))
    return layers


def adapter_state_dict(layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
                       key_format: KeyFormat) -> dict[str, torch.Tensor]:
    """`layers` keyed as `key_format` writes them. Formats without alpha get it folded into B."""
    state = {}
    for name, (down, up, alpha) in layers.items():
        rank = down.shape[0]
        if key_format is KeyFormat.DIFFUSERS:
            state[f"transformer.{name}.lora_A.weight"] = down
            state[f"transformer.{name}.lora_B.weight"] = (up.float() * (alpha / rank)).to(up.dtype)
        elif key_format is KeyFormat.PEFT:
            state[f"diffusion_model.{name}.lora_A.default.weight"] = down
            state[f"diffusion_model.{name}.lora_B.default.weight"] = (up.float() * (alpha / rank)).to(up.dtype)
        else:
            prefix = (f"diffusion_model.{name}" if key_format is KeyFormat.COMFYUI
                      else "lora_unet_" + re.sub(r"[.]", "_", name))
            state[f"{prefix}.lora_down.weight"] = down
            state[f"{prefix}.lora_up.weight"] = up
            state[f"{prefix}.alpha"] = torch.tensor(alpha)
    return state


def write_random_adapter(path: Path, key_format: KeyFormat, rank: int, seed: int, full_size: bool = False,
                         alpha: float | None = None, std: float = 0.05) -> Path:
    """A random adapter of `rank` for the tiny model (or the full-size one) written to `path` in `key_format`."""
    layers = random_adapter(FULL_SIZE if full_size else TINY, rank, seed, alpha, std)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(layers, key_format), path)
    return path
