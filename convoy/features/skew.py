"""Training-serving skew: the features a model was served (captured with each answer)
against what Feast's offline store gives for the same entities at the same moments
(`get_historical_features`, point in time), per feature.

- mismatch_rate: of the rows where the online store served a value, the share whose
  value differs from the offline one (beyond float rounding of the model's input type),
  or that has no offline value at all;
- mean_abs_diff: the mean |served - offline| over rows where both have a value;
- staleness_s: how far the served value's feature timestamp lags the offline row's,
  in seconds, averaged over those rows (0 when the online store kept up);
- missing: rows the online store had no value for (served a default, NaN, or refused).

Captured rows without every feature field (captured before the model gained its feast_*
parameters, or a response-cache hit captured before the cache kept looked-up features)
are skipped and counted: they hold nothing to compare.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ..capture.dataset import ExportError, ExportRequest, read_requests
from ..capture.writer import open_filesystem
from ..config import CAPTURE_EXCLUDE, CAPTURE_HASH, FEATURE_TIMESTAMP_SUFFIX, FeatureSpec, ModelSpec
from ..tensors import NUMPY_DTYPES
from .lookup import open_store, resolve

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

ROW_ID = "__convoy_row"  # joins Feast's answer (which reorders rows) back to ours
EVENT_TIME = "event_timestamp"


class SkewError(Exception):
    """Why no report could be made; `flag` names the argument at fault (a usage error)."""

    def __init__(self, message: str, flag: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.flag = flag


@dataclass(frozen=True)
class Served:
    """Captured rows, one per batch item: the keys, when, and what was served."""

    keys: dict[str, list[Any]]  # join key -> one value per item
    event_us: npt.NDArray[np.int64]  # when the request was answered (UTC µs)
    values: npt.NDArray[np.float64]  # [items, features]
    stamps_us: npt.NDArray[np.int64]  # served feature timestamps; 0: the store had none
    skipped: int = 0  # captured rows left out: they lack a feature field
    skipped_reason: str | None = None

    @property
    def items(self) -> int:
        return int(self.event_us.size)


@dataclass(frozen=True)
class Offline:
    values: npt.NDArray[np.float64]  # [items, features]; NaN where none
    stamps_us: npt.NDArray[np.int64] | None  # the offline rows' timestamps; 0 where none
    stamps_error: str | None = None  # why stamps_us is None


@dataclass(frozen=True)
class FeatureSkew:
    rows: int
    mismatch_rate: float
    mean_abs_diff: float
    staleness_s: float | None  # None: the offline timestamps could not be read
    missing: int

    def as_json(self) -> dict[str, Any]:
        return {
            "mismatch_rate": self.mismatch_rate,
            "mean_abs_diff": self.mean_abs_diff,
            "staleness_s": self.staleness_s,
            "missing": self.missing,
            "rows": self.rows,
        }


def compare(
    served: Served, offline: Offline, names: tuple[str, ...], datatype: str
) -> dict[str, FeatureSkew]:
    """Per feature, the served values against the offline ones (pure: unit-tested)."""
    dtype = NUMPY_DTYPES[datatype]
    found: dict[str, FeatureSkew] = {}
    for j, name in enumerate(names):
        had = served.stamps_us[:, j] != 0
        value, truth = served.values[had, j], offline.values[had, j]
        known = ~np.isnan(truth)
        # Offline values as the model's input type would have held them (FP32 rounding).
        truth_typed = np.where(known, truth, 0).astype(dtype).astype(np.float64)
        same = known & np.isclose(value, truth_typed, rtol=1e-6, atol=1e-9, equal_nan=True)
        compared = int(had.sum())
        both = known
        diff = np.abs(value[both] - truth_typed[both])
        staleness: float | None = None
        if offline.stamps_us is not None:
            lag = offline.stamps_us[had, j][both] - served.stamps_us[had, j][both]
            staleness = float(np.clip(lag, 0, None).mean() / 1e6) if lag.size else 0.0
        found[name] = FeatureSkew(
            rows=served.items,
            mismatch_rate=float((compared - same.sum()) / compared) if compared else 0.0,
            mean_abs_diff=float(diff.mean()) if diff.size else 0.0,
            staleness_s=staleness,
            missing=int(served.items - compared),
        )
    return found


# -- reading what was served ---------------------------------------------------------------


def read_served(
    capture_dir: str,
    model: str,
    spec: FeatureSpec,
    since: dt.datetime | None,
    until: dt.datetime | None,
    sample: int | None,
) -> Served:
    """The model's answered, captured requests in the window, one item per batch row; at
    most `sample` items (the most recent)."""
    try:
        filesystem, base = open_filesystem(capture_dir)
        if filesystem.get_file_info(base).type.name != "Directory":
            raise SkewError(f"'{capture_dir}' is not a directory", "--capture-dir")
        table = read_requests(filesystem, base, ExportRequest(model, capture_dir, "", since, until))
    except ExportError as exc:
        raise SkewError(exc.message, exc.flag) from None
    except (OSError, ValueError, KeyError) as exc:
        raise SkewError(
            f"cannot read the captured files in '{capture_dir}': {exc}", "--capture-dir"
        ) from None
    if "inputs" not in table.column_names:
        raise SkewError(f"the captured rows of '{model}' hold no inputs")
    inputs = table.column("inputs").combine_chunks()
    fields = {inputs.type.field(i).name for i in range(inputs.type.num_fields)}
    wanted = [name for _, name in spec.entities]
    for name in spec.names:
        wanted += [name, name + FEATURE_TIMESTAMP_SUFFIX]
    absent = [n for n in wanted if n not in fields]
    if absent:
        raise SkewError(
            f"the captured rows of '{model}' lack {absent}: were they captured with "
            "feast_* parameters, and none of them in capture_exclude?"
        )
    complete = _complete(inputs, wanted)
    skipped = int(len(inputs) - np.count_nonzero(complete))
    reason = None
    if skipped:
        reason = (
            f"{skipped} of {len(inputs)} captured rows lack served features (captured before "
            "the model had feast_* parameters, or a response-cache hit captured before the "
            "cache kept looked-up features)"
        )
        inputs = inputs.filter(complete)
    counts, columns = _items(inputs, wanted)
    stamps = table.column("timestamp").cast("int64").to_numpy()[complete]
    event_us = np.repeat(stamps, counts)
    order = np.argsort(event_us, kind="stable")
    if sample is not None and order.size > sample:
        order = order[-sample:]
    keys = {key: [_key(columns[name][i]) for i in order] for key, name in spec.entities}
    values = np.stack([np.asarray(columns[n], np.float64)[order] for n in spec.names], axis=1)
    ts = [np.asarray(columns[n + FEATURE_TIMESTAMP_SUFFIX], np.int64)[order] for n in spec.names]
    return Served(keys, event_us[order], values, np.stack(ts, axis=1), skipped, reason)


def _complete(inputs: pa.StructArray, names: list[str]) -> npt.NDArray[np.bool_]:
    """Per captured row, whether every field in `names` holds one value per item, as
    many items as the first: flattening drops null entries, which would shift later
    items' values onto other rows' keys."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def array(values: Any) -> npt.NDArray[Any]:
        return np.asarray(values.to_numpy(zero_copy_only=False))

    rows = len(inputs)
    valid = array(pc.is_valid(inputs)).astype(np.bool_)
    lengths: npt.NDArray[np.int64] | None = None
    for name in names:
        column = inputs.field(name)
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            items = array(pc.fill_null(pc.list_value_length(column), -1)).astype(np.int64)
            whole = _one_value(column.flatten())  # per item: one non-null value
            parents = array(pc.list_parent_indices(column)).astype(np.int64)
            good = np.bincount(parents, whole.astype(np.float64), minlength=rows)
            valid &= (items >= 0) & (good == items)
            if lengths is None:
                lengths = items
            valid &= items == lengths
        else:  # a model without a batch dimension: one item
            valid &= _one_value(column)
    return valid


def _one_value(column: Any) -> npt.NDArray[np.bool_]:
    """Per list entry, whether it holds exactly one non-null value."""
    import pyarrow.compute as pc

    length = pc.fill_null(pc.list_value_length(column), 0)
    first = pc.list_element(pc.if_else(pc.equal(length, 1), column, None), 0)
    return np.asarray(pc.is_valid(first).to_numpy(zero_copy_only=False), np.bool_)


def _key(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def _items(inputs: pa.StructArray, names: list[str]) -> tuple[Any, dict[str, list[Any]]]:
    """Per captured row, its number of items; per field, every item's one value."""
    import pyarrow as pa
    import pyarrow.compute as pc

    first = inputs.field(names[0])
    batched = pa.types.is_list(first.type) or pa.types.is_large_list(first.type)
    counts = pc.fill_null(pc.list_value_length(first), 0).to_numpy() if batched else None
    columns: dict[str, list[Any]] = {}
    for name in names:
        column = inputs.field(name)
        if batched:
            column = column.flatten()  # one item per batch row: a fixed-size list of one
        columns[name] = column.flatten().to_pylist()
    if counts is None:
        counts = np.ones(len(inputs), np.int64)
    return counts, columns


# -- asking Feast ----------------------------------------------------------------------------


def open_features(repository: Path, model: str) -> tuple[FeatureSpec, Any]:
    """The model's FeatureSpec (a service's features resolved) and its Feast store."""
    from ..config import CONFIG_FILENAME, read_model_config, validate_model_config
    from ..errors import ConvoyError

    model_dir = repository / model
    if not model_dir.is_dir():
        raise SkewError(f"no model '{model}' in {repository}", "--model-repository")
    path = str(model_dir / CONFIG_FILENAME)
    try:
        spec = validate_model_config(read_model_config(model_dir), path, model)
        if spec.features is None:
            raise SkewError(f"{path} declares no feast_repo: model '{model}' looks up no features")
        _check_keys_captured(spec, path)
        store = open_store(spec.features, model_dir, path)
        return resolve(spec.features, store, path), store
    except ConvoyError as exc:
        raise SkewError(exc.message, "--model-repository") from None


def _check_keys_captured(spec: ModelSpec, path: str) -> None:
    """Refuse entity inputs that capture leaves out or hashes: Feast would be asked for
    hex digests, not the keys that were served."""
    assert spec.features is not None
    capture = spec.capture
    if capture is None:
        return
    entities = [name for _, name in spec.features.entities]
    for parameter, names in ((CAPTURE_EXCLUDE, capture.exclude), (CAPTURE_HASH, capture.hashed)):
        named = [n for n in entities if n in names]
        if named:
            raise SkewError(
                f"{path}: {parameter} names the entity input(s) {named}: the captured rows "
                "do not hold the keys that were served, so there is nothing to ask Feast",
                "--model-repository",
            )


def offline(store: Any, spec: FeatureSpec, served: Served) -> Offline:
    """Feast's point-in-time features for every served item, at the moment it was served."""
    import pandas as pd

    entity_df = pd.DataFrame(dict(served.keys))
    entity_df[EVENT_TIME] = pd.to_datetime(served.event_us, unit="us", utc=True)
    entity_df[ROW_ID] = np.arange(served.items)
    try:
        found = store.get_historical_features(entity_df=entity_df, features=list(spec.features))
        frame = found.to_df().set_index(ROW_ID).sort_index()
    except Exception as exc:
        raise SkewError(f"Feast's offline store failed: {type(exc).__name__}: {exc}") from None
    values = np.stack(
        [pd.to_numeric(frame[name], errors="coerce").to_numpy(np.float64) for name in spec.names],
        axis=1,
    )
    try:
        return Offline(values, _offline_stamps(store, spec, entity_df))
    except Exception as exc:  # staleness left out, not guessed; the rest still reported
        reason = f"{type(exc).__name__}: {exc}"
        log.warning("staleness not measured: the offline rows' timestamps: %s", reason)
        return Offline(values, None, reason)


def _offline_stamps(store: Any, spec: FeatureSpec, entity_df: Any) -> npt.NDArray[np.int64]:
    """The timestamp of the offline row each point-in-time value came from, per feature:
    the same as-of join over the view's rows, read through Feast's offline store (which
    may fail to list them: the caller says so)."""
    import pandas as pd

    provider = store._get_provider()  # Feast has no public call for a source's rows
    stamps = np.zeros((len(entity_df), len(spec.features)), np.int64)
    start = entity_df[EVENT_TIME].min()
    end = entity_df[EVENT_TIME].max()
    for j, ref in enumerate(spec.features):
        view = store.get_feature_view(ref.split(":", 1)[0])
        source = view.batch_source
        keys = [c.name for c in view.entity_columns]
        ttl = view.ttl if view.ttl else dt.timedelta(days=3650)
        rows = provider.offline_store.pull_all_from_table_or_query(
            config=store.config, data_source=source, join_key_columns=keys,
            feature_name_columns=[ref.split(":", 1)[1]],
            timestamp_field=source.timestamp_field,
            created_timestamp_column=source.created_timestamp_column or None,
            start_date=(start - ttl).to_pydatetime(), end_date=end.to_pydatetime(),
        ).to_df()  # fmt: skip
        rows = rows.rename(columns={source.timestamp_field: "__feature_ts"})
        rows["__feature_ts"] = _utc_ns(rows["__feature_ts"])
        rows = rows.sort_values("__feature_ts")
        left = entity_df.assign(**{EVENT_TIME: _utc_ns(entity_df[EVENT_TIME])})
        left = left.sort_values(EVENT_TIME)
        joined = pd.merge_asof(
            left, rows[[*keys, "__feature_ts"]], left_on=EVENT_TIME,
            right_on="__feature_ts", by=keys, tolerance=pd.Timedelta(ttl),
        ).set_index(ROW_ID).sort_index()  # fmt: skip
        at = joined["__feature_ts"]
        nanos = at.dt.tz_convert(None).to_numpy("datetime64[ns]").astype(np.int64)
        stamps[:, j] = np.where(at.isna().to_numpy(), 0, nanos // 1000)
    return stamps


def _utc_ns(column: Any) -> Any:
    import pandas as pd

    return pd.to_datetime(column, utc=True).astype("datetime64[ns, UTC]")
