"""The Ray Serve deployment that hosts one engine.

Model applications have no HTTP route: only the gateway reaches them, by
DeploymentHandle. Errors cross back as payloads (``{"error": ...}``) rather
than exceptions, so the gateway gets the exact code and safe message without
depending on how Ray wraps exceptions raised in another process.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

import numpy as np
from ray import serve

from medserve import metrics
from medserve.engines.base import GenerationParams, ImagingEngine, LLMEngine
from medserve.engines.loader import load_engine
from medserve.errors import (
    ContextLengthExceededError,
    InputConstraintError,
    MedserveError,
    OperationNotSupportedError,
    UnsupportedMediaTypeError,
)
from medserve.imaging.decode import decode_dicom, decode_png
from medserve.imaging.preprocess import to_model_input
from medserve.protocols.oip import InferRequest, tensor_from_numpy
from medserve.specs import DeploymentSpec

logger = logging.getLogger("medserve.engine")

DICOM_TYPES = {"application/dicom"}
PNG_TYPES = {"image/png"}


def _digest(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def _envelope_errors(method):  # type: ignore[no-untyped-def]
    async def wrapper(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return await method(self, *args, **kwargs)
        except MedserveError as error:
            return error.to_payload()
        except Exception:  # noqa: BLE001 - an engine bug must not leak request content
            logger.exception("engine %s failed", self.spec.name)
            return {"error": {"code": "inference_failed", "message": "The model failed to produce a result."}}

    wrapper.__name__ = method.__name__
    return wrapper


class ModelServer:
    """One replica of one model deployment."""

    def __init__(self, spec: dict[str, Any], allow_unpinned: bool = False) -> None:
        self.spec = DeploymentSpec.model_validate(spec)
        self.engine, self.artifact_sha256 = load_engine(self.spec, allow_unpinned=allow_unpinned)
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

    @_envelope_errors
    async def chat(self, request: dict[str, Any]) -> dict[str, Any]:
        engine = self._llm()
        messages = [{"role": m["role"], "content": m["content"]} for m in request["messages"]]
        params = GenerationParams(**request["params"])
        prompt_tokens = await asyncio.to_thread(engine.count_chat_tokens, messages)
        limit = self.spec.inputs.max_prompt_tokens or engine.context_length
        if prompt_tokens > limit or prompt_tokens + 1 > engine.context_length:
            raise ContextLengthExceededError(limit=limit, prompt_tokens=prompt_tokens)
        # Never ask for more tokens than the context has room for.
        params = GenerationParams(
            **{**request["params"], "max_tokens": min(params.max_tokens, engine.context_length - prompt_tokens)}
        )
        generation = await asyncio.to_thread(engine.chat, messages, params)
        return {
            "text": generation.text,
            "finish_reason": generation.finish_reason,
            "prompt_tokens": generation.prompt_tokens,
            "completion_tokens": generation.completion_tokens,
            "output_sha256": _digest(generation.text),
        }

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
        engine = self._imaging()
        if content_type in DICOM_TYPES:
            image = decode_dicom(body)
        elif content_type in PNG_TYPES:
            image = decode_png(body)
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
        result["output_sha256"] = _digest(repr(findings))
        return result

    @_envelope_errors
    async def classify(self, body: bytes, content_type: str) -> dict[str, Any]:
        return await asyncio.to_thread(self._classify_sync, body, content_type)

    @_envelope_errors
    async def infer(self, request: dict[str, Any]) -> dict[str, Any]:
        engine = self._imaging()
        parsed = InferRequest.model_validate(request)
        inputs = {tensor.name: tensor.to_numpy() for tensor in parsed.inputs}
        outputs = await asyncio.to_thread(engine.infer_tensors, inputs)
        tensors = [tensor_from_numpy(name, np.asarray(value)) for name, value in outputs.items()]
        return {"outputs": tensors, "output_sha256": _digest(repr(tensors))}

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
