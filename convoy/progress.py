"""The command line's progress bar (engine builds, `convoy optimize`), on stderr."""

from __future__ import annotations

import sys


def progress_bar(phase: str, step: int, total: int) -> None:
    width = 30
    filled = width * step // max(total, 1)
    end = "\n" if step >= total else ""
    print(f"\r{phase[:40]:<40} [{'#' * filled}{'.' * (width - filled)}] {step}/{total}",
          end=end, file=sys.stderr, flush=True)  # fmt: skip
