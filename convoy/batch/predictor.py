"""ConvoyPredictor: Ray Data's callable class for `map_batches`, scoring with the code
`convoy batch` runs in process (and `convoy serve` online).

    import ray
    from convoy.batch import ConvoyPredictor

    ds = ray.data.read_parquet("s3://bucket/rows/")
    scored = ds.map_batches(
        ConvoyPredictor,
        fn_constructor_kwargs={"model": "minilm_embedding", "id_column": "doc_id",
                               "mapping": {"TEXT": "body"}},
        batch_size=1024, batch_format="pyarrow", concurrency=4,
    )
    scored.write_parquet("s3://bucket/embeddings/")

The model loads once per actor, in __init__, on an event loop of the actor's own (a
thread) that owns the model's queue and instances; __call__ takes a batch (a pyarrow
Table or a dict of numpy columns) and returns the same kind: the id column, the `keep`
columns and one column per model output, as `convoy batch` writes them. Rows the model
refuses (or whose values do not convert) are left out of the answer; with `dead_letter`
they are written there (`<actor>-<n>.jsonl`, id and error per line), else the batch fails.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Coroutine, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import pyarrow as pa

    from .engine import ModelSignature, Scorer
    from .job import PartScorer

T = TypeVar("T")


class RowsRefused(Exception):
    """Rows of a batch were refused and the predictor has no dead-letter directory."""


class ConvoyPredictor:
    def __init__(
        self,
        model: str,
        *,
        id_column: str,
        model_repository: str | None = None,
        version: str = "",
        mapping: Mapping[str, str] | None = None,  # input -> column
        keep: Sequence[str] = (),
        batch_size: int | None = None,
        concurrency: int | None = None,
        dead_letter: str | None = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="convoy-predictor", daemon=True
        )
        self._thread.start()
        self.model = model
        self.id_column = id_column
        self.mapping = dict(mapping or {})
        self.keep = tuple(keep)
        self._batch_size = batch_size
        self._concurrency = concurrency
        self._dead_letter = dead_letter
        self._name = uuid.uuid4().hex[:12]
        self._written = 0
        root = Path(model_repository) if model_repository else _examples()
        self._scorer, self.signature = self._run(_open(root, model, version))
        self._parts: dict[tuple[str, ...], PartScorer] = {}  # by the batch's columns

    def __call__(self, batch: pa.Table | dict[str, Any]) -> pa.Table | dict[str, Any]:
        import pyarrow as pa

        table = batch if isinstance(batch, pa.Table) else _table(batch)
        from .source import Part

        scorer = self._part_scorer(table.schema)
        scored, dead = self._run(scorer.score(Part(0, 0, table)))
        if dead:
            self._refused(dead)
        if isinstance(batch, pa.Table):
            return scored
        return {name: _numpy(scored.column(name)) for name in scored.column_names}

    def close(self) -> None:
        """Unload the model and stop the actor's loop (Ray ends the process anyway)."""
        if self._loop.is_closed():
            return
        self._run(self._scorer.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    # -- inside --------------------------------------------------------------------------

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()

    def _part_scorer(self, schema: pa.Schema) -> PartScorer:
        """Mapping checked once per batch schema (MappingError naming both sides)."""
        from .job import JobPlan, PartScorer, default_concurrency
        from .mapping import plan

        key = tuple(schema.names)
        scorer = self._parts.get(key)
        if scorer is None:
            signature = self.signature
            if self.id_column not in schema.names:
                raise KeyError(f"id_column '{self.id_column}' is not a column of the batch")
            job = JobPlan(
                signature=signature,
                bindings=tuple(plan(schema, signature, self.mapping)),
                keep=self.keep,
                id_column=self.id_column,
                batch_size=self._batch_size or max(1, signature.max_batch_size),
                concurrency=self._concurrency or default_concurrency(signature),
                part_rows=0,
                max_errors=None,
            )
            scorer = self._parts[key] = PartScorer(job, self._scorer)
        return scorer

    def _refused(self, dead: list[tuple[Any, str]]) -> None:
        if self._dead_letter is None:
            first = dead[0]
            raise RowsRefused(f"{len(dead)} rows refused, the first (id {first[0]}): {first[1]}")
        from .sink import Sink

        sink = Sink(self._dead_letter, self._dead_letter, "jsonl")
        sink.prepare()
        self._written += 1
        sink.write_dead_letters(f"{self._name}-{self._written}", dead)


async def _open(root: Path, model: str, version: str) -> tuple[Scorer, ModelSignature]:
    from .engine import open_in_process

    return await open_in_process(root, model, version)


def _examples() -> Path:
    from ..repository.examples import default_examples_dir, ensure_examples

    return ensure_examples(default_examples_dir())


def _table(batch: dict[str, Any]) -> pa.Table:
    """Ray's numpy batch: a column of arrays (a list column) becomes a list per row."""
    import numpy as np
    import pyarrow as pa

    columns = {}
    for name, values in batch.items():
        if isinstance(values, np.ndarray) and values.ndim > 1:
            columns[name] = pa.array(list(values.reshape(len(values), -1)))
        elif isinstance(values, np.ndarray) and values.dtype == object:
            columns[name] = pa.array(
                [list(v) if isinstance(v, np.ndarray) else v for v in values.tolist()]
            )
        else:
            columns[name] = pa.array(values)
    return pa.table(columns)


def _numpy(column: pa.ChunkedArray) -> Any:
    import numpy as np
    import pyarrow as pa

    if pa.types.is_fixed_size_list(column.type):
        flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return np.asarray(flat).reshape(len(column), column.type.list_size)
    return column.to_numpy(zero_copy_only=False)
