"""Choosing a diffusers attention backend for the DiT, falling back to PyTorch SDPA when one is unusable."""

from __future__ import annotations

import logging

log = logging.getLogger("zimage.attention")

SDPA = "native"  # diffusers' name for torch.nn.functional.scaled_dot_product_attention

# Our flag values → diffusers backend names, best first. FA3 (Hopper) is tried before FA2 where either is installed.
_CANDIDATES = {
    "sdpa": [SDPA],
    "flash": ["_flash_3", "flash", SDPA],
    "xformers": ["xformers", SDPA],
}


def candidates(choice: str, device_type: str) -> list[str]:
    if choice == "auto":
        return ["_flash_3", "flash", SDPA] if device_type == "cuda" else [SDPA]
    return _CANDIDATES[choice]


def apply_backend(transformer, choice: str, device_type: str) -> str:
    """Set the first backend of `choice` that diffusers accepts here; returns its diffusers name."""
    reasons = []
    for name in candidates(choice, device_type):
        try:
            transformer.set_attention_backend(name)
        except (RuntimeError, ValueError, ImportError) as error:
            reasons.append(f"{name}: {error}")
            continue
        if name == SDPA and choice not in ("auto", "sdpa"):
            log.warning("attention=%s is not usable here (%s); falling back to sdpa", choice, "; ".join(reasons))
        return name
    raise RuntimeError(f"no attention backend is usable: {'; '.join(reasons)}")


def fall_back_to_sdpa(transformer, failed: str, error: BaseException) -> str:
    """After a backend failed its first real call: one warning line, then SDPA."""
    log.warning("attention backend=%s failed its first call (%s: %s); falling back to sdpa",
                failed, type(error).__name__, str(error).strip().splitlines()[0] if str(error).strip() else "")
    transformer.set_attention_backend(SDPA)
    return SDPA
