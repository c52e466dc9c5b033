"""The engines medserve knows, in one table: the specs, the loader and the renderer read it.

Adding an engine is one row here plus its class. Pure data: it imports nothing
from medserve, so ``specs`` can build its types from it and the control plane
can read it without loading any engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# The Serve application that wraps a medserve engine class (ModelServer).
MODEL_SERVER_APP = "medserve.engines.serve_app:build_app"
# The Serve application for engines Ray Serve LLM runs (its GPU deployment is
# built from the spec's llm_config by the application builder).
SERVE_LLM_APP = "medserve.engines.vllm_app:build_app"


@dataclass(frozen=True)
class EngineInfo:
    name: str
    task: Literal["llm", "imaging"]
    requires: str
    """Python module that must be importable to run the engine."""
    install: str
    """What provides that module, for the error that says it is missing."""
    engine_class: str | None
    """``module:Class`` that ModelServer constructs; None: not a medserve engine class."""
    builtin: bool = False
    """Shipped with medserve, no weights: its artifact is builtin://<engine> and its
    sha256 pins the engine's parameter document (see medserve.engines.builtin)."""
    serve_llm: bool = False
    """Run by Ray Serve LLM in an application of its own (SERVE_LLM_APP)."""

    @property
    def app_import_path(self) -> str:
        """The Serve application a model of this engine is rendered into."""
        return SERVE_LLM_APP if self.serve_llm else MODEL_SERVER_APP


ENGINES: dict[str, EngineInfo] = {
    info.name: info
    for info in (
        EngineInfo("llama_cpp", "llm", "llama_cpp", "llama-cpp-python", "medserve.engines.llama_cpp:LlamaCppEngine"),
        EngineInfo(
            "vllm",
            "llm",
            "vllm",
            "the optional extra medserve[gpu] (ray[llm]: vLLM through Ray Serve LLM)",
            None,
            serve_llm=True,
        ),
        EngineInfo("onnx", "imaging", "onnxruntime", "onnxruntime", "medserve.engines.onnx:OnnxClassifierEngine"),
        EngineInfo("hu_roi", "imaging", "numpy", "numpy", "medserve.engines.hu_roi:HuRoiAnalyzer", builtin=True),
        EngineInfo("noop", "imaging", "medserve", "medserve", "medserve.engines.noop:NoopEngine", builtin=True),
    )
}

ENGINE_NAMES: tuple[str, ...] = tuple(ENGINES)

# Which engines can serve which task; checked so that a spec cannot pair an
# LLM task with an image classifier runtime by mistake.
ENGINES_BY_TASK: dict[str, set[str]] = {
    task: {info.name for info in ENGINES.values() if info.task == task} for task in ("llm", "imaging")
}

BUILTIN_ENGINES: set[str] = {info.name for info in ENGINES.values() if info.builtin}
