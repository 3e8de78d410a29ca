"""`convoy optimize`: FP16/INT8 versions of a model, measured and checked for agreement
before they are installed beside the original (docs/optimize.md)."""

from __future__ import annotations

from .optimizer import optimize
from .plan import OptimizePlan, OptimizeRefused, OptimizeRequest, plan_optimization
from .report import FLOORS, OptimizeReport

__all__ = [
    "FLOORS",
    "OptimizePlan",
    "OptimizeRefused",
    "OptimizeReport",
    "OptimizeRequest",
    "optimize",
    "plan_optimization",
]
