"""Typed settings: one place for every default and limit (defaults.toml < ZIMAGE_* env < flags)."""

from config.settings import PROJECT_DIR, Settings, SettingsError, build_arg_parser, load_settings

__all__ = ["PROJECT_DIR", "Settings", "SettingsError", "build_arg_parser", "load_settings"]
