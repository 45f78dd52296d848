"""Image-to-image and inpainting on the text-to-image pipeline: where an edit's denoising starts, and how inpainting
keeps what is not to be repainted.

The math is diffusers' own (`ZImageImg2ImgPipeline`, `ZImageInpaintPipeline`): the schedule's last `strength` part,
latents that start as the scheduler's `scale_noise` of the picture, and after each inpainting step the kept region
put back at the next noise level. It runs here, on the text-to-image pipeline's public arguments (`sigmas`,
`latents`, `callback_on_step_end`), rather than in those classes, because
- their VAE encode samples from the request's generator before the noise is drawn, so an edit at strength 1 would
  not be the text-to-image image of its seed; here the encode takes the distribution's mode and the noise is
  drawn exactly as text-to-image draws it;
- the engine's pipelines (eager, compiled, over the adapter slots) then serve edits as they are: the same DiT calls,
  no second set of pipeline objects per path, nothing new to compile.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from pipeline.requests import Edit


def edit_sigmas(steps: int, strength: float) -> list[float]:
    """The unshifted sigmas of the steps an edit runs: the last `strength` part of text-to-image's schedule, cut
    where diffusers' image-to-image cuts it (`get_timesteps`). Empty at strength 0."""
    schedule = get_default_z_image_sigmas(steps)
    skipped = int(max(steps - min(steps * strength, steps), 0))
    return schedule[skipped:]


class EditLatents:
    """An edit's latents on `pipe`: the picture encoded at (width, height), the noise text-to-image would draw for
    the request's generator, and the latent-size mask."""

    def __init__(self, pipe, edit: Edit, width: int, height: int, generator: torch.Generator,
                 device: torch.device):
        vae = pipe.vae
        picture = Image.fromarray(edit.image)
        if picture.size != (width, height):
            picture = picture.resize((width, height), Image.Resampling.LANCZOS)
        pixels = pipe.image_processor.preprocess(picture).to(device=device, dtype=vae.dtype)
        encoded = vae.encode(pixels).latent_dist.mode()
        self.picture = ((encoded - vae.config.shift_factor) * vae.config.scaling_factor).float()
        self.noise = randn_tensor(tuple(self.picture.shape), generator=generator, device=device, dtype=torch.float32)
        self.repaint = None
        if edit.mask is not None:
            mask = Image.fromarray(edit.mask)
            if mask.size != (width, height):
                mask = mask.resize((width, height), Image.Resampling.NEAREST)
            pixel_mask = torch.from_numpy(np.asarray(mask) >= 128).to(device=device, dtype=torch.float32)
            # A latent cell is repainted if any of its pixels is: the whole masked region changes, not most of it.
            self.repaint = F.adaptive_max_pool2d(pixel_mask[None, None], tuple(self.picture.shape[-2:]))

    def at(self, sigma: torch.Tensor) -> torch.Tensor:
        """The picture at noise level `sigma` (flow matching's forward process, as `scale_noise` computes it)."""
        return sigma * self.noise + (1.0 - sigma) * self.picture

    def keep_unmasked(self, latents: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Inpainting after a step whose result is at noise level `sigma`: the kept region is the picture's."""
        return self.repaint * latents + (1.0 - self.repaint) * self.at(sigma)
