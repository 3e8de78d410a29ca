"""TorchScript backend. Inputs bind to forward() in config order; outputs likewise."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from ..config import ModelSpec
from ..errors import InternalError
from .base import Array

# Request tensors are read-only views of the request bytes (zero copy); the
# model never writes to its inputs, so torch's warning about it is noise.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


class TorchScriptBackend:
    def __init__(self, model_path: Path, device: str, spec: ModelSpec) -> None:
        use_cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.device = device if use_cuda else "cpu"
        self._torch_device = torch.device(self.device)
        # TorchScript archives hold code and tensors, not pickles of arbitrary objects.
        module = torch.jit.load(str(model_path), map_location=self._torch_device)
        self._module = module.eval()
        self._input_names = tuple(t.name for t in spec.inputs)
        self._output_names = tuple(t.name for t in spec.outputs)

    def run(self, inputs: Mapping[str, Array], output_names: Sequence[str]) -> dict[str, Array]:
        args = [
            torch.from_numpy(np.ascontiguousarray(inputs[name])).to(self._torch_device)
            for name in self._input_names
        ]
        with torch.inference_mode():
            result = self._module(*args)
        tensors = [result] if isinstance(result, torch.Tensor) else list(result)
        if len(tensors) != len(self._output_names):
            raise InternalError(
                f"model returned {len(tensors)} outputs, config declares {len(self._output_names)}"
            )
        by_name = dict(zip(self._output_names, tensors, strict=True))
        return {name: by_name[name].detach().cpu().numpy() for name in output_names}

    def close(self) -> None:
        del self._module
