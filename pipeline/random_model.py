"""Random-weight Z-Image-Turbo models: a tiny one written in either accepted layout (tests, `--demo`), and the
full-size architecture built straight on a GPU (speed measurements; speed does not depend on weight values).

The components are the real classes (ZImageTransformer2DModel, Qwen3Model, AutoencoderKL,
FlowMatchEulerDiscreteScheduler), so every line of the real loading code runs on the tiny one. In layout A
the three files use the key formats of the real files (see `pipeline.formats`). No hub tokenizer can be fetched
offline, so a byte-level BPE tokenizer with Qwen's special tokens and chat template is trained here on a small
built-in corpus; byte-level means any UTF-8 prompt, Chinese included, tokenizes.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.formats import text_encoder_to_comfy, transformer_to_comfy, vae_to_ldm
from pipeline.layouts import DIT_FILE, TEXT_ENCODER_FILE, VAE_FILE, LayoutKind
from pipeline.manifest import MANIFEST_NAME, write_manifest

TINY_SEED = 0  # fixed, so a rebuilt demo model has the same weights
WEIGHT_DTYPE = torch.bfloat16  # the real files are bf16; the tiny ones match so both layouts load the same numbers

# Qwen3's template, reduced to what the pipeline uses: single user turn, generation prompt, thinking switch.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
_CORPUS = [
    "a photo of a cat sitting on a red chair in the morning light",
    "a watercolor painting of mountains and a lake at sunset, highly detailed",
    "portrait of an old man with a beard, studio lighting, 85mm",
    "a futuristic city street at night with neon signs and rain",
    "一只猫坐在红色的椅子上，清晨的阳光",
    "山水画，湖泊，日落，细节丰富",
    "夜晚的未来城市街道，霓虹灯和雨",
    "user assistant system",
]


@dataclass(frozen=True)
class ModelSpec:
    transformer: dict
    text_encoder: dict
    vae: dict


TINY = ModelSpec(
    transformer=dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=32, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[8, 12, 12], axes_lens=[1536, 512, 512],
    ),
    text_encoder=dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        intermediate_size=64, max_position_embeddings=2048, rope_theta=1_000_000.0, tie_word_embeddings=True,
        rms_norm_eps=1e-6,
    ),
    # Four blocks keep the real 8× VAE factor, so the tiny model takes the same image sizes as the real one.
    vae=dict(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
    ),
)
# The published configs of Tongyi-MAI/Z-Image-Turbo (transformer, Qwen3-4B, Flux VAE).
FULL_SIZE = ModelSpec(
    transformer=dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
        n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0,
        t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
    ),
    text_encoder=dict(
        hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        intermediate_size=9728, max_position_embeddings=40960, rope_theta=1_000_000.0, tie_word_embeddings=True,
        rms_norm_eps=1e-6, vocab_size=151936,
    ),
    vae=dict(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
        layers_per_block=2, norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
    ),
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=QWEN_CHAT_TEMPLATE, model_max_length=131072,
    )


def _perturb(module: torch.nn.Module) -> None:
    """Move every weight off its init (zeros, ones) so a wrongly mapped tensor changes the output."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)


def build_components(spec: ModelSpec = TINY, device: str | torch.device = "cpu") -> dict[str, object]:
    """Random-weight components of `spec`, in bf16 on `device` (seeded: the same call gives the same weights)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(TINY_SEED)
    tokenizer = build_tokenizer()
    text_config = {"vocab_size": len(tokenizer), **spec.text_encoder}
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(WEIGHT_DTYPE)  # built in bf16 from the start: a full-size fp32 copy would not fit
    try:
        with torch.device(device):
            text_encoder = Qwen3Model(Qwen3Config(**text_config)).eval()
            transformer = ZImageTransformer2DModel(**spec.transformer).eval()
            vae = AutoencoderKL(**spec.vae).eval()
            for module in (text_encoder, transformer, vae):
                _perturb(module)
    finally:
        torch.set_default_dtype(default_dtype)
    return dict(
        transformer=transformer, text_encoder=text_encoder, vae=vae, tokenizer=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
    )


def _write_single_file(components: dict[str, object], out: Path) -> None:
    transformer, text_encoder, vae = components["transformer"], components["text_encoder"], components["vae"]
    save_file(transformer_to_comfy(transformer.state_dict()), out / DIT_FILE, metadata={"format": "pt"})
    save_file(text_encoder_to_comfy(text_encoder.state_dict()), out / TEXT_ENCODER_FILE, metadata={"format": "pt"})
    ldm_vae = vae_to_ldm(vae.state_dict(), num_up_blocks=len(vae.config.up_block_types))
    save_file({key: value.contiguous() for key, value in ldm_vae.items()}, out / VAE_FILE, metadata={"format": "pt"})
    transformer.save_config(out / "transformer")
    text_encoder.config.save_pretrained(out / "text_encoder")
    vae.save_config(out / "vae")
    components["scheduler"].save_config(out / "scheduler")
    components["tokenizer"].save_pretrained(out / "tokenizer")


def _write_diffusers(components: dict[str, object], out: Path) -> None:
    from diffusers import ZImagePipeline

    ZImagePipeline(**components).save_pretrained(out, safe_serialization=True)


def write_random_model(out: Path, layout: LayoutKind, spec: ModelSpec = TINY, device: str = "cpu") -> Path:
    """Write a random-weight model (tiny unless `spec` says otherwise) to `out`, which must not exist yet or be
    empty, with a manifest; returns `out`."""
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new directory.")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed into place, so an interrupted build never looks like a finished one.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        components = build_components(spec, device)
        if layout is LayoutKind.SINGLE_FILE:
            _write_single_file(components, staging)
        else:
            _write_diffusers(components, staging)
        write_manifest(staging, layout.value)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def ensure_demo_model(demo_dir: Path) -> Path:
    """The cached tiny model for --demo (layout A, the path real deployments use), built on first use."""
    if not (demo_dir / MANIFEST_NAME).is_file():
        if demo_dir.exists():
            shutil.rmtree(demo_dir)
        write_random_model(demo_dir, LayoutKind.SINGLE_FILE)
    return demo_dir
