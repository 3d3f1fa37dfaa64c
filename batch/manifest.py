"""manifest.json: one entry per job (parameters, saved files, server, status), rewritten after every job."""

from __future__ import annotations

import json
from pathlib import Path

from .files import write_whole

PENDING, DONE, FAILED = "pending", "done", "failed"


class ManifestDamaged(ValueError):
    """manifest.json is not what this tool writes."""


class Manifest:
    """The jobs of an output folder by id; entries of earlier runs with other sweeps are kept."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, dict] = {}
        if path.exists():
            try:
                self.entries = {entry["id"]: entry for entry in json.loads(path.read_text())["jobs"]}
            except (ValueError, KeyError, TypeError) as error:
                raise ManifestDamaged(f"{path} is damaged ({error!r}); move it away to start this batch over") \
                    from None

    def is_done(self, job_id: str) -> bool:
        return self.entries.get(job_id, {}).get("status") == DONE

    def add(self, job) -> dict:
        """The entry of ``job``, made pending unless an earlier run finished it."""
        entry = self.entries.setdefault(job.id, {"id": job.id})
        entry["parameters"] = job.parameters
        if entry.get("status") != DONE:
            entry.update(status=PENDING, server=None, files=[], error=None)
        return entry

    def save(self):
        """Whole or not at all (raises WriteFailed): Ctrl-C, a crash or a full disk leave the last one standing."""
        write_whole(self.path, (json.dumps({"jobs": list(self.entries.values())}, indent=1) + "\n").encode())
