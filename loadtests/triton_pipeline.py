"""A Triton repository as people write it from Triton's documentation: a python-backend
pre-processing model feeding the example CNN (ONNX) through an ensemble. Used by the
end-to-end test and the protocol benchmark."""

from __future__ import annotations

from pathlib import Path

# Written the way Triton's python backend documentation writes a model.py.
PREPROCESS = """
import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        output = pb_utils.get_output_config_by_name(config, "PIXELS")
        self.dtype = pb_utils.triton_string_to_numpy(output["data_type"])

    def execute(self, requests):
        responses = []
        for request in requests:
            image = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy()
            pixels = (image.astype(np.float32) / 255.0).transpose(0, 3, 1, 2)
            out = pb_utils.Tensor("PIXELS", pixels.astype(self.dtype))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses

    def finalize(self):
        pass
"""

PREPROCESS_CONFIG = """
name: "preprocess"
backend: "python"
max_batch_size: 8
input [ { name: "IMAGE" data_type: TYPE_UINT8 dims: [ 64, 64, 3 ] } ]
output [ { name: "PIXELS" data_type: TYPE_FP32 dims: [ 3, 64, 64 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""

ENSEMBLE_CONFIG = """
name: "classify"
platform: "ensemble"
max_batch_size: 8
input [ { name: "IMAGE" data_type: TYPE_UINT8 dims: [ 64, 64, 3 ] } ]
output [ { name: "LOGITS" data_type: TYPE_FP32 dims: [ 1000 ] } ]
ensemble_scheduling {
  step [
    {
      model_name: "preprocess"
      model_version: -1
      input_map { key: "IMAGE" value: "IMAGE" }
      output_map { key: "PIXELS" value: "preprocessed" }
    },
    {
      model_name: "image_classifier"
      model_version: -1
      input_map { key: "INPUT" value: "preprocessed" }
      output_map { key: "LOGITS" value: "LOGITS" }
    }
  ]
}
"""


def write_pipeline(repo: Path) -> None:
    """Add `preprocess` (python backend) and the `classify` ensemble to a repository
    that holds `image_classifier`."""
    (repo / "preprocess" / "1").mkdir(parents=True)
    (repo / "preprocess" / "1" / "model.py").write_text(PREPROCESS)
    (repo / "preprocess" / "config.pbtxt").write_text(PREPROCESS_CONFIG)
    (repo / "classify" / "1").mkdir(parents=True)  # an ensemble's empty version directory
    (repo / "classify" / "config.pbtxt").write_text(ENSEMBLE_CONFIG)
