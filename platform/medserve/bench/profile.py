"""A sampling profile of a live Serve replica during a benchmark's measured window (py-spy).

`medserve bench --profile DIR` records each profiled path's replica with
``py-spy record --format raw`` (collapsed stacks: one line per distinct
stack, its sample count last) while the load runs, and the report lists the
frames where the samples ended, i.e. self time: where the replica's CPU
actually goes. py-spy attaches from outside (ptrace) and does not pause
the process (``--nonblocking``), so the profiled round runs at full speed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

_LINE_NUMBER = re.compile(r":\d+\)$")


def top_self_frames(collapsed: str, count: int = 15) -> list[tuple[str, float]]:
    """The frames that held the most samples themselves (the last frame of each stack), with their share.

    Frames are grouped by function and file, line numbers dropped, so one
    function's samples add up wherever in it they fell.
    """
    self_samples: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack or not samples.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1].strip()
        self_samples[_LINE_NUMBER.sub(")", leaf)] += int(samples)
        total += int(samples)
    return [(frame, samples / total) for frame, samples in self_samples.most_common(count)] if total else []


@dataclass
class Profile:
    """Records one path's processes for one measured window."""

    pids: Callable[[], list[int]]
    output: Path
    rate_hz: int = 250
    _processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _timer: threading.Timer | None = None

    def start_after(self, delay_s: float, duration_s: float) -> None:
        """Start recording once the warm-up is over, for the measured window."""
        # Installed beside this Python (the venv's bin, which need not be on PATH), or on PATH.
        beside = Path(sys.executable).parent / "py-spy"
        py_spy = str(beside) if beside.exists() else shutil.which("py-spy")
        if py_spy is None:
            raise FileNotFoundError("py-spy is not installed: pip install py-spy")

        def start() -> None:
            for index, pid in enumerate(self.pids()):
                path = self.output.with_name(f"{self.output.stem}-{index}.txt")
                self._processes.append(subprocess.Popen(
                    [py_spy, "record", "--pid", str(pid), "--duration", str(max(1, int(duration_s))),
                     "--rate", str(self.rate_hz), "--format", "raw", "--nonblocking", "--gil", "--output", str(path)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                ))

        self.output.parent.mkdir(parents=True, exist_ok=True)
        self._timer = threading.Timer(delay_s, start)
        self._timer.start()

    def finish(self) -> list[tuple[str, float]]:
        """Wait for the recordings; the top self-time frames over all of this path's processes."""
        if self._timer is not None:
            self._timer.join()
        for process in self._processes:
            process.wait(timeout=120)
        stacks = "\n".join(path.read_text() for path in sorted(self.output.parent.glob(f"{self.output.stem}-*.txt")))
        self.output.write_text(stacks)
        return top_self_frames(stacks)
