"""Agreement between two versions' outputs and the bare model's throughput."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..config import ModelSpec
from ..tensors import Array
from .runners import Runner
from .samples import Sample, batch_of, rows_of

_CLASSIFIER_NAME = re.compile(r"logit|prob|score|class", re.IGNORECASE)


@dataclass(frozen=True)
class OutputAgreement:
    output: str
    max_abs_diff: float
    mean_cosine: float  # per row, flattened; 1.0 is the same direction
    min_cosine: float
    top1_agreement: float | None  # classifiers only: same arg-max per row


@dataclass(frozen=True)
class Throughput:
    batch: int
    rows_per_s: float
    ms_per_batch: float
    runs: int


def is_classifier(spec: ModelSpec, output: str) -> bool:
    """A score per class per row: labels, softmax classification, or a scores-like name
    on a 1-D per-item output. Embeddings have no meaningful top-1."""
    tensor = spec.output(output)
    if tensor is None or len(tensor.dims) != 1 or tensor.datatype not in ("FP32", "FP16", "FP64"):
        return False
    return bool(
        tensor.label_filename or output in spec.softmax_outputs or _CLASSIFIER_NAME.search(output)
    )


def run_sample(runner: Runner, sample: Sample, batch: int, batched: bool) -> dict[str, Array]:
    """The whole sample through the model in batches of at most `batch` rows."""
    parts: dict[str, list[Array]] = {}
    step = batch if batched else sample.rows
    for start in range(0, sample.rows, step):
        out = runner.run(rows_of(sample, start, start + step, batched))
        for name, value in out.items():
            parts.setdefault(name, []).append(value)
    return {n: np.concatenate(v) if batched else v[0] for n, v in parts.items()}


def agreement(
    spec: ModelSpec, before: Mapping[str, Array], after: Mapping[str, Array]
) -> list[OutputAgreement]:
    rows: list[OutputAgreement] = []
    for name in sorted(before.keys() & after.keys()):
        a = np.asarray(before[name], dtype=np.float64)
        b = np.asarray(after[name], dtype=np.float64)
        flat_a = a.reshape(a.shape[0], -1) if spec.batched and a.ndim else a.reshape(1, -1)
        flat_b = b.reshape(flat_a.shape)
        norms = np.linalg.norm(flat_a, axis=1) * np.linalg.norm(flat_b, axis=1)
        # Two zero rows agree perfectly; one zero row against another does not.
        cosine = np.where(
            norms > 0,
            np.sum(flat_a * flat_b, axis=1) / np.where(norms > 0, norms, 1.0),
            np.all(flat_a == flat_b, axis=1).astype(np.float64),
        )
        top1 = None
        if is_classifier(spec, name):
            top1 = float(np.mean(flat_a.argmax(axis=1) == flat_b.argmax(axis=1)))
        rows.append(
            OutputAgreement(
                output=name,
                max_abs_diff=float(np.max(np.abs(flat_a - flat_b))) if flat_a.size else 0.0,
                mean_cosine=float(np.mean(cosine)),
                min_cosine=float(np.min(cosine)),
                top1_agreement=top1,
            )
        )
    return rows


def paired_throughput(
    runners: Sequence[Runner],
    sample: Sample,
    batch: int,
    batched: bool,
    seconds: float,
    clock: Callable[[], float] = time.perf_counter,
) -> list[Throughput]:
    """Each runner's rows/s on one batch, measured in alternation (one run of each per
    round, until every runner has run `seconds`, at least 3 rounds) so that load from
    elsewhere on the machine slows both versions alike instead of whichever ran second."""
    feed = batch_of(sample, batch, batched)
    for runner in runners:
        runner.run(feed)  # warm-up: allocations, thread pools, prepacked weights
    elapsed = [0.0] * len(runners)
    rounds = 0
    while rounds < 3 or min(elapsed) < seconds:
        for i, runner in enumerate(runners):
            start = clock()
            runner.run(feed)
            elapsed[i] += clock() - start
        rounds += 1
    rows = batch if batched else 1
    return [
        Throughput(
            batch=rows,
            rows_per_s=rows * rounds / spent if spent > 0 else float("inf"),
            ms_per_batch=1000 * spent / rounds,
            runs=rounds,
        )
        for spent in elapsed
    ]
