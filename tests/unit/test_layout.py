"""The repository layout promises: no package named platform, one importable medserve, no oversized file."""

import subprocess
import sys


def test_platform_is_not_a_package(repo_root):
    assert not (repo_root / "platform" / "__init__.py").exists()
    assert (repo_root / "platform" / "medserve" / "__init__.py").exists()


def test_stdlib_platform_importable_from_repo_root(repo_root):
    result = subprocess.run(
        [sys.executable, "-c", "import platform; print(platform.system())"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "Linux"


def test_ray_init_is_forbidden_in_unit_tests():
    import pytest
    import ray

    with pytest.raises(RuntimeError, match="must not start"):
        ray.init()


def test_git_tracks_source_only(repo_root):
    """No tracked file over 2 MB and no tracked executable binary (tools install them; git holds source)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=repo_root, capture_output=True, check=True).stdout
    paths = [repo_root / name for name in listed.decode().split("\0") if name]
    too_large = [str(p.relative_to(repo_root)) for p in paths if p.is_file() and p.stat().st_size > 2 * 1024 * 1024]
    binaries = []
    for path in paths:
        if path.is_file():
            with open(path, "rb") as handle:
                head = handle.read(4)
            if head == b"\x7fELF" or head[:2] == b"MZ":
                binaries.append(str(path.relative_to(repo_root)))
    assert len(paths) > 100  # the listing worked
    assert too_large == [] and binaries == []


MAX_SOURCE_LINES = 800


def test_no_source_file_is_over_800_lines(repo_root):
    """A file past this is several rooms in one: split it by what its parts do (as cli/ is) instead."""
    sources = sorted((repo_root / "platform").rglob("*.py"))
    lines = {str(p.relative_to(repo_root)): len(p.read_text().splitlines()) for p in sources}
    too_long = {path: n for path, n in lines.items() if n > MAX_SOURCE_LINES}
    assert len(sources) > 50  # the walk found the package
    assert too_long == {}
