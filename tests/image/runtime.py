"""Run the medserve image with podman, working around what this kind of sandbox lacks.

Two things stop a plain `podman run` inside the unprivileged VM this project's
CI and agents use (docs/container-image.md, "Where podman cannot run"):

* cgroups in hybrid mode: cgroup v1 controllers plus a cgroup2 mount at
  /sys/fs/cgroup/unified that has a controller enabled. crun refuses
  ("cgroups in hybrid mode not supported, drop all controllers from cgroupv2").
  Podman then runs in a private mount namespace without that cgroup2 mount,
  with --cgroups=disabled (no resource limits are enforced there).
* no CAP_SYS_RESOURCE in the bounding set: podman as root asks crun for
  RLIMIT_NOFILE=1048576 and RLIMIT_NPROC=4194304, and raising a hard limit
  fails ("setrlimit `RLIMIT_NOFILE`: Operation not permitted"). The limits
  are then given explicitly, no higher than this process's own.

On a machine with cgroup v2 (or v1 only) and a full root, neither applies and
the command is plain `podman run`.
"""

from __future__ import annotations

import os
import resource
import subprocess
from pathlib import Path

CAP_SYS_RESOURCE = 24


def hybrid_cgroups() -> bool:
    unified = Path("/sys/fs/cgroup/unified/cgroup.controllers")
    return unified.exists() and bool(unified.read_text().split())


def lacks_sys_resource() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            return not int(line.split()[1], 16) & (1 << CAP_SYS_RESOURCE)
    return False


def podman(container: str, *args: str) -> list[str]:
    """The podman command line; wrapped in a private mount namespace where the cgroups are hybrid."""
    if hybrid_cgroups():
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'umount /sys/fs/cgroup/unified && exec "$0" "$@"', container, *args]
    return [container, *args]


def run_flags() -> list[str]:
    """Extra `podman run` flags this machine needs (none on an ordinary host)."""
    flags: list[str] = []
    if hybrid_cgroups():
        flags.append("--cgroups=disabled")
    if os.geteuid() == 0 and lacks_sys_resource():
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        # crun's own limit on processes sits below the shell's here; 32768 is ample for Ray.
        nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[1], 32768)
        flags += [f"--ulimit=nofile={nofile}:{nofile}", f"--ulimit=nproc={nproc}:{nproc}"]
    return flags


def run(container: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(podman(container, *args), capture_output=True, text=True, timeout=timeout)


def container_processes(pid: int) -> list[int]:
    """Every process in the container whose first process is pid (same PID namespace)."""
    namespace = os.readlink(f"/proc/{pid}/ns/pid")
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "ns" / "pid") == namespace:
                    found.append(int(entry.name))
            except OSError:
                continue  # exited meanwhile
    return found


def uids(pid: int) -> list[int]:
    """Real, effective, saved and filesystem uid, as the kernel reports them."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(value) for value in line.split()[1:]]
    raise AssertionError(f"no Uid line for {pid}")


def root_mount_options(pid: int) -> set[str]:
    """Mount options of / as the process sees it (/proc/PID/mountinfo: field 5 is the mount point)."""
    options: set[str] = set()
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == "/":
            options = set(fields[5].split(","))  # the last mount on / is the one in effect
    return options
