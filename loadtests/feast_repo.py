"""A real Feast repository for the feature tests and loadtests/feature_lookup.py: Parquet
offline sources, an Entity, two FeatureViews and a FeatureService, applied with
FeatureStore.apply and materialised into the SQLite online store (or Redis), plus a
convoy_python model that reads the features.

users 1..USERS: user_stats (age FLOAT32, score FLOAT64) and user_activity (clicks INT64),
two rows each, two hours and one hour before `now`. The model answers
Y = age + 10 * score + 100 * clicks, so an answer shows which values were served.
"""

from __future__ import annotations

import datetime as dt
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from convoy.features.lookup import import_feast

USERS = 20
WEIGHTS = (1.0, 10.0, 100.0)  # age, score, clicks
FEATURES = "user_stats:age,user_stats:score,user_activity:clicks"

MODEL_SOURCE = """
import numpy as np

class Model:
    def __init__(self, config):
        self.weights = np.array([1.0, 10.0, 100.0], np.float32)

    def __call__(self, inputs):
        f = inputs["F"]
        return {"Y": (f * self.weights).sum(axis=-1, keepdims=True).astype(np.float32)}
"""


def age(user: int, hours_ago: int) -> float:
    return float(user + (2 - hours_ago) * 0.5)


def score(user: int, hours_ago: int) -> float:
    return float(user * 0.25 + hours_ago)


def clicks(user: int, hours_ago: int) -> int:
    return user * 3 + (2 - hours_ago)


def expected(user: int) -> float:
    """The model's answer with the latest features (one hour old) of `user`."""
    return age(user, 1) + 10 * score(user, 1) + 100 * clicks(user, 1)


@dataclass
class FeatureRepo:
    root: Path  # the Feast repository (feature_store.yaml, registry.db, Parquet)
    now: Any  # pandas Timestamp (UTC): the features' reference time

    def store(self) -> Any:
        return import_feast().FeatureStore(repo_path=str(self.root))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def online_store_yaml(redis_port: int | None) -> str:
    if redis_port is None:
        return "online_store:\n  type: sqlite\n  path: online.db\n"
    return f'online_store:\n  type: redis\n  connection_string: "127.0.0.1:{redis_port}"\n'


def build_feature_repo(
    root: Path, redis_port: int | None = None, project: str = "convoy"
) -> FeatureRepo:
    """Apply and materialise the repository; blocking, about a second."""
    import pandas as pd

    import_feast()  # first, so that the environment is left as it was
    from feast import (
        Entity,
        FeatureService,
        FeatureStore,
        FeatureView,
        Field,
        FileSource,
        ValueType,
    )
    from feast.types import Float32, Float64, Int64

    root.mkdir(parents=True, exist_ok=True)
    (root / "feature_store.yaml").write_text(
        f"project: {project}\nregistry: registry.db\nprovider: local\n"
        + online_store_yaml(redis_port)
        + "offline_store:\n  type: file\nentity_key_serialization_version: 3\n"
    )
    now = pd.Timestamp.now(tz="UTC").floor("s")
    users = range(1, USERS + 1)
    times = [now - pd.Timedelta(hours=h) for h in (2, 1)]
    stats = pd.DataFrame(
        {
            "user_id": [u for u in users for _ in (2, 1)],
            "event_timestamp": [t for _ in users for t in times],
            "age": np.array([age(u, h) for u in users for h in (2, 1)], np.float32),
            "score": [score(u, h) for u in users for h in (2, 1)],
        }
    )
    activity = pd.DataFrame(
        {
            "user_id": [u for u in users for _ in (2, 1)],
            "event_timestamp": [t for _ in users for t in times],
            "clicks": [clicks(u, h) for u in users for h in (2, 1)],
        }
    )
    stats.to_parquet(root / "user_stats.parquet")
    activity.to_parquet(root / "user_activity.parquet")
    user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64)
    views = [
        FeatureView(
            name="user_stats",
            entities=[user],
            ttl=dt.timedelta(days=1),
            schema=[Field(name="user_id", dtype=Int64), Field(name="age", dtype=Float32),
                    Field(name="score", dtype=Float64)],
            source=FileSource(
                path=str(root / "user_stats.parquet"), timestamp_field="event_timestamp"
            ),
        ),
        FeatureView(
            name="user_activity",
            entities=[user],
            ttl=dt.timedelta(days=1),
            schema=[Field(name="user_id", dtype=Int64), Field(name="clicks", dtype=Int64)],
            source=FileSource(
                path=str(root / "user_activity.parquet"), timestamp_field="event_timestamp"
            ),
        ),
    ]  # fmt: skip
    service = FeatureService(name="scoring", features=[views[0][["age", "score"]], views[1]])
    store = FeatureStore(repo_path=str(root))
    store.apply([user, *views, service])
    store.materialize(
        start_date=(now - pd.Timedelta(days=1)).to_pydatetime(), end_date=now.to_pydatetime()
    )
    return FeatureRepo(root, now)


def write_feature_model(
    models: Path,
    name: str,
    repo: Path,
    *,
    parameters: dict[str, str] | None = None,
    max_batch_size: int = 8,
    queue_delay_us: int = 20_000,
    extra: str = "",
) -> Path:
    """<models>/<name>: the model above, its features from `repo` (linked in as `features`)."""
    model = models / name
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.py").write_text(MODEL_SOURCE)
    (model / "features").symlink_to(repo, target_is_directory=True)
    params = {
        "feast_repo": "features",
        "feast_features": FEATURES,
        "feast_entities": "user_id:USER",
        "feast_output": "F",
        **(parameters or {}),
    }
    text = ", ".join(
        f'{{ key: "{k}" value {{ string_value: "{v}" }} }}' for k, v in params.items() if v
    )
    batching = f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}\n"
    (model / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "convoy_python"\nmax_batch_size: {max_batch_size}\n'
        'input [ { name: "F" data_type: TYPE_FP32 dims: [ 3 ] } ]\n'
        'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        f"parameters [ {text} ]\n" + (batching if max_batch_size else "") + extra
    )
    return model


class RedisServer:
    """Debian's redis-server on a free port, nothing persisted; stop() and start() again
    on the same port to take the store away and give it back."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)
            self._proc = None
