"""What `convoy optimize` found, as JSON (for scripts) and text (for people)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from .measure import OutputAgreement, Throughput

# Floors a new version must reach to be installed, per mode. Measured on the built-in
# examples (docs/optimize.md has the figures): FP16 changes nothing visible; INT8
# flips a few near-tied logits of the random-weight CNN (top-1 0.969 / 0.984 / 0.995 on
# 32 / 64 / 200 seeded rows) and turns MiniLM's embeddings by a little (min cosine 0.982).
FLOORS: dict[str, dict[str, float]] = {
    "fp16": {"min_cosine": 0.999, "top1": 0.99},
    "int8-dynamic": {"min_cosine": 0.95, "top1": 0.95},
    "int8-static": {"min_cosine": 0.9, "top1": 0.9},
}


@dataclass(frozen=True)
class VersionFigures:
    version: int
    model_bytes: int
    batch1: Throughput
    max_batch: Throughput


@dataclass(frozen=True)
class OptimizeReport:
    model: str
    backend: str
    mode: str
    from_version: VersionFigures
    to_version: VersionFigures
    sample: str
    agreement: tuple[OutputAgreement, ...]
    floors: dict[str, float]
    failures: tuple[str, ...]  # floors not reached; empty: installed
    notes: tuple[str, ...]
    convert_seconds: float

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> str:
        data: dict[str, Any] = dataclasses.asdict(self)
        data["passed"] = self.passed
        return json.dumps(data, indent=2) + "\n"

    def to_text(self) -> str:
        n, m = self.from_version, self.to_version
        lines = [
            f"{self.model}: version {n.version} -> {m.version} ({self.mode}, {self.backend}), "
            f"converted in {self.convert_seconds:.1f} s",
            f"  model size      {_mb(n.model_bytes):>10} -> {_mb(m.model_bytes):>10} "
            f"({m.model_bytes / max(n.model_bytes, 1):.2f}x)",
        ]
        for label, a, b in (
            (f"batch {n.batch1.batch}", n.batch1, m.batch1),
            (f"batch {n.max_batch.batch}", n.max_batch, m.max_batch),
        ):
            lines.append(
                f"  {label:<15} {a.rows_per_s:>8.1f} -> {b.rows_per_s:>8.1f} rows/s "
                f"({b.rows_per_s / max(a.rows_per_s, 1e-9):.2f}x; "
                f"{a.ms_per_batch:.1f} -> {b.ms_per_batch:.1f} ms a batch)"
            )
        lines.append(f"  agreement on {self.sample}:")
        for row in self.agreement:
            top1 = "" if row.top1_agreement is None else f", top-1 {row.top1_agreement:.4f}"
            lines.append(
                f"    {row.output}: max abs diff {row.max_abs_diff:.3g}, cosine mean "
                f"{row.mean_cosine:.6f} min {row.min_cosine:.6f}{top1}"
            )
        floors = ", ".join(f"{k} >= {v}" for k, v in self.floors.items())
        verdict = "passed" if self.passed else "FAILED: " + "; ".join(self.failures)
        lines.append(f"  floors ({floors}): {verdict}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines) + "\n"


def below_floors(
    agreement: tuple[OutputAgreement, ...], floors: dict[str, float]
) -> tuple[str, ...]:
    failures = []
    for row in agreement:
        if row.min_cosine < floors["min_cosine"]:
            failures.append(
                f"{row.output}: min cosine {row.min_cosine:.4f} < {floors['min_cosine']}"
            )
        if row.top1_agreement is not None and row.top1_agreement < floors["top1"]:
            failures.append(
                f"{row.output}: top-1 agreement {row.top1_agreement:.4f} < {floors['top1']}"
            )
    return tuple(failures)


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"
