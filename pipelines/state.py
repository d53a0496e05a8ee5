"""Content hashes of step inputs and outputs, and the state file that records finished steps.

A step is skipped when its config hash and the content hashes of its inputs and output equal
those recorded after its last successful run. Hashes are sha256 over file bytes; a folder hashes
its files' relative names and contents (names starting with "." are temporary or private and are
left out). Hashing a large artefact on every run would be slow, so each file's hash is cached in
the state file under its size and modification time and recomputed only when either changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from acfrec.errors import ArtifactError
from acfrec.utils import atomic_write_text, file_sha256

STATE_FILE = "pipeline-state.json"
STATE_VERSION = 1


def config_hash(config: Any) -> str:
    """sha256 of a JSON-able value, independent of mapping order."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class PipelineState:
    """What ``<workdir>/pipeline-state.json`` holds: finished steps and the file-hash cache."""

    path: Path
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    file_cache: dict[str, list[Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, workdir: Path) -> PipelineState:
        path = workdir / STATE_FILE
        if not path.is_file():
            return cls(path)
        try:
            payload = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ArtifactError(f"{path} is not a readable pipeline state file ({error}); delete it to rerun every step") from error
        if payload.get("version") != STATE_VERSION:
            return cls(path)  # another layout: every step reruns once
        return cls(path, payload.get("steps", {}), payload.get("file_cache", {}))

    def save(self) -> None:
        self.file_cache = {name: entry for name, entry in self.file_cache.items() if os.path.exists(name)}
        payload = {"version": STATE_VERSION, "steps": self.steps, "file_cache": self.file_cache}
        atomic_write_text(self.path, json.dumps(payload, indent=1, sort_keys=True))

    def record(self, step: str, config: str, inputs: Mapping[str, str], output: str, seconds: float) -> None:
        """Mark ``step`` finished with these hashes and write the state file at once."""
        self.steps[step] = {
            "config": config,
            "inputs": dict(inputs),
            "output": output,
            "seconds": round(seconds, 3),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        self.save()

    def forget(self, step: str) -> None:
        if self.steps.pop(step, None) is not None:
            self.save()

    # ----------------------------------------------------------------- hashing
    def path_hash(self, path: Path) -> str | None:
        """Content hash of a file or folder; None when it does not exist."""
        if path.is_file():
            return self._file_hash(path)
        if not path.is_dir():
            return None
        digest = hashlib.sha256(b"folder")
        for file in _visible_files(path):
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
            digest.update(self._file_hash(file).encode())
        return digest.hexdigest()

    def _file_hash(self, file: Path) -> str:
        stat = file.stat()
        key = str(file.resolve())
        cached = self.file_cache.get(key)
        if cached and cached[0] == stat.st_size and cached[1] == stat.st_mtime_ns:
            return str(cached[2])
        sha = file_sha256(file)
        self.file_cache[key] = [stat.st_size, stat.st_mtime_ns, sha]
        return sha


def _visible_files(folder: Path) -> list[Path]:
    """Files under ``folder`` in a stable order, skipping names (files or folders) starting with "."."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(root) / name for name in sorted(files) if not name.startswith("."))
    return found
