"""Download Z-Image-Turbo's weights into a directory (image builders with internet), and check a copy offline.

    python scripts/fetch_weights.py --layout single-file /opt/z-image-turbo/weights   # layout A (~20 GB)
    python scripts/fetch_weights.py --layout diffusers /opt/z-image-turbo/weights     # layout B (~33 GB)
    python scripts/fetch_weights.py --verify /opt/z-image-turbo/weights               # offline: sha256 per file
    python scripts/fetch_weights.py --write-manifest /opt/z-image-turbo/weights       # for weights copied by hand

A download ends by writing manifest.json (sha256 and size of every file), which --verify and the service's
--verify-weights check against. Needs `pip install '.[fetch]'` (huggingface_hub) for downloading only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DIFFUSERS_REPO = "Tongyi-MAI/Z-Image-Turbo"
COMFY_REPO = "Comfy-Org/z_image_turbo"
# Layout A: the three ComfyUI files, each saved under its plain name...
COMFY_FILES = {
    "split_files/diffusion_models/z_image_turbo_bf16.safetensors": "z_image_turbo_bf16.safetensors",
    "split_files/text_encoders/qwen_3_4b.safetensors": "qwen_3_4b.safetensors",
    "split_files/vae/ae.safetensors": "ae.safetensors",
}
# ...with the configs and tokenizer of the diffusers repo beside them.
SMALL_FILE_PATTERNS = ["transformer/config.json", "text_encoder/config.json", "vae/config.json",
                       "scheduler/scheduler_config.json", "tokenizer/*"]


def download(layout: str, out: Path) -> None:
    os.environ["HF_HUB_OFFLINE"] = "0"  # before huggingface_hub is imported: this is the one place that downloads
    from huggingface_hub import hf_hub_download, snapshot_download

    out.mkdir(parents=True, exist_ok=True)
    if layout == "diffusers":
        snapshot_download(DIFFUSERS_REPO, local_dir=out, allow_patterns=["*.json", "*.safetensors", "tokenizer/*"])
        return
    snapshot_download(DIFFUSERS_REPO, local_dir=out, allow_patterns=SMALL_FILE_PATTERNS)
    for remote, local in COMFY_FILES.items():
        fetched = Path(hf_hub_download(COMFY_REPO, remote, local_dir=out / ".comfy"))
        shutil.move(fetched, out / local)
    shutil.rmtree(out / ".comfy", ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--layout", choices=["single-file", "diffusers"],
                        help="download this layout into DIR, then write its manifest")
    action.add_argument("--verify", action="store_true", help="check DIR against its manifest.json (offline)")
    action.add_argument("--write-manifest", action="store_true", help="hash DIR's files into manifest.json")
    parser.add_argument("dir", type=Path, help="the weights directory")
    args = parser.parse_args(argv)

    from pipeline.layouts import WeightsError, find_weights
    from pipeline.manifest import verify_manifest, write_manifest

    if args.verify:
        problems = verify_manifest(args.dir)
        for problem in problems:
            print(f"FAIL {problem}")
        if problems:
            return 1
        print(f"OK every file in {args.dir} matches its manifest")
        return 0
    if args.layout:
        download(args.layout, args.dir)
    try:
        layout = find_weights(args.dir)
    except WeightsError as error:
        print(f"FAIL {error}")
        return 1
    print(f"wrote {write_manifest(args.dir, layout.kind.value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
