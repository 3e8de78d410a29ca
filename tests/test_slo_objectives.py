"""SLO declarations: slo.yaml beside config.pbtxt and --slo-config FILE, validated at load
with a ConfigError naming the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from convoy.errors import ConfigError
from convoy.monitoring.objectives import Kind, load_config_file, load_objectives

ISSUE_EXAMPLE = """
objectives:
  - name: availability
    kind: availability      # availability | latency | quality
    target: 99.9            # percent of good events
    window: 28d
  - name: fast
    kind: latency
    target: 99
    threshold_ms: 50
    window: 28d
"""


def _repository(tmp_path: Path, text: str, model: str = "tiny") -> Path:
    (tmp_path / model).mkdir(parents=True, exist_ok=True)
    (tmp_path / model / "slo.yaml").write_text(text)
    return tmp_path


def test_the_issue_example_loads(tmp_path: Path) -> None:
    declared = load_objectives(_repository(tmp_path, ISSUE_EXAMPLE), None)
    tiny = declared["tiny"]
    availability, fast = tiny.objectives
    assert (availability.kind, availability.target, availability.window_s) == (
        Kind.AVAILABILITY, 99.9, 28 * 86400,
    )  # fmt: skip
    assert availability.budget == pytest.approx(0.001)
    assert (fast.kind, fast.threshold_ms, fast.ratio) == (Kind.LATENCY, 50.0, 0.99)
    assert tiny.source.endswith("tiny/slo.yaml")


def test_one_file_for_many_models(tmp_path: Path) -> None:
    config = tmp_path / "slos.yaml"
    config.write_text(
        "models:\n"
        "  a: {objectives: [{name: availability, kind: availability, target: 99.5}]}\n"
        "  b:\n"
        "    objectives:\n"
        "      - {name: drift_free, kind: quality, target: 95, window: 7d}\n"
    )
    declared = load_config_file(config)
    assert sorted(declared) == ["a", "b"]
    assert declared["a"].objectives[0].window == "28d"  # the default period
    assert declared["b"].objectives[0].kind is Kind.QUALITY


@pytest.mark.parametrize(
    ("objective", "field", "problem"),
    [
        ("{name: a, kind: availability, target: 100}", "objectives[0].target", "below 100"),
        ("{name: a, kind: availability, target: '99.9'}", "objectives[0].target", "not a number"),
        ("{name: a, kind: uptime, target: 99}", "objectives[0].kind", "availability | latency"),
        ("{name: a, kind: latency, target: 99}", "objectives[0].threshold_ms", "missing"),
        ("{name: a, kind: latency, target: 99, threshold_ms: -1}", "objectives[0].threshold_ms",
         "above 0"),
        ("{name: a, kind: availability, target: 99, threshold_ms: 5}",
         "objectives[0].threshold_ms", "only a latency objective"),
        ("{name: a, kind: availability, target: 99, window: 4 weeks}", "objectives[0].window",
         "not a duration"),
        ("{name: A-b, kind: availability, target: 99}", "objectives[0].name", "must match"),
        ("{name: a, kind: availability, target: 99, trget: 98}", "objectives[0].trget",
         "unknown field"),
        ("{kind: availability, target: 99}", "objectives[0].name", "missing"),
    ],
)  # fmt: skip
def test_a_wrong_field_names_file_and_field(
    tmp_path: Path, objective: str, field: str, problem: str
) -> None:
    repository = _repository(tmp_path, f"objectives: [{objective}]\n")
    with pytest.raises(ConfigError) as caught:
        load_objectives(repository, None)
    assert caught.value.path == str(repository / "tiny" / "slo.yaml")
    assert caught.value.field == field
    assert problem in caught.value.problem


def test_duplicate_names_and_empty_lists_are_refused(tmp_path: Path) -> None:
    twice = "objectives: [{name: a, kind: availability, target: 99}, " \
        "{name: a, kind: latency, target: 99, threshold_ms: 5}]\n"  # fmt: skip
    with pytest.raises(ConfigError, match=r"objectives\[1\].name: 'a' is declared twice"):
        load_objectives(_repository(tmp_path, twice), None)
    with pytest.raises(ConfigError, match="objectives: must be a non-empty list"):
        load_objectives(_repository(tmp_path, "objectives: []\n"), None)
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_objectives(_repository(tmp_path, "objectives: [\n"), None)


def test_a_model_declared_twice_is_refused(tmp_path: Path) -> None:
    repository = _repository(tmp_path / "repo", ISSUE_EXAMPLE)
    config = tmp_path / "slos.yaml"
    config.write_text("models:\n  tiny: {objectives: [{name: a, kind: availability, target: 9}]}\n")
    with pytest.raises(ConfigError) as caught:
        load_objectives(repository, config)
    assert caught.value.field == "models.tiny"
    assert "also declared in" in caught.value.problem
    config.write_text("tiny: {}\n")
    with pytest.raises(ConfigError, match="models: the file must be one mapping"):
        load_objectives(None, config)
    config.write_text("models:\n  tiny: {objectives: [{name: a, kind: availability}]}\n")
    with pytest.raises(ConfigError, match=r"models.tiny.objectives\[0\].target: missing"):
        load_objectives(None, config)
