"""Resolve a model artifact to a local path and check its pinned sha256.

Nothing is downloaded: hospitals run air-gapped, so weights must already be
on the node (a path, a mounted volume, or a Python package's data files).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from medserve.errors import ArtifactError, ArtifactIntegrityError

_CHUNK = 4 * 1024 * 1024


def resolve_artifact(uri: str) -> Path:
    """The local path an artifact URI names; ArtifactError if it is not there."""
    if uri.startswith("package://"):
        package, _, inner = uri.removeprefix("package://").partition("/")
        # find_spec locates the package without importing it: some model
        # packages import optional plug-in frameworks at import time.
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ArtifactError(f"Python package {package!r} holding the model is not installed", uri=uri)
        path = Path(list(spec.submodule_search_locations)[0]) / inner
    elif uri.startswith("file://"):
        path = Path(uri.removeprefix("file://"))
    else:
        path = Path(uri)
    path = path.expanduser()
    if not path.exists():
        raise ArtifactError("model artifact not found on this node", uri=uri)
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def artifact_sha256(path: Path) -> str:
    """sha256 of a file, or of a directory's manifest.

    A directory (a Hugging Face checkpoint for vLLM) hashes as the sha256 of
    its manifest: one line per regular file, sorted by relative path,
    "<sha256>  <relative/path>\\n" (the format of `sha256sum`).
    """
    if path.is_file():
        return file_sha256(path)
    lines = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = Path(root) / name
            relative = full.relative_to(path).as_posix()
            lines.append(f"{file_sha256(full)}  {relative}\n")
    lines.sort(key=lambda line: line.split("  ", 1)[1])
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def verify_artifact(uri: str, expected_sha256: str | None, *, allow_unpinned: bool = False) -> tuple[Path, str]:
    """Resolve and hash an artifact; refuse it unless it matches its pin."""
    path = resolve_artifact(uri)
    actual = artifact_sha256(path)
    if expected_sha256 is None:
        if not allow_unpinned:
            raise ArtifactIntegrityError(
                "model artifact has no pinned sha256; pin it in the spec before serving", uri=uri, actual=actual
            )
    elif actual != expected_sha256:
        raise ArtifactIntegrityError(uri=uri, expected=expected_sha256, actual=actual)
    return path, actual
