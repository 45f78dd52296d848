"""LoRA adapters: the folder they come from (AdapterLibrary), and the slots a request's adapters are written into
(AdapterSlots), so that each request picks its own adapters and strengths with nothing recompiled.

The slots are one PEFT LoRA adapter of a fixed total rank on every linear layer of the DiT, injected into a view of
the transformer that shares every weight with it (lora_view): requests without adapters run the transformer as it
always was, requests with adapters run the view. A request's adapters are packed side by side into the slots, each
one's strength folded into its rows of A: B·(s₁A₁ ⊕ s₂A₂)·x = s₁B₁A₁x + s₂B₂A₂x, what diffusers' set_adapters
computes. Packing copies values into tensors that exist from the start, so a compiled graph never sees a new
shape, a new module or a new Python number: switching adapters recompiles nothing (diffusers' enable_lora_hotswap
keeps one adapter set hot-swappable, not several per request at strengths of their own)."""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.engine_types import AdapterInfo

log = logging.getLogger("zimage.adapters")

SLOT_ADAPTER = "request"  # the name of the one PEFT adapter that holds a request's adapters
SUFFIX = ".safetensors"
SHORT_HASH_CHARS = 12  # A1111's "Lora hashes" field: the first 12 hex digits of the file's AutoV3 hash
_A, _B = ".lora_A.weight", ".lora_B.weight"
_PREFIX = "transformer."


class AdapterProblem(ValueError):
    """Why a file in the adapter folder is left out; the message is for the operator's log."""


@dataclass(frozen=True, eq=False)
class Adapter:
    info: AdapterInfo
    # module name (as the transformer names it) → (A: rank × in, B: out × rank), in the DiT's dtype, in CPU memory
    # (pinned when the DiT is on a GPU: the copy into the slots is then asynchronous).
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(repr=False)


def linear_layers(transformer: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Every linear layer of the DiT, by name: (in_features, out_features). The layers the slots cover."""
    return {name: (module.in_features, module.out_features) for name, module in transformer.named_modules()
            if isinstance(module, torch.nn.Linear)}


def short_hash(path: Path) -> str:
    """A1111's AutoV3 hash of a safetensors file (sha256 of everything after its header), cut to 12 digits: what
    its "Lora hashes" field carries and what sites that host adapters index them by."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        header_bytes = struct.unpack("<Q", file.read(8))[0]
        file.seek(8 + header_bytes)
        while chunk := file.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()[:SHORT_HASH_CHARS]


def read_adapter(path: Path, layers: dict[str, tuple[int, int]], max_rank: int, dtype: torch.dtype,
                 pin: bool) -> Adapter:
    """The adapter in `path`, checked against the DiT's `layers`; AdapterProblem naming what does not fit. Every
    community key format diffusers reads for this model is read (its lora_state_dict converts them): diffusers' and
    PEFT's own, ComfyUI's `diffusion_model.` prefix, kohya's `lora_unet_…` with lora_down/lora_up and alpha."""
    from diffusers import ZImagePipeline
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as opened:
            raw_keys = list(opened.keys())
    except Exception as error:
        raise AdapterProblem(f"not a readable safetensors file ({type(error).__name__}: {error})") from None
    if any("dora_scale" in key for key in raw_keys):
        raise AdapterProblem("a DoRA adapter: the service serves LoRA adapters only")
    if any(".lokr_" in key or ".hada_" in key for key in raw_keys):
        raise AdapterProblem("a LoKr or LoHa adapter: the service serves LoRA adapters only")
    try:
        state_dict = ZImagePipeline.lora_state_dict(str(path))
    except Exception as error:
        raise AdapterProblem(f"not a LoRA adapter diffusers can read ({type(error).__name__}: {error})") from None
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, down in state_dict.items():
        if key.endswith(_B):
            continue
        if not key.endswith(_A):
            raise AdapterProblem(f"holds {key!r}, which is not a LoRA layer's weight")
        name = key.removeprefix(_PREFIX).removesuffix(_A)
        up = state_dict.get(key.removesuffix(_A) + _B)
        if up is None:
            raise AdapterProblem(f"has lora_A but no lora_B for {name!r}")
        if name not in layers:
            raise AdapterProblem(f"changes {name!r}, which is no linear layer of this model's DiT")
        in_features, out_features = layers[name]
        if down.ndim != 2 or up.ndim != 2 or down.shape[1] != in_features or up.shape[0] != out_features \
                or up.shape[1] != down.shape[0]:
            raise AdapterProblem(f"layer {name!r} has shapes {tuple(down.shape)} and {tuple(up.shape)}; this "
                                 f"model's needs (rank, {in_features}) and ({out_features}, rank)")
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            raise AdapterProblem(f"layer {name!r} holds NaN or infinite values")
        weights[name] = (_stored(down, dtype, pin), _stored(up, dtype, pin))
    unpaired = [key for key in state_dict if key.endswith(_B) and key.removesuffix(_B) + _A not in state_dict]
    if unpaired:
        raise AdapterProblem(f"has lora_B but no lora_A for {unpaired[0].removeprefix(_PREFIX).removesuffix(_B)!r}")
    if not weights:
        raise AdapterProblem("holds no LoRA layers")
    rank = max(down.shape[0] for down, _ in weights.values())
    if rank > max_rank:
        raise AdapterProblem(f"rank {rank} is over the server's --lora-max-rank of {max_rank}")
    info = AdapterInfo(name=path.name.removesuffix(SUFFIX), rank=rank, size_bytes=path.stat().st_size,
                       layers=len(weights), short_hash=short_hash(path))
    return Adapter(info=info, weights=weights)


def _stored(tensor: torch.Tensor, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    stored = tensor.to(dtype).contiguous()
    return stored.pin_memory() if pin else stored


class AdapterLibrary:
    """The adapters of a folder: every `*.safetensors` in it, named by its stem, read and checked when first seen
    and again whenever its size or modification time changes (refresh). A file that fails is left out with one log
    line naming it and why, until it changes; the others serve. Requests name adapters; nothing they send is ever
    used as a path."""

    def __init__(self, folder: Path, layers: dict[str, tuple[int, int]], max_rank: int, dtype: torch.dtype,
                 pin: bool):
        self.folder = folder
        self._layers, self._max_rank, self._dtype, self._pin = layers, max_rank, dtype, pin
        self._adapters: dict[str, Adapter] = {}
        self._seen: dict[str, tuple[int, int]] = {}  # file name → (size, mtime_ns) when last read, served or not

    def refresh(self) -> bool:
        """Read what changed in the folder since the last call; whether the set of adapters changed."""
        listing = self._listing()
        changed = False
        for gone in set(self._seen) - set(listing):
            del self._seen[gone]
            if self._adapters.pop(gone.removesuffix(SUFFIX), None) is not None:
                log.info("adapter removed name=%s", gone.removesuffix(SUFFIX))
                changed = True
        for file_name, stamp in sorted(listing.items()):
            if self._seen.get(file_name) == stamp:
                continue
            self._seen[file_name] = stamp
            name = file_name.removesuffix(SUFFIX)
            changed |= self._adapters.pop(name, None) is not None
            try:
                adapter = read_adapter(self.folder / file_name, self._layers, self._max_rank, self._dtype,
                                       self._pin)
            except AdapterProblem as problem:
                log.warning("adapter left out file=%s reason=%s", self.folder / file_name, problem)
                continue
            self._adapters[name] = adapter
            changed = True
            info = adapter.info
            log.info("adapter loaded name=%s rank=%d layers=%d size_mib=%.1f hash=%s", name, info.rank, info.layers,
                     info.size_bytes / 2**20, info.short_hash)
        return changed

    def _listing(self) -> dict[str, tuple[int, int]]:
        try:
            entries = list(os.scandir(self.folder))
        except OSError:  # no folder (yet), or unreadable: no adapters
            return {}
        listing = {}
        for entry in entries:
            if entry.name.endswith(SUFFIX) and not entry.name.startswith("."):
                try:
                    if entry.is_file():
                        stat = entry.stat()
                        listing[entry.name] = (stat.st_size, stat.st_mtime_ns)
                except OSError:
                    continue
        return listing

    def get(self, name: str) -> Adapter | None:
        return self._adapters.get(name)

    def infos(self) -> list[AdapterInfo]:
        return [self._adapters[name].info for name in sorted(self._adapters)]


def lora_view(transformer: torch.nn.Module, rank: int) -> torch.nn.Module:
    """A view of `transformer` whose every linear layer carries a LoRA adapter of `rank` (SLOT_ADAPTER), all zeros:
    every container module is copied, every other module and every weight is shared. The transformer itself is left
    as it was."""
    from peft import LoraConfig, inject_adapter_in_model

    view = _containers_copied(transformer)
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=sorted(linear_layers(transformer)),
                        init_lora_weights=False)
    trainable = {parameter: parameter.requires_grad for parameter in transformer.parameters()}
    inject_adapter_in_model(config, view, adapter_name=SLOT_ADAPTER)
    for parameter, flag in trainable.items():  # PEFT marks the shared weights frozen for training: put back
        parameter.requires_grad_(flag)
    for layer in _slot_layers(view).values():
        for weight in layer:
            weight.requires_grad_(False)
            weight.zero_()
    return view


def _containers_copied(module: torch.nn.Module) -> torch.nn.Module:
    if not module._modules:
        return module
    clone = copy.copy(module)
    clone.__dict__["_modules"] = {name: _containers_copied(child) for name, child in module._modules.items()}
    # copy.copy shares these with the original: PEFT's injection must not reach it through them.
    clone.__dict__["_parameters"] = dict(module._parameters)
    clone.__dict__["_buffers"] = dict(module._buffers)
    return clone


def _slot_layers(view: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module name → (A, B) of the slots in `view`."""
    from peft.tuners.lora import LoraLayer

    return {name: (module.lora_A[SLOT_ADAPTER].weight, module.lora_B[SLOT_ADAPTER].weight)
            for name, module in view.named_modules() if isinstance(module, LoraLayer)}


class AdapterSlots:
    """The slots of a lora_view: `load` writes a request's adapters into them, side by side, each at its strength."""

    def __init__(self, view: torch.nn.Module, rank: int):
        self.rank = rank
        self._layers = _slot_layers(view)
        # What the slots hold, the adapters themselves: an id() could be a new adapter's once the old one is gone.
        self._loaded: tuple[tuple[Adapter, float], ...] = ()

    def load(self, chosen: Sequence[tuple[Adapter, float]]) -> bool:
        """Write `chosen` (adapter, scale) into the slots, the rest of them zero; False when they already hold
        exactly that. Their ranks together must fit the slots (the request's validation checks)."""
        if len(chosen) == len(self._loaded) and all(
                adapter is held and scale == held_scale
                for (adapter, scale), (held, held_scale) in zip(chosen, self._loaded, strict=True)):
            return False
        self._loaded = ()  # a write cut off half way leaves the slots holding nothing known
        with torch.no_grad():
            for name, (slot_a, slot_b) in self._layers.items():
                slot_a.zero_()  # rows of A left zero make their columns of B count for nothing
                row = 0
                for adapter, scale in chosen:
                    weights = adapter.weights.get(name)
                    if weights is not None:
                        down, up = weights
                        rank = down.shape[0]
                        slot_a[row:row + rank].copy_(down, non_blocking=True).mul_(scale)
                        slot_b[:, row:row + rank].copy_(up, non_blocking=True)
                    row += adapter.info.rank
        self._loaded = tuple(chosen)
        return True

    def slot_bytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self._layers.values())
