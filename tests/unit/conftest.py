"""Unit tests physically cannot start Ray: ray.init raises here."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _forbid_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    def refuse(*_args, **_kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("unit tests must not start or join a Ray cluster; write an integration test")

    monkeypatch.setattr(ray, "init", refuse)


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    from medserve.db.engine import upgrade

    url = f"sqlite:///{tmp_path / 'medserve.db'}"
    upgrade(url)
    return url
