"""Model repository behaviour through the real client: load, unload, versions,
bad configs, auto-complete, and draining on SIGTERM."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from convoy.scheduling.devices import cuda_device_count

from .conftest import ROOT, ServerProcess, make_repository, start_server

pytestmark = pytest.mark.e2e


def add_version(repo: Path, model: str, version: int) -> None:
    src = next(p for p in (repo / model).iterdir() if p.is_dir())
    dst = repo / model / str(version)
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).symlink_to(f.resolve())


@pytest.fixture()
def repo(tmp_path: Path, examples_dir: Path) -> Path:
    return make_repository(tmp_path / "repo", examples_dir, ("tiny", "image_classifier"))


def tiny_input() -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 16), np.float32))
    return tensor


def test_bad_config_names_file_and_field_and_others_load(repo: Path) -> None:
    broken = repo / "broken"
    broken.mkdir()
    shutil.copytree(repo / "tiny" / "1", broken / "1", symlinks=True)
    (broken / "config.pbtxt").write_text(
        (repo / "tiny" / "config.pbtxt").read_text().replace('name: "tiny"', 'name: "broken"')
        + "\nmax_queue_size: 4\n"
    )
    badtype = repo / "badtype"
    badtype.mkdir()
    shutil.copytree(repo / "tiny" / "1", badtype / "1", symlinks=True)
    tiny_config = (repo / "tiny" / "config.pbtxt").read_text()
    (badtype / "config.pbtxt").write_text(
        tiny_config.replace('name: "tiny"', 'name: "badtype"').replace(
            "max_batch_size: 256", "max_batch_size: -3"
        )
    )
    server = start_server(repo)
    try:
        client = grpcclient.InferenceServerClient(server.url)
        assert client.is_model_ready("tiny")
        assert client.is_model_ready("image_classifier")
        assert not client.is_model_ready("broken")
        index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
        assert index["broken"]["state"] == "UNAVAILABLE"
        assert "broken/config.pbtxt" in index["broken"]["reason"]
        assert "max_queue_size" in index["broken"]["reason"]
        assert "badtype/config.pbtxt" in index["badtype"]["reason"]
        assert "max_batch_size" in index["badtype"]["reason"]
        with pytest.raises(InferenceServerException) as info:
            client.load_model("broken")
        assert "max_queue_size" in info.value.message()
        assert client.infer("tiny", [tiny_input()]).as_numpy("OUTPUT0") is not None
        client.close()
    finally:
        server.stop()


def test_load_unload_and_versions(repo: Path) -> None:
    add_version(repo, "tiny", 2)
    add_version(repo, "tiny", 3)
    server = start_server(repo)
    try:
        client = grpcclient.InferenceServerClient(server.url)
        # Default policy: the latest version only.
        assert client.get_model_metadata("tiny", as_json=True)["versions"] == ["3"]
        assert not client.is_model_ready("tiny", "1")
        client.unload_model("tiny")
        assert not client.is_model_ready("tiny")
        with pytest.raises(InferenceServerException) as info:
            client.infer("tiny", [tiny_input()])
        assert "tiny" in info.value.message()
        states = {
            m["name"]: m["state"] for m in client.get_model_repository_index(as_json=True)["models"]
        }
        assert states["tiny"] == "UNAVAILABLE"
        # Switch to serving every version, then load again at run time.
        config = repo / "tiny" / "config.pbtxt"
        config.write_text(config.read_text() + "\nversion_policy: { all { } }\n")
        client.load_model("tiny")
        assert client.get_model_metadata("tiny", as_json=True)["versions"] == ["1", "2", "3"]
        for version in ("1", "2", "3"):
            result = client.infer("tiny", [tiny_input()], model_version=version)
            assert result.get_response().model_version == version
        config.write_text(config.read_text().replace("all { }", "specific { versions: [1, 3] }"))
        client.load_model("tiny")
        assert client.get_model_metadata("tiny", as_json=True)["versions"] == ["1", "3"]
        with pytest.raises(InferenceServerException) as info:
            client.load_model("does_not_exist")
        assert info.value.status() == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException) as info:
            client.load_model("../tiny")
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        client.close()
    finally:
        server.stop()


def test_onnx_model_without_config_is_autocompleted(tmp_path: Path, examples_dir: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "bare" / "1").mkdir(parents=True)
    (repo / "bare" / "1" / "model.onnx").symlink_to(examples_dir / "image_classifier/1/model.onnx")
    (repo / "bare" / "config.pbtxt").write_text('platform: "onnxruntime_onnx"\nmax_batch_size: 8\n')
    server = start_server(repo)
    try:
        client = grpcclient.InferenceServerClient(server.url)
        meta = client.get_model_metadata("bare", as_json=True)
        assert meta["inputs"][0]["name"] == "INPUT"
        assert meta["inputs"][0]["shape"] == ["-1", "3", "64", "64"]
        config = client.get_model_config("bare", as_json=True)["config"]
        assert config["output"][0]["name"] == "LOGITS"
        # No instance_group: one instance per GPU, else one on the CPU, shown as Triton does.
        group = config["instance_group"][0]
        assert group["count"] == 1 and group["name"] == "bare_0"
        assert group["kind"] == ("KIND_GPU" if cuda_device_count() else "KIND_CPU")
        tensor = grpcclient.InferInput("INPUT", [2, 3, 64, 64], "FP32")
        tensor.set_data_from_numpy(np.zeros((2, 3, 64, 64), np.float32))
        assert client.infer("bare", [tensor]).as_numpy("LOGITS").shape == (2, 1000)
        client.close()
    finally:
        server.stop()


def test_sigterm_drains_in_flight_requests(repo: Path) -> None:
    server = start_server(repo, "--grace-period", "20")
    results: list[object] = []
    errors: list[Exception] = []

    def call() -> None:
        client = grpcclient.InferenceServerClient(server.url)
        try:
            tensor = grpcclient.InferInput("INPUT", [16, 3, 64, 64], "FP32")
            tensor.set_data_from_numpy(np.ones((16, 3, 64, 64), np.float32))
            results.append(client.infer("image_classifier", [tensor]).as_numpy("LOGITS"))
        except Exception as exc:
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    # Wait until all eight are accepted (in flight or answered), then ask for shutdown:
    # a request still on its way when SIGTERM arrives is refused, rightly.
    deadline = time.monotonic() + 60
    while _accepted(server, "image_classifier") < 8:
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.02)
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert server.proc.wait(60) == 0, server.output()
    assert not errors, errors
    assert len(results) == 8
    assert "convoy stopped" in server.output()


def test_cli_help_and_builtin_examples(examples_dir: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "convoy.cli", "serve", "--help"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for flag in ("--model-repository", "--grpc-port", "--metrics-port", "--grace-period"):
        assert flag in out
    # No repository: the built-in examples, from the cache the fixture filled.
    server = start_server(None, env={"CONVOY_CACHE_DIR": str(examples_dir.parent)})
    try:
        client = grpcclient.InferenceServerClient(server.url)
        index = client.get_model_repository_index(as_json=True)["models"]
        ready = {m["name"] for m in index if m["state"] == "READY"}
        assert ready == {"tiny", "image_classifier", "minilm_embedding"}
        client.close()
    finally:
        assert server.stop() == 0


def test_classification_labels_from_label_filename(repo: Path) -> None:
    (repo / "image_classifier" / "labels.txt").write_text(
        "\n".join(f"class_{i}" for i in range(1000))
    )
    config = repo / "image_classifier" / "config.pbtxt"
    config.write_text(
        config.read_text().replace(
            "dims: [ 1000 ] }", 'dims: [ 1000 ] label_filename: "labels.txt" }'
        )
    )
    server = start_server(repo)
    try:
        client = grpcclient.InferenceServerClient(server.url)
        tensor = grpcclient.InferInput("INPUT", [1, 3, 64, 64], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 3, 64, 64), np.float32))
        wanted = [grpcclient.InferRequestedOutput("LOGITS", class_count=2)]
        top = client.infer("image_classifier", [tensor], outputs=wanted).as_numpy("LOGITS")
        _, index, label = top[0, 0].decode().split(":")
        assert label == f"class_{index}"
        client.close()
    finally:
        server.stop()


def test_gpu_instances_fall_back_to_the_cpu_here(repo: Path) -> None:
    import urllib.request

    if cuda_device_count():
        pytest.skip("a GPU is present: KIND_GPU really runs on it")
    config = repo / "tiny" / "config.pbtxt"
    config.write_text(re.sub(r"kind: KIND_\w+", "kind: KIND_GPU", config.read_text()))
    server = start_server(repo)
    try:
        client = grpcclient.InferenceServerClient(server.url)
        assert (
            client.get_model_config("tiny", as_json=True)["config"]["instance_group"][0]["kind"]
            == "KIND_GPU"
        )
        assert client.infer("tiny", [tiny_input()]).as_numpy("OUTPUT0") is not None
        client.close()
        assert "asks for KIND_GPU but no GPU is usable here" in server.output()
        body = (
            urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics")
            .read()
            .decode()
        )
        assert 'convoy_compute_seconds_count{device="cpu",model="tiny",version="1"}' in body
    finally:
        server.stop()


def _accepted(server: ServerProcess, model: str) -> float:
    """Requests in flight plus those answered, from the server's own metrics."""
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        for name in ("convoy_inflight_requests", "convoy_request_success_total"):
            if line.startswith(f'{name}{{model="{model}"'):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_half_copied_version_serves_once_its_copy_completes(repo: Path) -> None:
    """--repository-poll-secs: a version directory caught half-copied fails its load,
    and is loaded and served once the copy completes (the failure logged and counted)."""
    model_file = (repo / "tiny" / "1" / "model.pt").read_bytes()
    server = start_server(repo, "--repository-poll-secs", "0.2")
    client = grpcclient.InferenceServerClient(server.url)
    try:
        (repo / "tiny" / "2").mkdir()
        (repo / "tiny" / "2" / "model.pt").write_bytes(model_file[: len(model_file) // 2])
        deadline = time.monotonic() + 30
        while not any("'tiny'" in line and "failed to load" in line for line in server.log):
            assert time.monotonic() < deadline, "".join(server.log)
            time.sleep(0.1)
        assert client.get_model_metadata("tiny", as_json=True)["versions"] == ["1"]
        (repo / "tiny" / "2" / "model.pt").write_bytes(model_file)  # the copy completes
        deadline = time.monotonic() + 30
        while client.get_model_metadata("tiny", as_json=True)["versions"] != ["2"]:
            assert time.monotonic() < deadline, "".join(server.log[-20:])
            time.sleep(0.1)
        result = client.infer("tiny", [tiny_input()])
        assert result.get_response().model_version == "2"
        warning = next(line for line in server.log if "version 2 failed to load" in line)
        assert " WARNING " in warning and "'tiny'" in warning
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        match = re.search(
            r'^convoy_model_load_failures_total\{model="tiny",version="2"\} (\S+)$',
            text,
            re.MULTILINE,
        )
        assert match is not None and float(match.group(1)) >= 1, text
    finally:
        client.close()
        server.stop()
