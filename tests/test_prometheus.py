"""The Grafana dashboard and the alert rules against a real Prometheus scraping real pytunnels.

Debian's `prometheus` scrapes two pytunnel processes every second while traffic flows: one
serves a certificate that expires tomorrow and churns connections whose handshakes fail, and
has a reload fail; the other is draining (SIGTERM with a long pre-drain delay), so it is not
ready.  Then every expression of deploy/grafana/pytunnel.json (its variables' queries too)
and every alert expression of deploy/prometheus/alerts.yaml goes through Prometheus' HTTP
API and must return data: a typo'd metric or label name returns nothing and fails here.
Prometheus also loads the rules itself: each evaluates without error, and every alert ends
up pending or firing.
"""

from __future__ import annotations

import datetime
import json
import re
import signal
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, Certs, EchoServer, TunnelFactory, need_tool
from monitoring_support import Traffic, poll, start_with_status

DASHBOARD = ROOT / "deploy" / "grafana" / "pytunnel.json"
RULES = ROOT / "deploy" / "prometheus" / "alerts.yaml"
LABEL_VALUES = re.compile(r"label_values\((.+),\s*(\w+)\)$")
BY = re.compile(r"\bby\s*\(([^)]*)\)")
TEMPLATE_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")
ANNOTATION_LABEL = re.compile(r"\$labels\.(\w+)")
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def dashboard() -> dict[str, Any]:
    doc = json.loads(DASHBOARD.read_text())
    assert isinstance(doc, dict)
    return doc


Query = tuple[str, str, set[str]]  # where, expression, labels every result must carry


def grouped_by(expr: str) -> set[str]:
    """The labels of every ``by (...)`` clause (``le`` is consumed by histogram_quantile)."""
    return {label.strip() for group in BY.findall(expr) for label in group.split(",")} - {"le", ""}


def dashboard_queries() -> list[Query]:
    """Every panel target (with the labels its legend names) and every query variable."""
    out = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            labels = grouped_by(target["expr"]) | set(TEMPLATE_LABEL.findall(target.get("legendFormat", "")))
            out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"], labels))
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            m = LABEL_VALUES.match(var["query"]["query"])
            assert m, var["query"]["query"]
            out.append((f"variable ${var['name']}", m.group(1), {m.group(2)}))
    return out


def alert_queries() -> list[Query]:
    """Every alert's expression, with the labels its annotations name ($labels.service, ...)."""
    rules = yaml.safe_load(RULES.read_text())
    out = []
    for rule in (r for g in rules["groups"] for r in g["rules"] if "alert" in r):
        named = set(ANNOTATION_LABEL.findall(" ".join(rule["annotations"].values())))
        out.append((f"alert {rule['alert']}", rule["expr"], grouped_by(rule["expr"]) | named))
    return out


class Prometheus:
    def __init__(self, binary: str, workdir: Path, targets: list[str]) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.address = f"127.0.0.1:{s.getsockname()[1]}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "pytunnel", "static_configs": [{"targets": targets}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = workdir / "prometheus.log"
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address={self.address}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )

    def get(self, path: str, **params: str) -> Any:
        url = f"http://{self.address}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with _OPENER.open(url, timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())

    def ready(self) -> bool:
        assert self.proc.poll() is None, f"prometheus exited:\n{self.log.read_text()}"
        try:
            with _OPENER.open(f"http://{self.address}/-/ready", timeout=5) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = self.get("/api/v1/query", query=expr)
        assert answer["status"] == "success", f"{expr}: {answer.get('error')}"
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def prometheus_binary() -> str:
    return need_tool("prometheus", "prometheus")


@pytest.fixture
def near_expiry(certs: Certs, tmp_path: Path) -> Path:
    """A server certificate from the session CA that expires tomorrow."""
    path = tmp_path / "tomorrow.pem"
    tomorrow = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)
    leaf = certs.ca.issue_cert("localhost", "127.0.0.1", not_after=tomorrow)
    leaf.private_key_and_cert_chain_pem.write_to_path(str(path))
    return path


@pytest.fixture
def traffic(certs: Certs) -> Iterator[Traffic]:
    load = Traffic(certs.ca_pem)
    yield load
    load.stop()


def substitute(expr: str, instances: list[str]) -> str:
    """Grafana's variables as a person picking "All" would have them, for this Prometheus."""
    values = {
        "$__rate_interval": "10s",
        "$__range": "5m",
        "$job": "pytunnel",
        "$instance": "|".join(instances),
        "$service": "webfront|mailgw|spare",
    }
    for name, value in values.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"an unknown variable in {expr}"
    return expr


@pytest.mark.timeout(300)  # Prometheus' start and a few scrapes, on a loaded machine
def test_every_dashboard_and_alert_expression_returns_data(
    tunnels: TunnelFactory,
    certs: Certs,
    echo: EchoServer,
    tmp_path: Path,
    prometheus_binary: str,
    near_expiry: Path,
    traffic: Traffic,
) -> None:
    services = {"webfront": near_expiry, "mailgw": certs.server_pem}
    text = "".join(
        f"[{name}]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {cert}\n"
        for name, cert in services.items()
    )
    conf = tunnels.conf(text)
    a, addr_a = start_with_status(tunnels, conf)
    b, addr_b = start_with_status(
        tunnels,
        f"[spare]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n",
        PYTUNNEL_PRE_DRAIN_DELAY="600",
    )
    traffic.stream(a.port("webfront"))
    traffic.churn(a.port("mailgw"))
    prom = Prometheus(prometheus_binary, tmp_path, [addr_a, addr_b])
    try:
        poll("prometheus ready", prom.ready)
        # both targets scraped, the failure counter seen at 0 before a reload fails
        poll("both targets up", lambda: len(prom.query("up == 1")) == 2 or None)
        failed = f'pytunnel_reloads_total{{instance="{addr_a}", result="failure"}} == 0'
        poll("the reload-failure counter at 0", lambda: prom.query(failed) or None)
        conf.write_text(conf.read_text() + "no_such_option = 1\n")
        a.signal(signal.SIGHUP)
        a.wait_for("Failed to reload the configuration file")
        b.signal(signal.SIGTERM)
        b.wait_for(r"Not ready \(/readyz 503\)")

        queries = dashboard_queries() + alert_queries()
        missing = {where: (substitute(expr, [addr_a, addr_b]), labels) for where, expr, labels in queries}
        found: dict[str, int] = {}

        def evaluate() -> bool:
            for where, (expr, labels) in list(missing.items()):
                result = prom.query(expr)
                if result:
                    for series in result:  # a typo'd label in by (...) or a legend: absent here
                        assert labels <= set(series["metric"]), f"{where}: {series['metric']} lacks {labels}"
                    found[where] = len(result)
                    del missing[where]
            return not missing

        try:
            poll("every expression to return data", evaluate, timeout=120, every=1.0)
        finally:
            for where, count in found.items():
                print(f"  {count:3d} series  {where}")
        assert not missing, f"no data: {json.dumps(missing, indent=1)}"
        assert len(found) == len(queries) >= 20

        def every_alert_active() -> set[str] | None:
            active = {x["labels"]["alertname"] for x in prom.get("/api/v1/alerts")["data"]["alerts"]}
            return active if active >= {where.split()[1] for where, _, _ in alert_queries()} else None

        print("alerts pending or firing:", sorted(poll("every alert pending or firing", every_alert_active)))
        groups = prom.get("/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert len(rules) == len(alert_queries())
        assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    finally:
        prom.close()
        traffic.stop()
    assert b.stop() == 0
    assert a.stop() == 0


def test_dashboard_is_well_formed() -> None:
    doc = dashboard()
    assert doc["uid"] == "pytunnel" and doc["title"] == "pytunnel"
    names = [v["name"] for v in doc["templating"]["list"]]
    assert names == ["datasource", "job", "instance", "service"]
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = " / ".join(p["title"] for p in doc["panels"])
    for wanted in (
        "Connections",
        "Active",
        "Bytes",
        "failures",
        "Handshake time",
        "certificate",
        "Reloads",
        "Ready",
    ):
        assert wanted in titles, f"no panel about {wanted}: {titles}"
    for panel in doc["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            uses = set(re.findall(r"\$(\w+)", target["expr"]))
            assert uses <= {"job", "instance", "service", "__rate_interval", "__range"}, uses
            assert {"job", "instance"} <= uses, f"{panel['title']}: ignores the instance selector"
