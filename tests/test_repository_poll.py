"""The repository poll tries a failed load again: a version directory caught
half-copied is loaded once its copy completes. Driven by poll_once and a fake clock
(no sleeps) over a real ModelRepository."""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

import pytest

from convoy.metrics import Metrics
from convoy.repository.manager import ModelRepository
from convoy.repository.poll import RepositoryPoller, RetrySchedule

SECOND = 1_000_000_000
INTERVAL_S = 3600.0  # the poller's own sleep never ends during a test: poll_once drives it


class FakeClock:
    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * SECOND)


def _failures(metrics: Metrics, model: str, version: str) -> float:
    value = metrics.registry.get_sample_value(
        "convoy_model_load_failures_total", {"model": model, "version": version}
    )
    return 0.0 if value is None else value


def test_a_half_copied_version_is_loaded_once_its_copy_completes(
    tmp_path: Path, examples_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "repo"
    shutil.copytree(examples_dir / "tiny", root / "tiny")  # latest 1: version 2 replaces 1
    model_file = (examples_dir / "tiny" / "1" / "model.pt").read_bytes()
    clock = FakeClock()
    metrics = Metrics(gpus=list)

    async def scenario() -> None:
        repo = ModelRepository(root, metrics)
        await repo.load_all()
        poller = RepositoryPoller(repo, repo.load, INTERVAL_S, clock=clock, retry_cap_s=4 * 3600)
        await poller.start()
        try:
            assert repo.get("tiny").version == 1
            # The copy of version 2 has begun: half its model file is there.
            (root / "tiny" / "2").mkdir()
            (root / "tiny" / "2" / "model.pt").write_bytes(model_file[: len(model_file) // 2])
            with caplog.at_level(logging.WARNING, logger="convoy.repository.poll"):
                await poller.poll_once()
            assert repo.get("tiny").version == 1  # version 1 serves on
            assert _failures(metrics, "tiny", "2") == 1
            (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert "'tiny' version 2 failed to load" in warning.getMessage()
            assert "model file" in warning.getMessage()  # the error itself

            # Files unchanged: tried again after one interval, then after two.
            clock.advance(INTERVAL_S / 2)
            await poller.poll_once()
            assert _failures(metrics, "tiny", "2") == 1
            clock.advance(INTERVAL_S / 2)
            await poller.poll_once()
            assert _failures(metrics, "tiny", "2") == 2
            clock.advance(INTERVAL_S)
            await poller.poll_once()
            assert _failures(metrics, "tiny", "2") == 2  # backed off: not yet

            # The copy completes: the next poll tries at once, without waiting out the back-off.
            (root / "tiny" / "2" / "model.pt").write_bytes(model_file)
            await poller.poll_once()
            served = repo.get("tiny")
            assert served.version == 2 and served.ready
            assert _failures(metrics, "tiny", "2") == 2
            assert poller.retries.pending() == []
            clock.advance(10 * INTERVAL_S)
            await poller.poll_once()
            assert repo.get("tiny").version == 2
        finally:
            await poller.stop()
            await repo.close()

    asyncio.run(scenario())


def test_a_model_that_failed_at_start_up_is_tried_again(tmp_path: Path, examples_dir: Path) -> None:
    root = tmp_path / "repo"
    shutil.copytree(examples_dir / "tiny", root / "tiny")
    model_file = root / "tiny" / "1" / "model.pt"
    whole = model_file.read_bytes()
    model_file.write_bytes(whole[:100])
    clock = FakeClock()
    metrics = Metrics(gpus=list)

    async def scenario() -> None:
        repo = ModelRepository(root, metrics)
        await repo.load_all()
        assert repo.load_failure("tiny") is not None
        assert _failures(metrics, "tiny", "1") == 1
        poller = RepositoryPoller(repo, repo.load, INTERVAL_S, clock=clock)
        await poller.start()
        try:
            model_file.write_bytes(whole)
            await poller.poll_once()
            assert repo.get("tiny").version == 1
            assert repo.load_failure("tiny") is None
        finally:
            await poller.stop()
            await repo.close()

    asyncio.run(scenario())


def test_the_back_off_doubles_up_to_the_cap_and_changed_files_are_due_at_once() -> None:
    clock = FakeClock()
    schedule = RetrySchedule(interval_s=2.0, cap_s=10.0, clock=clock)
    files = (("1/model.pt", 10, 1),)
    delays = [schedule.failed("m", files).delay_ns / SECOND for _ in range(5)]
    assert delays == [2.0, 4.0, 8.0, 10.0, 10.0]
    assert not schedule.due("m", files)
    assert schedule.due("m", (("1/model.pt", 20, 2),))  # the copy went on
    clock.advance(10)
    assert schedule.due("m", files)
    schedule.forget("m")
    assert not schedule.due("m", files) and schedule.pending() == []
