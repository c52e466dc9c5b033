"""Built-in engines: analyzers and stand-ins shipped with medserve, with no weights file.

Their "artifact" is a parameter document (engine name, engine version and
every parameter, canonical JSON) whose sha256 the spec pins, exactly as a
weights file is pinned: changing a threshold or a delay without a new pin is
refused at load time, so every audit record's version still names one exact
behaviour.
"""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ValidationError

from medserve.errors import ArtifactIntegrityError, ConfigurationError
from medserve.specs import DeploymentSpec


def _parameters_model(engine: str) -> tuple[type[BaseModel], str]:
    """The engine's parameter model and the version of its computation."""
    if engine == "hu_roi":
        from medserve.engines.hu_roi import ANALYZER_VERSION, HuRoiParameters

        return HuRoiParameters, ANALYZER_VERSION
    if engine == "noop":
        from medserve.engines.noop import NOOP_VERSION, NoopParameters

        return NoopParameters, NOOP_VERSION
    raise ConfigurationError("not a built-in engine", engine=engine)


def parameter_document(spec: DeploymentSpec) -> bytes:
    """The canonical bytes the spec's artifact sha256 pins."""
    engine = spec.model.engine
    model, version = _parameters_model(engine)
    try:
        parameters = model.model_validate(spec.model.parameters)
    except ValidationError as error:
        fields = [".".join(str(p) for p in item["loc"]) for item in error.errors()]
        raise ConfigurationError(f"invalid {engine} parameters", deployment=spec.name, fields=fields) from None
    # hu_roi's document predates the generic name "engine": its key stays "analyzer"
    # so the digests pinned in existing specs still match.
    document = {"analyzer": engine, "analyzer_version": version, "parameters": parameters.model_dump(mode="json")}
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def parameter_sha256(spec: DeploymentSpec) -> str:
    return hashlib.sha256(parameter_document(spec)).hexdigest()


def verify_parameters(spec: DeploymentSpec, *, allow_unpinned: bool = False) -> str:
    """Refuse to serve parameters that differ from the pinned digest (like weights would be refused)."""
    actual = parameter_sha256(spec)
    expected = spec.model.artifact.sha256
    if expected is None and not allow_unpinned:
        raise ArtifactIntegrityError(
            "built-in engine parameters have no pinned sha256; pin it in the spec before serving",
            uri=spec.model.artifact.uri, actual=actual,
        )
    if expected is not None and expected != actual:
        raise ArtifactIntegrityError(uri=spec.model.artifact.uri, expected=expected, actual=actual)
    return actual
