"""Image pre-processing in front of a vision model, opted into by config.pbtxt:

    input [ { name: "INPUT" data_type: TYPE_UINT8 dims: [ 224, 224, 3 ] } ]
    parameters { key: "preprocess" value { string_value: "image_hwc_uint8" } }
    parameters { key: "preprocess_mean" value { string_value: "0.485,0.456,0.406" } }
    parameters { key: "preprocess_std" value { string_value: "0.229,0.224,0.225" } }

Clients send raw pixels, uint8 [batch, H, W, C]; the runtime receives the same
input name as float32 [batch, C, H, W] of (x / 255 - mean) / std. On a GPU
instance of a runtime that keeps tensors on the device (PyTorch, TensorRT) the
uint8 pixels are uploaded and converted there by the fused kernel
(convoy/kernels/triton_kernels.py); elsewhere the numpy reference (convoy/kernels/image.py)
runs on the instance's thread. Never on the event loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from convoy.kernels.image import hwc_uint8_to_nchw_reference

from ..config import ImageOptions, ModelSpec
from .base import Array, Backend
from .stages import DeviceStages, working_kernel


def with_image_preprocessing(
    inner: Backend, spec: ModelSpec, stages: DeviceStages | None
) -> Backend:
    """`inner` with the conversion registered on its device stages, or wrapped."""
    settings = spec.options.image
    assert settings is not None  # load_backend asks only where the config opts in
    if stages is None:
        return ImagePreprocessingBackend(inner, settings)
    kernel = _device_kernel(stages.device)
    stages.inputs[settings.input] = lambda images: kernel(images, settings.mean, settings.std)
    return inner


def _device_kernel(device: str) -> Any:
    import torch

    from convoy.kernels.image import hwc_uint8_to_nchw_torch

    def load() -> Any:
        from convoy.kernels.triton_kernels import hwc_uint8_to_nchw_triton

        return hwc_uint8_to_nchw_triton

    def probe(kernel: Any) -> None:
        kernel(torch.zeros((1, 2, 2, 3), dtype=torch.uint8, device=device))

    return working_kernel("image_hwc_uint8", device, load, hwc_uint8_to_nchw_torch, probe)


class ImagePreprocessingBackend:
    def __init__(self, inner: Backend, settings: ImageOptions) -> None:
        self._inner = inner
        self.device = inner.device
        self._settings = settings

    def run(self, inputs: Mapping[str, Array], output_names: Sequence[str]) -> dict[str, Array]:
        feed = dict(inputs)
        name = self._settings.input
        feed[name] = hwc_uint8_to_nchw_reference(
            feed[name],  # type: ignore[arg-type]
            self._settings.mean,
            self._settings.std,
        )
        return self._inner.run(feed, output_names)

    def close(self) -> None:
        self._inner.close()
