"""Deployment specs: the YAML files in ``deployments/`` parse into these models.

The same models are used by the CLI (``medserve validate``), the control plane
(rendering the Ray Serve config) and the engines (which receive the model part
as their init argument), so a YAML file and the code can never disagree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from medserve.engines.registry import BUILTIN_ENGINES, ENGINE_NAMES, ENGINES_BY_TASK
from medserve.errors import SpecError

NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
MODEL_NAME_PATTERN = r"^[a-z0-9]([a-z0-9.-]{0,98}[a-z0-9])?$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
ALIAS_PATTERN = r"^[a-z][a-z0-9_-]{0,63}$"

Task = Literal["llm", "imaging"]
# The engine names, which task each serves and which are built in come from
# the one engine table (medserve.engines.registry).
EngineName = Literal[ENGINE_NAMES]  # type: ignore[valid-type]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ArtifactSpec(StrictModel):
    """Where the model's weights live and what they must hash to."""

    uri: str = Field(
        description="Location of the weights: an absolute or relative file path (file or directory), "
        "a file:// URI, or package://<python-package>/<path inside it> for weights shipped in a "
        "Python package, or builtin://<engine> for an analyzer shipped with medserve (no weights: "
        "its sha256 pins the analyzer's parameter document). Nothing is downloaded at load time.",
        min_length=1,
    )
    sha256: Annotated[str, Field(pattern=SHA256_PATTERN)] | None = Field(
        default=None,
        description="Lower-case hex sha256 of the file (for a directory: of its manifest, see "
        "`medserve artifact hash`). A mismatch at load time refuses the model. "
        "Leaving it unset is allowed for validation only: unpinned artifacts are not served.",
    )

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme = value.split("://", 1)[0] if "://" in value else "path"
        if scheme not in {"path", "file", "package", "builtin"}:
            raise ValueError(
                f"unsupported artifact scheme {scheme!r}: use a local path, file://, package:// or builtin:// "
                "(stage remote weights onto the nodes first)"
            )
        if scheme == "package" and "/" not in value.removeprefix("package://"):
            raise ValueError("package:// URIs need a path inside the package: package://<pkg>/<file>")
        return value


class ModelSpec(StrictModel):
    """The model a deployment serves: identity, version, engine and weights."""

    name: str = Field(
        pattern=MODEL_NAME_PATTERN, description="Model name clients use (lower-case letters, digits, dots, dashes)."
    )
    version: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$",
        description="Version of the model; every audit record carries it.",
    )
    task: Task = Field(description="llm: chat/completions; imaging: classification of images and DICOM.")
    engine: EngineName = Field(
        description="Runtime: llama_cpp (CPU GGUF), vllm (GPU), onnx (ONNX Runtime), "
        "hu_roi (built-in Hounsfield-unit region-of-interest analyzer for CT series), "
        "noop (built-in stand-in that answers without reading the input: capacity checks and benchmarks)."
    )
    artifact: ArtifactSpec = Field(description="The weights and their pinned digest.")
    parameters: dict[str, Any] = Field(
        default_factory=dict,
        description="Engine-specific options, e.g. n_ctx and n_threads for llama_cpp, "
        "tensor_parallel_size and max_model_len for vllm, class labels and input layout for onnx.",
    )

    @model_validator(mode="after")
    def _engine_fits_task(self) -> "ModelSpec":
        if self.engine not in ENGINES_BY_TASK[self.task]:
            allowed = ", ".join(sorted(ENGINES_BY_TASK[self.task]))
            raise ValueError(f"engine {self.engine!r} cannot serve task {self.task!r} (use one of: {allowed})")
        builtin = self.artifact.uri.startswith("builtin://")
        if (self.engine in BUILTIN_ENGINES) != builtin or (
            builtin and self.artifact.uri != f"builtin://{self.engine}"
        ):
            raise ValueError(
                f"engine {self.engine!r} needs artifact uri builtin://{self.engine}"
                if self.engine in BUILTIN_ENGINES
                else "builtin:// artifacts are for built-in analyzer engines only"
            )
        return self


class ResourceSpec(StrictModel):
    """What one replica needs from the cluster (Ray actor options)."""

    num_cpus: float = Field(default=1.0, ge=0, description="Logical CPUs per replica.")
    num_gpus: float = Field(
        default=0.0, ge=0, description="GPUs per replica; fractions (e.g. 0.25) let small models share a GPU."
    )
    accelerator_type: str | None = Field(
        default=None,
        description="Ray accelerator type the replica must run on, e.g. A100, H100, L4.",
    )
    memory_bytes: int | None = Field(default=None, gt=0, description="Heap memory reserved per replica, in bytes.")
    custom: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources, e.g. {radiology_gpu: 1} to pin replicas to an on-prem node pool.",
    )

    @model_validator(mode="after")
    def _fractional_gpus_below_one(self) -> "ResourceSpec":
        if self.num_gpus > 1 and self.num_gpus != int(self.num_gpus):
            raise ValueError("num_gpus above 1 must be a whole number")
        return self


class AutoscalingSpec(StrictModel):
    """Replica bounds and Ray Serve autoscaling behaviour."""

    min_replicas: int = Field(default=1, ge=0, description="Fewest replicas; 0 lets a rarely used model scale to zero.")
    max_replicas: int = Field(default=1, ge=1, description="Most replicas.")
    initial_replicas: int | None = Field(default=None, ge=0, description="Replicas at deploy time (default: min).")
    target_ongoing_requests: float = Field(
        default=2.0, gt=0, description="Ongoing requests per replica that autoscaling aims for."
    )
    upscale_delay_s: float = Field(default=10.0, ge=0, description="Seconds of sustained load before scaling up.")
    downscale_delay_s: float = Field(default=120.0, ge=0, description="Seconds of low load before scaling down.")
    downscale_to_zero_delay_s: float | None = Field(
        default=None, ge=0,
        description="Seconds without requests before the last replica stops (min_replicas 0); default: "
        "downscale_delay_s. The next request then waits for a replica to start.",
    )
    metrics_interval_s: float = Field(
        default=2.0, gt=0,
        description="How often replicas and the gateway report load to the autoscaler (Ray Serve's "
        "metrics_interval_s). Ray's own default, 10 s, puts a 10 s floor under every scale-up.",
    )
    look_back_period_s: float = Field(
        default=10.0, gt=0,
        description="Window over which the autoscaler averages load; longer is steadier, shorter reacts faster.",
    )
    max_ongoing_requests: int = Field(
        default=8, ge=1, description="Requests one replica works on at once; more wait in the queue."
    )
    max_queued_requests: int = Field(
        default=-1, ge=-1, description="Requests allowed to wait for a replica (-1: unbounded); beyond it, 503."
    )

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingSpec":
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError("look_back_period_s must be longer than metrics_interval_s")
        return self

    @property
    def is_fixed(self) -> bool:
        return self.min_replicas == self.max_replicas and self.min_replicas > 0


class InputSpec(StrictModel):
    """What inputs the model was validated for; anything else is refused."""

    modalities: list[str] = Field(
        default_factory=list,
        description="Accepted DICOM Modality codes (e.g. MR, CT). Empty: any. PNG input has no modality.",
    )
    body_parts: list[str] = Field(
        default_factory=list, description="Accepted DICOM BodyPartExamined values. Empty: any."
    )
    accept_png: bool = Field(default=True, description="Whether plain PNG images are accepted (imaging only).")
    max_prompt_tokens: int | None = Field(
        default=None, gt=0, description="Longest prompt accepted, in tokens (LLM only); longer gets 400."
    )
    max_output_tokens: int = Field(default=512, gt=0, description="Cap on max_tokens a caller may ask for.")

    @field_validator("modalities", "body_parts")
    @classmethod
    def _upper(cls, values: list[str]) -> list[str]:
        return [value.strip().upper() for value in values]


class ReasoningSpec(StrictModel):
    """How a reasoning model's thinking (``<think>...</think>``) is handled (LLM only)."""

    parser: Literal["deepseek_r1"] | None = Field(
        default=None,
        description="Split the reasoning from the answer the way vLLM's parser of this name does: "
        "text up to </think> becomes reasoning_content. None: the output is all answer.",
    )
    return_to_client: bool = Field(
        default=False,
        description="Whether reasoning_content reaches the caller. Either way the audit record keeps "
        "a sha256 of the reasoning and of the answer.",
    )


class StreamingSpec(StrictModel):
    """How a streamed answer leaves the model's replica (LLM only)."""

    interval_ms: float = Field(
        default=0.0,
        ge=0,
        le=1000,
        description="After the first token (which never waits), the tokens generated within this many "
        "milliseconds of the last item leave together as one stream item. Each item costs a hop through "
        "Ray, an SSE event and an HTTP write, so on a busy CPU fewer, larger items leave the engine more "
        "time (vLLM's --stream-interval makes the same trade by token count). 0: every token as it comes.",
    )


class AccessSpec(StrictModel):
    """Who may call the model."""

    departments: list[str] = Field(
        default_factory=list,
        description="Departments whose keys may call this model. Empty: every department.",
    )


class ReviewSpec(StrictModel):
    """Clinician review of the model's results: whether each is a draft until a person signs it off,
    and what is kept for the reviewer (GET /v1/reviews/pending, POST /v1/reviews/{inference_id},
    GET /v1/reports/{id}). PHI minimisation is the default: nothing but digests is stored unless asked."""

    required: bool | None = Field(
        default=None,
        description="Whether every answered result waits in the review queue until a clinician accepts, edits or "
        "rejects it. Default: false for LLMs, true for imaging models and pipelines (which cannot turn it off).",
    )
    departments: list[str] = Field(
        default_factory=list,
        description="Caller departments whose results need review (LLM only); results for callers of other "
        "departments are answered without a pending result. Empty: every department.",
    )
    store_output: bool = Field(
        default=False,
        description="Keep the answer text (LLM) or the findings (imaging model) for the reviewer and for "
        "GET /v1/reports/{id}; otherwise only its sha256 digest is kept. Pipeline reports are always kept.",
    )
    store_input: bool = Field(
        default=False,
        description="Keep the request's messages or prompt for the reviewer (LLM only). Off by default: input "
        "text often carries patient data.",
    )
    retention_days: int = Field(
        default=30, ge=1, le=3650,
        description="Days a stored text, findings or report is kept; after that it is pruned and only the "
        "digests, the review and the audit row remain.",
    )

    def effective_required(self, task: str) -> bool:
        return self.required if self.required is not None else task != "llm"

    def check_for(self, task: str) -> None:
        """What this policy cannot say for a kind of result (raises ValueError)."""
        if task != "llm":
            if self.required is False:
                raise ValueError("review.required cannot be false for imaging models and pipelines: "
                                 "every imaging result is a draft until a clinician signs it off")
            if self.departments:
                raise ValueError("review.departments applies to LLMs only (imaging results are always reviewed)")
            if self.store_input:
                raise ValueError("review.store_input applies to LLMs only (DICOM and images are never stored)")
        elif not self.effective_required(task) and (self.store_output or self.store_input or self.departments):
            raise ValueError("review.store_output, store_input and departments need review.required: true")


class ValidationEvidence(StrictModel):
    """Evidence that the model performs as claimed."""

    dataset: str = Field(description="Data set the model was validated on.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Metric name to value, e.g. auroc: 0.91.")
    notes: str | None = Field(default=None, description="Caveats about the validation.")


class ModelCard(StrictModel):
    """What a clinician and a regulator need to know about the model."""

    intended_use: str = Field(min_length=1, description="The clinical question the model answers, and for whom.")
    contraindications: list[str] = Field(default_factory=list, description="Where the model must not be used.")
    limitations: list[str] = Field(default_factory=list, description="Known failure modes and caveats.")
    regulatory_status: str = Field(
        description="e.g. 'research use only', 'FDA 510(k) K123456', 'CE MDR class IIa', 'NMPA class III'."
    )
    validation: ValidationEvidence | None = Field(default=None, description="Validation data set and metrics.")
    approver: str | None = Field(default=None, description="Who approved the model for clinical use.")


class DeploymentSpec(StrictModel):
    """One model deployment: what to serve, on what, for whom."""

    kind: Literal["deployment"] = Field(
        default="deployment", description="Spec kind; files without one are deployments."
    )
    name: str = Field(pattern=NAME_PATTERN, description="Deployment name; also the Ray Serve application name.")
    description: str | None = Field(default=None, description="Free text for people reading the catalog.")
    model: ModelSpec = Field(description="The model and version to serve.")
    resources: ResourceSpec = Field(default_factory=ResourceSpec, description="Per-replica resources.")
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec, description="Replica count and scaling.")
    inputs: InputSpec = Field(default_factory=InputSpec, description="Input constraints.")
    access: AccessSpec = Field(default_factory=AccessSpec, description="Which departments may call it.")
    reasoning: ReasoningSpec = Field(
        default_factory=ReasoningSpec, description="Reasoning split and whether callers see it (LLM only)."
    )
    review: ReviewSpec = Field(
        default_factory=ReviewSpec,
        description="Clinician review: whether results wait in the review queue and what is kept for the reviewer.",
    )
    streaming: StreamingSpec = Field(
        default_factory=StreamingSpec, description="How streamed answers leave the model's replica (LLM only)."
    )
    model_card: ModelCard = Field(description="Intended use, regulatory status and validation.")
    placement: Literal["replicas", "gateway"] = Field(
        default="replicas",
        description="replicas: the model runs in its own Ray Serve replicas, which the gateway reaches by "
        "DeploymentHandle and `autoscaling` scales. gateway: the engine is loaded inside every gateway replica "
        "and called in process, which saves the handle hop (most of a light model's cost per request); the "
        "gateway's replicas are then its replicas, `autoscaling.max_ongoing_requests` and `max_queued_requests` "
        "bound it in each gateway replica, and it needs no GPU, no custom resources, one replica and alias: null.",
    )
    alias: str | None = Field(
        default="production",
        pattern=ALIAS_PATTERN,
        description="Registry alias whose version this deployment serves (created pointing at model.version "
        "on first apply; afterwards `medserve promote` and `medserve rollback` move it, and canary and shadow "
        "rollouts run against it). null pins the deployment to model.version: no rollouts.",
    )

    @model_validator(mode="after")
    def _inputs_fit_task(self) -> "DeploymentSpec":
        if self.model.task == "llm" and (self.inputs.modalities or self.inputs.body_parts):
            raise ValueError("modalities and body_parts apply to imaging models only")
        if self.model.task != "llm" and self.reasoning.parser is not None:
            raise ValueError("reasoning applies to LLM models only")
        if self.model.task != "llm" and self.streaming.interval_ms:
            raise ValueError("streaming applies to LLM models only")
        if "reasoning_parser" in self.model.parameters:
            raise ValueError("set reasoning.parser rather than model.parameters.reasoning_parser")
        self.review.check_for(self.model.task)
        if self.placement == "gateway":
            self._check_gateway_placement()
        if self.model.engine == "vllm":
            if self.resources.num_gpus <= 0:
                raise ValueError("the vllm engine needs resources.num_gpus > 0")
            tensor_parallel = self.model.parameters.get("tensor_parallel_size", 1)
            if not isinstance(tensor_parallel, int) or tensor_parallel < 1:
                raise ValueError("model.parameters.tensor_parallel_size must be a whole number >= 1")
            if self.resources.num_gpus > tensor_parallel:
                raise ValueError(
                    "resources.num_gpus exceeds model.parameters.tensor_parallel_size: each of the "
                    "tensor-parallel workers takes num_gpus / tensor_parallel_size GPUs (at most 1)"
                )
        return self

    def _check_gateway_placement(self) -> None:
        """What an engine inside the gateway's replicas cannot have: the gateway is
        one CPU deployment, scaled for the door, with one version per model."""
        problems = []
        if self.model.engine == "vllm":
            problems.append("the vllm engine runs in Ray Serve LLM's own replicas")
        if self.resources.num_gpus or self.resources.accelerator_type or self.resources.custom:
            problems.append("GPUs, accelerator types and custom resources need replicas of their own")
        if self.autoscaling.min_replicas != 1 or self.autoscaling.max_replicas != 1:
            problems.append("replica counts are the gateway's (leave min_replicas and max_replicas at 1)")
        if self.alias is not None:
            problems.append("rollouts need one application per version (set alias: null)")
        if problems:
            raise ValueError("placement: gateway does not fit: " + "; ".join(problems))

    @property
    def tensor_parallel_size(self) -> int:
        return int(self.model.parameters.get("tensor_parallel_size", 1))


class PipelineStepSpec(StrictModel):
    """One check of a pipeline: a deployed model (or built-in analyzer) run on the whole series."""

    name: str = Field(pattern=NAME_PATTERN, description="Step name; findings and ROIs in requests refer to it.")
    model: str = Field(
        pattern=MODEL_NAME_PATTERN,
        description="Model name of a deployment in the same catalog (its model.name) that the step calls.",
    )
    description: str | None = Field(default=None, description="What the step checks, for people reading reports.")


class PipelineInputSpec(StrictModel):
    """What series the pipeline as a whole accepts; each step's own inputs are checked as well."""

    modalities: list[str] = Field(
        default_factory=list, description="Accepted DICOM Modality codes for the series. Empty: any."
    )
    body_parts: list[str] = Field(
        default_factory=list, description="Accepted DICOM BodyPartExamined values. Empty: any."
    )
    max_instances: int = Field(
        default=1000, ge=1, le=10_000, description="Most DICOM instances (slices) one request may carry."
    )

    @field_validator("modalities", "body_parts")
    @classmethod
    def _upper(cls, values: list[str]) -> list[str]:
        return [value.strip().upper() for value in values]


class PipelineSpec(StrictModel):
    """Several checks on one DICOM series ("one sweep, many checks"), merged into one report."""

    kind: Literal["pipeline"] = Field(description="Spec kind: pipeline.")
    name: str = Field(pattern=NAME_PATTERN, description="Pipeline name; the route is /v1/pipelines/{name}/studies.")
    version: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$",
        description="Version of the pipeline definition; the pipeline's own audit record carries it.",
    )
    description: str | None = Field(default=None, description="Free text for people reading the catalog.")
    inputs: PipelineInputSpec = Field(default_factory=PipelineInputSpec, description="Series constraints.")
    access: AccessSpec = Field(default_factory=AccessSpec, description="Which departments may run it.")
    steps: list[PipelineStepSpec] = Field(
        min_length=1, max_length=16, description="Checks run in parallel on the same series."
    )
    review: ReviewSpec = Field(
        default_factory=ReviewSpec,
        description="Review of the pipeline's report: always required; retention_days bounds how long the "
        "stored report is kept.",
    )

    @model_validator(mode="after")
    def _unique_steps(self) -> "PipelineSpec":
        names = [step.name for step in self.steps]
        if len(names) != len(set(names)):
            raise ValueError("step names must be unique within a pipeline")
        self.review.check_for("pipeline")
        return self


def _spec_kind(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("kind", "deployment"))
    return str(getattr(value, "kind", "deployment"))


# Discriminated by `kind`; files written before pipelines existed have none
# and are deployments.
AnySpec = Annotated[
    Union[Annotated[DeploymentSpec, Tag("deployment")], Annotated[PipelineSpec, Tag("pipeline")]],
    Discriminator(_spec_kind),
]
_ANY_SPEC: TypeAdapter[DeploymentSpec | PipelineSpec] = TypeAdapter(AnySpec)


def deployments_of(specs: list[DeploymentSpec | PipelineSpec]) -> list[DeploymentSpec]:
    return [spec for spec in specs if isinstance(spec, DeploymentSpec)]


def pipelines_of(specs: list[DeploymentSpec | PipelineSpec]) -> list[PipelineSpec]:
    return [spec for spec in specs if isinstance(spec, PipelineSpec)]


# --- loading ----------------------------------------------------------------


def _format_validation_error(path: Path, error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        loc = item["loc"]
        if loc and loc[0] in {"deployment", "pipeline"}:  # the union's tag, not a field
            loc = loc[1:]
        location = ".".join(str(part) for part in loc) or "(top level)"
        lines.append(f"{path}: {location}: {item['msg']}")
    return "\n".join(lines)


def parse_spec(data: Any, source: Path | str = "<spec>") -> DeploymentSpec | PipelineSpec:
    path = Path(str(source))
    if not isinstance(data, dict):
        raise SpecError(f"{path}: the file must hold one YAML mapping", file=str(path))
    if data.get("kind", "deployment") not in {"deployment", "pipeline"}:
        raise SpecError(f"{path}: kind: must be 'deployment' (the default) or 'pipeline'", file=str(path))
    try:
        return _ANY_SPEC.validate_python(data)
    except ValidationError as error:
        raise SpecError(_format_validation_error(path, error), file=str(path)) from None


def load_spec(path: Path) -> DeploymentSpec | PipelineSpec:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise SpecError(f"{path}: cannot read: {error.strerror}", file=str(path)) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise SpecError(f"{path}: not valid YAML{where}", file=str(path)) from None
    return parse_spec(data, path)


def spec_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix in {".yaml", ".yml"} and p.is_file())


def load_catalog(directory: Path) -> list[DeploymentSpec | PipelineSpec]:
    """All specs in a directory; raises on the first bad file, on duplicate names,
    and on pipeline steps that name no model of the catalog."""
    specs = [load_spec(path) for path in spec_files(directory)]
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.name in seen:
            raise SpecError(f"deployment name {spec.name!r} is used twice in {directory}", name=spec.name)
        seen[spec.name] = spec.name
    check_pipeline_steps(specs)
    return specs


def check_pipeline_steps(specs: list[DeploymentSpec | PipelineSpec]) -> None:
    """Every pipeline step must call an imaging model that the same catalog deploys."""
    imaging_models = {spec.model.name for spec in deployments_of(specs) if spec.model.task == "imaging"}
    for pipeline in pipelines_of(specs):
        for step in pipeline.steps:
            if step.model not in imaging_models:
                raise SpecError(
                    f"pipeline {pipeline.name!r}: step {step.name!r} calls {step.model!r}, "
                    "which is no imaging model of this catalog",
                    name=pipeline.name,
                )
