"""The Ray Serve deployment that hosts one engine.

Model applications have no HTTP route: only the gateway reaches them, by
DeploymentHandle. Errors cross back as payloads (``{"error": ...}``) rather
than exceptions, so the gateway gets the exact code and safe message without
depending on how Ray wraps exceptions raised in another process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import numpy as np
from ray import serve

from medserve import metrics
from medserve.digests import sha256_hex
from medserve.engines.base import BATCHABLE_METHODS, GenerationParams, ImagingEngine, LLMEngine, Piece, VolumeEngine
from medserve.engines.loader import load_engine
from medserve.engines.noop import NoopEngine
from medserve.engines.reasoning import ReasoningSplitter, Split
from medserve.errors import (
    ContextLengthExceededError,
    InferenceError,
    InputConstraintError,
    MedserveError,
    OperationNotSupportedError,
    UnsupportedMediaTypeError,
)
from medserve.imaging.decode import ImageLimits, decode_dicom, decode_png
from medserve.imaging.preprocess import to_model_input
from medserve.imaging.series import RoiBox, Volume, assemble_series
from medserve.protocols.oip import InferRequest, tensor_from_numpy
from medserve.settings import Settings
from medserve.specs import DeploymentSpec

logger = logging.getLogger("medserve.engine")

DICOM_TYPES = {"application/dicom"}
PNG_TYPES = {"image/png"}


def _envelope_errors(method):  # type: ignore[no-untyped-def]
    async def wrapper(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return await method(self, *args, **kwargs)
        except MedserveError as error:
            return error.to_payload()
        except Exception:  # noqa: BLE001 - an engine bug must not leak request content
            logger.exception("engine %s failed", self.spec.name)
            return InferenceError().to_payload()

    wrapper.__name__ = method.__name__
    return wrapper


def _envelope_stream_errors(method):  # type: ignore[no-untyped-def]
    """The same for streaming methods: an error becomes the stream's last item."""

    async def wrapper(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            async for item in method(self, *args, **kwargs):
                yield item
        except MedserveError as error:
            yield error.to_payload()
        except Exception:  # noqa: BLE001 - an engine bug must not leak request content
            logger.exception("engine %s failed", self.spec.name)
            yield InferenceError().to_payload()

    wrapper.__name__ = method.__name__
    return wrapper


async def whole_answer(events: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    """Fold a generation's events (deltas, then one end event) into the whole answer."""
    content, reasoning, end = [], [], {}
    async for event in events:
        if event["type"] == "delta":
            content.append(event["content"])
            reasoning.append(event["reasoning"])
        elif event["type"] == "end":
            end = event
    return {
        "content": "".join(content),
        "reasoning": "".join(reasoning),
        **{key: end[key] for key in ("finish_reason", "prompt_tokens", "completion_tokens", "time_to_first_token_s")},
    }


def _unfinished(item: Any) -> bool:
    """A generated piece that is not the last one (the end, or an error, is never held back)."""
    return isinstance(item, Piece) and item.finish_reason is None


class _PieceChannel:
    """Generated pieces from the engine's worker thread to the event loop: a wake-up per item, not per token.

    Waking the event loop from another thread costs a system call on each side
    and the GIL's hand-over, on every token: CPU taken from the engine's own
    threads, which on a small machine (llama.cpp with a thread per core) slows
    the engine itself. The worker wakes the loop for the first piece (never
    delayed), for the last one or an error (the end never waits), and for the
    first piece generated ``hold_s`` or more after the loop last took pieces;
    the pieces in between wait in a list for the loop to take them all at once.
    ``hold_s`` None: only the first and the last (a whole answer); 0: every piece
    that finds no wake-up already under way.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, hold_s: float | None) -> None:
        self._loop = loop
        self._hold_s = hold_s
        self._lock = threading.Lock()
        self._held: list[Piece | BaseException] = []
        self._taken_at: float | None = None  # when the loop last took pieces (time.monotonic)
        self._wake_pending = False  # woken, and the loop has not taken the pieces yet
        self.ready = asyncio.Event()  # set on the loop by the worker's wake-up

    def put(self, item: Piece | BaseException) -> None:
        """The worker thread's side."""
        with self._lock:
            self._held.append(item)
            if self._wake_pending:
                return
            hold_s, taken_at = self._hold_s, self._taken_at
            if not (taken_at is None or not _unfinished(item)
                    or (hold_s is not None and time.monotonic() - taken_at >= hold_s)):
                return
            self._wake_pending = True
        self._loop.call_soon_threadsafe(self.ready.set)

    def take(self) -> list[Piece | BaseException]:
        """The event loop's side: every piece held so far (none, after a late wake-up)."""
        with self._lock:
            held, self._held = self._held, []
            self._wake_pending = False
            if held:
                self._taken_at = time.monotonic()
        self.ready.clear()
        return held


class ModelServer:
    """One replica of one model deployment."""

    def __init__(self, spec: dict[str, Any], allow_unpinned: bool = False) -> None:
        self.spec = DeploymentSpec.model_validate(spec)
        self.engine, self.artifact_sha256 = load_engine(self.spec, allow_unpinned=allow_unpinned)
        settings = Settings()  # from the replica's environment, which `up` passes to Ray
        self.image_limits = ImageLimits(settings.max_image_pixels, settings.max_image_side)
        model = self.spec.model
        self._sampler = metrics.engine_sampler(
            model=model.name, version=model.version, sha256=self.artifact_sha256, engine=model.engine
        ).start()

    def __del__(self) -> None:
        sampler = getattr(self, "_sampler", None)
        if sampler is not None:
            sampler.stop()

    # --- LLM -------------------------------------------------------------

    def _llm(self) -> LLMEngine:
        if not isinstance(self.engine, LLMEngine):
            raise OperationNotSupportedError("this model does not generate text", model=self.spec.model.name)
        return self.engine

    def _prepare(self, request: dict[str, Any]) -> tuple[LLMEngine, list[int], GenerationParams]:
        """Prompt tokens and bounded parameters; refuses a prompt over the limit before generating."""
        engine = self._llm()
        if request.get("kind", "chat") == "chat":
            messages = [{"role": m["role"], "content": m["content"]} for m in request["messages"]]
            prompt = engine.chat_prompt(messages)
        else:
            prompt = engine.text_prompt(request["prompt"])
        limit = self.spec.inputs.max_prompt_tokens or engine.context_length
        if len(prompt) > limit or len(prompt) + 1 > engine.context_length:
            raise ContextLengthExceededError(limit=limit, prompt_tokens=len(prompt))
        params = GenerationParams(**request["params"])
        # Never ask for more tokens than the context has room for.
        room = engine.context_length - len(prompt)
        return engine, prompt, replace(params, max_tokens=min(params.max_tokens, room))

    async def _events(self, request: dict[str, Any], interval_s: float | None) -> AsyncIterator[dict[str, Any]]:
        """start, then deltas (pieces that arrived together are merged), then end.

        ``interval_s`` (a stream): each delta after the first also takes what is generated within
        interval_s of the one before; 0, a delta per wake-up. None (a whole answer, read only at its
        end): the first piece (its time is the time to first token), then everything else at the end.

        Generation runs in a worker thread; closing this generator (the caller
        went away, the gateway gave up) sets the cancel flag, and the engine
        stops at its next token.
        """
        engine, prompt, params = await asyncio.to_thread(self._prepare, request)
        yield {"type": "start", "prompt_tokens": len(prompt)}
        splitter = ReasoningSplitter() if request.get("kind", "chat") == "chat" and self.spec.reasoning.parser else None
        loop = asyncio.get_running_loop()
        channel = _PieceChannel(loop, interval_s)
        cancel = threading.Event()

        def produce() -> None:
            try:
                for piece in engine.generate(prompt, params, cancel):
                    channel.put(piece)
            except BaseException as error:  # noqa: BLE001 - handed to the event loop
                channel.put(error)

        started = loop.time()
        worker = loop.run_in_executor(None, produce)
        completion_tokens, first_token_s = 0, None
        last_item_at = None
        try:
            while True:
                batch: list[Piece | BaseException] = []
                if interval_s and last_item_at is not None:
                    # The worker wakes this loop for the first piece generated interval_s after the
                    # last take; the timer covers an engine that pauses with pieces held.
                    wait_s = last_item_at + interval_s - loop.time()
                    if wait_s > 0 and not channel.ready.is_set():
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(wait_s):
                                await channel.ready.wait()
                    batch = channel.take()
                while not batch:
                    await channel.ready.wait()
                    batch = channel.take()
                for item in batch:
                    if isinstance(item, BaseException):
                        raise item
                text = "".join(item.text for item in batch)
                tokens = sum(item.tokens for item in batch)
                completion_tokens += tokens
                if first_token_s is None and tokens:
                    first_token_s = loop.time() - started
                last = batch[-1]
                split = splitter.feed(text) if splitter else Split(content=text)
                if last.finish_reason is not None and splitter:
                    tail = splitter.finish()
                    split = Split(split.reasoning + tail.reasoning, split.content + tail.content)
                if split.reasoning or split.content or tokens:
                    last_item_at = loop.time()
                    yield {"type": "delta", "content": split.content, "reasoning": split.reasoning, "tokens": tokens}
                if last.finish_reason is not None:
                    yield {
                        "type": "end",
                        "finish_reason": last.finish_reason,
                        "prompt_tokens": len(prompt),
                        "completion_tokens": completion_tokens,
                        "time_to_first_token_s": first_token_s,
                    }
                    return
        finally:
            # Normal end: a no-op. Early close: the engine stops at its next token
            # and the worker thread finishes on its own.
            cancel.set()
            del worker

    @_envelope_stream_errors
    async def generate_stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Streaming generation; call with handle.options(stream=True).

        The spec's streaming.interval_ms gathers the tokens after the first into fewer items.
        """
        async for event in self._events(request, self.spec.streaming.interval_ms / 1000.0):
            yield event

    @_envelope_errors
    async def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        """The whole answer at once."""
        return await whole_answer(self._events(request, None))

    # --- imaging ---------------------------------------------------------

    def _imaging(self) -> ImagingEngine:
        if not isinstance(self.engine, ImagingEngine):
            raise OperationNotSupportedError("this model does not analyse images", model=self.spec.model.name)
        return self.engine

    def _check_constraints(self, modality: str | None, body_part: str | None, source_format: str) -> None:
        inputs = self.spec.inputs
        if source_format == "png":
            if not inputs.accept_png:
                raise InputConstraintError("this model accepts DICOM only", model=self.spec.model.name)
            return
        if inputs.modalities and modality not in inputs.modalities:
            raise InputConstraintError(
                "the image modality is not one this model was validated for",
                model=self.spec.model.name,
                accepted_modalities=inputs.modalities,
                modality=modality,
            )
        if inputs.body_parts and body_part not in inputs.body_parts:
            raise InputConstraintError(
                "the body part is not one this model was validated for",
                model=self.spec.model.name,
                accepted_body_parts=inputs.body_parts,
                body_part=body_part,
            )

    def _classify_sync(self, body: bytes, content_type: str) -> dict[str, Any]:
        if isinstance(self.engine, VolumeEngine):
            # A series analyzer given one instance: a series of one slice, default ROI.
            if content_type not in DICOM_TYPES:
                raise InputConstraintError("this model accepts DICOM only", model=self.spec.model.name)
            volume = assemble_series([body])
            self._check_constraints(volume.modality, volume.body_part, "dicom")
            findings = self.engine.analyze(volume, None)
            return {
                "findings": findings,
                "input": {"format": "dicom", "modality": volume.modality, "body_part": volume.body_part},
                "output_sha256": sha256_hex(json.dumps(findings, sort_keys=True)),
            }
        engine = self._imaging()
        if content_type in DICOM_TYPES:
            image = decode_dicom(body, self.image_limits)
        elif content_type in PNG_TYPES:
            image = decode_png(body, self.image_limits)
        else:
            raise UnsupportedMediaTypeError(accepted=sorted(DICOM_TYPES | PNG_TYPES))
        self._check_constraints(image.modality, image.body_part, image.source_format)
        batch = to_model_input(image, engine.input_height, engine.input_width, engine.input_channels)
        probabilities = engine.predict(batch)[0]
        findings = sorted(
            ({"label": label, "probability": round(float(p), 6)} for label, p in zip(engine.labels, probabilities)),
            key=lambda item: item["probability"],
            reverse=True,
        )
        result = {
            "findings": findings,
            "top_label": findings[0]["label"],
            "input": {"format": image.source_format, "modality": image.modality, "body_part": image.body_part},
        }
        result["output_sha256"] = sha256_hex(repr(findings))
        return result

    @_envelope_errors
    async def classify(self, body: bytes, content_type: str) -> dict[str, Any]:
        if isinstance(self.engine, NoopEngine):
            # Never reads the input: no worker thread, so it measures the platform alone.
            return await self.engine.classify()
        return await asyncio.to_thread(self._classify_sync, body, content_type)

    def _analyze_series_sync(self, volume: Volume, roi: dict[str, Any] | None) -> dict[str, Any]:
        self._check_constraints(volume.modality, volume.body_part, "dicom")
        if isinstance(self.engine, VolumeEngine):
            findings = self.engine.analyze(volume, RoiBox.model_validate(roi) if roi else None)
        elif isinstance(self.engine, ImagingEngine):
            # A 2-D classifier sees the series' middle slice, windowed as a single upload would be.
            engine = self.engine
            batch = to_model_input(volume.middle_slice_image(), engine.input_height, engine.input_width,
                                   engine.input_channels)
            probabilities = engine.predict(batch)[0]
            ranked = sorted(
                ({"label": label, "probability": round(float(p), 6)} for label, p in zip(engine.labels, probabilities)),
                key=lambda item: item["probability"],
                reverse=True,
            )
            findings = [
                {
                    "code": f"{self.spec.model.name}-class",
                    "display": f"{self.spec.model.name} classification",
                    "label": ranked[0]["label"],
                    "value": ranked[0]["probability"],
                    "unit": "probability",
                    "flag": None,
                    "interpretation": f"most probable class: {ranked[0]['label']}",
                    "details": {"probabilities": ranked, "slice": volume.shape[0] // 2},
                }
            ]
        else:
            raise OperationNotSupportedError("this model does not analyse images", model=self.spec.model.name)
        return {"findings": findings, "output_sha256": sha256_hex(json.dumps(findings, sort_keys=True))}

    @_envelope_errors
    async def analyze_series(self, volume: Volume, roi: dict[str, Any] | None = None) -> dict[str, Any]:
        """Findings for one assembled series (pipeline steps call this)."""
        return await asyncio.to_thread(self._analyze_series_sync, volume, roi)

    @_envelope_errors
    async def infer(self, request: dict[str, Any]) -> dict[str, Any]:
        engine = self._imaging()
        parsed = InferRequest.model_validate(request)
        inputs = {tensor.name: tensor.to_numpy() for tensor in parsed.inputs}
        outputs = await asyncio.to_thread(engine.infer_tensors, inputs)
        tensors = [tensor_from_numpy(name, np.asarray(value)) for name, value in outputs.items()]
        return {"outputs": tensors, "output_sha256": sha256_hex(repr(tensors))}

    async def call_many(self, method: str, calls: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
        """Several gateway requests for one method in one handle round trip (gateway/batching.py).

        Each answer is that call's own result or error payload, in order: one
        bad input fails only its own request.
        """
        if method not in BATCHABLE_METHODS:
            return [OperationNotSupportedError("this method is not called in batches", method=method).to_payload()
                    for _ in calls]
        return list(await asyncio.gather(*(getattr(self, method)(*args) for args in calls)))

    @_envelope_errors
    async def metadata(self) -> dict[str, Any]:
        meta = self._imaging().metadata()
        return {"name": self.spec.model.name, "versions": [self.spec.model.version], "platform": "onnxruntime", **meta}

    async def check_health(self) -> None:
        # Ray Serve calls this periodically; an engine that failed to load
        # never gets here (the constructor raised), so nothing more to check.
        return None


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder named by import_path in the rendered Serve config."""
    return serve.deployment(ModelServer).bind(args["spec"], bool(args.get("allow_unpinned", False)))
