"""One model's Feast repository: opened and checked at load, and the online lookup of
one batch's rows (blocking: called on an instance's thread, never on the event loop).

Feast is imported here, inside functions, and only for a model that declares
feast_repo: `convoy serve` without one never imports it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..config import FEAST_ENTITIES, FEAST_FEATURES, FEAST_REPO, FEAST_SERVICE, FeatureSpec
from ..errors import ConfigError, ConvoyError, InternalError, InvalidInput, Unavailable

# Feast's value types a feature may have to fill a numeric input.
NUMERIC_TYPES = frozenset({"INT32", "INT64", "FLOAT", "DOUBLE", "BOOL"})
# Feast's key types and the request datatype that carries them.
KEY_DATATYPES = {"INT64": "INT64", "INT32": "INT64", "STRING": "BYTES"}
# The range of an integer key of each Feast type: a key out of it fails its request
# INVALID_ARGUMENT (Feast would raise for the whole batch).
KEY_RANGES = {"INT32": (-(2**31), 2**31 - 1), "INT64": (-(2**63), 2**63 - 1)}
# A store that cannot be reached raises one of these (redis-py, sockets): the batch fails
# UNAVAILABLE and the next one tries again. Matched by name: no import of redis where the
# store is SQLite.
_UNREACHABLE = frozenset({"ConnectionError", "TimeoutError", "OSError"})
# sqlite3.OperationalError is also "no such table" (a permanent fault, INTERNAL): only
# these messages say the file is busy or cannot be opened right now.
_SQLITE_TRANSIENT = ("locked", "busy", "unable to open", "disk i/o")
_PRESENT = 1  # feast.protos FieldStatus.PRESENT
_OUTSIDE_MAX_AGE = 4  # ... FieldStatus.OUTSIDE_MAX_AGE: older than the view's ttl

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LookedUp:
    """A batch's features, one row per entity row, columns in the declared order."""

    values: npt.NDArray[np.float64]  # [rows, features]; NaN where missing
    timestamps_us: npt.NDArray[np.int64]  # feature timestamps, UTC µs; 0 where missing
    present: npt.NDArray[np.bool_]
    stale: npt.NDArray[np.bool_]  # not present because older than the view's ttl


def repo_dir(spec: FeatureSpec, model_dir: Path) -> Path:
    return model_dir / spec.repo


# Set by Feast's import (feast.metrics, for its own feature server) to a temporary
# directory of its own. Every process started after it (a front end, or a server that a
# test starts) then ran prometheus_client in its multiprocess mode, in that directory.
FEAST_SETS = ("PROMETHEUS_MULTIPROC_DIR", "PROMETHEUS_MULTIPROCESS_DIR")
# One import at a time: a second load's snapshot taken while the first's import has the
# variables set would put Feast's values back for good.
_IMPORTING = threading.Lock()


def import_feast() -> Any:
    """The feast package, imported with those variables left as they were (ImportError
    where it is not installed)."""
    # prometheus_client picks its mode when first imported: before Feast, so that the
    # variables seen then are ours, not Feast's.
    import prometheus_client.values  # noqa: F401

    with _IMPORTING:
        before = {name: os.environ.get(name) for name in FEAST_SETS}
        try:
            import feast

            with contextlib.suppress(ModuleNotFoundError):  # now, not on a later first use
                import feast.metrics
        finally:
            for name, value in before.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    return feast


def open_store(spec: FeatureSpec, model_dir: Path, config_path: str) -> Any:
    """The Feast FeatureStore of `spec`; ConfigError naming feast_repo where it is missing
    or cannot be read."""
    root = repo_dir(spec, model_dir)
    field = f"parameters.{FEAST_REPO}"
    if not (root / "feature_store.yaml").is_file():
        raise ConfigError(config_path, field, f"no feature_store.yaml in '{root}'")
    try:
        feast = import_feast()
    except ImportError as exc:
        raise ConfigError(
            config_path, field, f"Feast is not installed (pip install 'convoy[feast]'): {exc}"
        ) from None
    try:
        store = feast.FeatureStore(repo_path=str(root))
        store.list_feature_views()  # reads the registry: a broken one fails the load here
    except Exception as exc:
        raise ConfigError(
            config_path, field, f"the Feast repository '{root}' is broken: {exc}"
        ) from None
    return store


def resolve(spec: FeatureSpec, store: Any, config_path: str) -> FeatureSpec:
    """`spec` with a feature service's features filled in, each feature and entity checked
    against the repository: ConfigError naming the parameter at fault."""
    if spec.service is not None:
        try:
            service = store.get_feature_service(spec.service)
        except Exception as exc:
            raise ConfigError(config_path, f"parameters.{FEAST_SERVICE}", str(exc)) from None
        refs = tuple(
            f"{projection.name_to_use()}:{feature.name}"
            for projection in service.feature_view_projections
            for feature in projection.features
        )
        spec = spec.with_features(refs, config_path)
    declared = dict(spec.entities)
    key_inputs = {t.name: t for t in spec.caller_inputs}
    for ref in spec.features:
        view_name, feature_name = ref.split(":", 1)
        field = f"parameters.{FEAST_FEATURES}"
        try:
            view = store.get_feature_view(view_name)
        except Exception:
            raise ConfigError(
                config_path, field, f"'{ref}': no feature view '{view_name}'"
            ) from None
        types = {f.name: f.dtype.to_value_type().name for f in view.features}
        if feature_name not in types:
            raise ConfigError(
                config_path, field, f"'{ref}': view '{view_name}' has no feature '{feature_name}'"
            )
        if types[feature_name] not in NUMERIC_TYPES:
            raise ConfigError(
                config_path, field, f"'{ref}' is {types[feature_name]}; a model input needs numbers"
            )
        for column in view.entity_columns:
            key = column.name
            if key not in declared:
                raise ConfigError(
                    config_path,
                    f"parameters.{FEAST_ENTITIES}",
                    f"view '{view_name}' needs entity key '{key}': add '{key}:INPUT'",
                )
            wanted = KEY_DATATYPES.get(column.dtype.to_value_type().name)
            have = key_inputs[declared[key]].datatype
            if wanted is not None and wanted != have:
                raise ConfigError(
                    config_path,
                    f"parameters.{FEAST_ENTITIES}",
                    f"entity key '{key}' is {column.dtype} in Feast: input '{declared[key]}' "
                    f"must be {'TYPE_STRING' if wanted == 'BYTES' else 'TYPE_INT64'}, not {have}",
                )
    return spec


def key_types(store: Any, spec: FeatureSpec) -> dict[str, str]:
    """Each entity join key's Feast value type (INT32, INT64, STRING...), from the views
    of `spec`'s features."""
    found: dict[str, str] = {}
    for view_name in dict.fromkeys(ref.split(":", 1)[0] for ref in spec.features):
        for column in store.get_feature_view(view_name).entity_columns:
            found[column.name] = column.dtype.to_value_type().name
    return found


def check_keys(keys: Mapping[str, Sequence[Any]], types: Mapping[str, str]) -> None:
    """InvalidInput naming the first integer key outside its Feast type's range."""
    for key, values in keys.items():
        bounds = KEY_RANGES.get(types.get(key, ""))
        if bounds is None:
            continue
        low, high = bounds
        for value in values:
            if not low <= value <= high:
                raise InvalidInput(
                    f"entity key {key}={value} is out of range: Feast's '{key}' is "
                    f"{types[key]} ({low} to {high})"
                )


def close_store(store: Any) -> None:
    """Release the online store's client (SQLite connection, redis-py pool): Feast's own
    close() is async and releases only its async clients. Reads Feast's private
    attributes, so a failure is logged, never raised: closing must not fail an unload."""
    try:
        provider = getattr(store, "_provider", None)  # None: never used
        online = getattr(provider, "_online_store", None)
        for attribute in ("_conn", "_client"):  # SqliteOnlineStore, RedisOnlineStore
            client = getattr(online, attribute, None)
            if client is not None:
                setattr(online, attribute, None)
                client.close()
    except Exception:
        log.warning("closing the Feast online store's client failed", exc_info=True)


def lookup(store: Any, spec: FeatureSpec, keys: dict[str, list[Any]]) -> LookedUp:
    """The online features of every row (`keys`: join key -> one value per row), in one
    call to the store. Unavailable where the store cannot be reached."""
    rows = len(next(iter(keys.values())))
    try:
        response = store.get_online_features(features=list(spec.features), entity_rows=keys)
    except Exception as exc:
        raise _failure(exc) from exc
    proto = response.proto
    column = {name: i for i, name in enumerate(proto.metadata.feature_names.val)}
    values = np.full((rows, len(spec.features)), np.nan)
    stamps = np.zeros((rows, len(spec.features)), np.int64)
    present = np.zeros((rows, len(spec.features)), np.bool_)
    stale = np.zeros((rows, len(spec.features)), np.bool_)
    for j, name in enumerate(spec.names):
        result = proto.results[column[name]]
        for i, (value, status, stamp) in enumerate(
            zip(result.values, result.statuses, result.event_timestamps, strict=True)
        ):
            kind = value.WhichOneof("val")
            if status != _PRESENT or kind is None or kind == "null_val":
                stale[i, j] = status == _OUTSIDE_MAX_AGE
                continue
            values[i, j] = float(getattr(value, kind))
            stamps[i, j] = stamp.seconds * 1_000_000 + stamp.nanos // 1000
            present[i, j] = True
    return LookedUp(values, stamps, present, stale)


def _failure(exc: Exception) -> ConvoyError:
    names = {kind.__name__ for kind in type(exc).__mro__}
    transient = names & _UNREACHABLE or (
        "OperationalError" in names and any(w in str(exc).lower() for w in _SQLITE_TRANSIENT)
    )
    if transient:
        return Unavailable(f"feature store unreachable: {type(exc).__name__}: {exc}")
    return InternalError(f"feature lookup failed: {type(exc).__name__}: {exc}")


def entity_values(array: npt.NDArray[Any], datatype: str) -> Sequence[Any]:
    """One request input's keys as Feast takes them: ints, or BYTES decoded as UTF-8."""
    flat = array.reshape(-1)
    if datatype != "BYTES":
        return [int(v) for v in flat]
    try:
        return [v.decode() if isinstance(v, bytes) else str(v) for v in flat]
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"an entity key is not UTF-8 text: {exc}") from None
