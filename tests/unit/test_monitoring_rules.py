"""monitoring/ as files: the alerts the issue asks for, with what each alert needs, the docs'
table in step with the rules, and a dashboard that covers what it must.  (promtool's own checks
and a live Prometheus: tests/integration/test_monitoring.py.)"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.paths import ROOT

RULES = ROOT / "monitoring" / "prometheus" / "xksproxy-alerts.yml"
DASHBOARD = ROOT / "monitoring" / "grafana" / "xksproxy.json"
PAGE = ROOT / "docs" / "operations" / "monitoring.md"
NO_FOR = "\u2013"  # an en dash, as the docs' table shows an alert without a `for`


@dataclass
class Alert:
    name: str
    expr: str
    duration: str  # its `for`, NO_FOR when it has none
    labels: dict[str, str]
    annotations: set[str]


def alerts() -> dict[str, Alert]:
    """The rule file's alerts, read from its own layout (the venv has no YAML parser)."""
    text = RULES.read_text()
    found: dict[str, Alert] = {}
    chunks = re.split(r"^\s*- alert: ", text, flags=re.MULTILINE)[1:]
    for chunk in chunks:
        chunk = re.split(r"^  - name: ", chunk, flags=re.MULTILINE)[0]
        name = chunk.split("\n", 1)[0].strip()
        expr_match = re.search(r"^(\s+)expr: (.*)$", chunk, re.MULTILINE)
        assert expr_match, name
        indent, first = expr_match.groups()
        if first.strip() == "|":
            rest = chunk[expr_match.end() :].split("\n")[1:]
            body = []
            for line in rest:
                if line.strip() and len(line) - len(line.lstrip()) <= len(indent):
                    break
                body.append(line.strip())
            expr = " ".join(b for b in body if b)
        else:
            expr = first.strip()
        duration = re.search(r"^\s+for: (\S+)", chunk, re.MULTILINE)
        labels_block = re.search(r"labels:\n((?:\s{10}\S.*\n)+)", chunk)
        labels = {}
        if labels_block:
            for line in labels_block.group(1).splitlines():
                key, _, value = line.strip().partition(": ")
                labels[key] = value
        annotations = set(re.findall(r"^\s{10}(summary|description|runbook):", chunk, re.M))
        found[name] = Alert(
            name, expr, duration.group(1) if duration else NO_FOR, labels, annotations
        )
    return found


# The issue's list: each alert, and what its expression must read.
REQUIRED = {
    "XksHsmUnavailable": r'xks_hsm_state\{state="UNAVAILABLE"\}',
    "XksAllHsmsDown": r"xks_hsm_state",
    "XksServerErrors": r'status=~"500\|503"',
    "XksLatencyNearBudget": r"histogram_quantile\(0\.99,.*xks_request_duration_seconds_bucket",
    "XksThrottling": r'status="429"',
    "XksSigV4FailureSpike": r"xks_auth_failures_total",
    "XksKeyCopyMismatch": r"xks_key_copy_mismatches_total",
    "XksAuditLogUnwritable": r"xks_log_writable",
    "XksTlsCertificateExpiring": r"xks_tls_certificate_expiry_timestamp_seconds\) - time\(\)",
    "XksProxyDown": r'up\{job="xksproxy"\}',
}


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_the_issue_s_alerts_are_there(name: str) -> None:
    alert = alerts()[name]
    assert re.search(REQUIRED[name], alert.expr), alert.expr


def test_the_hsm_alert_names_the_hsm() -> None:
    assert "by (job, instance, hsm)" in alerts()["XksHsmUnavailable"].expr


def test_every_alert_has_a_severity_and_its_texts() -> None:
    for alert in alerts().values():
        assert alert.labels.get("severity") in ("critical", "warning"), alert
        assert alert.annotations == {"summary", "description", "runbook"}, alert
        # Every label of the scrape stays: an alert says which proxy it is about.
        assert "instance" in alert.expr or alert.expr.startswith("up{"), alert


def docs_table() -> Iterator[tuple[str, str, str]]:
    """(alert, severity, for) of each row of the docs' table of alerts."""
    for line in PAGE.read_text().splitlines():
        row = re.match(r"^\| \[(Xks\w+)\]\(#\w+\) \| (\w+) \| (\S+) \|", line)
        if row:
            yield row.group(1), row.group(2), row.group(3)


def test_the_docs_table_lists_every_alert_as_the_rules_define_it() -> None:
    table = {name: (severity, duration) for name, severity, duration in docs_table()}
    assert table == {a.name: (a.labels["severity"], a.duration) for a in alerts().values()}


def dashboard() -> dict[str, Any]:
    model: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return model


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def exprs() -> list[str]:
    return [t["expr"] for p in panels() for t in p["targets"]]


# What the issue asks the dashboard to show, and a query that shows it.
SHOWN = {
    "request rate by API": r"sum by \(api\) \(rate\(xks_requests_total",
    "latency by API": r"sum by \(api, le\) \(rate\(xks_request_duration_seconds_bucket",
    "errors by name": r"sum by \([^)]*error_name[^)]*\) \(rate\(xks_requests_total",
    "HSM state": r"xks_hsm_state",
    "HSM call latency": r"xks_hsm_call_duration_seconds_bucket",
    "pool use": r"xks_pool_sessions",
    "pool waits": r"xks_pool_waiters",
    "time waited for a session": r"xks_pool_acquire_seconds_bucket",
    "failovers": r"xks_failovers_total",
    "throttling": r'status="429"',
}


@pytest.mark.parametrize("what", sorted(SHOWN))
def test_the_dashboard_shows(what: str) -> None:
    assert any(re.search(SHOWN[what], e) for e in exprs()), what


def test_every_panel_and_query_takes_the_data_source_variable() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]


def test_panels_fit_the_grid_without_overlapping() -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, (panel["title"], taken.get((x, y)))
                taken[(x, y)] = panel["title"]
