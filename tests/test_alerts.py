"""The alerting rules (deploy/prometheus/alerts.yaml): promtool checks them and runs their unit
tests (alerts.test.yaml), every alert has a firing and a quiet case there, and the Kubernetes
PrometheusRule carries the same groups.  That each expression finds real series in a real
pytunnel's metrics is tests/test_prometheus.py's job.

promtool comes with Debian's `prometheus` package (.ci/run installs it).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml
from conftest import ROOT, need_tool

RULES_DIR = ROOT / "deploy" / "prometheus"
RULES = RULES_DIR / "alerts.yaml"
UNIT_TESTS = RULES_DIR / "alerts.test.yaml"
OPERATOR_RULE = ROOT / "deploy" / "kubernetes" / "components" / "prometheusrule" / "prometheusrule.yaml"


def _yaml(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict)
    return doc


def alerts() -> list[dict[str, Any]]:
    return [rule for group in _yaml(RULES)["groups"] for rule in group["rules"] if "alert" in rule]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = need_tool("promtool", "prometheus")
    return subprocess.run([binary, *args], capture_output=True, text=True, cwd=RULES_DIR, timeout=120)


def test_promtool_check_rules() -> None:
    done = promtool("check", "rules", RULES.name)
    print(done.stdout, done.stderr)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in done.stdout


def test_promtool_unit_tests_pass() -> None:
    done = promtool("test", "rules", UNIT_TESTS.name)
    print(done.stdout, done.stderr)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    cases = [case for test in _yaml(UNIT_TESTS)["tests"] for case in test.get("alert_rule_test", [])]
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names)) == 5, names
    for name in names:
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case.get("exp_alerts") for case in mine), f"{name}: no case where it fires"
        assert any(not case.get("exp_alerts") for case in mine), f"{name}: no case where it stays quiet"
    assert {case["alertname"] for case in cases} <= set(names), "a unit test names an alert that is gone"


def test_every_alert_says_how_bad_and_what() -> None:
    for rule in alerts():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
        assert rule["alert"].startswith("Pytunnel"), rule["alert"]


def test_the_prometheusrule_carries_the_same_groups() -> None:
    operator = _yaml(OPERATOR_RULE)
    assert (operator["apiVersion"], operator["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert set(operator["spec"]) == {"groups"}
    assert operator["spec"]["groups"] == _yaml(RULES)["groups"], (
        f"{OPERATOR_RULE.relative_to(ROOT)} drifted from {RULES.relative_to(ROOT)}: copy the groups over"
    )


def test_the_connection_cap_alert_waits_for_the_cap() -> None:
    """maxConnections does not exist yet: no alert pretends it does, and the docs say so."""
    assert "maxConnections" not in "".join(str(rule["expr"]) for rule in alerts())
    assert "maxConnections" in (ROOT / "docs" / "metrics.md").read_text()
