"""Deployment specs: the catalog validates, bad files are named precisely."""

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from medserve.cli.main import cli
from medserve.errors import SpecError
from medserve.specs import (
    DeploymentSpec,
    PipelineSpec,
    StrictModel,
    deployments_of,
    load_catalog,
    load_spec,
    pipelines_of,
    spec_files,
)


def _valid() -> dict:
    return {
        "name": "demo",
        "model": {
            "name": "demo-model",
            "version": "1.0",
            "task": "imaging",
            "engine": "onnx",
            "artifact": {"uri": "/models/demo.onnx", "sha256": "a" * 64},
            "parameters": {"labels": ["a", "b"]},
        },
        "model_card": {"intended_use": "testing", "regulatory_status": "research use only"},
    }


def test_every_catalog_spec_validates(repo_root):
    files = spec_files(repo_root / "deployments")
    assert len(files) >= 5
    specs = load_catalog(repo_root / "deployments")
    engines = {spec.model.engine for spec in deployments_of(specs)}
    assert {"onnx", "llama_cpp", "vllm", "hu_roi"} <= engines
    assert {p.name for p in pipelines_of(specs)} >= {"ct-opportunistic-screen", "mr-brain-screen"}


def test_catalog_has_cpu_demos_and_gpu_specs(repo_root):
    specs = {spec.name: spec for spec in load_catalog(repo_root / "deployments")}
    assert specs["brain-mri-tumour"].resources.num_gpus == 0
    assert specs["smollm2-demo"].model.engine == "llama_cpp"
    assert specs["deepseek-r1-distill-qwen-32b"].resources.num_gpus == 2
    assert specs["ct-pancreas-screen"].resources.num_gpus == 0.25


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.update(surprise=1), "surprise"),
        (lambda d: d["model"].update(task="genomics"), "model.task"),
        (lambda d: d["model"].update(engine="llama_cpp"), "model"),
        (lambda d: d["model"]["artifact"].update(sha256="xyz"), "model.artifact.sha256"),
        (lambda d: d["model"]["artifact"].update(uri="s3://bucket/model"), "model.artifact.uri"),
        (lambda d: d.update(autoscaling={"min_replicas": 3, "max_replicas": 1}), "autoscaling"),
        (lambda d: d.update(resources={"num_gpus": 1.5}), "resources"),
        (lambda d: d.update(name="Bad Name"), "name"),
        (lambda d: d.pop("model_card"), "model_card"),
    ],
)
def test_bad_spec_names_file_and_field(tmp_path: Path, mutate, field):
    data = _valid()
    mutate(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert str(path) in caught.value.message
    assert f": {field}:" in caught.value.message


def test_not_yaml_is_reported(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(path)


def test_duplicate_names_refused(tmp_path: Path):
    for index in range(2):
        (tmp_path / f"spec{index}.yaml").write_text(yaml.safe_dump(_valid()))
    with pytest.raises(SpecError, match="used twice"):
        load_catalog(tmp_path)


def test_validate_cli_exit_codes(tmp_path: Path, repo_root):
    runner = CliRunner()
    ok = runner.invoke(cli, ["validate", str(repo_root / "deployments")])
    assert ok.exit_code == 0, ok.output
    assert "smollm2-demo" in ok.output

    data = _valid()
    data["autoscaling"] = {"max_replicas": 0}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    result = runner.invoke(cli, ["validate", str(bad)])
    assert result.exit_code != 0
    assert "bad.yaml: autoscaling.max_replicas" in result.output


def test_schema_cli_prints_json_schema():
    result = CliRunner().invoke(cli, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"name", "model", "model_card"}


def test_every_field_is_documented():
    def walk(model: type) -> list[str]:
        missing = []
        for name, field in model.model_fields.items():
            if not field.description:
                missing.append(f"{model.__name__}.{name}")
            annotation = field.annotation
            for candidate in getattr(annotation, "__args__", ()) + (annotation,):
                if isinstance(candidate, type) and issubclass(candidate, StrictModel):
                    missing.extend(walk(candidate))
        return missing

    assert walk(DeploymentSpec) == []
    assert walk(PipelineSpec) == []
