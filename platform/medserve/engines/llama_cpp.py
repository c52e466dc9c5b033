"""llama.cpp engine for GGUF models on CPU (the SmolLM2 demo; small on-prem LLMs)."""

from __future__ import annotations

import codecs
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path

from medserve.engines.base import GenerationParams, LLMEngine, Piece
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

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        return self._prompt_tokens(messages)

    def text_prompt(self, prompt: str) -> list[int]:
        return self._llama.tokenize(prompt.encode(), add_bos=True, special=False)

    def generate(self, prompt: list[int], params: GenerationParams, cancel: threading.Event) -> Iterator[Piece]:
        """Token by token, so that cancellation, stop sequences and counts are exact."""
        from llama_cpp import llama_vocab_is_eog

        llama = self._llama
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending, untold, finish_reason, cut = "", 0, "length", False
        with self._lock:
            llama.set_seed(params.seed if params.seed is not None else random.randrange(2**32))
            # No KV-cache reuse across requests: a reused prefix changes the numerics
            # slightly, and the same request with the same seed must give the same answer.
            llama.reset()
            tokens = llama.generate(
                prompt, top_k=40, top_p=params.top_p, min_p=0.05, temp=params.temperature, repeat_penalty=1.0
            )
            try:
                for generated, token in enumerate(tokens, start=1):
                    if cancel.is_set():
                        finish_reason = "cancelled"
                        break
                    if llama_vocab_is_eog(llama._model.vocab, token):
                        finish_reason = "stop"
                        break
                    untold += 1
                    pending += decoder.decode(llama.detokenize([token]))
                    stop_at = min((pending.find(s) for s in params.stop if s in pending), default=-1)
                    if stop_at >= 0:
                        pending, finish_reason, cut = pending[:stop_at], "stop", True
                        break
                    if generated >= params.max_tokens:
                        break
                    keep = max((_overlap(pending, s) for s in params.stop), default=0)
                    if len(pending) > keep:
                        yield Piece(text=pending[: len(pending) - keep], tokens=untold)
                        pending, untold = pending[len(pending) - keep:], 0
            finally:
                tokens.close()
        if not cut:
            pending += decoder.decode(b"", final=True)
        yield Piece(text=pending, tokens=untold, finish_reason=finish_reason)


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of text that could begin the stop sequence."""
    for length in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-length:]):
            return length
    return 0
