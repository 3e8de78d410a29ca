"""convoy_python models that hold a known amount of memory (and, for the on-demand
tests, may be slow or fail to load): y = factor * x over FP32 [1] `X` -> `Y`."""

from __future__ import annotations

from pathlib import Path

from tests.linear import write_linear_model

SOURCE = """
import os
import time

import numpy as np


class Model:
    def __init__(self, config):
        if os.path.exists({broken!r}):
            raise RuntimeError("bad model file: " + {broken!r})
        self.ballast = np.ones({mib} << 20, dtype=np.uint8)  # touched: resident

    def __call__(self, inputs):
        time.sleep({delay})
        return {{"Y": inputs["X"] * {factor}}}
"""


def write_sized_model(
    root: Path,
    name: str,
    mib: int,
    *,
    factor: float = 2.0,
    delay_s: float = 0.0,
    broken_if: Path | None = None,
) -> Path:
    """<root>/<name>, holding `mib` MiB once loaded; its version folder's files add up to
    as much (a sparse weights.bin), so the first estimate is the size it will measure.
    The load fails while the file `broken_if` exists."""
    source = SOURCE.format(
        broken=str(broken_if or root / ".never"), mib=mib, delay=delay_s, factor=factor
    )
    write_linear_model(root, name, {1: source})
    with open(root / name / "1" / "weights.bin", "wb") as weights:
        weights.truncate(mib << 20)
    return root / name


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels` (0 when none)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def scrape(port: int | None) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


__all__ = ["metric_value", "scrape", "write_sized_model"]
