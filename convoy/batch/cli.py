"""`convoy batch MODEL --input URI --output URI ...`: arguments -> BatchConfig -> a job,
in process, against a live server, or on Ray Data. Exit status: 0 done, 1 stopped
(--max-errors passed, the model failed), 2 usage error (nothing scored)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ..arguments import grpc_address, number
from .priority import PRIORITIES, lower_cpu_priority

DONE, STOPPED, USAGE = 0, 1, 2
TOKEN_ENV = "CONVOY_TOKEN"
_positive_int = number(int, 0, strict=True)
_non_negative_int = number(int, 0, strict=False)
_non_negative_float = number(float, 0, strict=False)


class UsageError(Exception):
    """Refused before any row is scored."""


@dataclass(frozen=True)
class BatchConfig:
    model: str
    input: str
    output: str
    version: str = ""
    model_repository: Path | None = None
    server: str | None = None
    mapping: tuple[str, ...] = ()  # COLUMN=INPUT
    keep: tuple[str, ...] = ()
    id_column: str | None = None
    batch_size: int | None = None
    resume: bool = False
    dead_letter: str | None = None
    max_errors: int | None = None
    format: str = "parquet"
    concurrency: int | None = None
    engine: str = "local"
    ray_address: str | None = None
    num_gpus: float = 0.0
    token: str | None = None
    tls_ca: Path | None = None
    cpu_priority: str = "normal"
    rate: float | None = None  # rows per second
    capture_dir: str | None = None  # in process: capture what is scored (transport batch)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BatchConfig:
        return cls(
            model=args.model,
            input=args.input,
            output=args.output,
            version=str(args.version) if args.version is not None else "",
            model_repository=args.model_repository,
            server=args.server,
            mapping=tuple(args.map or ()),
            keep=tuple(args.keep or ()),
            id_column=args.id_column,
            batch_size=args.batch_size,
            resume=args.resume,
            dead_letter=args.dead_letter,
            max_errors=args.max_errors,
            format=args.format,
            concurrency=args.concurrency,
            engine=args.engine,
            ray_address=args.ray_address,
            num_gpus=args.num_gpus,
            token=args.token or os.environ.get(TOKEN_ENV),
            tls_ca=args.tls_ca,
            cpu_priority=args.cpu_priority or ("idle" if args.server else "normal"),
            rate=args.rate,
            capture_dir=args.capture_dir or None,  # "" as convoy serve takes it: off
        )


def add_batch_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "batch",
        help="score a Parquet, CSV or JSONL dataset with a model (offline, resumable)",
        description="Score every row of --input with MODEL, exactly as `convoy serve` would "
        "answer it, into --output: in this process (the default), against a live server "
        "(--server), or on Ray Data (--engine ray). Prints a JSON summary (docs/batch.md).",
    )
    parser.add_argument("model", metavar="MODEL")
    parser.add_argument(
        "--input",
        required=True,
        metavar="URI",
        help="a Parquet file, directory or glob, a CSV or JSONL file; a local "
        "path or a pyarrow filesystem URI (s3://bucket/key)",
    )
    parser.add_argument(
        "--output",
        required=True,
        metavar="URI",
        help="directory of the output parts and their manifest",
    )
    parser.add_argument(
        "--version",
        type=_positive_int,
        default=None,
        metavar="N",
        help="the model version (default: the one the server would answer with)",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--model-repository",
        type=Path,
        default=None,
        metavar="DIR",
        help="load the model from this repository (default: the built-in examples)",
    )
    where.add_argument(
        "--server",
        type=grpc_address,
        default=None,
        metavar="URL",
        help="score against this KServe v2 gRPC server (host:port or grpc://host:port), at "
        "background priority",
    )
    parser.add_argument(
        "--map",
        action="append",
        metavar="COLUMN=INPUT",
        help="feed the model input INPUT from COLUMN (default: the column "
        "of the input's name); repeatable",
    )
    parser.add_argument(
        "--keep",
        action="append",
        metavar="COLUMN",
        help="copy this input column to the output; repeatable",
    )
    parser.add_argument(
        "--id-column",
        default=None,
        metavar="C",
        help="the rows' id (default: the row's position in the input)",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        metavar="B",
        help="rows per request (default: the model's max_batch_size)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the job whose output is there, scoring only the parts it has not finished",
    )
    parser.add_argument(
        "--dead-letter",
        default=None,
        metavar="URI",
        help="directory for the rows refused, with their id and error "
        "(default: OUTPUT/_dead_letter)",
    )
    parser.add_argument(
        "--max-errors",
        type=_non_negative_int,
        default=None,
        metavar="K",
        help="stop once more than K rows were refused (default: never)",
    )
    parser.add_argument(
        "--format",
        choices=("parquet", "csv", "jsonl"),
        default="parquet",
        help="the output's format (default parquet)",
    )
    parser.add_argument(
        "--concurrency",
        type=_positive_int,
        default=None,
        metavar="K",
        help="batches in flight (default: two per model instance); with "
        "--engine ray, the number of model actors (default 1)",
    )
    parser.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local (this process or --server) or ray (Ray Data)",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="the Ray cluster for --engine ray (default: a local Ray)",
    )
    parser.add_argument(
        "--num-gpus",
        type=_non_negative_float,
        default=0.0,
        metavar="G",
        help="GPUs per model actor with --engine ray (default 0)",
    )
    parser.add_argument(
        "--token", default=None, help=f"bearer token for --server (default: ${TOKEN_ENV}, if set)"
    )
    parser.add_argument("--tls-ca", type=Path, default=None, help="PEM CA to verify a TLS --server")
    parser.add_argument(
        "--rate",
        type=number(float, 0, strict=True),
        default=None,
        metavar="R",
        help="at most R rows per second, evenly spaced (default: as fast as the model "
        "answers): against a shared server, what the job may take from online callers",
    )
    parser.add_argument(
        "--capture-dir",
        default=None,
        metavar="URI",
        help="in process: capture the requests scored to Parquet here, as convoy serve "
        "--capture-dir does (models whose config sets capture_sample_rate), with the "
        "transport `batch` (docs/capture.md); a --server captures by its own flag",
    )
    parser.add_argument(
        "--cpu-priority",
        choices=PRIORITIES,
        default=None,
        help="this process's CPU priority: idle (only CPU time nothing else on the host "
        "wants), low (nice 19) or normal (default: idle with --server, else normal)",
    )
    return parser


def run_batch(
    args: argparse.Namespace,
    out: TextIO | None = None,
    err: TextIO | None = None,
    lower_priority: bool = False,
) -> int:
    """The job; with lower_priority (the `convoy batch` command: a process of its own),
    --cpu-priority is applied to the process first."""
    from .engine import JobFailed  # the model runtimes' side, loaded for a job only

    out, err = out or sys.stdout, err or sys.stderr
    config = BatchConfig.from_args(args)
    if lower_priority:
        applied = lower_cpu_priority(config.cpu_priority)  # before the job starts threads
        if applied != config.cpu_priority:
            print(f"convoy batch: --cpu-priority {applied}, not {config.cpu_priority}", file=err)
    try:
        if config.engine == "ray":
            from .ray_engine import run_on_ray

            result = run_on_ray(config, err)
        else:
            result = asyncio.run(run_local(config, err))
    except UsageError as exc:
        print(f"convoy batch: {exc}", file=err)
        return USAGE
    except JobFailed as exc:
        print(f"convoy batch: {exc}", file=err)
        return STOPPED
    print(json.dumps(result.summary), file=out)
    if result.stopped is not None:
        print(f"convoy batch: stopped: {result.stopped}", file=err)
        return STOPPED
    return DONE


@dataclass(frozen=True)
class Outcome:
    summary: dict[str, Any]
    stopped: str | None = None


async def run_local(config: BatchConfig, err: TextIO) -> Outcome:
    from ..capture.replay_targets import Pacer
    from ..errors import ConfigError
    from .engine import NoSuchVersion, open_in_process, open_server
    from .job import (
        BatchJob,
        TooManyErrors,
        default_part_rows,
        now,
        summary,
    )
    from .sink import Manifest, OutputError, Sink
    from .source import SourceError, open_source

    if config.capture_dir is not None and config.server is not None:
        raise UsageError(
            "--capture-dir: a --server captures what it answers by its own --capture-dir"
        )
    start = now()
    try:
        dataset = open_source(config.input)
        sink = Sink(config.output, config.dead_letter, config.format)
        existing = await asyncio.to_thread(sink.existing)
    except (SourceError, OutputError) as exc:
        raise UsageError(str(exc)) from None
    if existing is not None and not config.resume:
        raise UsageError(
            f"--output {config.output} holds a batch job's output already: add --resume to "
            "continue it, or name another --output"
        )
    try:
        if config.server is not None:
            scorer, signature = await open_server(
                config.server, config.model, config.version, config.token, config.tls_ca
            )
        else:
            root = _repository(config)
            scorer, signature = await open_in_process(
                root, config.model, config.version, config.capture_dir
            )
    except NoSuchVersion as exc:
        raise UsageError(str(exc)) from None
    except ConfigError as exc:  # --capture-dir
        raise UsageError(exc.message) from None
    if config.rate is not None:
        scorer.pacer = Pacer(config.rate)
    try:
        plan = make_plan(config, dataset.schema, signature)
        if plan.part_rows == 0:
            plan = _with_part_rows(plan, default_part_rows(plan.batch_size))
        manifest = Manifest(
            input=config.input,
            model=config.model,
            version=signature.version,
            part_rows=existing.part_rows if existing is not None else plan.part_rows,
            format=config.format,
            id_column=config.id_column,
        )
        if existing is not None:
            changed = manifest.differs(existing)
            if changed:
                raise UsageError(
                    f"--resume: the output was written by another job: {'; '.join(changed)}"
                )
            manifest.parts = dict(existing.parts)
            plan = _with_part_rows(plan, existing.part_rows)
        total = _count(dataset) if err.isatty() else None
        job = BatchJob(plan, scorer, sink, manifest, _bar(err, total, start, manifest.rows))
        stopped = None
        scoring = now()
        try:
            progress = await job.run(dataset)
        except TooManyErrors as exc:
            progress, stopped = job.progress, str(exc)
        except OutputError as exc:  # Sink.prepare, before any row: nothing scored
            raise UsageError(str(exc)) from None
        end = now()
        result = summary(progress, manifest, end - start, end - scoring, scorer.retries)
    finally:
        await scorer.close()
    counts = getattr(scorer.target, "captured", None)  # closed: every row written or dropped
    if counts is not None:
        result["capture"] = _captured(counts, err)
    return Outcome(result, stopped)


def _captured(counts: Any, err: TextIO) -> dict[str, Any]:
    """The summary's `capture`: requests written, and those dropped by reason (the
    writer drops rather than waits, as in the server: said on stderr too)."""
    dropped: dict[str, int] = {}
    for (_, _, reason), n in counts.dropped.items():
        dropped[reason] = dropped.get(reason, 0) + n
    if dropped:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(dropped.items()))
        print(f"convoy batch: --capture-dir: requests not captured: {reasons}", file=err)
    return {"rows": sum(counts.rows.values()), "dropped": dropped, "files": counts.files}


def make_plan(config: BatchConfig, schema: Any, signature: Any) -> Any:
    """Every check that needs no row: mapping, --keep, --id-column, --batch-size."""
    from .job import JobPlan, default_concurrency
    from .mapping import MappingError, parse_map, plan

    try:
        bindings = plan(schema, signature, parse_map(config.mapping))
    except MappingError as exc:
        raise UsageError(str(exc)) from None
    names = list(schema.names)
    for column in config.keep:
        if column not in names:
            raise UsageError(
                f"--keep {column}: the input has no such column (columns: {', '.join(names)})"
            )
        if column in {t.name for t in signature.outputs}:
            raise UsageError(f"--keep {column}: the model has an output of that name")
    if config.id_column is not None and config.id_column not in names:
        raise UsageError(
            f"--id-column {config.id_column}: the input has no such column "
            f"(columns: {', '.join(names)})"
        )
    most = signature.max_batch_size or 1
    batch_size = config.batch_size or most
    if batch_size > most:
        raise UsageError(
            f"--batch-size {batch_size}: model '{signature.name}' takes at most {most} rows "
            "a request (its max_batch_size)"
        )
    return JobPlan(
        signature=signature,
        bindings=tuple(bindings),
        keep=config.keep,
        id_column=config.id_column,
        batch_size=batch_size,
        concurrency=config.concurrency or default_concurrency(signature),
        part_rows=0,
        max_errors=config.max_errors,
    )


def _with_part_rows(plan: Any, part_rows: int) -> Any:
    import dataclasses

    return dataclasses.replace(plan, part_rows=part_rows)


def _repository(config: BatchConfig) -> Path:
    root = config.model_repository
    if root is None:
        from ..repository.examples import default_examples_dir, ensure_examples

        root = ensure_examples(default_examples_dir())
    if not (Path(root) / config.model).is_dir():
        raise UsageError(f"--model-repository: no model '{config.model}' in {root}")
    return Path(root)


def _count(dataset: Any) -> int | None:
    try:
        return int(dataset.count_rows())
    except Exception:  # a count is only for the bar's ETA
        return None


def _bar(err: TextIO, total: int | None, start: float, before: int) -> Any:
    """A progress bar (rows/s, ETA) where stderr is a terminal; None elsewhere."""
    if not err.isatty():
        return None
    from .job import Progress, now

    def show(progress: Progress) -> None:
        done = progress.rows + progress.errors
        seconds = max(now() - start, 1e-9)
        rate = done / seconds
        whole = total if total is not None else before + done
        left = max(whole - before - done, 0)
        eta = f" ETA {left / rate:.0f}s" if rate > 0 and total is not None else ""
        phase = f"{rate:,.0f} rows/s{eta}"
        from ..progress import progress_bar

        progress_bar(phase, before + done, whole)

    return show
