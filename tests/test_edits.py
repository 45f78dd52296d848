"""Image-to-image and inpainting through the engine on the tiny model: what strength 0 and 1 mean, what inpainting
keeps, how many steps run, and the fields an edit is refused on."""

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.edits import edit_sigmas
from pipeline.requests import GenerationRequest, Limits, RequestError, edit_size
from pipeline.storage import read_parameters

SIZE = dict(width=128, height=128)


def _picture(width=128, height=128, seed=0) -> np.ndarray:
    """A picture with structure (gradients and a square) so that a VAE round trip is not flat."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    picture = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], axis=-1)
    picture[height // 4: height // 2, width // 4: width // 2] = (250, 30, 30)
    return (picture + rng.integers(0, 8, picture.shape)).clip(0, 255).astype(np.uint8)


def _left_half_mask(width=128, height=128) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[:, : width // 2] = 255
    return mask


def _pixels(result) -> np.ndarray:
    return np.asarray(result.image, dtype=int)


def _round_trip(pipe, picture: np.ndarray) -> np.ndarray:
    """The picture through the VAE, with diffusers' own processor and the engine's decode (the mode, not a sample)."""
    vae = pipe.vae
    with torch.inference_mode():
        pixels = pipe.image_processor.preprocess(Image.fromarray(picture)).to(vae.dtype)
        latents = vae.encode(pixels).latent_dist.mode()
        decoded = vae.decode(latents, return_dict=False)[0]
    return pipe.image_processor.denormalize(decoded[0]).float().mul(255).round().to(torch.uint8).permute(1, 2, 0) \
        .numpy().astype(int)


def test_strength_one_is_the_text_to_image_image_of_its_seed(engine):
    text = engine.generate(GenerationRequest("a harbour at dawn", seed=21, steps=3, **SIZE))
    edited = engine.generate(GenerationRequest("a harbour at dawn", seed=21, steps=3, image=_picture(), strength=1.0,
                                               **SIZE))
    np.testing.assert_array_equal(_pixels(edited), _pixels(text))


def test_strength_zero_is_the_picture_through_the_vae_and_runs_no_step(engine):
    steps = []
    edited = engine.generate(GenerationRequest("anything", seed=3, steps=4, image=_picture(), strength=0.0, **SIZE),
                             progress=lambda step, total: steps.append(step))
    assert steps == []
    assert np.abs(_pixels(edited) - _round_trip(engine.pipeline, _picture())).max() <= 1


def test_strength_between_runs_the_last_part_of_the_schedule_and_changes_less_than_text_to_image(engine):
    seen = []
    half = engine.generate(GenerationRequest("a harbour at dawn", seed=5, steps=4, image=_picture(), strength=0.5,
                                             **SIZE), progress=lambda step, total: seen.append((step, total)))
    assert seen == [(1, 2), (2, 2)]
    text = engine.generate(GenerationRequest("a harbour at dawn", seed=5, steps=4, **SIZE))
    source = _round_trip(engine.pipeline, _picture())
    assert np.abs(_pixels(half) - source).mean() < np.abs(_pixels(text) - source).mean()


def test_the_schedule_is_cut_where_diffusers_image_to_image_cuts_it():
    assert edit_sigmas(8, 1.0) == pytest.approx([1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])
    assert edit_sigmas(8, 0.6) == pytest.approx([0.625, 0.5, 0.375, 0.25, 0.125])  # int(8 - 4.8) = 3 skipped
    assert edit_sigmas(8, 0.0) == []


def test_inpainting_keeps_the_latents_the_mask_leaves_and_changes_those_it_covers(engine):
    """Checked where the decoder starts: the tiny VAE's decoder (as the real one) has self-attention, so every pixel
    depends on every latent, and the kept half's pixels are the picture's only as far as the VAE reproduces it."""
    picture, mask = _picture(), _left_half_mask()
    vae = engine.pipeline.vae
    decoded = []
    hook = vae.decoder.register_forward_pre_hook(lambda _module, args: decoded.append(args[0].clone()))
    try:
        engine.generate(GenerationRequest("a red boat", seed=8, steps=3, image=picture, mask=mask, **SIZE))
    finally:
        hook.remove()
    with torch.inference_mode():
        pixels = engine.pipeline.image_processor.preprocess(Image.fromarray(picture)).to(vae.dtype)
        kept = vae.encode(pixels).latent_dist.mode()
    (latents,) = decoded
    width = latents.shape[-1]  # 16 latent columns for 128 pixels: the mask covers the left 8
    torch.testing.assert_close(latents[..., width // 2:], kept[..., width // 2:])
    assert (latents[..., : width // 2] - kept[..., : width // 2]).abs().mean() > 0.1


def test_an_edit_is_saved_with_its_mode_strength_and_source_and_made_at_the_pictures_aspect(engine):
    result = engine.generate(GenerationRequest("a harbour", seed=4, steps=2, width=None, height=None,
                                               image=_picture(300, 200), strength=0.7))
    assert result.image.size == (288, 192)
    saved = read_parameters(result.path)
    assert (saved["mode"], saved["strength"], saved["width"], saved["height"]) == ("image", 0.7, 288, 192)
    assert len(saved["source_sha256"]) == 10 and "image" not in saved
    assert "Denoising strength: 0.7" in Image.open(result.path).text["parameters"]  # as A1111 writes an edit's


def test_a_picture_of_another_size_is_resized_to_the_request(engine):
    result = engine.generate(GenerationRequest("a harbour", seed=4, steps=2, image=_picture(300, 200),
                                               mask=_left_half_mask(300, 200), width=64, height=96))
    assert result.image.size == (64, 96)


@pytest.mark.parametrize(("fields", "field"), [
    ({"mask": _left_half_mask()}, "image"),
    ({"strength": 0.5}, "image"),
    ({"image": _picture(), "strength": 1.5}, "strength"),
    ({"image": _picture(), "strength": float("nan")}, "strength"),
    ({"image": _picture(), "strength": True}, "strength"),
    ({"image": _picture().astype(np.float32)}, "image"),
    ({"image": _picture(), "mask": _left_half_mask(64, 64)}, "mask"),
    ({"output_format": "gif"}, "output_format"),
    ({"output_compression": 101}, "output_compression"),
    ({"output_compression": 9.5}, "output_compression"),
    ({"output_format": "jpeg", "prompt": "海港" * 9000}, "output_format"),  # 54 KB of UTF-8: more than a JPEG holds
])
def test_a_bad_edit_or_output_field_is_refused_naming_it(engine, fields, field):
    with pytest.raises(RequestError) as refused:
        engine.generate(GenerationRequest(**{"prompt": "a harbour", "seed": 1, "steps": 1, **SIZE, **fields}))
    assert refused.value.field == field


def test_an_edit_without_a_size_takes_the_pictures_aspect_within_the_limits():
    limits = Limits(max_h=2048, max_w=2048)
    assert edit_size(4000, 3000, limits) == (1168, 880)  # at most the default image's pixels
    assert edit_size(300, 200, limits) == (288, 192)  # never enlarged
    assert edit_size(40, 30, limits) == (64, 64)  # the smallest size served
    assert edit_size(3000, 1000, Limits(max_h=2048, max_w=1024)) == (1024, 336)
