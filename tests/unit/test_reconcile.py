"""Which specs can run on which cluster, and why the others are skipped."""

from medserve.controlplane.reconcile import capacity_problem, plan
from medserve.specs import load_catalog

CPU_NODE = {"CPU": 2.0, "memory": 1e10}
GPU_NODE = {"CPU": 16.0, "GPU": 4.0, "accelerator_type:A100": 1.0}


def _specs(repo_root):
    return {spec.name: spec for spec in load_catalog(repo_root / "deployments")}


def test_cpu_specs_fit_a_two_core_node(repo_root):
    specs = _specs(repo_root)
    assert capacity_problem(specs["brain-mri-tumour"], [CPU_NODE]) is None
    assert capacity_problem(specs["smollm2-demo"], [CPU_NODE]) is None


def test_gpu_spec_skipped_with_reason(repo_root):
    reason = capacity_problem(_specs(repo_root)["deepseek-r1-distill-qwen-32b"], [CPU_NODE])
    assert "GPU: needs 2 per replica, largest node has 0" in reason
    assert "A100" in reason


def test_gpu_spec_fits_gpu_node(repo_root):
    assert capacity_problem(_specs(repo_root)["deepseek-r1-distill-qwen-32b"], [CPU_NODE, GPU_NODE]) is None


def test_custom_resource_must_exist_on_one_node(repo_root):
    spec = _specs(repo_root)["ct-pancreas-screen"]
    assert "radiology_gpu" in capacity_problem(spec, [GPU_NODE])
    assert capacity_problem(spec, [{**GPU_NODE, "radiology_gpu": 1.0}]) is None


def test_plan_skips_vllm_without_the_extra(repo_root):
    specs = list(_specs(repo_root).values())
    items = {item.spec.name: item for item in plan(specs, [{**GPU_NODE, "CPU": 64.0, "accelerator_type:H100": 1.0}])}
    assert items["deepseek-r1-distill-qwen-32b"].deploy is False
    assert "medserve[gpu]" in items["deepseek-r1-distill-qwen-32b"].reason
    assert items["brain-mri-tumour"].deploy is True
