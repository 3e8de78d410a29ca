"""`convoy batch --engine ray`: the same job on Ray Data, for more than one machine.

    ray.data.read_parquet | read_csv | read_json  (the --input files)
      .map_batches(ConvoyPredictor, concurrency=K, num_gpus=G, batch_format="pyarrow")
      .write_parquet(--output)

Each actor loads the model once with the in-process engine's code. Checked before Ray
starts: the mapping (against the model's config.pbtxt), --keep, --id-column (required:
Ray Data keeps no row positions) and the output. Ray writes its own file names; the
manifest is written once the job has finished (no --resume on Ray).
"""

from __future__ import annotations

import posixpath
import time
from pathlib import Path
from typing import Any, TextIO

from .cli import BatchConfig, Outcome, UsageError, make_plan
from .engine import ModelSignature

ROWS_PER_ACTOR_CALL = 16  # batches of the model per map_batches call


def run_on_ray(config: BatchConfig, err: TextIO) -> Outcome:
    from .mapping import parse_map
    from .sink import Manifest, OutputError, Sink
    from .source import SourceError, open_source

    if config.server is not None:
        raise UsageError("--server: --engine ray loads the model in its actors; drop one of them")
    if config.resume:
        raise UsageError("--resume: a job on --engine ray cannot be resumed; run it again")
    if config.rate is not None:
        raise UsageError("--rate: paces a job against --server; --engine ray scores in its actors")
    if config.capture_dir is not None:
        raise UsageError("--capture-dir: captures a job scored in process (--engine local)")
    if config.id_column is None:
        raise UsageError("--engine ray needs --id-column: Ray Data keeps no row positions")
    if config.format != "parquet":
        raise UsageError(f"--format {config.format}: --engine ray writes Parquet")
    start = time.perf_counter()
    try:
        dataset = open_source(config.input)
        sink = Sink(config.output, config.dead_letter, "parquet")
        if sink.existing() is not None:
            raise UsageError(
                f"--output {config.output} holds a batch job's output already: "
                "name another --output"
            )
    except (SourceError, OutputError) as exc:
        raise UsageError(str(exc)) from None
    root = _repository(config)
    signature = _signature(root, config)
    plan = make_plan(config, dataset.schema, signature)
    import ray

    if not ray.is_initialized():
        ray.init(address=config.ray_address, include_dashboard=False, log_to_driver=False)
    from .predictor import ConvoyPredictor

    files = sorted(dataset.files)
    kind = dataset.format.default_extname  # parquet, csv or json
    filesystem = dataset.filesystem
    if kind == "parquet":
        rows = ray.data.read_parquet(files, filesystem=filesystem)
    elif kind == "csv":
        rows = ray.data.read_csv(files, filesystem=filesystem)
    else:
        rows = ray.data.read_json(files, filesystem=filesystem, lines=True)
    dead_letter = config.dead_letter or _child(config.output, "_dead_letter")
    actors = config.concurrency or 1
    scored = rows.map_batches(
        ConvoyPredictor,
        fn_constructor_kwargs={
            "model": config.model,
            "id_column": config.id_column,
            "model_repository": str(root),
            "version": config.version,
            "mapping": parse_map(config.mapping),
            "keep": config.keep,
            "batch_size": plan.batch_size,
            "dead_letter": dead_letter,
        },
        batch_size=plan.batch_size * ROWS_PER_ACTOR_CALL,
        batch_format="pyarrow",
        concurrency=actors,
        num_gpus=config.num_gpus or None,
    )
    scored.write_parquet(config.output)
    written, refused = _counts(config.output, dead_letter)
    manifest = Manifest(
        input=config.input,
        model=config.model,
        version=signature.version,
        part_rows=0,
        format="parquet",
        id_column=config.id_column,
        parts={0: {"rows": written, "errors": refused}},
        complete=True,
    )
    sink.write_manifest(manifest)
    seconds = time.perf_counter() - start
    summary: dict[str, Any] = {
        "model": config.model,
        "version": signature.version,
        "engine": "ray",
        "rows": written,
        "errors": refused,
        "seconds": round(seconds, 3),
        "scoring_seconds": round(seconds, 3),  # Ray loads the models as it scores
        "rows/s": round((written + refused) / seconds, 1) if seconds > 0 else 0.0,
        "total_rows": written,
        "total_errors": refused,
        "complete": True,
    }
    return Outcome(summary)


def _child(uri: str, name: str) -> str:
    """A folder inside a directory URI, its query (s3 options) kept."""
    base, sep, query = uri.partition("?")
    return posixpath.join(base, name) + sep + query


def _repository(config: BatchConfig) -> Path:
    from .cli import _repository as repository

    return repository(config)


def _signature(root: Path, config: BatchConfig) -> ModelSignature:
    """The model's inputs and outputs from its config.pbtxt: the mapping is checked on
    the driver, which may have no device to load the model on."""
    from ..config import CONFIG_FILENAME, read_model_config, validate_model_config
    from ..errors import ConvoyError

    model_dir = root / config.model
    try:
        spec = validate_model_config(
            read_model_config(model_dir), str(model_dir / CONFIG_FILENAME), config.model
        )
    except ConvoyError as exc:
        raise UsageError(f"model '{config.model}': {exc.message}") from None
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
    version = config.version or (str(versions[-1]) if versions else "")
    return ModelSignature(
        name=config.model,
        version=version,
        inputs=tuple(spec.inputs),
        outputs=tuple(spec.outputs),
        max_batch_size=spec.max_batch_size if spec.batched else 0,
        instances=1,
    )


def _counts(output: str, dead_letter: str) -> tuple[int, int]:
    """Rows Ray wrote (from the Parquet footers) and dead letters (lines)."""
    import pyarrow.dataset as ds
    from pyarrow import fs

    from ..capture.writer import open_filesystem

    filesystem, base = open_filesystem(output)
    written = ds.dataset(base, filesystem=filesystem, format="parquet").count_rows()
    dead_fs, dead_base = open_filesystem(dead_letter)
    refused = 0
    if dead_fs.get_file_info(dead_base).type == fs.FileType.Directory:
        for info in dead_fs.get_file_info(fs.FileSelector(dead_base)):
            if info.path.endswith(".jsonl"):
                with dead_fs.open_input_stream(info.path) as source:
                    refused += source.read().count(b"\n")
    return int(written), refused
