"""The model side: weight layouts and checks, loading, the tiny model, and the engine that runs requests.

Importing this package first puts the Hugging Face libraries in offline mode, before any of them is imported:
the service must never reach for the network at start.
"""

from pipeline import offline as _offline  # noqa: F401  (side effect: offline flags)
