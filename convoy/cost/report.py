"""What each model's inferences cost: busy time per device, priced per hour.

A model version's cost is the instance time its batches took (convoy_model_busy_seconds)
at the hourly price of the device kind (cpu: per core-hour, an instance's thread; gpu:
per GPU-hour); its share of the machine is its part of all models' busy time on that
device kind, the fraction of the machine's bill to charge it if idle time is shared.
Readings come from the server's /metrics (totals since start-up) or Prometheus
(increase over a window): both give the same Reading rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

DEFAULT_PRICES = {"cpu": 0.04, "gpu": 2.50}


@dataclass
class Reading:
    """One model version's figures over the window."""

    model: str
    version: str
    inferences: float = 0.0  # requests answered with a result
    busy_s: dict[str, float] = field(default_factory=dict)  # device -> seconds
    memory_bytes: dict[str, float] = field(default_factory=dict)  # device -> held now


@dataclass(frozen=True)
class CostRow:
    model: str
    version: str
    inferences: float
    busy_s: dict[str, float]
    share: dict[str, float]  # device kind (cpu, gpu) -> part of all models' busy time
    memory_bytes: dict[str, float]
    cost: float  # at the given prices, for the window
    cost_per_1000: float | None  # None: no inference to divide by

    def as_json(self) -> dict[str, object]:
        return {
            "model": self.model,
            "version": self.version,
            "inferences": self.inferences,
            "busy_seconds": self.busy_s,
            "share": self.share,
            "memory_bytes": self.memory_bytes,
            "cost": self.cost,
            "cost_per_1000": self.cost_per_1000,
        }


def parse_prices(text: str) -> dict[str, float]:
    """'cpu=0.04,gpu=2.50' -> hourly prices; ValueError naming the bad part."""
    prices = dict(DEFAULT_PRICES)
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, sep, value = part.partition("=")
        kind = kind.strip()
        if not sep or kind not in DEFAULT_PRICES:
            raise ValueError(f"'{part}' is not cpu=PRICE or gpu=PRICE")
        try:
            price = float(value)
        except ValueError:
            raise ValueError(f"'{part}': '{value}' is not a number") from None
        if not math.isfinite(price) or price < 0:
            raise ValueError(f"'{part}': a price is a number of zero or more")
        prices[kind] = price
    return prices


def device_kind(device: str) -> str:
    return "cpu" if device == "cpu" else "gpu"


def cost_rows(readings: Iterable[Reading], prices: Mapping[str, float]) -> list[CostRow]:
    readings = list(readings)
    totals: dict[str, float] = {}
    for reading in readings:
        for device, seconds in reading.busy_s.items():
            kind = device_kind(device)
            totals[kind] = totals.get(kind, 0.0) + seconds
    rows = []
    for r in sorted(readings, key=lambda r: (r.model, r.version)):
        by_kind: dict[str, float] = {}
        for device, seconds in r.busy_s.items():
            kind = device_kind(device)
            by_kind[kind] = by_kind.get(kind, 0.0) + seconds
        cost = sum(seconds / 3600 * prices[kind] for kind, seconds in by_kind.items())
        share = {k: (s / totals[k] if totals[k] > 0 else 0.0) for k, s in by_kind.items()}
        per_1000 = cost / r.inferences * 1000 if r.inferences > 0 else None
        rows.append(
            CostRow(
                r.model, r.version, r.inferences, r.busy_s, share, r.memory_bytes, cost, per_1000
            )
        )
    return rows


def format_table(rows: list[CostRow], window: str) -> str:
    header = ("MODEL", "VERSION", "INFERENCES", "BUSY S (DEVICE)", "SHARE", "MEMORY MiB", "$/1000")
    lines = [header]
    for row in rows:
        busy = " ".join(f"{s:.2f}({d})" for d, s in sorted(row.busy_s.items())) or "0"
        share = " ".join(f"{k} {v:.1%}" for k, v in sorted(row.share.items())) or "-"
        memory = " ".join(
            f"{b / (1 << 20):.1f}({d})" for d, b in sorted(row.memory_bytes.items())
        ) or "-"  # fmt: skip
        price = "-" if row.cost_per_1000 is None else f"{row.cost_per_1000:.6f}"
        lines.append((row.model, row.version, f"{row.inferences:.0f}", busy, share, memory, price))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        for line in lines
    )
    return f"{window}\n{text}"
