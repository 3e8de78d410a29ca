"""What `convoy monitor` shows: a table of the latest drift figures per input and
feature, and an HTML report with reference-vs-current histograms of the features
that drifted (matplotlib, PNGs embedded as base64 so the file stands alone).
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass

from .detectors import Histogram
from .feedback import VersionFeedback
from .monitor import TensorStatus


@dataclass(frozen=True)
class TensorReport:
    version: str
    status: TensorStatus
    age_s: float | None  # since its latest window was tested


@dataclass(frozen=True)
class DriftReport:
    model: str
    reference: str
    tensors: tuple[TensorReport, ...]
    feedback: tuple[VersionFeedback, ...]


@dataclass(frozen=True)
class _Row:
    version: str
    tensor: str
    feature: str
    test: str
    state: str
    windows: str
    p_value: str
    distance: str
    drift: str


_HEADER = _Row(
    "VERSION", "TENSOR", "FEATURE", "TEST", "STATE", "WINDOWS", "P-VALUE", "DISTANCE", "DRIFT"
)


def _rows(report: DriftReport) -> list[_Row]:
    rows = []
    for t in report.tensors:
        s, r = t.status, t.status.result
        name = f"{s.name} (output)" if s.is_output else s.name
        windows = f"{s.windows} ({s.alarms} drifted)"
        if r is None:
            rows.append(_Row(t.version, name, "", s.test or "-", s.state, windows, "-", "-", "-"))
            continue
        drift = "DRIFT" if r.is_drift else "no"
        rows.append(
            _Row(t.version, name, "", r.test, s.state, windows, f"{r.p_value:.3g}",
                 f"{r.distance:.3g}", drift)
        )  # fmt: skip
        for f in r.features:
            rows.append(
                _Row("", "", f.name, "", "", "", f"{f.p_value:.3g}", f"{f.distance:.3g}",
                     "DRIFT" if f.is_drift else "no")
            )  # fmt: skip
    return rows


def format_table(report: DriftReport) -> str:
    """Plain-text figures for a terminal."""
    rows = [_HEADER, *_rows(report)]
    cells = [list(vars(row).values()) for row in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    lines = [f"model {report.model}, reference {report.reference or '-'}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)).rstrip()
              for cell in cells]  # fmt: skip
    if report.feedback:
        lines.append("")
        lines.append("VERSION  TASK            ROLLING  REFERENCE  WINDOW  JUDGED")
        for fb in report.feedback:
            rolling = "-" if fb.rolling is None else f"{fb.rolling:.4g}"
            reference = "-" if fb.reference is None else f"{fb.reference:.4g}"
            lines.append(
                f"{fb.version:<8} {fb.task:<15} {rolling:<8} {reference:<10} {fb.window:<7} "
                f"{fb.accepted}"
            )
    return "\n".join(lines)


def drifted_histograms(report: DriftReport) -> list[tuple[str, Histogram]]:
    """(title, histogram) for every drifted feature, or drifted multivariate tensor."""
    found = []
    for t in report.tensors:
        r = t.status.result
        if r is None or not r.is_drift:
            continue
        where = f"{report.model}:{t.version} {t.status.name}"
        if r.histogram is not None:
            found.append((f"{where} (distance to the reference mean)", r.histogram))
        for f in r.features:
            if f.is_drift and f.histogram is not None:
                found.append((f"{where} feature {f.name} (p={f.p_value:.3g})", f.histogram))
    return found


def _png(title: str, histogram: Histogram) -> str:
    from matplotlib.figure import Figure  # Figure, not pyplot: no global figure state

    figure = Figure(figsize=(7, 3.2), dpi=90)
    axes = figure.add_subplot()
    positions = range(len(histogram.labels))
    axes.bar(positions, histogram.reference, width=0.9, alpha=0.5, label="reference")
    axes.bar(positions, histogram.current, width=0.5, alpha=0.7, label="current window")
    step = max(1, len(histogram.labels) // 10)
    axes.set_xticks(list(positions)[::step], list(histogram.labels)[::step], fontsize=7)
    axes.set_ylabel("share")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def html_report(report: DriftReport) -> str:
    """A standalone HTML page: the table, then one histogram per drifted feature."""
    esc = html.escape
    rows = _rows(report)
    head = "".join(f"<th>{esc(c)}</th>" for c in vars(_HEADER).values())
    body = "".join(
        "<tr" + (' class="drift"' if row.drift == "DRIFT" else "") + ">"
        + "".join(f"<td>{esc(c)}</td>" for c in vars(row).values()) + "</tr>"
        for row in rows
    )  # fmt: skip
    plots = [
        f'<figure><img alt="{esc(title)}" src="data:image/png;base64,{_png(title, h)}">'
        f"<figcaption>{esc(title)}</figcaption></figure>"
        for title, h in drifted_histograms(report)
    ]
    drifted = "".join(plots) or "<p>No feature drifted in the latest windows.</p>"
    feedback = ""
    if report.feedback:
        items = "".join(
            f"<tr><td>{esc(f.version)}</td><td>{esc(f.task)}</td>"
            f"<td>{'-' if f.rolling is None else f'{f.rolling:.4g}'}</td>"
            f"<td>{'-' if f.reference is None else f'{f.reference:.4g}'}</td>"
            f"<td>{f.window}</td></tr>"
            for f in report.feedback
        )
        feedback = (
            "<h2>Feedback</h2><table><tr><th>VERSION</th><th>TASK</th><th>ROLLING</th>"
            f"<th>REFERENCE</th><th>WINDOW</th></tr>{items}</table>"
        )
    title = f"Drift report: {esc(report.model)}"
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>'
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}"
        "tr.drift td{background:#fdd}</style></head><body>"
        f"<h1>{title}</h1><p>Reference: {esc(report.reference or '-')}</p>"
        f"<table><tr>{head}</tr>{body}</table>{feedback}<h2>Drifted features</h2>{drifted}"
        "</body></html>"
    )
