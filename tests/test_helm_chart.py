"""deploy/helm/convoy: rendered offline by Helm's own template engine for a matrix of values,
every object validated against the Kubernetes schemas (strict), plus the invariants that
schemas cannot see (probes, selectors, grace periods, autoscaler targets).

Helm comes from helm-python-sdk (Helm's Go SDK as a shared library, no binary, no cluster);
the schemas from kubernetes-validate. Both are test extras; without them these tests skip.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from convoy.cli import build_parser
from tests.test_dashboard import unknown_metrics

helm = pytest.importorskip(
    "helm_python",
    reason="helm-python-sdk missing: pip install 'helm-python-sdk==0.2.2' (a test extra)",
)
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate",
    reason="kubernetes-validate missing: pip install 'kubernetes-validate==1.37.0' (a test extra)",
)
from helm_python import _native  # noqa: E402  (only once the package is known to be there)

CHART = Path(__file__).resolve().parents[1] / "deploy" / "helm" / "convoy"
# The oldest version the chart supports (Chart.yaml kubeVersion: native gRPC probes are GA
# from 1.27) and a current one: a field removed or added between them fails one of the two.
KUBE_VERSIONS = ("1.27.0", "1.33.0")
RELEASE, NAMESPACE = "prod", "serving"
FULLNAME = "prod-convoy"
MONITORING_API = "monitoring.coreos.com/v1"
# Custom resources: kubernetes-validate ships only the built-in kinds' schemas, so these
# get the structural checks in test_custom_resources instead of a schema.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("keda.sh/v1alpha1", "ScaledObject"),
             ("monitoring.coreos.com/v1", "PrometheusRule")}  # fmt: skip

Objects = list[dict[str, Any]]


def render(
    values: dict[str, Any],
    *,
    kube_version: str = KUBE_VERSIONS[-1],
    api_versions: tuple[str, ...] = (MONITORING_API,),
) -> Objects:
    """`helm template` in-process. Chart.render() does not pass the Capabilities options on,
    so the library's own render entry point is called with them (`--kube-version`,
    `--api-versions` of the Helm CLI)."""
    with helm.Chart.load(CHART) as chart:
        options = {
            "name": RELEASE,
            "namespace": NAMESPACE,
            "is_install": True,
            "kube_version": f"v{kube_version}",
            "api_versions": list(api_versions),
        }
        manifests: dict[str, str] = json.loads(
            _native.call_string(
                "helm_render", chart._raw(), json.dumps(values), json.dumps(options)
            )
        )
    objects: Objects = []
    for name, text in sorted(manifests.items()):
        if name.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def values_for(mode: str, gpu: bool, tls: bool) -> dict[str, Any]:
    return {
        "modelRepository": {"source": "pvc", "pvc": {"claimName": "convoy-models"}},
        "autoscaling": {"mode": mode},
        "gpu": {"enabled": gpu},
        "tls": {"enabled": tls, "secretName": "convoy-tls" if tls else ""},
    }


MATRIX = list(itertools.product(("hpa", "keda", "none"), (True, False), (False, True)))
MATRIX_IDS = [f"{m}-{'gpu' if g else 'cpu'}-{'tls' if t else 'plain'}" for m, g, t in MATRIX]


@pytest.fixture(scope="module", params=MATRIX, ids=MATRIX_IDS)
def case(request: pytest.FixtureRequest) -> tuple[dict[str, Any], Objects]:
    mode, gpu, tls = request.param
    values = values_for(mode, gpu, tls)
    return values, render(values)


def one(objects: Objects, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def kinds(objects: Objects) -> list[str]:
    return sorted(o["kind"] for o in objects)


def server_container(objects: Objects) -> dict[str, Any]:
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "convoy")


def serve_args(objects: Objects) -> Any:
    """The container's flags, parsed by `convoy serve`'s own parser: a flag the server does
    not know fails here rather than in a crash-looping pod."""
    container = server_container(objects)
    assert container["command"] == ["convoy", "serve"]
    return build_parser().parse_args(["serve", *container["args"]])


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- schemas -------------------------------------------------------------------------------


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_object_is_valid_kubernetes(
    case: tuple[dict[str, Any], Objects], kube_version: str
) -> None:
    values, _ = case
    objects = render(values, kube_version=kube_version)
    checked = 0
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} on {kube_version}: {exc}")
        checked += 1
    assert checked >= 5


def test_custom_resources(case: tuple[dict[str, Any], Objects]) -> None:
    """The CRDs' schemas are not shipped offline: the fields the operators read are checked."""
    values, objects = case
    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == MONITORING_API
    metrics = one(objects, "Service", f"{FULLNAME}-metrics")
    assert matches(monitor["spec"]["selector"]["matchLabels"], metrics["metadata"]["labels"])
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    port_names = {p["name"] for p in metrics["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
    if values["autoscaling"]["mode"] == "keda":
        scaled = one(objects, "ScaledObject")
        assert scaled["apiVersion"] == "keda.sh/v1alpha1"
        spec = scaled["spec"]
        assert set(spec) <= {
            "scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval",
            "cooldownPeriod", "advanced", "triggers",
        }  # fmt: skip
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
        assert set(trigger["metadata"]) == {"serverAddress", "query", "threshold"}
        assert isinstance(trigger["metadata"]["threshold"], str)  # KEDA reads strings
        float(trigger["metadata"]["threshold"])
        assert not unknown_metrics([trigger["metadata"]["query"]])


def test_service_monitor_only_where_the_api_exists() -> None:
    objects = render(values_for("hpa", True, False), api_versions=())
    assert "ServiceMonitor" not in kinds(objects)


# --- what schemas cannot see ---------------------------------------------------------------


def test_probes_check_grpc_health_on_the_grpc_port(case: tuple[dict[str, Any], Objects]) -> None:
    values, objects = case
    container = server_container(objects)
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    assert grpc_port == serve_args(objects).grpc_port
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]
        if values["tls"]["enabled"]:
            # Kubernetes' gRPC probe cannot speak TLS: the image's grpc client checks health.
            script = probe["exec"]["command"][-1]
            assert "HealthStub" in script and f"127.0.0.1:{grpc_port}" in script
            assert "grpc" not in probe
        else:
            assert probe["grpc"] == {"port": grpc_port, "service": ""}
            assert "exec" not in probe and "httpGet" not in probe
    startup = container["startupProbe"]
    # Loading models and building TensorRT engines takes minutes: ten at least.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


def test_pod_drains_before_it_is_killed(case: tuple[dict[str, Any], Objects]) -> None:
    _, objects = case
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    grace = serve_args(objects).grace_period
    pre_stop = server_container(objects)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # Kubernetes counts preStop inside terminationGracePeriodSeconds.
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + math.ceil(grace)


@pytest.mark.parametrize("age_ms", [30000, 10000, 0])
def test_pre_stop_outlasts_the_connection_age(age_ms: int) -> None:
    """SIGTERM only once every client connection has aged out and re-resolved without the
    pod: before that, calls still arrive and race the shutdown."""
    values = values_for("hpa", True, False)
    values["server"] = {"maxConnectionAgeMs": age_ms}
    objects = render(values)
    assert serve_args(objects).max_connection_age_ms == age_ms
    pre_stop = server_container(objects)["lifecycle"]["preStop"]["exec"]["command"]
    assert int(pre_stop[1]) >= 1.1 * age_ms / 1000 + 5


def test_grace_period_follows_the_value() -> None:
    values = values_for("none", False, False)
    values["server"] = {"gracePeriodSeconds": 120.5}
    values["lifecycle"] = {"preStopSleepSeconds": 5, "terminationMarginSeconds": 10}
    objects = render(values)
    assert serve_args(objects).grace_period == 120.5
    assert (
        one(objects, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        == 5 + 121 + 10
    )


def test_selectors_match_pod_labels(case: tuple[dict[str, Any], Objects]) -> None:
    _, objects = case
    deployment = one(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert matches(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    container_ports = {p["name"] for p in server_container(objects)["ports"]}
    services = [o for o in objects if o["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} == {
        FULLNAME,
        f"{FULLNAME}-headless",
        f"{FULLNAME}-metrics",
    }
    for service in services:
        assert matches(service["spec"]["selector"], pod_labels)
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports
    assert one(objects, "Service", f"{FULLNAME}-headless")["spec"]["clusterIP"] == "None"
    pdb = one(objects, "PodDisruptionBudget")
    assert matches(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert "minAvailable" not in pdb["spec"]


def test_autoscaler_owns_the_replica_count(case: tuple[dict[str, Any], Objects]) -> None:
    values, objects = case
    mode = values["autoscaling"]["mode"]
    deployment = one(objects, "Deployment")
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    if mode == "none":
        assert deployment["spec"]["replicas"] == 2
        assert not {"HorizontalPodAutoscaler", "ScaledObject"} & set(kinds(objects))
        return
    assert "replicas" not in deployment["spec"]
    if mode == "hpa":
        hpa = one(objects, "HorizontalPodAutoscaler")
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == target
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "Pods"
        behavior = hpa["spec"]["behavior"]
        assert "ScaledObject" not in kinds(objects)
    else:
        scaled = one(objects, "ScaledObject")
        assert scaled["spec"]["scaleTargetRef"] == target
        behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert "HorizontalPodAutoscaler" not in kinds(objects)
    # Scale up at once, scale down only after a stable stretch.
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 180


def test_adapter_rule_serves_the_metric_the_hpa_reads() -> None:
    objects = render(values_for("hpa", True, False))
    hpa = one(objects, "HorizontalPodAutoscaler")
    name = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    config = yaml.safe_load(
        one(objects, "ConfigMap", f"{FULLNAME}-adapter-rules")["data"]["config.yaml"]
    )
    (rule,) = config["rules"]
    assert rule["name"]["as"] == name
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert "<<.GroupBy>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]
    assert not unknown_metrics([rule["seriesQuery"]])


def test_gpu_and_cpu_scheduling(case: tuple[dict[str, Any], Objects]) -> None:
    values, objects = case
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    limits = server_container(objects)["resources"].get("limits", {})
    if values["gpu"]["enabled"]:
        assert limits["nvidia.com/gpu"] == 1
        assert pod["nodeSelector"]["nvidia.com/gpu.present"] == "true"
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    else:
        assert "nvidia.com/gpu" not in limits
        assert "nodeSelector" not in pod and "tolerations" not in pod
    assert server_container(objects)["resources"]["requests"]["cpu"]


def test_non_root_read_only_with_writable_caches(case: tuple[dict[str, Any], Objects]) -> None:
    _, objects = case
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    container = server_container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in (env["CONVOY_CACHE_DIR"], env["HOME"], "/tmp"):
        mount = mounts[path]
        assert not mount.get("readOnly") and "emptyDir" in volumes[mount["name"]]
    args = serve_args(objects)
    # The repository is mounted read-only, so rollout state must live on a writable mount.
    assert mounts[str(args.model_repository)]["readOnly"] is True
    assert str(args.rollout_state_dir).startswith(env["CONVOY_CACHE_DIR"] + "/")


def test_tls_and_token_secrets_are_mounted_when_enabled(
    case: tuple[dict[str, Any], Objects],
) -> None:
    values, objects = case
    container = server_container(objects)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    args = serve_args(objects)
    secrets = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    if values["tls"]["enabled"]:
        assert "convoy-tls" in secrets
        mounts = [m["mountPath"] for m in container["volumeMounts"]]
        assert str(args.tls_cert.parent) in mounts and str(args.tls_key.parent) in mounts
    else:
        assert args.tls_cert is None and not secrets
    assert args.auth_tokens is None

    values = values_for("none", False, True)
    values["tls"]["mutual"] = True
    values["auth"] = {"enabled": True, "secretName": "convoy-tokens", "rateLimit": 50}
    objects = render(values)
    args = serve_args(objects)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v} == {
        "convoy-tls",
        "convoy-tokens",
    }
    assert args.tls_ca is not None and args.auth_tokens is not None and args.rate_limit == 50
    assert "tls.key" in server_container(objects)["readinessProbe"]["exec"]["command"][-1]

    # Mutual TLS probes present a client certificate of their own where one is given.
    values["tls"]["probeClientSecretName"] = "convoy-probe-client"
    objects = render(values)
    container = server_container(objects)
    paths = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert paths["probe-client"] in container["livenessProbe"]["exec"]["command"][-1]


def test_connection_age_flag_reaches_the_server() -> None:
    objects = render(values_for("hpa", True, False))
    assert serve_args(objects).max_connection_age_ms == 30000
    values = values_for("hpa", True, False)
    values["server"] = {"maxConnectionAgeMs": 0}
    assert serve_args(render(values)).max_connection_age_ms == 0


def test_front_ends_get_a_memory_backed_dev_shm_that_holds_their_segments() -> None:
    """A container's own /dev/shm is often 64 MiB: the chart mounts a memory-backed one
    sized by value, and passes the front ends' count and segment size to the server."""
    values = values_for("hpa", True, False)
    values["server"] = {"frontends": 4, "frontendShmMiB": 32}
    values["cache"] = {"shmSizeLimit": "512Mi"}
    objects = render(values)
    args = serve_args(objects)
    assert args.frontends == 4 and args.frontend_shm_mib == 32
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in server_container(objects)["volumeMounts"]}
    shm = {v["name"]: v for v in pod["volumes"]}[mounts["/dev/shm"]]["emptyDir"]
    assert shm == {"medium": "Memory", "sizeLimit": "512Mi"}
    defaults = serve_args(render(values_for("hpa", True, False)))
    assert defaults.frontends == 0 and defaults.frontend_shm_mib == 16


@pytest.mark.parametrize(
    "repository",
    [
        {"source": "configMap", "configMap": {"name": "tiny-repo", "items": [
            {"key": "config.pbtxt", "path": "tiny/config.pbtxt"},
            {"key": "model.pt", "path": "tiny/1/model.pt"},
        ]}},
        {"source": "initContainer", "initContainer": {
            "image": "amazon/aws-cli:2.17.0",
            "args": ["s3", "sync", "s3://models/prod", "/models"],
        }},
    ],
    ids=["configMap", "initContainer"],
)  # fmt: skip
def test_model_repository_sources(repository: dict[str, Any]) -> None:
    values = values_for("hpa", True, False)
    values["modelRepository"] = repository
    objects = render(values)
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) not in CRD_KINDS:
            kubernetes_validate.validate(obj, KUBE_VERSIONS[-1], strict=True)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    models = next(v for v in pod["volumes"] if v["name"] == "models")
    if repository["source"] == "configMap":
        assert models["configMap"]["name"] == "tiny-repo"
        assert "initContainers" not in pod
    else:
        assert "emptyDir" in models
        (init,) = pod["initContainers"]
        assert any(
            m["name"] == "models" and m["mountPath"] == "/models" for m in init["volumeMounts"]
        )


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_installs_with_no_values_and_serves_the_examples(kube_version: str) -> None:
    """`helm install convoy deploy/helm/convoy` as a newcomer types it: no repository given,
    so no volume to name; the server builds its examples into the writable cache."""
    objects = render({}, kube_version=kube_version)
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) not in CRD_KINDS:
            kubernetes_validate.validate(obj, kube_version, strict=True)
    args = serve_args(objects)
    assert args.model_repository is None
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert "models" not in {v["name"] for v in pod["volumes"]}
    container = server_container(objects)
    assert "models" not in {m["name"] for m in container["volumeMounts"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert any(m["mountPath"] == env["CONVOY_CACHE_DIR"] for m in container["volumeMounts"])
    report = helm.lint(CHART, {}, strict=True, kube_version=f"v{kube_version}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"autoscaling": {"mdoe": "hpa"}}, "mdoe"),
        ({"autoscaling": {"mode": "vpa"}}, "mode"),
        ({"replicas": 3}, "replicas"),
        ({"server": {"gracePeriodSeconds": "30s"}}, "gracePeriodSeconds"),
        ({"modelRepository": {"source": "pvc", "pvc": {"claimName": ""}}}, "claimName"),
        ({"tls": {"enabled": True}}, "secretName"),
    ],
    ids=["typo", "unknown-mode", "unknown-top-level", "wrong-type", "no-claim", "tls-no-secret"],
)
def test_schema_rejects_mistakes(values: dict[str, Any], error: str) -> None:
    merged = values_for("hpa", True, False)
    for key, value in values.items():
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    with pytest.raises(helm.HelmValuesError, match=re.escape(error)):
        render(merged)


def test_lint_is_clean() -> None:
    report = helm.lint(
        CHART,
        values_for("hpa", True, False),
        strict=True,
        kube_version=f"v{KUBE_VERSIONS[-1]}",
    )
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
