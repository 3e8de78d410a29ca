"""The same model with Feast's Redis online store (Debian's redis-server, started here on a
free port): only feature_store.yaml differs. Redis going away fails lookups UNAVAILABLE
while the server keeps serving, and they succeed again once Redis is back."""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from loadtests.feast_repo import (
    FeatureRepo,
    RedisServer,
    build_feature_repo,
    expected,
    write_feature_model,
)

from .conftest import ServerProcess, start_server

pytestmark = pytest.mark.e2e
# Found, not imported: Feast takes seconds to import, paid by the fixtures that use it.
if importlib.util.find_spec("feast") is None:
    pytest.skip("feast missing: the `feast` extra (pulled by `test`)", allow_module_level=True)
if importlib.util.find_spec("redis") is None:
    pytest.skip("redis missing: the `feast` extra (pulled by `test`)", allow_module_level=True)
if shutil.which("redis-server") is None:
    pytest.skip(
        "redis-server missing (apt-get install redis-server; .ci/run does)", allow_module_level=True
    )


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def served(
    redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, FeatureRepo]]:
    repo = build_feature_repo(tmp_path_factory.mktemp("feast") / "repo", redis_port=redis.port)
    models = tmp_path_factory.mktemp("models")
    write_feature_model(models, "scored", repo.root)
    server = start_server(models)
    yield server, repo
    server.stop()


def users(*ids: int) -> grpcclient.InferInput:
    x = grpcclient.InferInput("USER", [len(ids), 1], "INT64")
    x.set_data_from_numpy(np.array(ids, np.int64).reshape(-1, 1))
    return x


def test_features_from_redis_then_redis_down_then_back(
    served: tuple[ServerProcess, FeatureRepo], redis: RedisServer
) -> None:
    server, repo = served
    client = grpcclient.InferenceServerClient(server.url)
    try:
        got = client.infer("scored", [users(1, 20)]).as_numpy("Y").reshape(-1)
        assert got.tolist() == pytest.approx([expected(1), expected(20)])
        with pytest.raises(InferenceServerException, match="user_id=404"):
            client.infer("scored", [users(404)])
        redis.stop()
        # Each request of a batch gets its answer (after redis-py's own retries, ~4 s).
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(client.infer, "scored", [users(u)]) for u in range(1, 5)]
        for future in futures:
            with pytest.raises(InferenceServerException) as info:
                future.result()
            assert "UNAVAILABLE" in str(info.value.status()), info.value
            assert "feature store unreachable" in info.value.message()
        assert client.is_server_live() and client.is_model_ready("scored")
        redis.start()  # empty: nothing was persisted, so materialise again
        store = repo.store()
        store.materialize(
            start_date=(repo.now - np.timedelta64(1, "D")).to_pydatetime(),
            end_date=repo.now.to_pydatetime(),
        )
        assert client.infer("scored", [users(3)]).as_numpy("Y").item() == pytest.approx(expected(3))
    finally:
        client.close()
