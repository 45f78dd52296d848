"""A sha256 manifest of a weights directory, so a copy can be checked offline, file by file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST_NAME = "manifest.json"
_CHUNK = 8 * 2**20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _listed_files(root: Path) -> list[Path]:
    return sorted(
        path for path in root.rglob("*")
        if path.is_file() and path.name != MANIFEST_NAME and ".cache" not in path.relative_to(root).parts
    )


def write_manifest(root: Path, layout: str) -> Path:
    """Hash every file under `root` into `root/manifest.json`; returns the manifest's path."""
    files = {
        path.relative_to(root).as_posix(): {"sha256": sha256_of(path), "size": path.stat().st_size}
        for path in _listed_files(root)
    }
    manifest = root / MANIFEST_NAME
    manifest.write_text(json.dumps({"layout": layout, "files": files}, indent=2) + "\n", encoding="utf-8")
    return manifest


def verify_manifest(root: Path) -> list[str]:
    """Problems found comparing `root` with its manifest, one line each; an empty list means every file matches."""
    manifest = root / MANIFEST_NAME
    if not manifest.is_file():
        return [f"{manifest} does not exist: write one with scripts/fetch_weights.py --write-manifest {root}"]
    try:
        entries = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError):
        return [f"{manifest} is damaged: write it again with scripts/fetch_weights.py --write-manifest {root}"]
    problems = []
    for relative, expected in sorted(entries.items()):
        path = root / relative
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != expected["size"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {expected['size']} (truncated?)")
        elif sha256_of(path) != expected["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest (damaged or a different file)")
    return problems
