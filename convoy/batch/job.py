"""BatchJob: an input's rows through a model, part after part, into an output that
records what is done (DESIGN §13).

Parts are cut from the input in order and scored a few at a time; a part's rows go to
the model in batches of --batch-size (its max_batch_size by default), as many batches in
flight as --concurrency allows, so every instance has the next batch waiting. A batch the
model refuses is split in halves until the refused rows are alone; they go to the dead
letters with their error, the others are scored. A part is written, then recorded in the
manifest: a crash loses at most the parts in flight, and a resumed job recomputes those
and no other.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..capture.replay_targets import Refused
from ..config import TensorSpec
from ..tensors import NUMPY_DTYPES, Array
from .engine import ModelSignature, Scorer
from .mapping import Binding, convert
from .sink import Manifest, Sink, output_column
from .source import Part, parts

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.dataset as ds

PART_BATCHES = 16  # batches per part: a part is what a crash may cost
PARTS_IN_FLIGHT = 2  # the next part is read and queued while one finishes


class TooManyErrors(Exception):
    """--max-errors was passed; the parts done so far are kept."""


@dataclass(frozen=True)
class JobPlan:
    """What a job does, every decision made before a row is scored."""

    signature: ModelSignature
    bindings: tuple[Binding, ...]
    keep: tuple[str, ...]
    id_column: str | None
    batch_size: int
    concurrency: int
    part_rows: int
    max_errors: int | None

    @property
    def columns(self) -> list[str]:
        wanted = [b.column for b in self.bindings] + list(self.keep)
        if self.id_column is not None:
            wanted.append(self.id_column)
        return list(dict.fromkeys(wanted))


@dataclass
class Progress:
    rows: int = 0
    errors: int = 0
    parts: int = 0


class PartScorer:
    """A part's rows through the model: converted, sent in batches (as many in flight
    as `concurrency`), a refused batch bisected to its bad rows, reassembled in order.
    Shared by the in-process job and ConvoyPredictor (Ray Data)."""

    def __init__(self, plan: JobPlan, scorer: Scorer) -> None:
        self.plan = plan
        self.scorer = scorer
        self._slots = asyncio.Semaphore(plan.concurrency)
        self._bisecting = asyncio.Lock()  # one bisection at a time holds every slot

    async def score(self, part: Part) -> tuple[pa.Table, list[tuple[Any, str]]]:
        """The part's scored rows (id, --keep columns, outputs) and its refused rows
        (id, error)."""
        converted = await asyncio.to_thread(convert, part.table, self.plan.bindings)
        errors: dict[int, str] = dict(converted.errors)
        scored: list[tuple[Array, dict[str, Array]]] = []
        size = self.plan.batch_size
        chunks = [
            (positions[i : i + size], _rows(inputs, i, i + size))
            for positions, inputs in converted.groups
            for i in range(0, len(positions), size)
        ]
        await asyncio.gather(
            *(self._score(part, pos, inputs, scored, errors) for pos, inputs in chunks)
        )
        return await asyncio.to_thread(self._assemble, part, scored, errors)

    async def _score(
        self,
        part: Part,
        positions: Array,
        inputs: dict[str, Array],
        scored: list[tuple[Array, dict[str, Array]]],
        errors: dict[int, str],
    ) -> None:
        """One batch; where the model refuses it, each half on its own down to the rows."""
        request_id = _request_id(part, positions)
        if not self.plan.signature.batched:
            await asyncio.gather(
                *(
                    self._score_one(part, positions[i : i + 1], inputs, i, scored, errors)
                    for i in range(len(positions))
                )
            )
            return
        try:
            async with self._slots:
                outputs = await self.scorer.score(inputs, request_id)
        except Refused:
            async with self._alone():
                await self._bisect(part, positions, inputs, scored, errors)
            return
        scored.append((positions, outputs))

    @contextlib.asynccontextmanager
    async def _alone(self) -> AsyncIterator[None]:
        """Every slot held: none of this job's other requests in flight, so the model's
        queue cannot batch a bisected half with another request (a good row would fail
        beside another request's bad one)."""
        async with self._bisecting:
            for _ in range(self.plan.concurrency):
                await self._slots.acquire()
            try:
                yield
            finally:
                for _ in range(self.plan.concurrency):
                    self._slots.release()

    async def _bisect(
        self,
        part: Part,
        positions: Array,
        inputs: dict[str, Array],
        scored: list[tuple[Array, dict[str, Array]]],
        errors: dict[int, str],
    ) -> None:
        """A refused batch again, then each half on its own, down to the refused rows."""
        request_id = _request_id(part, positions)
        try:
            scored.append((positions, await self.scorer.score(inputs, request_id)))
            return
        except Refused as refused:
            if len(positions) == 1:
                errors[int(positions[0])] = str(refused)
                return
        half = len(positions) // 2
        await self._bisect(part, positions[:half], _rows(inputs, 0, half), scored, errors)
        await self._bisect(
            part, positions[half:], _rows(inputs, half, len(positions)), scored, errors
        )

    async def _score_one(
        self,
        part: Part,
        positions: Array,
        inputs: dict[str, Array],
        i: int,
        scored: list[tuple[Array, dict[str, Array]]],
        errors: dict[int, str],
    ) -> None:
        """A row of a model without a batch dimension: its own request."""
        row = {name: value[i] for name, value in inputs.items()}
        try:
            async with self._slots:
                outputs = await self.scorer.score(
                    row, f"batch-{part.first_row + int(positions[0])}"
                )
        except Refused as refused:
            errors[int(positions[0])] = str(refused)
            return
        scored.append((positions, {name: value[None] for name, value in outputs.items()}))

    def _assemble(
        self, part: Part, scored: list[tuple[Array, dict[str, Array]]], errors: dict[int, str]
    ) -> tuple[pa.Table, list[tuple[Any, str]]]:
        """The part's scored rows in input order: id, --keep columns, outputs."""
        import pyarrow as pa

        ids = self._ids(part)
        positions = (
            np.concatenate([p for p, _ in scored]) if scored else np.zeros(0, dtype=np.int64)
        )
        order = np.argsort(positions, kind="stable")
        rows = positions[order]
        columns: dict[str, pa.Array] = {}
        fields: list[pa.Field] = []
        id_name = self.plan.id_column or "id"
        columns[id_name] = ids.take(pa.array(rows))
        fields.append(pa.field(id_name, columns[id_name].type))
        for name in self.plan.keep:
            if name == id_name:
                continue
            columns[name] = part.table.column(name).take(pa.array(rows))
            fields.append(pa.field(name, columns[name].type))
        for spec in self.plan.signature.outputs:
            if scored and spec.name not in scored[0][1]:
                continue  # a server that left an output out
            pieces = [output_column(spec, outputs[spec.name]) for _, outputs in scored]
            if not pieces:  # every row refused: the columns all the same, with no rows
                empty = np.zeros((0, *(max(d, 0) for d in spec.dims)), _numpy_dtype(spec))
                pieces = [output_column(spec, empty)]
            field = pieces[0][0]
            whole = pa.concat_arrays([array for _, array in pieces]).take(pa.array(order))
            columns[spec.name] = whole
            fields.append(field.with_type(whole.type))
        arrays = [
            c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in columns.values()
        ]
        table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
        dead_rows = sorted(errors)
        dead_ids = ids.take(pa.array(dead_rows, pa.int64())).to_pylist() if dead_rows else []
        return table, [(i, errors[r]) for i, r in zip(dead_ids, dead_rows, strict=True)]

    def _ids(self, part: Part) -> pa.Array:
        import pyarrow as pa

        if self.plan.id_column is not None:
            column = part.table.column(self.plan.id_column)
            return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        start = part.first_row
        return pa.array(np.arange(start, start + part.table.num_rows, dtype=np.int64))


class BatchJob:
    def __init__(
        self,
        plan: JobPlan,
        scorer: Scorer,
        sink: Sink,
        manifest: Manifest,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> None:
        self.plan = plan
        self.scorer = scorer
        self.sink = sink
        self.manifest = manifest
        self.progress = Progress()
        self._on_progress = on_progress
        self._parts = PartScorer(plan, scorer)
        self._manifest_lock = asyncio.Lock()

    async def run(self, dataset: ds.Dataset) -> Progress:
        """Every part not yet done; TooManyErrors past --max-errors, JobFailed where the
        model cannot go on. The manifest is complete when this returns."""
        done = frozenset(self.manifest.parts)
        await asyncio.to_thread(self.sink.prepare)
        # Before any part: a job killed during its first part is still one to --resume.
        await asyncio.to_thread(self.sink.write_manifest, self.manifest)
        reader = parts(dataset, self.plan.columns, self.plan.part_rows, done)
        running: set[asyncio.Task[None]] = set()
        try:
            while True:
                part = await asyncio.to_thread(next, reader, None)
                if part is None:
                    break
                task = asyncio.create_task(self._part(part))
                running.add(task)
                task.add_done_callback(running.discard)
                if len(running) >= PARTS_IN_FLIGHT:
                    finished, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    for t in finished:
                        t.result()  # the first failure stops the job
            while running:
                finished, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for t in finished:
                    t.result()
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
        self.manifest.complete = True
        await asyncio.to_thread(self.sink.write_manifest, self.manifest)
        return self.progress

    async def _part(self, part: Part) -> None:
        table, dead = await self._parts.score(part)
        await asyncio.to_thread(self.sink.write_part, part.index, table, dead)
        async with self._manifest_lock:
            self.manifest.parts[part.index] = {"rows": table.num_rows, "errors": len(dead)}
            await asyncio.to_thread(self.sink.write_manifest, self.manifest)
        self.progress.rows += table.num_rows
        self.progress.errors += len(dead)
        self.progress.parts += 1
        if self._on_progress is not None:
            self._on_progress(self.progress)
        limit = self.plan.max_errors
        if limit is not None and self.manifest.errors > limit:
            raise TooManyErrors(
                f"{self.manifest.errors} rows refused, more than --max-errors {limit}"
            )


def _numpy_dtype(spec: TensorSpec) -> Any:
    if spec.datatype == "BYTES":
        return object
    return np.float32 if spec.datatype == "BF16" else NUMPY_DTYPES[spec.datatype]


def _rows(inputs: dict[str, Array], start: int, end: int) -> dict[str, Array]:
    return {name: value[start:end] for name, value in inputs.items()}


def default_concurrency(signature: ModelSignature) -> int:
    """Two batches per instance: one running, the next waiting in the queue."""
    return max(2, 2 * signature.instances)


def default_part_rows(batch_size: int) -> int:
    return max(1, batch_size) * PART_BATCHES


def rows_per_second(rows: int, seconds: float) -> float:
    return rows / seconds if seconds > 0 else 0.0


def summary(
    progress: Progress, manifest: Manifest, seconds: float, scoring_s: float, retries: int = 0
) -> dict[str, Any]:
    """`seconds` is the whole run, the model's load included; `rows/s` (the issue's name
    for it) is over the scoring alone (`scoring_seconds`), the rate a longer job keeps up."""
    return {
        "model": manifest.model,
        "version": manifest.version,
        "rows": progress.rows,
        "errors": progress.errors,
        "parts": progress.parts,
        "seconds": round(seconds, 3),
        "scoring_seconds": round(scoring_s, 3),
        "rows/s": round(rows_per_second(progress.rows + progress.errors, scoring_s), 1),
        "total_rows": manifest.rows,
        "total_errors": manifest.errors,
        "complete": manifest.complete,
        "retries": retries,
    }


def now() -> float:
    return time.perf_counter()


def _request_id(part: Part, positions: Array) -> str:
    """A batch request's id: its first row in the input, and how many rows it holds."""
    return f"batch-{part.first_row + int(positions[0])}-{len(positions)}"
