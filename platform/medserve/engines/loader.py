"""Pick and construct the engine a spec names, after checking its artifact."""

from __future__ import annotations

import importlib
import importlib.util

from medserve.engines.artifacts import verify_artifact
from medserve.engines.base import Engine
from medserve.engines.builtin import verify_parameters
from medserve.engines.registry import ENGINES
from medserve.errors import MissingExtraError
from medserve.specs import DeploymentSpec


def engine_available(engine: str) -> tuple[bool, str | None]:
    """Whether this Python environment can run an engine, and why not."""
    info = ENGINES[engine]
    if importlib.util.find_spec(info.requires) is None:
        return False, f"the {engine} engine needs {info.install}, which is not installed"
    return True, None


def engine_class(path: str) -> type[Engine]:
    """The class a ``module:Class`` path names, its module imported only now."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def load_engine(spec: DeploymentSpec, *, allow_unpinned: bool = False) -> tuple[Engine, str]:
    """The engine for a spec and the sha256 its artifact actually has."""
    available, reason = engine_available(spec.model.engine)
    if not available:
        raise MissingExtraError(reason, engine=spec.model.engine)
    info = ENGINES[spec.model.engine]
    if info.builtin:
        # No weights: the pinned digest covers the engine's parameter document.
        sha256 = verify_parameters(spec, allow_unpinned=allow_unpinned)
        return engine_class(info.engine_class)(spec), sha256
    path, sha256 = verify_artifact(spec.model.artifact.uri, spec.model.artifact.sha256, allow_unpinned=allow_unpinned)
    if info.engine_class is None:
        # vLLM is not a medserve engine class: Ray Serve LLM runs it, see engines/vllm_app.py.
        app_module = info.app_import_path.partition(":")[0]
        raise MissingExtraError(f"{info.name} specs are served by {app_module}, not ModelServer", engine=info.name)
    return engine_class(info.engine_class)(spec, path), sha256
