"""The factory that picks a runtime for a model and wraps it in the work the
config asks for around it (pre-processing, tokenization). Kept apart from the
protocol in base.py: every runtime imports base.py, and this imports every runtime.
"""

from __future__ import annotations

from pathlib import Path

from ..config import ModelSpec
from ..errors import ConfigError
from .base import Backend, BackendSignature
from .stages import device_stages


def load_backend(spec: ModelSpec, model_path: Path, device: str, threads: int) -> Backend:
    """Construct the runtime for `spec` on `device`; blocking (run it off the event loop)."""
    # TensorRT may build its engine from a model.onnx beside the missing model.plan.
    onnx_source = spec.backend == "tensorrt" and model_path.with_name("model.onnx").exists()
    if not model_path.exists() and not onnx_source:
        raise ConfigError(str(model_path), "default_model_filename", "model file not found")
    if spec.options.text is not None:
        from .text import tokenizer_path

        tokenizer_path(spec.options.text, model_path.parent)
    backend: Backend
    if spec.backend == "onnxruntime":
        from .onnxruntime import OnnxRuntimeBackend

        threads = spec.options.intra_op_thread_count or threads  # Triton's parameter name
        backend = OnnxRuntimeBackend(model_path, device, threads, spec)
    elif spec.backend == "pytorch":
        from .pytorch import TorchScriptBackend

        backend = TorchScriptBackend(model_path, device, spec)
    elif spec.backend == "convoy_python":
        from .python import PythonBackend

        backend = PythonBackend(model_path, device, spec)
    elif spec.backend == "python":
        from .triton_python import TritonPythonBackend

        backend = TritonPythonBackend(model_path, device, spec)
    elif spec.backend == "tensorrt":
        try:
            from .tensorrt import TensorRTBackend
        except ImportError as exc:
            raise ConfigError(
                str(model_path), "backend", f"TensorRT is not available here ({exc})"
            ) from None
        backend = TensorRTBackend(model_path, device, spec)
    else:
        raise ConfigError(str(model_path), "backend", f"unsupported backend '{spec.backend}'")
    # Work around the model: GPU kernels on the runtime's stream where it keeps
    # tensors on a GPU, the numpy references on the instance's thread elsewhere.
    stages = device_stages(backend)
    if spec.options.image is not None:
        from .preprocess import with_image_preprocessing

        backend = with_image_preprocessing(backend, spec, stages)
    if spec.options.text is not None:
        from .text import TokenizingBackend

        backend = TokenizingBackend(backend, spec, model_path.parent, stages)
    prepare = getattr(backend, "prepare", None)
    if callable(prepare):
        prepare()  # e.g. capture CUDA graphs, with the stages above in place
    return backend


def probe_signature(backend_name: str, model_path: Path) -> BackendSignature | None:
    """What the model file declares, for auto-completing a config; None if unknown."""
    if backend_name == "onnxruntime" and model_path.exists():
        from .onnxruntime import onnx_signature

        return onnx_signature(model_path)
    return None
