"""Drift on the real example models, through the server and tritonclient: a MiniLM
text-domain shift seen by the multivariate test on its 384-d embeddings (and the text
test on its input), and prediction drift of the image classifier when its images get
brighter. Each case first shows that traffic like the reference raises no alarm.

Traffic is sent one window at a time, waiting for the server to score it, so that
every window holds one kind of traffic only and none is dropped by the sampler."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ServerProcess, make_repository, start_server

pytestmark = pytest.mark.e2e

# Fully seeded traffic and seeded permutations make each window's p-value
# reproducible; 0.01 (not the default 0.05) keeps the no-alarm checks away from the
# edge while a shift still reaches the permutation test's floor of 1/201.
SIGNIFICANCE = "0.01"

TEXT_WINDOW = 48  # strings per window
TEXT_ROWS = 8  # strings per request, all sampled (drift_rows_per_request)
TEXT_REFERENCE = 3 * TEXT_WINDOW  # first:N
TEXT_PARAMETERS = {
    "drift_reference": f"first:{TEXT_REFERENCE}",
    "drift_window": str(TEXT_WINDOW),
    "drift_rows_per_request": str(TEXT_ROWS),
    "drift_interval_s": "0.1",
    "drift_significance": SIGNIFICANCE,
}

IMAGE_WINDOW = 32
IMAGE_REFERENCE = 256
IMAGE_PARAMETERS = {
    "drift_reference": "reference.npz",
    "drift_window": str(IMAGE_WINDOW),
    # An image row is 48 KiB, so one is sampled per request; the logits must keep in
    # step, or the output's windows would fill four times faster than the input's.
    "drift_rows_per_request": "1",
    "drift_interval_s": "0.1",
    "drift_significance": SIGNIFICANCE,
    # The example has no label file, so its LOGITS would get the score-distribution
    # test; name the class-frequency test a classifier deployment would use.
    "drift_test": "LOGITS:classes",
}

_CITIES = ("Paris", "Oslo", "Lisbon", "Denver", "Osaka", "Cairo", "Lima", "Dublin")
_SKIES = ("sunny", "cloudy", "rainy", "windy", "foggy", "stormy", "clear", "humid")
_WEATHER = (
    "The weather in {city} is {sky} today, around {deg} degrees.",
    "Tomorrow {city} expects a {sky} morning and {deg} degrees by noon.",
    "Forecasters say {city} will stay {sky} with highs near {deg} degrees.",
    "It was {sky} in {city} all week; temperatures hovered at {deg} degrees.",
)


def weather_sentences(rng: np.random.Generator, n: int) -> list[str]:
    """The reference domain: short English sentences about the weather."""
    return [
        str(rng.choice(_WEATHER)).format(
            city=rng.choice(_CITIES), sky=rng.choice(_SKIES), deg=int(rng.integers(-10, 40))
        )
        for _ in range(n)
    ]


def code_lines(rng: np.random.Generator, n: int) -> list[str]:
    """Another domain: code-like lines of random identifiers, operators and hex literals."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz_"))
    ops = ("=", "+=", "->", "::", "&&", "<<", "!=", "%")

    def token() -> str:
        if rng.random() < 0.3:
            return hex(int(rng.integers(0, 1 << 16)))
        if rng.random() < 0.3:
            return str(rng.choice(ops))
        return "".join(rng.choice(letters, int(rng.integers(2, 9))))

    return [" ".join(token() for _ in range(int(rng.integers(6, 14)))) for _ in range(n)]


def random_images(rng: np.random.Generator, n: int, brightness: float = 0.0) -> np.ndarray:
    """Seeded noise images around mid-grey; `brightness` lifts every pixel."""
    images = rng.normal(0.5 + brightness, 0.25, size=(n, 3, 64, 64))
    return images.astype(np.float32)


def _append_parameters(config: Path, parameters: dict[str, str]) -> None:
    with config.open("a") as f:
        for key, value in parameters.items():
            f.write(f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}\n')


def _classifier_reference(examples_dir: Path, model_dir: Path) -> None:
    """reference.npz as docs/monitoring.md describes: validation images and the
    model's own logits for them (computed here with onnxruntime, as a user would)."""
    import onnxruntime as ort

    images = random_images(np.random.default_rng(10), IMAGE_REFERENCE)
    session = ort.InferenceSession(
        str(examples_dir / "image_classifier" / "1" / "model.onnx"),
        providers=["CPUExecutionProvider"],
    )
    logits = session.run(["LOGITS"], {"INPUT": images})[0]
    np.savez(model_dir / "reference.npz", INPUT=images, LOGITS=logits)


@pytest.fixture(scope="module")
def drift_server(
    examples_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    repo = make_repository(
        tmp_path_factory.mktemp("drift-models"),
        examples_dir,
        ("minilm_embedding", "image_classifier"),
    )
    _append_parameters(repo / "minilm_embedding" / "config.pbtxt", TEXT_PARAMETERS)
    _append_parameters(repo / "image_classifier" / "config.pbtxt", IMAGE_PARAMETERS)
    _classifier_reference(examples_dir, repo / "image_classifier")
    proc = start_server(repo)
    yield proc
    proc.stop()


def _metrics(server: ServerProcess) -> dict[str, float]:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        lines = response.read().decode().splitlines()
    return {
        series: float(value)
        for series, _, value in (line.rpartition(" ") for line in lines)
        if series.startswith("convoy_drift_")
    }


def _series(metric: str, model: str, tensor: str, feature: str | None = None) -> str:
    """A series as /metrics prints it (labels in alphabetical order)."""
    label = "" if feature is None else f'feature="{feature}",'
    return f'{metric}{{{label}input="{tensor}",model="{model}",version="1"}}'


def _wait_for(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _wait_scored(server: ServerProcess, model: str, tensors: tuple[str, ...], windows: int) -> None:
    def scored() -> bool:
        figures = _metrics(server)
        return all(
            figures.get(_series("convoy_drift_windows_total", model, t), 0) >= windows
            for t in tensors
        )

    _wait_for(scored, f"{model} window {windows} of {tensors} to be scored")


def _detected(server: ServerProcess, model: str, tensor: str) -> float | None:
    return _metrics(server).get(_series("convoy_drift_detected", model, tensor))


def _send_texts(server: ServerProcess, texts: list[str]) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.url)
    try:
        # Sequential requests: the sampler sees them in order, so windows do not mix.
        for start in range(0, len(texts), TEXT_ROWS):
            rows = np.array([[t.encode()] for t in texts[start : start + TEXT_ROWS]], np.object_)
            data = grpcclient.InferInput("TEXT", list(rows.shape), "BYTES")
            data.set_data_from_numpy(rows)
            client.infer("minilm_embedding", [data])
    finally:
        client.close()


def _send_images(server: ServerProcess, images: np.ndarray) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.url)
    try:
        for image in images:
            data = grpcclient.InferInput("INPUT", [1, 3, 64, 64], "FP32")
            data.set_data_from_numpy(image[np.newaxis])
            client.infer("image_classifier", [data])
    finally:
        client.close()


def test_minilm_text_from_another_domain_drifts_its_embeddings(
    drift_server: ServerProcess,
) -> None:
    model, tensors = "minilm_embedding", ("TEXT", "EMBEDDING")
    rng = np.random.default_rng(20)
    _send_texts(drift_server, weather_sentences(rng, TEXT_REFERENCE))

    def reference_fitted() -> bool:
        figures = _metrics(drift_server)
        return all(
            figures.get(_series("convoy_drift_reference_size", model, t)) == TEXT_REFERENCE
            for t in tensors
        )

    _wait_for(reference_fitted, "the first:N reference")

    _send_texts(drift_server, weather_sentences(rng, TEXT_WINDOW))
    _wait_scored(drift_server, model, tensors, 1)
    assert _detected(drift_server, model, "EMBEDDING") == 0.0
    assert _detected(drift_server, model, "TEXT") == 0.0

    _send_texts(drift_server, code_lines(rng, TEXT_WINDOW))
    _wait_scored(drift_server, model, tensors, 2)
    figures = _metrics(drift_server)
    # One figure for the whole 384-d tensor, from the multivariate test.
    assert _detected(drift_server, model, "EMBEDDING") == 1.0
    assert figures[_series("convoy_drift_windows_total", model, "EMBEDDING")] == 2
    assert figures[_series("convoy_drift_p_value", model, "EMBEDDING", "")] < float(SIGNIFICANCE)
    assert _series("convoy_drift_p_value", model, "EMBEDDING", "0") not in figures
    assert _detected(drift_server, model, "TEXT") == 1.0


def test_brighter_images_drift_the_classifier_predictions(drift_server: ServerProcess) -> None:
    model, tensors = "image_classifier", ("INPUT", "LOGITS")
    rng = np.random.default_rng(30)
    # The reference is already fitted (from the file at load), so the first window counts.
    _send_images(drift_server, random_images(rng, IMAGE_WINDOW))
    _wait_scored(drift_server, model, tensors, 1)
    assert _detected(drift_server, model, "INPUT") == 0.0
    assert _detected(drift_server, model, "LOGITS") == 0.0

    _send_images(drift_server, random_images(rng, IMAGE_WINDOW, brightness=0.3))
    _wait_scored(drift_server, model, tensors, 2)
    assert _detected(drift_server, model, "INPUT") == 1.0
    # Prediction drift: the brighter images move the top-1 class frequencies.
    assert _detected(drift_server, model, "LOGITS") == 1.0
    class_p = _series("convoy_drift_p_value", model, "LOGITS", "class")
    assert _metrics(drift_server)[class_p] < float(SIGNIFICANCE)
