"""Image pre-processing in front of a vision model, opted into by config.pbtxt:

    input [ { name: "INPUT" data_type: TYPE_UINT8 dims: [ 224, 224, 3 ] } ]
    parameters { key: "preprocess" value { string_value: "image_hwc_uint8" } }
    parameters { key: "preprocess_mean" value { string_value: "0.485,0.456,0.406" } }
    parameters { key: "preprocess_std" value { string_value: "0.229,0.224,0.225" } }

Clients send raw pixels, uint8 [batch, H, W, C]; the runtime receives the same
input name as float32 [batch, C, H, W] of (x / 255 - mean) / std. The conversion
is kernels/image.py (its numpy reference on the CPU) and runs on the instance's
thread, never on the event loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kernels.image import IMAGENET_MEAN, IMAGENET_STD, hwc_uint8_to_nchw_reference

from ..config import ModelSpec
from ..errors import ConfigError
from .base import Array, Backend

PREPROCESSORS = ("image_hwc_uint8",)


def _floats(spec: ModelSpec, key: str, default: tuple[float, ...]) -> tuple[float, ...]:
    text = spec.parameters.get(key)
    if text is None:
        return default
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(
            spec.name, f"parameters.{key}", f"'{text}' is not a list of numbers"
        ) from None
    if len(values) != len(default) or (key.endswith("std") and min(values) <= 0):
        raise ConfigError(spec.name, f"parameters.{key}", f"needs {len(default)} values (std > 0)")
    return values


class ImagePreprocessingBackend:
    def __init__(self, inner: Backend, spec: ModelSpec) -> None:
        kind = spec.parameters["preprocess"]
        if kind not in PREPROCESSORS:
            raise ConfigError(
                spec.name, "parameters.preprocess", f"'{kind}' is not one of {PREPROCESSORS}"
            )
        images = [t for t in spec.inputs if t.datatype == "UINT8" and len(t.dims) == 3]
        if len(images) != 1 or images[0].dims[-1] != 3:
            raise ConfigError(
                spec.name,
                "input",
                "image_hwc_uint8 needs exactly one UINT8 input with dims [H, W, 3]",
            )
        self._inner = inner
        self.device = inner.device
        self._name = images[0].name
        self._mean = _floats(spec, "preprocess_mean", IMAGENET_MEAN)
        self._std = _floats(spec, "preprocess_std", IMAGENET_STD)

    def run(self, inputs: Mapping[str, Array], output_names: Sequence[str]) -> dict[str, Array]:
        feed = dict(inputs)
        feed[self._name] = hwc_uint8_to_nchw_reference(
            feed[self._name],  # type: ignore[arg-type]
            self._mean,
            self._std,
        )
        return self._inner.run(feed, output_names)

    def close(self) -> None:
        self._inner.close()
