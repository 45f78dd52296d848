"""Typed settings: one place for every default and limit (defaults.toml < ZIMAGE_* env < flags)."""

from config.settings import (
    DEFAULTS_FILE,
    PROJECT_DIR,
    AttentionChoice,
    DeviceChoice,
    Settings,
    SettingsError,
    build_arg_parser,
    load_settings,
)

__all__ = [
    "DEFAULTS_FILE",
    "PROJECT_DIR",
    "AttentionChoice",
    "DeviceChoice",
    "Settings",
    "SettingsError",
    "build_arg_parser",
    "load_settings",
]
