"""`convoy optimize`: convert version N into version M, measure both, install M only
if its outputs agree with N's within the mode's floors.

M is built in a hidden staging directory beside N and put in place whole, so a
server polling the repository never sees half a version, nor (--force) a version
that vanishes (install.py).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from .install import install_version
from .measure import agreement, paired_throughput, run_sample
from .plan import OptimizePlan, OptimizeRequest, plan_optimization
from .report import FLOORS, OptimizeReport, VersionFigures, below_floors
from .runners import Runner, open_runner
from .samples import Sample, load_calibration, seeded_sample

Progress = Callable[[str, int, int], None]
STEPS = 7


def _silent(phase: str, step: int, total: int) -> None:
    pass


def optimize(
    request: OptimizeRequest,
    progress: Progress = _silent,
    floors: dict[str, float] | None = None,
) -> OptimizeReport:
    """Blocking (minutes at most). OptimizeRefused for what it will not do; a report
    whose `passed` is False when M was measured and not installed."""
    plan = plan_optimization(request)
    spec = plan.spec
    step = _Steps(progress)
    step(f"loading version {request.from_version}")
    before_runner = open_runner(spec, plan.source, request.threads)
    sample = _sample(plan, before_runner)
    staging = plan.target_dir.with_name(f".optimize-{request.to_version}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        target_file = _stage(plan, staging)
        step(f"converting to {plan.mode}")
        started = time.perf_counter()
        _convert(plan, target_file, sample)
        convert_seconds = time.perf_counter() - started
        step(f"loading version {request.to_version}")
        after_runner = open_runner(spec, target_file, request.threads)
        step("comparing outputs")
        top = max(1, spec.max_batch_size)
        compared = tuple(
            agreement(
                spec,
                run_sample(before_runner, sample, top, spec.batched),
                run_sample(after_runner, sample, top, spec.batched),
            )
        )
        runners = (before_runner, after_runner)
        per_batch = []
        for batch in (1, top):
            step(f"throughput at batch {batch}")
            per_batch.append(
                paired_throughput(runners, sample, batch, spec.batched, request.bench_seconds)
            )
        figures = [
            VersionFigures(version, path.stat().st_size, per_batch[0][i], per_batch[1][i])
            for i, (version, path) in enumerate(
                ((request.from_version, plan.source), (request.to_version, target_file))
            )
        ]
        chosen = {**FLOORS[plan.mode], **(floors or {})}
        report = OptimizeReport(
            model=spec.name,
            backend=spec.backend,
            mode=plan.mode,
            from_version=figures[0],
            to_version=figures[1],
            sample=sample.source,
            agreement=compared,
            floors=chosen,
            failures=below_floors(compared, chosen),
            notes=_notes(plan),
            convert_seconds=convert_seconds,
        )
        step("installing" if report.passed else "not installing: below the floors")
        if report.passed:
            (staging / "optimize_report.json").write_text(report.to_json())
            (staging / "optimize_report.txt").write_text(report.to_text())
            install_version(staging, plan.target_dir)
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class _Steps:
    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._done = 0

    def __call__(self, phase: str) -> None:
        self._done += 1
        self._progress(phase, min(self._done, STEPS), STEPS)


def _sample(plan: OptimizePlan, runner: Runner) -> Sample:
    request, spec = plan.request, plan.spec
    if request.calibration is not None:
        return load_calibration(request.calibration, runner.inputs, spec.batched)
    return seeded_sample(spec, runner.inputs, plan.source.parent, request.sample_rows, request.seed)


def _stage(plan: OptimizePlan, staging: Path) -> Path:
    """Version N's directory without its model file (tokenizer, labels, ... kept)."""
    source_dir = plan.source.parent
    shutil.copytree(
        source_dir,
        staging,
        ignore=lambda d, names: (
            [plan.source.name, "optimize_report.json", "optimize_report.txt"]
            if Path(d) == source_dir
            else []
        ),
    )
    return staging / plan.source.name


def _convert(plan: OptimizePlan, target: Path, sample: Sample) -> None:
    from . import convert

    if plan.mode == "fp16":
        convert.onnx_fp16(plan.source, target)
    elif plan.spec.backend == "pytorch":
        convert.torchscript_int8_dynamic(plan.source, target)
    elif plan.mode == "int8-static":
        convert.onnx_int8_static(plan.source, target, sample)
    else:
        convert.onnx_int8_dynamic(plan.source, target)


def _notes(plan: OptimizePlan) -> tuple[str, ...]:
    request, spec = plan.request, plan.spec
    notes = []
    if plan.mode == "int8-static":
        notes.append("agreement measured on the calibration rows themselves (in-sample)")
    if spec.backend == "pytorch" and request.calibration is not None:
        notes.append("TorchScript INT8 is dynamic: the calibration file is the sample only")
    if spec.options.text is not None:
        notes.append("measured on the model file's token inputs, without tokenization")
    if (request.model_dir / "rollout.json").exists():
        notes.append(
            "rollout.json present: a server that loads or polls this repository starts "
            f"its declared rollout of version {request.to_version}"
        )
    elif (
        spec.version_policy.kind == "latest"
        and spec.version_policy.num_versions == 1
        and request.to_version > request.from_version
    ):
        notes.append(
            f"version_policy latest: a server that loads or polls this repository serves "
            f"version {request.to_version} in place of {request.from_version}; start a shadow "
            "or canary first (docs/optimize.md)"
        )
    return tuple(notes)
