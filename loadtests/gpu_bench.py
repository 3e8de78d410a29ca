"""GPU benchmark: the example CNN on one GPU, against the GPU's roofline.

    python -m loadtests.gpu_bench --seconds 5

fp16 images/s at batch 64 through Convoy's TorchScript backend (pinned host
memory, a CUDA stream per instance): without and with CUDA graphs, and with 1
against 4 instances running concurrently on their own threads and streams. The
model's FLOPs per image are counted with torch's FlopCounterMode and turned into
achieved TFLOP/s, set against the dense fp16 peak given with --peak-tflops
(H200: about 990 by the datasheet; ~790 bf16 measured on random data here).

First the model alone at a large batch with its input already on the GPU (the
ceiling), then Convoy's backend at that batch (the copies' cost). Then served
against bare, at the same batch size: the CNN taking raw uint8
images (converted on the GPU by the pre-processing kernel), 4 GPU instances,
once called directly on 4 threads and once through `convoy serve` driven by
--procs client processes sending whole batches. The ratio is the server's cost.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from convoy.backends.pytorch import TorchScriptBackend
from convoy.config import validate_model_config
from convoy.pb import model_config_pb2 as mc


def cnn() -> torch.nn.Module:
    from convoy.repository.examples import build_classifier_module

    return build_classifier_module().eval()


def flops_per_image(model: torch.nn.Module) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, 64, 64))
    return float(counter.get_total_flops())


def spec(graphs: str, batch: int = 64) -> object:
    config = mc.ModelConfig(name="cnn", backend="pytorch", max_batch_size=batch)
    config.input.add(name="INPUT", data_type=mc.TYPE_FP32, dims=[3, 64, 64])
    config.output.add(name="LOGITS", data_type=mc.TYPE_FP32, dims=[1000])
    config.parameters["precision"].string_value = "fp16"
    if graphs:
        config.parameters["cuda_graph_batch_sizes"].string_value = graphs
    return validate_model_config(config, "gpu_bench", "cnn")


def images_per_s(path: Path, graphs: str, instances: int, seconds: float, batch: int) -> float:
    backends = [
        TorchScriptBackend(path, "cuda:0", spec(graphs, batch))  # type: ignore[arg-type]
        for _ in range(instances)
    ]
    x = np.random.default_rng(0).random((batch, 3, 64, 64), dtype=np.float32)
    rate = drive(backends, {"INPUT": x}, seconds)
    for b in backends:
        b.close()
    return rate


def drive(backends: list[Any], inputs: dict[str, np.ndarray], seconds: float) -> float:
    """Rows/s of `backends` each called in a loop on its own thread."""
    batch = len(next(iter(inputs.values())))
    for b in backends:
        for _ in range(3):
            b.run(inputs, ["LOGITS"])
    counts = [0] * len(backends)
    stop = time.perf_counter() + seconds

    def loop(i: int) -> None:
        while time.perf_counter() < stop:
            backends[i].run(inputs, ["LOGITS"])
            counts[i] += batch

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(backends))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def device_resident(model: torch.nn.Module, batch: int, seconds: float) -> float:
    """Images/s of the model alone: fp16, input already on the GPU, one CUDA graph
    replayed. The ceiling that copies and serving are measured against."""
    model = model.half().cuda()
    x = torch.randn(batch, 3, 64, 64, device="cuda", dtype=torch.float16)
    stream = torch.cuda.Stream()
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(3):
            model(x)
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            model(x)
        replays = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            for _ in range(10):
                graph.replay()
            replays += 10
            stream.synchronize()
        elapsed = time.perf_counter() - start
    return replays * batch / elapsed


SERVED_CONFIG = """
name: "cnn_gpu"
platform: "pytorch_libtorch"
max_batch_size: {batch}
input [ {{ name: "INPUT" data_type: TYPE_UINT8 dims: [ 64, 64, 3 ] }} ]
output [ {{ name: "LOGITS" data_type: TYPE_FP32 dims: [ 1000 ] }} ]
parameters {{ key: "preprocess" value {{ string_value: "image_hwc_uint8" }} }}
parameters {{ key: "precision" value {{ string_value: "fp16" }} }}
dynamic_batching {{ }}
instance_group [ {{ count: {instances} kind: {kind} }} ]
"""


def served_against_bare(
    path: Path, seconds: float, batch: int, instances: int, procs: int, device: str = "cuda:0"
) -> tuple[float, float, float]:
    """(served images/s, bare images/s, served p99 ms) for raw uint8 images
    (device "cpu" runs the same on the CPU: a check of this script without a GPU)."""
    from convoy.backends import load_backend

    from .bare import load_spec
    from .bench import run_closed_loop
    from .launch import start_convoy

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "cnn_gpu"
        (model_dir / "1").mkdir(parents=True)
        shutil.copy(path, model_dir / "1/model.pt")
        (model_dir / "config.pbtxt").write_text(
            SERVED_CONFIG.format(
                batch=batch, instances=instances, kind="KIND_CPU" if device == "cpu" else "KIND_GPU"
            )
        )
        model_spec = load_spec(model_dir)
        backends = [
            load_backend(model_spec, model_dir / "1/model.pt", device, 1) for _ in range(instances)
        ]
        images = np.random.default_rng(0).integers(0, 256, (batch, 64, 64, 3), dtype=np.uint8)
        bare = drive(backends, {"INPUT": images}, seconds)
        for b in backends:
            b.close()
        server = start_convoy(Path(tmp), "--metrics-port", "-1")
        try:
            result = run_closed_loop(
                server.url, "cnn_gpu", 2 * instances, seconds, procs=procs, rows=batch
            )
        finally:
            server.stop()
    return result.rows_per_s, bare, result.p99_ms


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--peak-tflops", type=float, default=990.0)
    parser.add_argument("--procs", type=int, default=8, help="client processes (served)")
    parser.add_argument(
        "--large-batch", type=int, default=2048, help="batch for the compute-bound lines"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here")
    model = cnn()
    flops = flops_per_image(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        torch.jit.script(model).save(str(path))
        print(f"GPU: {torch.cuda.get_device_name(0)}; {flops / 1e9:.3f} GFLOP per image")

        def report(what: str, rate: float) -> None:
            tflops = rate * flops / 1e12
            print(
                f"{what:<52} {rate:10.0f} images/s  {tflops:7.2f} TFLOP/s  "
                f"{100 * tflops / args.peak_tflops:5.1f}% of peak",
                flush=True,
            )

        big = args.large_batch
        report(
            f"model alone, fp16, batch {big}, on-device input",
            device_resident(cnn(), big, args.seconds),
        )
        report(
            f"backend, fp16, batch {big}, graphs on, 1 instance",
            images_per_s(path, str(big), 1, args.seconds, big),
        )
        for graphs, instances in (("", 1), (str(args.batch), 1), ("", 4), (str(args.batch), 4)):
            rate = images_per_s(path, graphs, instances, args.seconds, args.batch)
            report(
                f"backend, fp16, batch {args.batch}, graphs {'on' if graphs else 'off'}, "
                f"{instances} instance(s)",
                rate,
            )
        served, bare, p99 = served_against_bare(path, args.seconds, args.batch, 4, args.procs)
        print(
            f"uint8 images, fp16, batch {args.batch}, 4 instances: served {served:10.0f} images/s"
            f"  bare {bare:10.0f} images/s  served/bare {served / bare:5.2f}  p99 {p99:.1f} ms",
            flush=True,
        )


if __name__ == "__main__":
    main()
