"""What `convoy optimize` was asked, and every refusal decided before any work."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import CONFIG_FILENAME, ModelSpec, read_model_config, validate_model_config
from ..errors import ConvoyError

SUPPORTED = {"onnxruntime": ("fp16", "int8"), "pytorch": ("int8",)}


class OptimizeRefused(ConvoyError):
    """`convoy optimize` will not do what was asked; `reason` names why, for scripts."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"refused ({reason}): {message}")
        self.reason = reason


@dataclass(frozen=True)
class OptimizeRequest:
    model_dir: Path
    from_version: int
    to_version: int
    precision: str  # fp16 | int8
    calibration: Path | None = None  # .npz named after the model file's inputs
    force: bool = False  # replace an existing target version
    sample_rows: int = 64  # rows compared when no calibration file is given
    bench_seconds: float = 2.0  # per version and batch size, measured alternately
    seed: int = 0
    threads: int = 0  # runtime threads while measuring; 0: all cores


@dataclass(frozen=True)
class OptimizePlan:
    request: OptimizeRequest
    spec: ModelSpec
    source: Path  # the model file of version N
    target_dir: Path  # version M's directory (absent, or replaced with --force)
    mode: str  # fp16 | int8-dynamic | int8-static


def plan_optimization(request: OptimizeRequest) -> OptimizePlan:
    model_dir = request.model_dir
    config_path = model_dir / CONFIG_FILENAME
    if not config_path.is_file():
        raise OptimizeRefused("not_a_model", f"{model_dir} has no {CONFIG_FILENAME}")
    config = read_model_config(model_dir)
    spec = validate_model_config(config, str(config_path), model_dir.name)
    precisions = SUPPORTED.get(spec.backend)
    if precisions is None:
        raise OptimizeRefused(
            "unsupported_backend",
            f"model '{spec.name}' uses backend '{spec.backend}'; convoy optimize converts "
            f"onnxruntime (fp16, int8) and pytorch TorchScript (int8) models",
        )
    if request.precision not in precisions:
        raise OptimizeRefused(
            "unsupported_precision",
            f"{request.precision} is not offered for backend '{spec.backend}' "
            f"(offered: {', '.join(precisions)})",
        )
    if request.from_version < 1 or request.to_version < 1:
        raise OptimizeRefused("bad_version", "versions are positive integers")
    if request.from_version == request.to_version:
        raise OptimizeRefused("same_version", "--to-version must differ from --from-version")
    source = model_dir / str(request.from_version) / spec.default_model_filename
    if not source.is_file():
        raise OptimizeRefused(
            "missing_version",
            f"version {request.from_version} of '{spec.name}' has no "
            f"{spec.default_model_filename} ({source})",
        )
    target = model_dir / str(request.to_version)
    if target.exists() and not request.force:
        raise OptimizeRefused(
            "target_exists",
            f"version {request.to_version} of '{spec.name}' exists ({target}); "
            "pass --force to replace it",
        )
    if request.calibration is not None and not request.calibration.is_file():
        raise OptimizeRefused(
            "calibration_mismatch", f"calibration file {request.calibration} does not exist"
        )
    if request.sample_rows < 1 or request.bench_seconds <= 0:
        raise OptimizeRefused("bad_argument", "sample rows and bench seconds must be positive")
    if request.precision == "fp16":
        mode = "fp16"
    elif spec.backend == "onnxruntime" and request.calibration is not None:
        mode = "int8-static"
    else:
        mode = "int8-dynamic"  # TorchScript: a calibration file is the agreement sample only
    return OptimizePlan(request, spec, source, target, mode)
