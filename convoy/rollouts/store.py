"""Rollout state on disk: one JSON file per model, replaced atomically.

Written at every phase or step change (a few times per rollout, about 1 KB),
never per request, and from a worker thread: the fsyncs take milliseconds to
seconds on a busy disk, which the event loop must not wait on. A write goes to
a temporary file in the same directory, is fsynced, then renamed over the old
one, so a crash leaves the old state or the new, never half of one.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from ..errors import ConfigError

log = logging.getLogger(__name__)

FORMAT = 1
SUFFIX = ".rollout.json"


class RolloutStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path_of(self, model: str) -> Path:
        # Model names are repository directory names: no separators, safe as file names.
        return self.directory / f"{model}{SUFFIX}"

    def check_writable(self) -> None:
        """At start-up, before anything serves: ConfigError naming the flag when state
        cannot be written here, rather than a refused rollout later."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.directory, prefix=".tmp-probe-")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise ConfigError(
                str(self.directory), "--rollout-state-dir", f"cannot write rollout state: {exc}"
            ) from exc

    def save(self, record: dict[str, Any]) -> None:
        """OSError when the directory cannot be written (full, read-only, gone)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.path_of(str(record["model"]))
        data = json.dumps({"format": FORMAT, **record}, indent=2, sort_keys=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=SUFFIX)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(self.directory)

    def load_all(self) -> list[dict[str, Any]]:
        """Every saved record; ConfigError names a file that cannot be read back."""
        if not self.directory.is_dir():
            return []
        records = []
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            if path.name.startswith(".tmp-"):
                continue  # a write that crashed before its rename
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(str(path), "<file>", f"unreadable rollout state: {exc}") from exc
            if not isinstance(record, dict) or record.get("format") != FORMAT:
                raise ConfigError(str(path), "format", f"expected rollout state format {FORMAT}")
            record.pop("format")
            records.append(record)
        return records


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); some filesystems refuse, which is harmless."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
