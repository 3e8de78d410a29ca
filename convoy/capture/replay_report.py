"""What a replay found: each captured request answered by the candidate and by the
baseline, compared, and judged by the gates. Plain functions over numpy arrays: no
server, no files (replay_cli.py sends the requests and writes the report).

- `diff_rate`: the share of compared requests (the baseline answered) whose candidate
  answer differs from the baseline's: any output not within rtol/atol of it
  (|candidate - baseline| <= atol + rtol * |baseline|, numpy's isclose), a shape or
  BYTES value that is not equal, or no answer at all.
- `noise_floor`: the same share for the baseline's replayed answers against the answers
  it gave when captured (rows it served, with outputs captured). A deterministic model
  shows 0; a nondeterministic one shows the difference that is normal (Diffy's noise:
  a candidate's difference means something only beyond it).
- divergence per output, over the requests both answered: the largest and the mean
  absolute difference, and for classifier scores (rows of 2+ values) the share of rows
  whose top-1 class changed.
- `accuracy` per version on the requests with a label: a classifier's top-1 (argmax of
  the row of the first output) against the label (a class index, or a class name where
  the model has a label file); an output of one value per row against the label itself
  (within rtol/atol for numbers). A label that is a list gives one label per batch row;
  one label applies to every row of its request. A request the version failed counts
  as wrong.

The gates: the candidate's diff rate may exceed the noise floor by at most
`max_diff_rate`. Where the noise floor is above 0 it is itself a sample, as is the diff
rate: the excess fails only when a one-sided Fisher exact test (scipy.stats) finds the
diff rate greater than the noise floor at p < 0.05 (`diff_p_value`), so that a
nondeterministic model's identical candidate does not fail one run in several by
chance. A noise floor of 0 (a deterministic model) allows no such slack. The candidate
may fail at most `max_diff_rate` of the requests the baseline answered;
its accuracy may be at most `max_accuracy_drop` below the baseline's. Nothing compared
fails (a gate with no data says nothing good). A gate that cannot be judged (no labels)
is skipped, with a reason.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..rollouts.compare import compare_arrays
from ..tensors import Array
from .replay import CapturedRequest

SIGNIFICANCE = 0.05


@dataclass(frozen=True)
class Tolerance:
    rtol: float = 1e-5
    atol: float = 1e-6


@dataclass(frozen=True)
class Gates:
    max_diff_rate: float = 0.01  # beyond the noise floor
    max_accuracy_drop: float = 0.01


@dataclass(frozen=True)
class Answer:
    """One version's answer to one replayed request."""

    outputs: Mapping[str, Array] | None  # None: it failed
    error: str | None = None
    latency_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.outputs is not None


@dataclass(frozen=True)
class Replayed:
    request: CapturedRequest
    candidate: Answer
    baseline: Answer


@dataclass
class OutputDivergence:
    """One output over the requests both versions answered."""

    compared: int = 0
    differing: int = 0
    max_abs: float = 0.0
    abs_sum: float = 0.0
    elements: int = 0
    top1_rows: int = 0
    top1_changed: int = 0

    def add(self, baseline: Array, candidate: Array, tolerance: Tolerance) -> None:
        self.compared += 1
        if not arrays_close(baseline, candidate, tolerance):
            self.differing += 1
        divergence = compare_arrays(baseline, candidate)
        self.max_abs = max(self.max_abs, divergence.max_abs_diff)
        self.top1_rows += divergence.top1_rows
        self.top1_changed += divergence.top1_rows - divergence.top1_agreed
        if baseline.shape == candidate.shape and _numeric(baseline) and _numeric(candidate):
            diff = np.abs(baseline.astype(np.float64) - candidate.astype(np.float64))
            self.abs_sum += float(np.nansum(diff))
            self.elements += diff.size

    def as_json(self) -> dict[str, Any]:
        return {
            "compared": self.compared,
            "diff_rate": _share(self.differing, self.compared),
            "max_abs": _finite(self.max_abs) if self.compared else None,
            "mean_abs": self.abs_sum / self.elements if self.elements else None,
            "top1_change": _share(self.top1_changed, self.top1_rows),
        }


@dataclass(frozen=True)
class ReplayReport:
    model: str
    candidate: str
    baseline: str
    requests: int
    errors: dict[str, int]
    error_samples: dict[str, list[str]]
    latency_ms: dict[str, dict[str, float] | None]
    compared: int  # requests the baseline answered
    diff_rate: float | None
    noise_compared: int  # requests the baseline served when captured, answers captured
    noise_floor: float | None
    diff_p_value: float | None  # diff rate > noise floor, one-sided; None: floor 0 or unknown
    divergence: dict[str, OutputDivergence]
    labelled: int
    accuracy: dict[str, float | None]
    tolerance: Tolerance
    gates: Gates
    passed: bool
    reasons: list[str]
    skipped: dict[str, int] = field(default_factory=dict)
    window: dict[str, str | None] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "candidate": self.candidate,
            "baseline": self.baseline,
            "requests": self.requests,
            "skipped": dict(self.skipped),
            "window": dict(self.window),
            "errors": dict(self.errors),
            "error_samples": {v: list(s) for v, s in self.error_samples.items()},
            "latency_ms": dict(self.latency_ms),
            "compared": self.compared,
            "diff_rate": self.diff_rate,
            "noise_compared": self.noise_compared,
            "noise_floor": self.noise_floor,
            "diff_p_value": self.diff_p_value,
            "divergence": {name: d.as_json() for name, d in self.divergence.items()},
            "labelled": self.labelled,
            "accuracy": dict(self.accuracy),
            "rtol": self.tolerance.rtol,
            "atol": self.tolerance.atol,
            "max_diff_rate": self.gates.max_diff_rate,
            "max_accuracy_drop": self.gates.max_accuracy_drop,
            "passed": self.passed,
            "reasons": list(self.reasons),
        }


# -- comparing answers ---------------------------------------------------------------------


def arrays_close(reference: Array, other: Array, tolerance: Tolerance) -> bool:
    """Within rtol/atol of the reference (numbers; NaN equals NaN), else equal."""
    a, b = np.asarray(reference), np.asarray(other)
    if a.shape != b.shape:
        return False
    if _numeric(a) and _numeric(b):
        return bool(
            np.allclose(
                b.astype(np.float64),
                a.astype(np.float64),
                rtol=tolerance.rtol,
                atol=tolerance.atol,
                equal_nan=True,
            )
        )
    return bool(np.array_equal(a, b))


def answers_differ(
    reference: Mapping[str, Array], other: Mapping[str, Array] | None, tolerance: Tolerance
) -> bool:
    """Whether `other` differs from `reference` in any of the reference's outputs."""
    if other is None:
        return True
    for name, value in reference.items():
        mine = other.get(name)
        if mine is None or not arrays_close(value, mine, tolerance):
            return True
    return False


# -- accuracy --------------------------------------------------------------------------------


def predictions(output: Array, batched: bool) -> list[Any]:
    """One prediction per batch row: the argmax of a row of 2+ values (a classifier's
    top-1 class), else the row's one value."""
    array = np.asarray(output)
    if batched and array.ndim >= 1:
        rows = array.reshape(array.shape[0], -1)
    else:
        rows = array.reshape(1, -1)
    out: list[Any] = []
    for row in rows:
        if row.size >= 2 and _numeric(row):
            out.append(int(np.argmax(row)))
        elif row.size == 1:
            out.append(row[0].item() if isinstance(row[0], np.generic) else row[0])
        else:
            out.append(None)
    return out


def label_matches(
    prediction: Any,
    label: Any,
    classifier: bool,
    class_names: Sequence[str] | None,
    tolerance: Tolerance,
) -> bool:
    if prediction is None or label is None:
        return False
    if classifier:
        index = _as_index(label)
        if index is not None:
            return bool(prediction == index)
        if class_names is not None and 0 <= prediction < len(class_names):
            return bool(_text(label) == class_names[prediction])
        return False
    if isinstance(prediction, bytes | str):
        return _text(prediction) == _text(label)
    try:  # a number, or a number as text (the Feedback RPC's labels are text)
        return bool(
            np.isclose(float(prediction), float(label), rtol=tolerance.rtol, atol=tolerance.atol)
        )
    except (TypeError, ValueError):
        return _text(prediction) == _text(label)


def correct_rows(
    answer: Answer,
    label: Any,
    output: str,
    batched: bool,
    class_names: Sequence[str] | None,
    tolerance: Tolerance,
    rows: int,
) -> int:
    """How many of a request's `rows` batch rows this answer got right."""
    if answer.outputs is None or output not in answer.outputs:
        return 0
    value = np.asarray(answer.outputs[output])
    predicted = predictions(value, batched)
    classifier = (value.size // max(1, len(predicted))) >= 2
    labels = list(label) if isinstance(label, list | tuple) else [label] * len(predicted)
    if len(labels) != len(predicted):
        return 0
    matched = sum(
        label_matches(p, lab, classifier, class_names, tolerance)
        for p, lab in zip(predicted, labels, strict=True)
    )
    return min(matched, rows)


# -- the report ------------------------------------------------------------------------------


def build_report(
    model: str,
    candidate: str,
    baseline: str,
    replayed: Sequence[Replayed],
    *,
    tolerance: Tolerance = Tolerance(),
    gates: Gates = Gates(),
    labels: Mapping[str, Any] | None = None,
    batched: bool = True,
    label_output: str | None = None,
    class_names: Sequence[str] | None = None,
    skipped: Mapping[str, int] | None = None,
    window: Mapping[str, str | None] | None = None,
) -> ReplayReport:
    """Compare every replayed request and judge the gates. `batched`: the model's
    tensors have a batch dimension first; `label_output`: the output accuracy reads
    (default: the first one answered)."""
    versions = (candidate, baseline)
    answers = {candidate: [r.candidate for r in replayed], baseline: [r.baseline for r in replayed]}
    errors = {v: sum(not a.ok for a in answers[v]) for v in versions}
    samples = {v: sorted({a.error or "" for a in answers[v] if not a.ok})[:5] for v in versions}
    latency = {v: latency_summary([a.latency_s for a in answers[v] if a.ok]) for v in versions}

    compared = differing = candidate_failed = 0
    divergence: dict[str, OutputDivergence] = {}
    noise_compared = noisy = 0
    for r in replayed:
        base, cand = r.baseline.outputs, r.candidate.outputs
        if base is not None:
            compared += 1
            if answers_differ(base, cand, tolerance):
                differing += 1
            if cand is None:
                candidate_failed += 1
            else:
                for name, value in base.items():
                    if name in cand:
                        divergence.setdefault(name, OutputDivergence()).add(
                            np.asarray(value), np.asarray(cand[name]), tolerance
                        )
        if r.request.version == baseline and r.request.outputs:
            noise_compared += 1
            if answers_differ(r.request.outputs, base, tolerance):
                noisy += 1
    diff_rate = _share(differing, compared)
    noise_floor = _share(noisy, noise_compared)
    p_value = excess_p_value(differing, compared, noisy, noise_compared)

    labelled, accuracy, unnamed = _accuracy(
        replayed, versions, labels, batched, label_output, class_names, tolerance
    )
    passed, reasons = judge(
        baseline=baseline,
        compared=compared,
        diff_rate=diff_rate,
        noise_floor=noise_floor,
        p_value=p_value,
        candidate_failed=candidate_failed,
        accuracy=(accuracy[baseline], accuracy[candidate]),
        labelled=labelled,
        labels_found=labels is not None,
        gates=gates,
        unnamed=unnamed,
    )
    return ReplayReport(
        model=model,
        candidate=candidate,
        baseline=baseline,
        requests=len(replayed),
        errors=errors,
        error_samples=samples,
        latency_ms=latency,
        compared=compared,
        diff_rate=diff_rate,
        noise_compared=noise_compared,
        noise_floor=noise_floor,
        diff_p_value=p_value,
        divergence=divergence,
        labelled=labelled,
        accuracy=accuracy,
        tolerance=tolerance,
        gates=gates,
        passed=passed,
        reasons=reasons,
        skipped=dict(skipped or {}),
        window=dict(window or {}),
    )


def _accuracy(
    replayed: Sequence[Replayed],
    versions: tuple[str, str],
    labels: Mapping[str, Any] | None,
    batched: bool,
    label_output: str | None,
    class_names: Sequence[str] | None,
    tolerance: Tolerance,
) -> tuple[int, dict[str, float | None], int]:
    """(labelled rows judged, accuracy per version, labelled rows not judged: class
    names with none to read a classifier's answer by)."""
    candidate, baseline = versions
    if not labels:
        return 0, {v: None for v in versions}, 0
    rows = unnamed = 0
    right = dict.fromkeys(versions, 0)
    for r in replayed:
        label = labels.get(r.request.request_id)
        if label is None:
            continue
        n = _rows_of(r.request, batched)
        output = label_output or _first_output(r)
        if output is not None and class_names is None:
            if any(_names_a_class(a, output, label, batched) for a in (r.baseline, r.candidate)):
                unnamed += n  # compared with no names, every version would read 0
                continue
        rows += n
        for version, answer in ((candidate, r.candidate), (baseline, r.baseline)):
            if output is not None:
                right[version] += correct_rows(
                    answer, label, output, batched, class_names, tolerance, n
                )
    if not rows:
        return 0, {v: None for v in versions}, unnamed
    return rows, {v: right[v] / rows for v in versions}, unnamed


def _names_a_class(answer: Answer, output: str, label: Any, batched: bool) -> bool:
    """Whether the label is a class name (not an index) for a classifier's answer."""
    if answer.outputs is None or output not in answer.outputs:
        return False
    value = np.asarray(answer.outputs[output])
    if value.size // max(1, len(predictions(value, batched))) < 2:
        return False
    labels = label if isinstance(label, list | tuple) else [label]
    return any(_as_index(x) is None for x in labels)


def judge(
    *,
    baseline: str,
    compared: int,
    diff_rate: float | None,
    noise_floor: float | None,
    p_value: float | None,
    candidate_failed: int,
    accuracy: tuple[float | None, float | None],
    labelled: int,
    labels_found: bool,
    gates: Gates,
    unnamed: int = 0,
) -> tuple[bool, list[str]]:
    """(passed, reasons): a reason for every gate that failed or could not be judged."""
    failed: list[str] = []
    notes: list[str] = []
    if not compared or diff_rate is None:
        failed.append(f"nothing compared: the baseline (version {baseline}) answered no request")
    else:
        floor = noise_floor if noise_floor is not None else 0.0
        if noise_floor is None:
            notes.append(
                f"noise_floor: no captured answer of version {baseline} to re-score (none "
                "served by it, or capture_outputs false): taken as 0"
            )
        significant = p_value is None or p_value < SIGNIFICANCE
        if diff_rate > floor + gates.max_diff_rate + 1e-12 and significant:
            failed.append(
                f"diff_rate {diff_rate:.4f} exceeds the noise floor {floor:.4f} by more than "
                f"max_diff_rate {gates.max_diff_rate:g}"
                + ("" if p_value is None else f" (one-sided Fisher exact p = {p_value:.3g})")
            )
        failed_share = candidate_failed / compared
        if failed_share > gates.max_diff_rate + 1e-12:
            failed.append(
                f"the candidate failed {candidate_failed} of {compared} requests the baseline "
                f"answered ({failed_share:.4f} > max_diff_rate {gates.max_diff_rate:g})"
            )
    base_accuracy, cand_accuracy = accuracy
    if unnamed:
        notes.append(
            f"accuracy: {unnamed} labelled rows give a class name, and the target gave no "
            "class names to read the answers by (the output has no label file, or a --server "
            "keeps it): not counted"
        )
    if not labels_found:
        notes.append("accuracy: no labels folder in the capture directory; gate skipped")
    elif not labelled or base_accuracy is None or cand_accuracy is None:
        notes.append("accuracy: none of the replayed requests has a label; gate skipped")
    elif base_accuracy - cand_accuracy > gates.max_accuracy_drop + 1e-12:
        failed.append(
            f"accuracy {cand_accuracy:.4f} is {base_accuracy - cand_accuracy:.4f} below the "
            f"baseline's {base_accuracy:.4f} (max_accuracy_drop {gates.max_accuracy_drop:g})"
        )
    return not failed, failed + notes


def excess_p_value(differing: int, compared: int, noisy: int, noise_compared: int) -> float | None:
    """How likely a diff rate this far above the noise floor is if the candidate differs
    no more than the baseline differs from itself (one-sided Fisher exact test); None
    where the floor is 0 or unmeasured (nothing to be unlucky against)."""
    if not noisy or not compared or not noise_compared:
        return None
    from scipy.stats import fisher_exact

    table = [[differing, compared - differing], [noisy, noise_compared - noisy]]
    return float(fisher_exact(table, alternative="greater").pvalue)


def latency_summary(seconds: Sequence[float]) -> dict[str, float] | None:
    if not seconds:
        return None
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {
        "p50": round(float(p50), 3),
        "p90": round(float(p90), 3),
        "p99": round(float(p99), 3),
        "mean": round(float(ms.mean()), 3),
    }


# -- HTML ------------------------------------------------------------------------------------


def html_report(report: Mapping[str, Any]) -> str:
    """The report as one self-contained HTML page (no scripts, no external assets)."""
    esc = html.escape

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.6g}"
        return esc(str(value))

    verdict = "PASSED" if report["passed"] else "FAILED"
    colour = "#dfd" if report["passed"] else "#fdd"
    title = f"Replay: {esc(report['model'])} version {esc(report['candidate'])}"
    summary = [
        ("candidate", report["candidate"]),
        ("baseline", report["baseline"]),
        ("requests", report["requests"]),
        ("compared", report["compared"]),
        ("diff_rate", report["diff_rate"]),
        ("noise_floor", report["noise_floor"]),
        ("labelled", report["labelled"]),
        ("rtol / atol", f"{report['rtol']:g} / {report['atol']:g}"),
        ("max_diff_rate", report["max_diff_rate"]),
        ("max_accuracy_drop", report["max_accuracy_drop"]),
    ]
    summary_rows = "".join(f"<tr><th>{esc(k)}</th><td>{cell(v)}</td></tr>" for k, v in summary)
    version_rows = ""
    for version in (report["candidate"], report["baseline"]):
        latency = report["latency_ms"].get(version) or {}
        version_rows += (
            f"<tr><td>{cell(version)}</td><td>{cell(report['errors'].get(version))}</td>"
            f"<td>{cell(latency.get('p50'))}</td><td>{cell(latency.get('p90'))}</td>"
            f"<td>{cell(latency.get('p99'))}</td>"
            f"<td>{cell(report['accuracy'].get(version))}</td></tr>"
        )
    output_rows = "".join(
        f"<tr><td>{cell(name)}</td><td>{cell(d['compared'])}</td><td>{cell(d['diff_rate'])}</td>"
        f"<td>{cell(d['max_abs'])}</td><td>{cell(d['mean_abs'])}</td>"
        f"<td>{cell(d['top1_change'])}</td></tr>"
        for name, d in report["divergence"].items()
    )
    reasons = "".join(f"<li>{esc(r)}</li>" for r in report["reasons"]) or "<li>-</li>"
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>'
        "<style>body{font-family:sans-serif}table{border-collapse:collapse;margin-bottom:1em}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px;text-align:left}</style>"
        f"</head><body><h1>{title}</h1>"
        f'<p style="background:{colour};padding:4px"><b>{verdict}</b></p>'
        f"<ul>{reasons}</ul><table>{summary_rows}</table>"
        "<h2>Versions</h2><table><tr><th>VERSION</th><th>ERRORS</th><th>P50 MS</th>"
        f"<th>P90 MS</th><th>P99 MS</th><th>ACCURACY</th></tr>{version_rows}</table>"
        "<h2>Outputs</h2><table><tr><th>OUTPUT</th><th>COMPARED</th><th>DIFF RATE</th>"
        f"<th>MAX ABS</th><th>MEAN ABS</th><th>TOP-1 CHANGE</th></tr>{output_rows}</table>"
        "</body></html>"
    )


# -- helpers ---------------------------------------------------------------------------------


def _numeric(array: Array) -> bool:
    return bool(np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_)


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _finite(value: float) -> float | str:
    """JSON has no infinity: a shape or BYTES mismatch reads "inf"."""
    return value if math.isfinite(value) else "inf"


def _rows_of(request: CapturedRequest, batched: bool) -> int:
    if not batched or not request.inputs:
        return 1
    first = next(iter(request.inputs.values()))
    return int(first.shape[0]) if first.ndim else 1


def _first_output(replayed: Replayed) -> str | None:
    for answer in (replayed.baseline, replayed.candidate):
        if answer.outputs:
            return next(iter(answer.outputs))
    return None


def _as_index(label: Any) -> int | None:
    if isinstance(label, bool):
        return None
    if isinstance(label, int | np.integer):
        return int(label)
    if isinstance(label, float) and label.is_integer():
        return int(label)
    text = _text(label)
    return int(text) if text is not None and text.strip().lstrip("-").isdigit() else None


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return None if value is None else str(value)
