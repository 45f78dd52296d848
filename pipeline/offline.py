"""Offline flags for huggingface_hub, transformers and diffusers.

They read these variables when first imported, so this module must be imported before any of them; the package's
`__init__` does that. `setdefault` lets an image builder with internet (scripts/fetch_weights.py) opt back in.
"""

import os

for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "DIFFUSERS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
