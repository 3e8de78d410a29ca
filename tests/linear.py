"""Small convoy_python test models over one FP32 [1] input `X` and output `Y`: a version
computes y = factor * x, so an answer's factor says which version computed it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

SOURCE = """
class Model:
    def __init__(self, config):
        pass

    def __call__(self, inputs):
        return {{"Y": inputs["X"] * {factor}}}
"""


def linear_source(factor: float) -> str:
    return SOURCE.format(factor=factor)


def write_linear_model(
    root: Path,
    name: str,
    versions: Mapping[int, str],
    *,
    max_batch_size: int = 4,
    parameters: Mapping[str, str] | None = None,
    version_policy: str = "specific { versions: [ 1 ] }",
    extra: str = "",
) -> Path:
    """<root>/<name>/<version>/model.py for each (version, source) and its config.pbtxt;
    `parameters` as config.pbtxt string parameters, `extra` appended to the config."""
    for version, source in versions.items():
        (root / name / str(version)).mkdir(parents=True)
        (root / name / str(version) / "model.py").write_text(source)
    params = ", ".join(
        f'{{ key: "{k}" value {{ string_value: "{v}" }} }}' for k, v in (parameters or {}).items()
    )
    (root / name / "config.pbtxt").write_text(
        f'name: "{name}"\n'
        'backend: "convoy_python"\n'
        f"max_batch_size: {max_batch_size}\n"
        'input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        f"version_policy: {{ {version_policy} }}\n"
        + (f"parameters [ {params} ]\n" if params else "")
        + extra
    )
    return root


def infer_x(client: Any, model: str, value: float, request_id: str) -> Any:
    """One row, X = value, to a linear model through tritonclient's gRPC client."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    x = grpcclient.InferInput("X", [1, 1], "FP32")
    x.set_data_from_numpy(np.full((1, 1), value, np.float32))
    return client.infer(model, [x], request_id=request_id)
