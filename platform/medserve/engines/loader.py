"""Pick and construct the engine a spec names, after checking its artifact."""

from __future__ import annotations

import importlib.util

from medserve.engines.artifacts import verify_artifact
from medserve.engines.base import Engine
from medserve.engines.builtin import verify_parameters
from medserve.errors import MissingExtraError
from medserve.specs import BUILTIN_ENGINES, DeploymentSpec


def engine_available(engine: str) -> tuple[bool, str | None]:
    """Whether this Python environment can run an engine, and why not."""
    needs = {"llama_cpp": ("llama_cpp", "llama-cpp-python"), "onnx": ("onnxruntime", "onnxruntime"),
             "vllm": ("vllm", "the optional extra medserve[gpu] (ray[llm]: vLLM through Ray Serve LLM)"),
             "hu_roi": ("numpy", "numpy"), "noop": ("medserve", "medserve")}
    module, install = needs[engine]
    if importlib.util.find_spec(module) is None:
        return False, f"the {engine} engine needs {install}, which is not installed"
    return True, None


def load_engine(spec: DeploymentSpec, *, allow_unpinned: bool = False) -> tuple[Engine, str]:
    """The engine for a spec and the sha256 its artifact actually has."""
    available, reason = engine_available(spec.model.engine)
    if not available:
        raise MissingExtraError(reason, engine=spec.model.engine)
    if spec.model.engine in BUILTIN_ENGINES:
        # No weights: the pinned digest covers the engine's parameter document.
        sha256 = verify_parameters(spec, allow_unpinned=allow_unpinned)
        if spec.model.engine == "noop":
            from medserve.engines.noop import NoopEngine

            return NoopEngine(spec), sha256
        from medserve.engines.hu_roi import HuRoiAnalyzer

        return HuRoiAnalyzer(spec), sha256
    path, sha256 = verify_artifact(spec.model.artifact.uri, spec.model.artifact.sha256, allow_unpinned=allow_unpinned)
    if spec.model.engine == "llama_cpp":
        from medserve.engines.llama_cpp import LlamaCppEngine

        return LlamaCppEngine(spec, path), sha256
    if spec.model.engine == "onnx":
        from medserve.engines.onnx import OnnxClassifierEngine

        return OnnxClassifierEngine(spec, path), sha256
    # vLLM is not a medserve engine class: Ray Serve LLM runs it, see engines/vllm_app.py.
    raise MissingExtraError("vllm specs are served by medserve.engines.vllm_app, not ModelServer", engine="vllm")
