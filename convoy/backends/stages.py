"""Work around the model that a GPU backend runs on its device, on its stream.

Models opt into pre- and post-processing through config.pbtxt (see
preprocess.py and text.py). Where the runtime keeps tensors on a GPU (PyTorch,
TensorRT), that work is registered here and runs as GPU kernels between the
upload and the model, or between the model and the download: raw uint8 images
cross the bus at a quarter of the float size, and a pooled embedding instead of
every token's hidden state comes back. Elsewhere the numpy references run on
the instance's thread instead.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

Tensor = Any  # torch.Tensor; torch is not type-checked here
Kernel = Callable[..., Any]

InputStage = Callable[[Tensor], Tensor]
OutputStage = Callable[[Tensor, Mapping[str, Tensor]], Tensor]  # (output, the batch's inputs)


@dataclass
class DeviceStages:
    device: str = "cpu"  # where the owning backend keeps its tensors
    inputs: dict[str, InputStage] = field(default_factory=dict)
    outputs: dict[str, OutputStage] = field(default_factory=dict)

    def apply_inputs(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {n: self.inputs[n](t) if n in self.inputs else t for n, t in tensors.items()}

    def apply_outputs(
        self, outputs: Mapping[str, Tensor], inputs: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        return {
            n: self.outputs[n](t, inputs) if n in self.outputs else t for n, t in outputs.items()
        }


def device_stages(backend: object) -> DeviceStages | None:
    """The stages of a backend that keeps its tensors on a GPU; None for any other."""
    stages = getattr(backend, "stages", None)
    on_gpu = isinstance(stages, DeviceStages) and stages.device.startswith("cuda")
    return stages if on_gpu else None


def working_kernel(
    name: str,
    device: str,
    load: Callable[[], Kernel],
    fallback: Kernel,
    probe: Callable[[Kernel], object],
) -> Kernel:
    """The OpenAI Triton kernel where it imports, compiles and runs on `device`, else
    the same in torch ops. Tried once, at model load: on a machine where Triton
    cannot build (no C compiler for its launcher, a GPU it does not support) the
    model then serves from torch ops instead of failing every batch."""
    import torch

    gpu = device.startswith("cuda")
    try:
        kernel = load()
        # On the instance's device: Triton launches on the current one.
        with torch.cuda.device(torch.device(device)) if gpu else contextlib.nullcontext():
            probe(kernel)
            if gpu:
                torch.cuda.synchronize()  # a launch failure surfaces here
    except Exception as exc:  # ImportError, compile errors, launch failures alike
        log.warning("%s: the Triton kernel is unusable here (%s); using torch ops", name, exc)
        return fallback
    return kernel
