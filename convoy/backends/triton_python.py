"""Triton's python backend API: `backend: "python"` models run unchanged.

    <model>/config.pbtxt:  backend: "python"
    <model>/<version>/model.py:
        import triton_python_backend_utils as pb_utils
        class TritonPythonModel:
            def initialize(self, args): ...       # optional; args as Triton passes them
            def execute(self, requests): ...      # one InferenceResponse per request
            def finalize(self): ...               # optional, at unload

Triton runs each instance in its own stub process; Convoy runs it on the
instance's thread, in the server's process (so no shared-memory copies, but
also no isolation: serve only repositories you trust, as with convoy_python).

execute() sees one InferenceRequest per client request. The pool normally
hands a backend one gathered batch; a backend that can answer per request
offers `run_requests` (RunsRequests), which keeps each request's rows apart
and lets a response carrying an error fail only its own request.

Not supported, refused by name: decoupled models (ConfigError at load,
DecoupledNotSupported from get_response_sender) and BLS (BLSNotSupported from
InferenceRequest.exec).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ..config import CONFIG_FILENAME, ModelSpec, read_model_config
from ..errors import (
    Cancelled,
    ConfigError,
    ConvoyError,
    InternalError,
    InvalidInput,
    ModelNotFound,
    Unavailable,
    Unimplemented,
)
from ..pb import model_config_pb2 as mc
from ..tritonjson import message_to_json
from . import triton_python_backend_utils as pb_utils
from .base import Array, RequestInputs
from .model_imports import ModelNamespace

UTILS_MODULE = "triton_python_backend_utils"


# TritonError codes -> the Convoy error (and so the gRPC/HTTP status) Triton would answer.
_ERROR_CODES: dict[int, type[ConvoyError]] = {
    pb_utils.TritonError.INVALID_ARG: InvalidInput,
    pb_utils.TritonError.NOT_FOUND: ModelNotFound,
    pb_utils.TritonError.UNAVAILABLE: Unavailable,
    pb_utils.TritonError.UNSUPPORTED: Unimplemented,
    pb_utils.TritonError.CANCELLED: Cancelled,
}


def install_utils_module() -> None:
    """Make `import triton_python_backend_utils` resolve to our module.

    Triton's stub puts its own copy on the model's path; Convoy has one module
    for every model, registered once in sys.modules (the import system looks
    there first), so no directory needs adding to sys.path for it."""
    if sys.modules.get(UTILS_MODULE) is not pb_utils:
        sys.modules[UTILS_MODULE] = pb_utils


class TritonPythonBackend:
    """One TritonPythonModel instance, owned by one model instance's thread."""

    def __init__(
        self,
        model_path: Path,
        device: str,
        spec: ModelSpec,
        config: mc.ModelConfig | None = None,
        instance_name: str | None = None,
    ) -> None:
        self.device = device
        self._name = spec.name
        version_dir = model_path.parent
        model_dir = version_dir.parent
        config_path = str(model_dir / CONFIG_FILENAME)
        if config is None:
            # The served config where the caller has it (instance groups resolved);
            # else the file, which for a python model declares its tensors itself.
            config = read_model_config(model_dir)
            if not config.backend:
                config.backend = spec.backend
        if config.model_transaction_policy.decoupled:
            raise ConfigError(
                config_path,
                "model_transaction_policy.decoupled",
                "decoupled python models are not supported by Convoy "
                "(DecoupledNotSupported): return one InferenceResponse per request from execute",
            )
        gpu = device.startswith("cuda")
        kind, device_id = ("GPU", device.split(":", 1)[1]) if gpu else ("CPU", "0")
        self._args = {
            "model_config": message_to_json(config),
            "model_instance_kind": kind,
            "model_instance_name": instance_name or _instance_name(spec),
            "model_instance_device_id": device_id,
            "model_repository": str(model_dir),
            "model_version": version_dir.name,
            "model_name": spec.name,
        }
        install_utils_module()
        # Its own modules, as Triton's own process per model gives it (model_imports.py).
        self._modules = ModelNamespace(version_dir, process_wide=(UTILS_MODULE,))
        try:
            with self._modules.loading():
                self._model: Any = self._construct(model_path)
        except BaseException:
            self._modules.close()
            raise

    def _construct(self, model_path: Path) -> Any:
        module = _import_model(self._modules, model_path)
        model_class = getattr(module, "TritonPythonModel", None)
        if not isinstance(model_class, type):
            raise ConfigError(str(model_path), "model.py", "defines no class TritonPythonModel")
        execute = getattr(model_class, "execute", None)
        if not callable(execute):
            raise ConfigError(str(model_path), "TritonPythonModel", "has no execute(requests)")
        try:
            model = model_class()
            initialize = getattr(model, "initialize", None)
            if callable(initialize):
                initialize(dict(self._args))
        except Exception as exc:
            raise ConfigError(
                str(model_path), "TritonPythonModel.initialize", f"failed: {exc!r}"
            ) from exc
        return model

    def run_requests(
        self, requests: Sequence[RequestInputs]
    ) -> list[dict[str, Array] | ConvoyError]:
        wrapped = [
            pb_utils.InferenceRequest(
                model_name=self._name,
                inputs=[pb_utils.Tensor(name, array) for name, array in r.inputs.items()],
                requested_output_names=list(r.output_names),
                request_id=r.id,
            )
            for r in requests
        ]
        try:
            responses = self._model.execute(wrapped)
        except pb_utils.TritonModelException as exc:
            raise InternalError(f"model '{self._name}': execute failed: {exc.message()}") from exc
        except Exception as exc:
            raise InternalError(f"model '{self._name}': execute raised {exc!r}") from exc
        if not isinstance(responses, list | tuple) or len(responses) != len(requests):
            count = len(responses) if isinstance(responses, list | tuple) else type(responses)
            raise InternalError(
                f"model '{self._name}': execute returned {count} responses for "
                f"{len(requests)} requests; it must return one InferenceResponse per request"
            )
        return [
            self._answer(index, request, response)
            for index, (request, response) in enumerate(zip(requests, responses, strict=True))
        ]

    def _answer(
        self, index: int, request: RequestInputs, response: object
    ) -> dict[str, Array] | ConvoyError:
        if not isinstance(response, pb_utils.InferenceResponse):
            return InternalError(
                f"model '{self._name}': execute returned {type(response).__name__} for "
                f"request {index}; expected pb_utils.InferenceResponse"
            )
        error = response.error()
        if error is not None:
            message = error.message() if isinstance(error, pb_utils.TritonError) else str(error)
            code = (
                error.code()
                if isinstance(error, pb_utils.TritonError)
                else pb_utils.TritonError.INTERNAL
            )
            return _ERROR_CODES.get(code, InternalError)(message)
        tensors = {t.name(): t for t in response.output_tensors()}
        missing = [name for name in request.output_names if name not in tensors]
        if missing:
            return InternalError(
                f"model '{self._name}': the response to request {index} has no output "
                f"{missing}; it holds {sorted(tensors)}"
            )
        return {name: np.asarray(tensors[name].as_numpy()) for name in request.output_names}

    def run(self, inputs: Mapping[str, Array], output_names: Sequence[str]) -> dict[str, Array]:
        """A gathered batch as one request (warm-up, and pools that batch by gathering)."""
        (answer,) = self.run_requests([RequestInputs("", inputs, tuple(output_names))])
        if isinstance(answer, ConvoyError):
            raise answer
        return answer

    def close(self) -> None:
        try:
            finalize = getattr(self._model, "finalize", None)
            if callable(finalize):
                finalize()
        finally:
            self._modules.close()


def _instance_name(spec: ModelSpec) -> str:
    """Triton's "<group name>_<index>" (a group unnamed in the config is "<model>_<n>");
    without the index the pool gives each instance, the first of the first group."""
    groups = spec.instance_groups
    group = groups[0].name if groups and groups[0].name else f"{spec.name}_0"
    return f"{group}_0"


def _import_model(modules: ModelNamespace, model_path: Path) -> ModuleType:
    try:
        return modules.load_model(model_path)
    except Exception as exc:  # SyntaxError, ImportError, anything the module body raises
        raise ConfigError(str(model_path), "model.py", f"import failed: {exc!r}") from exc
