"""The repository layout promises: no package named platform, one importable medserve."""

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
