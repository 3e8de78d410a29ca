"""`convoy batch --engine ray` on a local Ray instance (one for the module): the same
output as the in-process engine, and ConvoyPredictor as Ray Data users call it."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from .conftest import ROOT, make_repository
from .linear import linear_source, write_linear_model

ray = pytest.importorskip("ray", reason="ray missing: the ray extra (the test extra has it)")
pytest.importorskip("ray.data", reason="ray[data] missing: the ray extra")
pa = pytest.importorskip("pyarrow", reason="pyarrow missing: a dependency of convoy")
pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow missing: a dependency of convoy")

ROWS = 200


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    # The actors import convoy from the checkout, whether or not it is installed.
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory, examples_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("ray-repo")
    make_repository(root, examples_dir, ("tiny",))
    write_linear_model(root, "lin", {1: linear_source(2)}, max_batch_size=8)
    return root


def batch(*argv: str) -> tuple[int, dict[str, Any], str]:
    from convoy.batch.cli import run_batch
    from convoy.cli import build_parser

    out, err = io.StringIO(), io.StringIO()
    code = run_batch(build_parser().parse_args(["batch", *argv]), out, err)
    lines = out.getvalue().strip().splitlines()
    return code, json.loads(lines[-1]) if lines else {}, err.getvalue()


def read(path: Path) -> pa.Table:
    import pyarrow.dataset as ds

    return ds.dataset(str(path), format="parquet").to_table().sort_by("key")


def test_ray_writes_what_the_in_process_engine_writes(
    local_ray: None, repository: Path, tmp_path: Path
) -> None:
    x = np.random.default_rng(3).standard_normal((ROWS, 16)).astype(np.float32)
    table = pa.table(
        {
            "key": [f"k{i:04d}" for i in range(ROWS)],
            "INPUT0": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 16),
            "tag": [i % 3 for i in range(ROWS)],
        }
    )
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=50)
    common = (
        "tiny", "--input", str(tmp_path / "in.parquet"), "--model-repository", str(repository),
        "--id-column", "key", "--keep", "tag", "--batch-size", "32",
    )  # fmt: skip
    code, _, err = batch(*common, "--output", str(tmp_path / "local"))
    assert code == 0, err
    code, on_ray, err = batch(
        *common, "--output", str(tmp_path / "ray"), "--engine", "ray", "--concurrency", "1"
    )
    assert code == 0, err
    assert (on_ray["rows"], on_ray["errors"], on_ray["engine"]) == (ROWS, 0, "ray")
    assert read(tmp_path / "ray").equals(read(tmp_path / "local"))
    manifest = json.loads((tmp_path / "ray" / "_convoy_batch.json").read_text())
    assert manifest["rows"] == ROWS and manifest["complete"]


def test_ray_needs_an_id_column_and_refuses_a_bad_mapping(repository: Path, tmp_path: Path) -> None:
    pq.write_table(pa.table({"id": ["a"], "x": ["text"]}), tmp_path / "in.parquet")
    common = ("lin", "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "o"),
              "--model-repository", str(repository), "--engine", "ray")  # fmt: skip
    code, _, err = batch(*common, "--map", "x=X")
    assert code == 2 and "--engine ray needs --id-column" in err
    code, _, err = batch(*common, "--map", "x=X", "--id-column", "id")
    assert code == 2 and "column 'x' (string) cannot feed input 'X'" in err


def test_the_predictor_as_ray_data_users_call_it(local_ray: None, repository: Path) -> None:
    from convoy.batch import ConvoyPredictor

    rows = ray.data.from_items([{"doc": i, "value": float(i)} for i in range(40)])
    scored = rows.map_batches(
        ConvoyPredictor,
        fn_constructor_kwargs={
            "model": "lin",
            "id_column": "doc",
            "model_repository": str(repository),
            "mapping": {"X": "value"},
        },
        batch_size=16,
        concurrency=1,
    )
    answers = {r["doc"]: list(r["Y"]) for r in scored.take_all()}
    assert answers == {i: [2.0 * i] for i in range(40)}


def test_importing_convoy_batch_does_not_import_ray() -> None:
    import subprocess
    import sys

    code = "import sys, convoy.batch, convoy.cli; print('ray' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "False"
