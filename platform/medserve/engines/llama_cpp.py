"""llama.cpp engine for GGUF models on CPU (the SmolLM2 demo; small on-prem LLMs)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from medserve.engines.base import Generation, GenerationParams, LLMEngine
from medserve.errors import MissingExtraError
from medserve.specs import DeploymentSpec


class LlamaCppEngine(LLMEngine):
    def __init__(self, spec: DeploymentSpec, artifact_path: Path) -> None:
        super().__init__(spec, artifact_path)
        try:
            from llama_cpp import Llama
        except ImportError:
            raise MissingExtraError("llama-cpp-python is not installed", engine="llama_cpp") from None
        params = spec.model.parameters
        threads = int(params.get("n_threads") or max(1, round(spec.resources.num_cpus)) or os.cpu_count() or 1)
        self._llama = Llama(
            model_path=str(artifact_path),
            n_ctx=int(params.get("n_ctx", 2048)),
            n_threads=threads,
            n_batch=int(params.get("n_batch", 256)),
            seed=int(params.get("seed", 0)),
            verbose=False,
        )
        # One llama.cpp context serves one generation at a time; concurrent
        # requests to the same replica queue here (Ray Serve scales replicas).
        self._lock = threading.Lock()

    @property
    def context_length(self) -> int:
        return int(self._llama.n_ctx())

    def _prompt_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        handler = self._llama.chat_handler or None
        template = self._llama.metadata.get("tokenizer.chat_template")
        if handler is None and template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=self._llama._model.token_get_text(self._llama.token_eos()),
                bos_token=self._llama._model.token_get_text(self._llama.token_bos()),
            )
            prompt = formatter(messages=messages).prompt
        else:
            prompt = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        return self._llama.tokenize(prompt.encode(), add_bos=False, special=True)

    def count_chat_tokens(self, messages: list[dict[str, str]]) -> int:
        return len(self._prompt_tokens(messages))

    def chat(self, messages: list[dict[str, str]], params: GenerationParams) -> Generation:
        with self._lock:
            result = self._llama.create_chat_completion(
                messages=messages,  # type: ignore[arg-type]
                max_tokens=params.max_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                stop=params.stop or None,
                seed=params.seed,
            )
        choice = result["choices"][0]  # type: ignore[index]
        usage = result["usage"]  # type: ignore[index]
        return Generation(
            text=choice["message"]["content"] or "",
            finish_reason=choice["finish_reason"] or "stop",
            prompt_tokens=int(usage["prompt_tokens"]),
            completion_tokens=int(usage["completion_tokens"]),
        )
