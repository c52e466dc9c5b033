"""Spec commands: validate and describe the catalog, render its Serve config, hash artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import click

from medserve.cli.common import fail, load_settings, render_options


def _expand(paths: tuple[str, ...]) -> list[Path]:
    from medserve.specs import spec_files

    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        files.extend(spec_files(path) if path.is_dir() else [path])
    return files


@click.command()
@click.argument("paths", nargs=-1, required=True)
def validate(paths: tuple[str, ...]) -> None:
    """Check deployment spec files (or directories of them); non-zero exit on any problem."""
    from medserve.errors import SpecError
    from medserve.specs import PipelineSpec, check_pipeline_steps, load_spec

    problems = 0
    files = _expand(paths)
    loaded = []
    for path in files:
        try:
            spec = load_spec(path)
        except SpecError as error:
            problems += 1
            click.echo(error.message, err=True)
        else:
            loaded.append(spec)
            if isinstance(spec, PipelineSpec):
                steps = ", ".join(f"{step.name}={step.model}" for step in spec.steps)
                click.echo(f"{path}: ok ({spec.name}: pipeline {spec.version}, steps {steps})")
            else:
                click.echo(f"{path}: ok ({spec.name}: {spec.model.name} {spec.model.version}, {spec.model.engine})")
    if not problems and any(Path(raw).is_dir() for raw in paths):
        try:  # a whole catalog: pipeline steps must name its models
            check_pipeline_steps(loaded)
        except SpecError as error:
            problems += 1
            click.echo(error.message, err=True)
    if problems:
        fail(f"{problems} of {len(files)} spec file(s) invalid")
    if not files:
        fail("no spec files found")


@click.command()
@click.option("--kind", type=click.Choice(["deployment", "pipeline"]), default="deployment", show_default=True)
def schema(kind: str) -> None:
    """Print the JSON Schema of a deployment (or pipeline) spec."""
    from medserve.specs import DeploymentSpec, PipelineSpec

    model = PipelineSpec if kind == "pipeline" else DeploymentSpec
    click.echo(json.dumps(model.model_json_schema(), indent=2))


@click.command()
@click.option("--deployments", "deployments_dir", type=click.Path(path_type=Path), default=None)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["json", "yaml"]),
    default="json",
    show_default=True,
    help="yaml: the spelling KubeRay's serveConfigV2 and the Helm chart carry.",
)
def render(deployments_dir: Path | None, output_format: str) -> None:
    """Print the Ray Serve config rendered from the catalog (all specs, no capacity check)."""
    from medserve.controlplane.render import render_serve_config
    from medserve.specs import load_catalog

    settings = load_settings()
    specs = load_catalog(deployments_dir or settings.deployments_dir)
    config = render_serve_config(specs, render_options(settings))
    if output_format == "yaml":
        from medserve.controlplane.kuberay import serve_config_yaml

        click.echo(serve_config_yaml(config), nl=False)
    else:
        click.echo(json.dumps(config, indent=2))


@click.group()
def artifact() -> None:
    """Model artifacts."""


@artifact.command("hash")
@click.argument("uri", required=False)
@click.option("--spec", "spec_path", type=click.Path(path_type=Path, exists=True), default=None,
              help="A built-in analyzer's spec: hash its parameter document instead of a file.")
def artifact_hash(uri: str | None, spec_path: Path | None) -> None:
    """Print the sha256 a spec should pin for an artifact (file, directory or package:// URI)."""
    from medserve.engines.artifacts import artifact_sha256, resolve_artifact

    if spec_path is not None:
        from medserve.engines.builtin import parameter_sha256
        from medserve.specs import BUILTIN_ENGINES, DeploymentSpec, load_spec

        spec = load_spec(spec_path)
        if not isinstance(spec, DeploymentSpec) or spec.model.engine not in BUILTIN_ENGINES:
            fail("--spec takes the spec of a built-in engine (hu_roi, noop)")
        click.echo(parameter_sha256(spec))  # type: ignore[arg-type]
        return
    if not uri:
        fail("give an artifact URI or --spec")
    click.echo(artifact_sha256(resolve_artifact(uri)))  # type: ignore[arg-type]
