"""Where the weights are on disk, in which of the two accepted layouts, and whether the files are whole.

Layout A ("single-file"): the three files as ComfyUI repackages them, with the small config and tokenizer files of
the published diffusers repo beside them:

    z_image_turbo_bf16.safetensors   DiT, ComfyUI keys (fused attention.qkv, x_embedder, final_layer, ...)
    qwen_3_4b.safetensors            Qwen3-4B text encoder, keys `model.*`
    ae.safetensors                   Flux VAE, LDM keys (encoder.down.N.block.M..., no quant convs)
    transformer/config.json  text_encoder/config.json  vae/config.json  scheduler/scheduler_config.json
    tokenizer/tokenizer.json  tokenizer/tokenizer_config.json

Layout B ("diffusers"): the folder published as Tongyi-MAI/Z-Image-Turbo (model_index.json and one sub-folder per
component, weights possibly sharded behind an `*.index.json`).

The checks here read only file headers, so a 12 GB set is checked in milliseconds; the sha256 manifest check is
separate (`pipeline.manifest`) because hashing takes a minute.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from pipeline.messages import StartupError

DIT_FILE = "z_image_turbo_bf16.safetensors"
TEXT_ENCODER_FILE = "qwen_3_4b.safetensors"
VAE_FILE = "ae.safetensors"

CONFIG_FILES = (
    "transformer/config.json",
    "text_encoder/config.json",
    "vae/config.json",
    "scheduler/scheduler_config.json",
)
TOKENIZER_FILES = ("tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json")

# One tensor each real file must hold (without any checkpoint prefix), so a swapped or foreign file is named as such.
SINGLE_FILE_SIGNATURES = {
    DIT_FILE: ("layers.0.adaLN_modulation.0.weight", "a Z-Image DiT"),
    TEXT_ENCODER_FILE: ("model.embed_tokens.weight", "a Qwen3 text encoder"),
    VAE_FILE: ("decoder.conv_in.weight", "a Flux VAE"),
}
CHECKPOINT_PREFIXES = ("", "model.diffusion_model.", "first_stage_model.", "vae.")

# Each diffusers component folder and the stem of its weight file(s).
DIFFUSERS_WEIGHTS = {
    "transformer": "diffusion_pytorch_model",
    "text_encoder": "model",
    "vae": "diffusion_pytorch_model",
}

# safetensors headers are JSON of tensor names and offsets: a few hundred KB for the real files. A larger
# "length" means the first 8 bytes are not a safetensors header at all (an HTML error page, a pickle, ...).
MAX_HEADER_BYTES = 100 * 2**20

FETCH_HINT = "Fetch the weights with scripts/fetch_weights.py (on a machine with internet) or copy them in place"


class WeightsError(StartupError):
    """Weights that cannot be loaded; the message is one line naming the file and what to do."""


class LayoutKind(StrEnum):
    SINGLE_FILE = "single-file"
    DIFFUSERS = "diffusers"


@dataclass(frozen=True)
class WeightLayout:
    kind: LayoutKind
    root: Path

    def file(self, relative: str) -> Path:
        return self.root / relative

    def weight_files(self) -> list[Path]:
        """Every safetensors file the pipeline will read."""
        if self.kind is LayoutKind.SINGLE_FILE:
            return [self.file(DIT_FILE), self.file(TEXT_ENCODER_FILE), self.file(VAE_FILE)]
        return [path for component in DIFFUSERS_WEIGHTS for path in _diffusers_weight_files(self.root, component)]


def find_weights(model_dir: Path) -> WeightLayout:
    """Detect the layout of `model_dir` and check that every file it needs is present and whole."""
    if not model_dir.is_dir():
        raise WeightsError(
            f"model directory {model_dir} does not exist. {FETCH_HINT}, pass --model-dir DIR, "
            f"or run with --demo to serve the tiny demo model."
        )
    if any((model_dir / name).exists() for name in SINGLE_FILE_SIGNATURES):
        layout = WeightLayout(LayoutKind.SINGLE_FILE, model_dir)
        _check_single_file_layout(layout)
    elif (model_dir / "model_index.json").is_file():
        layout = WeightLayout(LayoutKind.DIFFUSERS, model_dir)
        _check_diffusers_layout(layout)
    else:
        raise WeightsError(
            f"no Z-Image-Turbo weights in {model_dir}: expected {DIT_FILE} (layout A) or model_index.json "
            f"(layout B). {FETCH_HINT}, or run with --demo to serve the tiny demo model."
        )
    return layout


def _require(path: Path, what: str) -> None:
    if not path.is_file():
        raise WeightsError(f"missing file {path} ({what}). {FETCH_HINT}.")


def _check_single_file_layout(layout: WeightLayout) -> None:
    for name, (tensor, what) in SINGLE_FILE_SIGNATURES.items():
        path = layout.file(name)
        _require(path, what)
        keys = read_safetensors_keys(path)
        if not any(prefix + tensor in keys for prefix in CHECKPOINT_PREFIXES):
            raise WeightsError(
                f"{path} does not hold {what} (it has no tensor {tensor}): a different file was put under this "
                f"name. {FETCH_HINT}."
            )
    for relative in CONFIG_FILES + TOKENIZER_FILES:
        _require(layout.file(relative), "config/tokenizer file from the Tongyi-MAI/Z-Image-Turbo repo")
        _check_json(layout.file(relative))


def _check_diffusers_layout(layout: WeightLayout) -> None:
    _check_json(layout.file("model_index.json"))
    for relative in CONFIG_FILES + TOKENIZER_FILES:
        _require(layout.file(relative), "part of the diffusers folder layout")
        _check_json(layout.file(relative))
    for path in layout.weight_files():
        read_safetensors_keys(path)


def _diffusers_weight_files(root: Path, component: str) -> list[Path]:
    stem = root / component / DIFFUSERS_WEIGHTS[component]
    single = stem.with_name(stem.name + ".safetensors")
    index = stem.with_name(stem.name + ".safetensors.index.json")
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = _check_json(index).get("weight_map", {})
        shards = [index.parent / name for name in sorted(set(weight_map.values()))]
        for shard in shards:
            _require(shard, f"a shard listed in {index.name}")
        return shards
    raise WeightsError(f"missing file {single} (or its sharded {index.name}) for the {component}. {FETCH_HINT}.")


def _check_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WeightsError(f"{path} is not valid JSON ({error}): the file is damaged. {FETCH_HINT}.") from None


def read_safetensors_keys(path: Path) -> set[str]:
    """Tensor names of a safetensors file, after checking its header and that no tensor data is cut off."""
    _require(path, "weights")
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path} is truncated ({size} bytes, not even a header). {FETCH_HINT}.")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES:
            raise WeightsError(f"{path} is not a safetensors file. {FETCH_HINT}.")
        if header_len > size - 8:
            raise WeightsError(f"{path} is truncated: {size} bytes on disk, cut inside its header. {FETCH_HINT}.")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise WeightsError(f"{path} has a damaged safetensors header. {FETCH_HINT}.") from None
    header.pop("__metadata__", None)
    data_end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    expected = 8 + header_len + data_end
    if size < expected:
        raise WeightsError(
            f"{path} is truncated: {size} bytes on disk, {expected} expected (an interrupted copy or download?). "
            f"{FETCH_HINT}."
        )
    return set(header)
