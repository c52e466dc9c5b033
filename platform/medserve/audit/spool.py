"""The audit writer's spool: records (and checkpoints) made durable in a local file while the database
cannot take them, replayed into it later (see :mod:`medserve.audit.writer_process`).

One JSON-lines file per writer chain, appended and fsync'd, held under an exclusive ``flock`` while its
writer lives; a file whose lock is free belongs to a writer that stopped and is adopted by the next.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

logger = logging.getLogger("medserve.audit")


def _to_json(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _from_json(row: dict[str, Any]) -> dict[str, Any]:
    row["id"] = uuid.UUID(row["id"])
    row["created_at"] = datetime.fromisoformat(row["created_at"])
    return row


class SpoolFile:
    """An append-only JSON-lines file of records and checkpoints, held under an exclusive lock."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.pending = 0  # records waiting in the file
        self.entries = 0  # records and checkpoints waiting in the file

    @classmethod
    def create(cls, path: Path) -> "SpoolFile":
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return cls(path, fd)

    @classmethod
    def adopt(cls, path: Path) -> "SpoolFile | None":
        """The spool of a writer that is gone (its lock is free), or None while its owner lives."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        spool = cls(path, fd)
        entries = spool.read()
        spool.entries = len(entries)
        spool.pending = sum(1 for kind, _ in entries if kind == "r")
        return spool

    def append(self, records: list[dict[str, Any]], checkpoints: list[dict[str, Any]]) -> None:
        lines = [json.dumps({"r": {k: _to_json(v) for k, v in row.items()}}) for row in records]
        lines += [json.dumps({"c": {k: _to_json(v) for k, v in row.items()}}) for row in checkpoints]
        data = ("\n".join(lines) + "\n").encode()
        written = 0
        while written < len(data):
            written += os.write(self.fd, data[written:])
        os.fsync(self.fd)
        self.pending += len(records)
        self.entries += len(records) + len(checkpoints)

    def read(self) -> list[tuple[str, dict[str, Any]]]:
        return read_spool(self.path)

    def clear(self) -> None:
        os.ftruncate(self.fd, 0)
        os.fsync(self.fd)
        self.pending = self.entries = 0

    def release(self) -> None:
        os.close(self.fd)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.pending = self.entries = 0


def read_spool(path: Path) -> list[tuple[str, dict[str, Any]]]:
    entries: list[tuple[str, dict[str, Any]]] = []
    with open(path, "rb") as handle:
        for number, line in enumerate(handle):
            try:
                item = json.loads(line)
            except ValueError:
                # A line cut short by a crash: its records were never acknowledged.
                logger.warning("audit spool %s: ignoring an incomplete line %d", path.name, number + 1)
                continue
            kind = "r" if "r" in item else "c"
            entries.append((kind, _from_json(item[kind])))
    return entries


def spooled_ids(spool_dir: Path | None) -> set[str]:
    """Ids of the records in every spool file on the directory, held by anyone (reading needs no lock)."""
    found: set[str] = set()
    if spool_dir is None or not spool_dir.is_dir():
        return found
    for path in spool_dir.glob("*.jsonl"):
        try:
            with open(path, "rb") as handle:
                for line in handle:
                    try:
                        item = json.loads(line)
                    except ValueError:
                        continue  # cut short by a crash: never acknowledged
                    if "r" in item:
                        found.add(str(item["r"]["id"]))
        except FileNotFoundError:  # replayed and removed meanwhile: its records are in the database
            continue
    return found
