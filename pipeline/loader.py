"""Weights on disk → a ZImagePipeline on the device, in either layout, never touching the network."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from pipeline.formats import text_encoder_from_comfy
from pipeline.layouts import (
    DIT_FILE,
    FETCH_HINT,
    TEXT_ENCODER_FILE,
    VAE_FILE,
    LayoutKind,
    WeightLayout,
    WeightsError,
    find_weights,
)
from pipeline.manifest import verify_manifest
from pipeline.messages import StartupError, first_line
from pipeline.read_ahead import ReadAhead

log = logging.getLogger("zimage.loader")


class DeviceError(StartupError):
    """The configured device is not there."""


@dataclass(frozen=True)
class LoadedPipeline:
    pipe: object  # diffusers.ZImagePipeline (imported lazily: this module is imported before diffusers is needed)
    source: str  # what was loaded, for logs and the UI: "single-file /path", "diffusers /path", ...
    device: torch.device
    dtype: torch.dtype


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for, but PyTorch sees no CUDA GPU (check nvidia-smi and the "
                           "torch build: python -c 'import torch; print(torch.version.cuda)').")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def dtype_for(device: torch.device) -> torch.dtype:
    # BF16 is the model's native precision on the GPU; on the CPU many bf16 kernels are missing or slow, so the
    # CPU (demo model, tests) computes in float32 from the same bf16 files.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _timed(component: str, path: Path, dtype: torch.dtype, device: torch.device, load,
           read_ahead_s: dict[Path, float]):
    started = time.perf_counter()
    try:
        module = load()
    except NotImplementedError as error:
        if "meta tensor" not in str(error):
            raise
        # diffusers leaves any tensor the file lacks on the meta device, then fails moving it; say which file.
        raise WeightsError(f"{path} lacks tensors the {component} needs: an incomplete file or a different "
                           f"checkpoint. {FETCH_HINT}.") from None
    if isinstance(module, torch.nn.Module):
        module.to(device=device, dtype=dtype)
    # read_ahead_s: reading the file, done beside the imports (pipeline/read_ahead.py); "seconds" is what was left.
    read_ahead = f" read_ahead_s={read_ahead_s[path]:.2f}" if path in read_ahead_s else ""
    log.info("loaded component=%s file=%s seconds=%.2f%s dtype=%s device=%s", component, path,
             time.perf_counter() - started, read_ahead,
             str(dtype).removeprefix("torch."), device)
    return module


def import_model_libraries() -> None:
    """Import now, in this thread, what loading imports lazily. A caller that imports other packages in another thread
    meanwhile calls this first: two threads initialising the same package at once can see it half-initialised."""
    import diffusers
    import transformers

    for name in ("AutoencoderKL", "FlowMatchEulerDiscreteScheduler", "ZImagePipeline", "ZImageTransformer2DModel"):
        getattr(diffusers, name)
    for name in ("AutoModel", "AutoTokenizer", "Qwen3Config", "Qwen3Model"):
        getattr(transformers, name)


def _load_qwen_single_file(path: Path, tensors: dict[str, torch.Tensor] | None, config_dir: Path,
                           dtype: torch.dtype):
    """The text encoder from `path`, or from its `tensors` already read."""
    from safetensors.torch import load_file
    from transformers import Qwen3Config, Qwen3Model

    # transformers has no from_single_file; its from_pretrained takes a ready state dict instead, and reports
    # what did not match so a wrong file is named rather than silently left at random init.
    state_dict = text_encoder_from_comfy(load_file(path) if tensors is None else tensors)
    model, info = Qwen3Model.from_pretrained(
        None, config=Qwen3Config.from_pretrained(config_dir), state_dict=state_dict, dtype=dtype,
        output_loading_info=True,
    )
    problems = info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]
    if problems:
        raise WeightsError(
            f"{path} does not match the text encoder config in {config_dir} (e.g. {sorted(problems)[0]}). "
            f"{FETCH_HINT}."
        )
    return model.eval()


def _from_read_ahead_or_file(path: Path, build, device: torch.device, read_ahead: ReadAhead | None,
                             read_ahead_s: dict[Path, float]):
    """build(tensors, device) from `path`'s tensors read ahead, else build(path, None) as without read-ahead. A
    build from tensors that fails costs a second read of the file, not the start: the file's own build then
    succeeds, or fails with the error it always gave."""
    tensors = read_ahead.take(path) if read_ahead is not None else None
    if tensors is not None:
        try:
            module = build(tensors, device)
        except Exception as error:
            log.warning("building from the tensors read ahead from %s failed (%s: %s); reading the file again",
                        path, type(error).__name__, first_line(error))
        else:
            read_ahead_s[path] = read_ahead.seconds[path]
            _give_each_parameter_its_storage(module)
            return module
        tensors = None  # its memory is the second read's
    return build(path, None)


def _give_each_parameter_its_storage(module: torch.nn.Module) -> None:
    """diffusers splits the file's fused attention.qkv into three views of one tensor. Copied to the GPU after
    loading, as the file's build is, each gets its own storage; built on the GPU, they would share one. The same
    layout either way: the compiled graphs and the memory measurements were made with this one."""
    for parameter in module.parameters():
        if parameter.untyped_storage().nbytes() != parameter.nbytes:
            parameter.data = parameter.data.clone()


def _load_components(layout: WeightLayout, dtype: torch.dtype, device: torch.device,
                     text_encoder_device: torch.device, read_ahead: ReadAhead | None) -> dict[str, object]:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import AutoModel, AutoTokenizer

    root = layout.root
    devices = {"text_encoder": text_encoder_device}
    read_ahead_s: dict[Path, float] = {}
    if layout.kind is LayoutKind.SINGLE_FILE:
        def single_file(model_class, subfolder: str):
            # from_single_file runs diffusers' own converters (ComfyUI DiT keys, LDM VAE keys) on the file or on
            # its tensors read ahead (left on their device); `config` points at the config files beside the
            # weights so nothing is looked up on the hub.
            return lambda source, on: model_class.from_single_file(
                source if isinstance(source, dict) else str(source), config=str(root), subfolder=subfolder,
                torch_dtype=dtype, device=on, local_files_only=True)

        builds = {
            "transformer": (DIT_FILE, single_file(ZImageTransformer2DModel, "transformer")),
            "text_encoder": (TEXT_ENCODER_FILE, lambda source, _on: _load_qwen_single_file(
                root / TEXT_ENCODER_FILE, source if isinstance(source, dict) else None, root / "text_encoder",
                dtype)),
            "vae": (VAE_FILE, single_file(AutoencoderKL, "vae")),
        }
        loaders = {name: (root / file, partial(_from_read_ahead_or_file, root / file, build,
                                               devices.get(name, device), read_ahead, read_ahead_s))
                   for name, (file, build) in builds.items()}
    else:
        loaders = {
            "transformer": (root / "transformer", lambda: ZImageTransformer2DModel.from_pretrained(
                root, subfolder="transformer", torch_dtype=dtype, local_files_only=True)),
            "text_encoder": (root / "text_encoder", lambda: AutoModel.from_pretrained(
                root / "text_encoder", dtype=dtype, local_files_only=True).eval()),
            "vae": (root / "vae", lambda: AutoencoderKL.from_pretrained(
                root, subfolder="vae", torch_dtype=dtype, local_files_only=True)),
        }
    components = {name: _timed(name, path, dtype, devices.get(name, device), load, read_ahead_s)
                  for name, (path, load) in loaders.items()}
    components["tokenizer"] = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    components["scheduler"] = FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler")
    return components


def load_pipeline(model_dir: Path, device: torch.device, verify: bool = False,
                  text_encoder_on_cpu: bool = False, read_ahead: ReadAhead | None = None) -> LoadedPipeline:
    """Find, check and load the weights in `model_dir`; any problem raises WeightsError with a one-line reason.
    `text_encoder_on_cpu` (the low-VRAM profile) keeps the text encoder's weights out of GPU memory even while
    loading, so a 16 GB card never holds both models at once. `read_ahead`: the single files' tensors, being read
    onto their devices since before the libraries were imported (ReadAhead.of_model(model_dir, device))."""
    from diffusers import ZImagePipeline

    layout = find_weights(model_dir)
    log.info("weights layout=%s dir=%s", layout.kind.value, layout.root)
    if verify:
        started = time.perf_counter()
        problems = verify_manifest(layout.root)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise WeightsError(f"weights verification failed: {problems[0]}{more}. {FETCH_HINT}.")
        log.info("verified weights against manifest seconds=%.1f", time.perf_counter() - started)
    dtype = dtype_for(device)
    if device.type != "cuda":
        log.info("device=%s dtype=%s (float32 on CPU: bf16 is for the GPU)", device, str(dtype).removeprefix("torch."))
    try:
        components = _load_components(layout, dtype, device,
                                      torch.device("cpu") if text_encoder_on_cpu else device, read_ahead)
    except WeightsError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise WeightsError(f"cannot load the weights in {layout.root}: {first_line(error)}. {FETCH_HINT}.") \
            from error
    pipe = ZImagePipeline(**components)
    return LoadedPipeline(pipe=pipe, source=f"{layout.kind.value} {layout.root}", device=device, dtype=dtype)
