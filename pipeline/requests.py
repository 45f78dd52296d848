"""What a caller may ask for, and the checks that turn loose input (UI numbers, API JSON) into a clean request:
the one place a size string, a batch of n and its seeds, and every field are read and refused with a named error."""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
import unicodedata
from dataclasses import dataclass

import numpy as np

from pipeline.storage import JPEG_PROMPT_BYTES, OUTPUT_FORMATS

SIZE_MULTIPLE = 16  # VAE factor 8 × DiT patch 2
MIN_SIZE = 64
MAX_STEPS = 50
MIN_SHIFT, MAX_SHIFT = 1.0, 10.0  # the range of the official demo's time-shift slider
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes any 64-bit value
RANDOM_SEED_LIMIT = 2**32  # random seeds stay below 2**53 so they survive a round trip through JavaScript
MAX_PROMPT_CHARS = 20_000
MAX_IMAGES_PER_CALL = 4  # n of the OpenAI-style route: one turn on the GPU for up to this many images
MAX_LORAS = 4  # LoRA adapters in one request
MIN_LORA_SCALE, MAX_LORA_SCALE = -2.0, 2.0
LORA_FIELDS = ("name", "scale")
DEFAULT_STRENGTH = 0.6  # image-to-image: the composition kept, the detail drawn anew (diffusers' default too)
INPAINT_STRENGTH = 1.0  # inpainting: the masked region drawn anew, whatever was there (diffusers' default)
MAX_COMPRESSION = 100

DEFAULT_SIZE = 1024
DEFAULT_STEPS = 8
DEFAULT_SHIFT = 3.0


# "WIDTHxHEIGHT", optionally followed by the UI table's aspect ratio "( 9:7 )"; nothing else, so that a typo is named
# rather than half read. [0-9], not \d: \d takes every script's digits ("١٠٢٤"), which int() reads as 1024 too.
_SIZE = re.compile(r"\s*([0-9]{1,5})\s*[x×]\s*([0-9]{1,5})\s*(?:\(\s*[0-9]+\s*:\s*[0-9]+\s*\))?\s*")

# A1111's prompt syntax for an adapter, "<lora:name:0.8>" or "<lora:name>" (strength 1), as prompts copied from adapter
# pages carry it. Taken out of the prompt the text encoder reads, as A1111 does.
_LORA_TAG = re.compile(r"\s*<lora:([^:<>]*)(?::([^<>]*))?>", re.IGNORECASE)

SHOWN_CHARS = 40  # enough of a value to recognise it in a message; a megabyte sent is not a megabyte echoed


def shown(value: object) -> str:
    """`value` as Python writes it (repr), cut to SHOWN_CHARS characters with "…": what an error message or a log
    line may echo of anything a caller sent."""
    # A long string is cut before repr so that a megabyte in a field is never copied whole just to be dropped.
    text = repr(value[:SHOWN_CHARS] if isinstance(value, str) else value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS - 1]}…"


class RequestError(ValueError):
    """Input the service will not run; the message is meant for the person who sent it, and `field` names the input
    it is about (an API answer's `param`)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field

    def __reduce__(self):  # pickled whole (a Ray replica raises it in another process)
        return type(self), (str(self), self.field)


@dataclass(frozen=True)
class Limits:
    max_h: int
    max_w: int


@dataclass(frozen=True)
class GenerationRequest:
    prompt: object
    width: object = DEFAULT_SIZE
    height: object = DEFAULT_SIZE
    steps: object = DEFAULT_STEPS
    seed: object = None  # None or "random": draw one; the seed used comes back with the result
    shift: object = DEFAULT_SHIFT
    loras: object = ()  # [{"name": ..., "scale": ...}, ...]: LoRA adapters of the server's folder, by name
    image: object = None  # an edit's picture: RGB uint8 (height, width, 3), as pipeline.uploads reads it
    mask: object = None  # inpainting: uint8 (height, width) of the picture's size, 255 where to repaint
    strength: object = None  # an edit's, 0 to 1; None: DEFAULT_STRENGTH, or INPAINT_STRENGTH with a mask
    output_format: object = "png"
    output_compression: object = None  # jpeg and webp: 0-100, None for the default quality; png: not used


@dataclass(frozen=True, eq=False)
class Edit:
    """The picture an edit starts from, and what of it to repaint."""

    image: np.ndarray  # RGB uint8 (height, width, 3), as uploaded (the engine resizes it to the request's size)
    mask: np.ndarray | None  # uint8 (height, width), 255 where to repaint; None: all of it (image-to-image)
    strength: float  # 0: the picture as it is (through the VAE); 1: its content is drawn anew
    digest: str  # the uploaded pixels' short SHA-256: which picture, in the saved image's parameters

    @property
    def mode(self) -> str:
        return "inpaint" if self.mask is not None else "image"


@dataclass(frozen=True)
class LoraChoice:
    """One adapter a request asks for, by its name in the server's adapter folder, at strength `scale`."""

    name: str
    scale: float


@dataclass(frozen=True)
class ValidRequest:
    prompt: str  # without its <lora:…> tags: those are in `loras`
    width: int
    height: int
    steps: int
    seed: int
    shift: float
    loras: tuple[LoraChoice, ...] = ()
    edit: Edit | None = None  # None: text-to-image
    output_format: str = "png"
    output_compression: int | None = None


def _whole_number(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{name} must be a whole number (got {shown(value)}).", name)
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise RequestError(f"{name} must be a whole number (got {shown(value)}).", name)
    return int(value)


def _size(name: str, value: object, limit: int, flag: str) -> int:
    size = _whole_number(name, value)
    if size < MIN_SIZE or size > limit:
        raise RequestError(f"{name} must be between {MIN_SIZE} and {limit} pixels (got {shown(size)}); "
                           f"the server's limit is set by {flag}.", name)
    if size % SIZE_MULTIPLE:
        lower = size // SIZE_MULTIPLE * SIZE_MULTIPLE
        raise RequestError(f"{name} must be a multiple of {SIZE_MULTIPLE} (got {size}); "
                           f"try {lower} or {lower + SIZE_MULTIPLE}.", name)
    return size


def _is_random(seed: object) -> bool:
    return seed is None or (isinstance(seed, str) and seed.strip().lower() == "random")


def _seed(value: object) -> int:
    if _is_random(value):
        return secrets.randbelow(RANDOM_SEED_LIMIT)
    seed = _whole_number("seed", value)
    if not 0 <= seed < SEED_LIMIT:
        raise RequestError(f"seed must be between 0 and {SEED_LIMIT - 1}, or 'random' (got {shown(seed)}).", "seed")
    return seed


def checked_prompt(value: object) -> str:
    """The prompt as the engine will run it (stripped), or RequestError naming what is wrong with it."""
    if not isinstance(value, str):
        raise RequestError(f"prompt must be text (got {type(value).__name__}).", "prompt")
    prompt = value.strip()
    if not prompt:
        raise RequestError("prompt is empty: describe the image you want.", "prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError(f"prompt is {len(prompt)} characters long; the limit is {MAX_PROMPT_CHARS}.", "prompt")
    control = next((char for char in prompt if unicodedata.category(char) == "Cc" and char not in "\t\n\r"), None)
    if control is not None:
        raise RequestError(f"prompt contains the control character U+{ord(control):04X}; send plain text.", "prompt")
    if any(unicodedata.category(char) == "Cs" for char in prompt):
        raise RequestError("prompt is not valid Unicode text (it holds a lone surrogate); send UTF-8 text.", "prompt")
    return prompt


def _lora_scale(where: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not MIN_LORA_SCALE <= value <= MAX_LORA_SCALE:
        raise RequestError(f"{where} must be a number from {MIN_LORA_SCALE:g} to {MAX_LORA_SCALE:g} (got "
                           f"{shown(value)}).", "loras")
    return float(value)


def _lora_name(where: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RequestError(f"{where} must be an adapter's name (got {shown(value)}).", "loras")
    return value.strip()


def _listed_loras(value: object) -> list[LoraChoice]:
    """The `loras` field: a list of {"name": ..., "scale": ...} (scale 1 when left out)."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise RequestError(f"loras must be a list of {{\"name\": ..., \"scale\": ...}} (got {shown(value)}).",
                           "loras")
    if len(value) > MAX_LORAS:
        raise RequestError(f"loras holds {len(value)} adapters; the limit is {MAX_LORAS}.", "loras")
    choices = []
    for index, item in enumerate(value):
        if isinstance(item, LoraChoice):
            item = {"name": item.name, "scale": item.scale}
        if not isinstance(item, dict):
            raise RequestError(f"loras[{index}] must be {{\"name\": ..., \"scale\": ...}} (got {shown(item)}).",
                               "loras")
        unknown = next((key for key in item if key not in LORA_FIELDS), None)
        if unknown is not None:
            raise RequestError(f"loras[{index}] has the unknown key {shown(unknown)}; it takes "
                               f"{' and '.join(LORA_FIELDS)}.", "loras")
        choices.append(LoraChoice(_lora_name(f"loras[{index}].name", item.get("name")),
                                  _lora_scale(f"loras[{index}].scale", item.get("scale", 1.0))))
    return choices


def _tagged_loras(prompt: str) -> tuple[str, list[LoraChoice]]:
    """The prompt without its <lora:name:scale> tags, and the adapters they name."""
    choices = []
    for match in _LORA_TAG.finditer(prompt):
        where = f"the prompt's {shown(match[0].strip())}"
        scale_text = (match[2] or "1").strip()
        try:
            scale = float(scale_text)
        except ValueError:
            scale = scale_text
        choices.append(LoraChoice(_lora_name(f"the name in {where}", match[1]),
                                  _lora_scale(f"the strength in {where}", scale)))
    return _LORA_TAG.sub("", prompt).strip(), choices


def checked_loras(value: object, prompt: str) -> tuple[str, tuple[LoraChoice, ...]]:
    """The prompt without its <lora:…> tags, and the adapters the request asks for: those of `loras` then the
    prompt's tags, each name once, at most MAX_LORAS. Whether each exists is the engine's to check."""
    listed = _listed_loras(value)
    prompt, tagged = _tagged_loras(prompt)
    choices = listed + tagged
    names = [choice.name for choice in choices]
    duplicate = next((name for name in names if names.count(name) > 1), None)
    if duplicate is not None:
        raise RequestError(f"loras names the adapter {shown(duplicate)} twice (in the list or as a <lora:…> tag in "
                           f"the prompt); give it once, at one strength.", "loras")
    if len(choices) > MAX_LORAS:
        raise RequestError(f"The request asks for {len(choices)} adapters (loras and the prompt's <lora:…> tags); "
                           f"the limit is {MAX_LORAS}.", "loras")
    if not prompt:
        raise RequestError("prompt is empty once its <lora:…> tags are taken out: describe the image you want.",
                           "prompt")
    return prompt, tuple(choices)


def _edit(request: GenerationRequest) -> Edit | None:
    """The request's picture, mask and strength, checked; None for text-to-image."""
    image, mask = request.image, request.mask
    if image is None:
        if mask is not None or request.strength is not None:
            raise RequestError(f"{'mask' if mask is not None else 'strength'} belongs to an edit; send the image "
                               f"to edit too.", "image")
        return None
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            and 0 not in image.shape):
        raise RequestError("image must be an RGB picture.", "image")
    if mask is not None and not (isinstance(mask, np.ndarray) and mask.dtype == np.uint8
                                 and mask.shape == image.shape[:2]):
        raise RequestError(f"mask must be a greyscale picture of the image's size, {image.shape[1]}×"
                           f"{image.shape[0]}.", "mask")
    strength = request.strength
    if strength is None:
        strength = INPAINT_STRENGTH if mask is not None else DEFAULT_STRENGTH
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise RequestError(f"strength must be a number from 0 to 1 (got {shown(strength)}): how much of the "
                           f"picture is drawn anew.", "strength")
    digest = hashlib.sha256(image.tobytes()).hexdigest()[:10]
    return Edit(image=image, mask=mask, strength=float(strength), digest=digest)


def edit_size(width: int, height: int, limits: Limits) -> tuple[int, int]:
    """The size an edit of a `width`×`height` picture is made at when none is asked for: the picture's aspect, at
    most the default image's pixel count and the server's limits, in whole 16-pixel steps."""
    scale = min(1.0, math.sqrt(DEFAULT_SIZE * DEFAULT_SIZE / (width * height)), limits.max_w / width,
                limits.max_h / height)
    # Rounded before the floor: 3000 × (1024 / 3000) is 1023.99… in floating point.
    sides = (int(round(side * scale, 6)) // SIZE_MULTIPLE * SIZE_MULTIPLE for side in (width, height))
    return tuple(max(MIN_SIZE, side) for side in sides)


def _output(request: GenerationRequest, prompt: str) -> tuple[str, int | None]:
    if request.output_format not in OUTPUT_FORMATS:
        raise RequestError(f"output_format must be one of {', '.join(OUTPUT_FORMATS)} (got "
                           f"{shown(request.output_format)}).", "output_format")
    if request.output_format == "jpeg" and len(json.dumps(prompt, ensure_ascii=False).encode()) > JPEG_PROMPT_BYTES:
        raise RequestError("output_format jpeg cannot carry a prompt this long in its metadata (a JPEG holds 64 KB "
                           "of it); ask for png or webp.", "output_format")
    compression = request.output_compression
    if compression is not None:
        compression = _whole_number("output_compression", compression)
        if not 0 <= compression <= MAX_COMPRESSION:
            raise RequestError(f"output_compression must be from 0 to {MAX_COMPRESSION} (got {compression}).",
                               "output_compression")
    return request.output_format, compression


def validate(request: GenerationRequest, limits: Limits) -> ValidRequest:
    """Check every field; the first problem raises RequestError naming the field, the value and the fix."""
    prompt, loras = checked_loras(request.loras, checked_prompt(request.prompt))
    edit = _edit(request)
    width, height = request.width, request.height
    if edit is not None and width is None and height is None:
        width, height = edit_size(edit.image.shape[1], edit.image.shape[0], limits)
    width = _size("width", width, limits.max_w, "--max-w")
    height = _size("height", height, limits.max_h, "--max-h")
    steps = _whole_number("steps", request.steps)
    if not 1 <= steps <= MAX_STEPS:
        raise RequestError(f"steps must be between 1 and {MAX_STEPS} (got {shown(steps)}); Turbo is made for "
                           f"{DEFAULT_STEPS}.", "steps")
    shift = request.shift
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift):
        raise RequestError(f"shift must be a number (got {shown(shift)}).", "shift")
    if not MIN_SHIFT <= shift <= MAX_SHIFT:
        raise RequestError(f"shift must be between {MIN_SHIFT} and {MAX_SHIFT} (got {shift}); "
                           f"the default is {DEFAULT_SHIFT}.", "shift")
    output_format, compression = _output(request, prompt)
    return ValidRequest(prompt=prompt, width=width, height=height, steps=steps, seed=_seed(request.seed),
                        shift=float(shift), loras=loras, edit=edit, output_format=output_format,
                        output_compression=compression)


def parse_size(label: object, field: str = "size") -> tuple[int, int]:
    """'1152x896 ( 9:7 )' or '1152x896' → (width, height); `field` is what the caller calls it, for the message.
    The numbers are checked against the limits with the rest of the request (validate)."""
    match = _SIZE.fullmatch(label) if isinstance(label, str) else None
    if not match:
        raise RequestError(f"{field} must look like 1024x1024 (got {shown(label)}).", field)
    return int(match[1]), int(match[2])


def batch(prompt: object, size: object, n: object, seed: object, steps: object = None,
          shift: object = None, loras: object = None) -> list[GenerationRequest]:
    """`n` images of one prompt and `size` ("WIDTHxHEIGHT"; None: an edit's, from its picture), seeds `seed`,
    `seed`+1, ... (each drawn at random when seed is None or "random"); steps and shift take their defaults when
    None. Size, n and seeds are checked here, before the first image; each request's fields when the engine
    validates it."""
    seeds = batch_seeds(seed, n)
    width, height = (None, None) if size is None else parse_size(size)
    return [GenerationRequest(prompt=prompt, width=width, height=height, seed=image_seed,
                              steps=DEFAULT_STEPS if steps is None else steps,
                              shift=DEFAULT_SHIFT if shift is None else shift, loras=loras)
            for image_seed in seeds]


def batch_seeds(seed: object, n: object) -> list[int | None]:
    """The seeds of `n` images asked for at once: `seed`, `seed`+1, ..., or None for each (drawn at random) when
    seed is None or "random". Checked whole before the first image, so a batch that would run past the last seed
    is refused before anything is generated or saved."""
    try:
        count = _whole_number("n", n)  # 2.0 as well as 2, as for every other whole number
    except RequestError:
        count = 0
    if not 1 <= count <= MAX_IMAGES_PER_CALL:
        raise RequestError(f"n must be a whole number from 1 to {MAX_IMAGES_PER_CALL} (got {shown(n)}).", "n")
    if _is_random(seed):
        return [None] * count
    first = _seed(seed)
    if first + count > SEED_LIMIT:
        raise RequestError(f"seed must be at most {SEED_LIMIT - count} when n is {count}: the images take seeds "
                           f"{first} to {first + count - 1} (the largest is {SEED_LIMIT - 1}).", "seed")
    return [first + index for index in range(count)]
