"""Source of a convoy_python model that injects faults on chosen inputs.

Used by the fault tests and the soak run. X is FP32 [1]; Y = X, except:
-1 raises, -2 hangs for 30 s (past any execution timeout), -3 runs out of
memory, -4 takes 0.4 s. The `sleep_s` parameter slows every batch.
"""

SOURCE = """
import time


class Model:
    def __init__(self, config):
        self.sleep_s = float(config.get("sleep_s", "0"))

    def __call__(self, inputs):
        x = inputs["X"]
        if (x == -1).any():
            raise RuntimeError("injected failure")
        if (x == -2).any():
            time.sleep(30)
        if (x == -3).any():
            raise MemoryError("injected out of memory")
        if (x == -4).any():
            time.sleep(0.4)
        time.sleep(self.sleep_s)
        return {"Y": x.copy()}
"""


def config(name: str, extra: str = "", max_batch: int = 8, instances: int = 1) -> str:
    return f"""
name: "{name}"
backend: "convoy_python"
max_batch_size: {max_batch}
input [ {{ name: "X" data_type: TYPE_FP32 dims: [ 1 ] }} ]
output [ {{ name: "Y" data_type: TYPE_FP32 dims: [ 1 ] }} ]
instance_group [ {{ count: {instances} kind: KIND_CPU }} ]
{extra}
"""
