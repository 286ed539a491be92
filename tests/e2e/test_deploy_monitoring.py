"""deploy/: the Prometheus alert rules and the Grafana dashboard query what pgproxy exports.

A real proxy with the monitor on serves some traffic (queries, an error, a failed login, a
disconnect) so that every family, labelled ones included, has samples; then every metric
name in every PromQL expression of deploy/ must be among the sample names of one scrape.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from .conftest import ProxyThread
from .helpers import APP_PASSWORD, connect, conninfo, wait_for
from .test_metrics import get

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "pgproxy-alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "pgproxy-dashboard.json"

# A metric name in PromQL (string literals removed first, so that label values never count).
_METRIC = re.compile(r"(?<![A-Za-z0-9_:])pgproxy_[A-Za-z0-9_:]*")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')

SEVERITIES = {"critical", "warning", "info"}
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}


def metric_names(expr: str) -> set[str]:
    """The pgproxy_* metric names a PromQL expression (or label_values() query) reads."""
    return set(_METRIC.findall(_STRING.sub('""', expr)))


def load_rules() -> list[dict[str, object]]:
    """Every rule of the rules file, after checking the file's standard structure."""
    document = yaml.safe_load(RULES.read_text())
    assert isinstance(document, dict)
    assert set(document) == {"groups"}
    groups = document["groups"]
    assert isinstance(groups, list) and groups
    rules: list[dict[str, object]] = []
    names: set[str] = set()
    for group in groups:
        assert isinstance(group, dict)
        assert isinstance(group.get("name"), str) and group["name"] not in names, group
        names.add(group["name"])
        assert set(group) <= {"name", "interval", "rules"}, group
        assert isinstance(group["rules"], list) and group["rules"], group["name"]
        rules.extend(group["rules"])
    for rule in rules:
        assert isinstance(rule, dict)
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        alert, expr = rule.get("alert"), rule.get("expr")
        assert isinstance(alert, str) and re.fullmatch(r"[A-Za-z]\w*", alert), rule
        assert isinstance(expr, str) and expr.strip(), alert
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", str(rule["for"])), alert
        labels, annotations = rule.get("labels"), rule.get("annotations")
        assert isinstance(labels, dict) and labels.get("severity") in SEVERITIES, alert
        assert isinstance(annotations, dict), alert
        assert isinstance(annotations.get("summary"), str) and annotations["summary"], alert
        assert isinstance(annotations.get("description"), str), alert
    alerts = [rule["alert"] for rule in rules]
    assert len(alerts) == len(set(alerts)), alerts
    return rules


def dashboard_panels(panels: list[dict[str, object]]) -> Iterator[dict[str, object]]:
    """Every panel, those inside collapsed rows included."""
    for panel in panels:
        yield panel
        nested = panel.get("panels")
        if isinstance(nested, list):
            yield from dashboard_panels(nested)


def load_dashboard_exprs() -> list[str]:
    """Every PromQL expression of the dashboard, after checking its structure."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert isinstance(dashboard, dict)
    assert dashboard.get("schemaVersion", 0) >= 36
    assert dashboard.get("title") and dashboard.get("uid")
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"DS_PROMETHEUS", "instance", "database", "user"} <= set(variables)
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    exprs: list[str] = []
    for name in ("instance", "database", "user"):
        variable = variables[name]
        assert variable["type"] == "query", name
        assert variable["datasource"] == DATASOURCE, name
        query = variable["query"]
        query = query["query"] if isinstance(query, dict) else query
        assert query.startswith("label_values("), query
        exprs.append(query)
    panels = list(dashboard_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    data_panels = [panel for panel in panels if panel["type"] != "row"]  # rows only group
    assert data_panels
    for panel in data_panels:
        title = panel.get("title")
        assert title, panel
        assert panel.get("datasource") == DATASOURCE, title
        targets = panel.get("targets")
        assert isinstance(targets, list) and targets, title
        for target in targets:
            assert target.get("datasource", DATASOURCE) == DATASOURCE, title
            assert isinstance(target.get("expr"), str) and target["expr"].strip(), title
            exprs.append(target["expr"])
    return exprs


# -- the running proxy -------------------------------------------------------------------------


def exported_sample_names(proxy: ProxyThread) -> set[str]:
    reply = get(proxy.proxy.metrics_port, "/metrics")
    assert reply.status == 200, reply
    return {
        sample.name
        for family in text_string_to_metric_families(reply.body.decode())
        for sample in family.samples
    }


@pytest.fixture
def monitored(make_proxy: Callable[..., ProxyThread]) -> ProxyThread:
    return make_proxy(metrics_listen="127.0.0.1:0", monitor_interval="0.2")


def make_traffic(proxy: ProxyThread) -> None:
    """Queries, a transaction, an error, a failed login and a client disconnect."""
    with connect(proxy.port) as conn:
        for n in range(3):
            assert conn.execute("SELECT %s::int", (n,)).fetchone() == (n,)
        with conn.transaction():
            conn.execute("SELECT 1").fetchall()
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT * FROM no_such_table")
    wrong = conninfo(proxy.port, password=APP_PASSWORD + "-wrong")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong).close()


def test_every_metric_in_the_alert_rules_and_dashboard_is_exported(
    monitored: ProxyThread,
) -> None:
    rules = load_rules()
    dashboard_exprs = load_dashboard_exprs()
    make_traffic(monitored)
    # The monitor's first read, and the closed client counted, show up asynchronously.
    wanted = {
        "pgproxy_pg_monitor_up",
        "pgproxy_pg_max_connections",
        "pgproxy_pg_connections_by_application",
        "pgproxy_client_disconnects_total",
        "pgproxy_errors_total",
    }

    def complete() -> set[str] | None:
        names = exported_sample_names(monitored)
        return names if names >= wanted else None

    exported = wait_for(complete, what="the monitor's families and the disconnect")
    assert exported is not None

    referenced: dict[str, set[str]] = {}
    for rule in rules:
        expr = str(rule["expr"])
        for name in metric_names(expr):
            referenced.setdefault(name, set()).add(f"alert {rule['alert']}")
    for expr in dashboard_exprs:
        for name in metric_names(expr):
            referenced.setdefault(name, set()).add(f"dashboard: {expr}")
    assert len(referenced) >= 20, sorted(referenced)  # the regex finds names at all
    missing = {name: sorted(where) for name, where in referenced.items() if name not in exported}
    assert not missing, f"not exported by pgproxy: {missing}"
    # Every situation deploy/README.md lists still has an alert reading its family.
    alerted = {name for rule in rules for name in metric_names(str(rule["expr"]))}
    assert {
        "pgproxy_up",
        "pgproxy_pg_connections",
        "pgproxy_pg_max_connections",
        "pgproxy_longest_wait_seconds",
        "pgproxy_idle_in_transaction_longest_seconds",
        "pgproxy_pg_oldest_transaction_seconds",
        "pgproxy_login_failures_total",
        "pgproxy_client_connections_max",
        "pgproxy_pg_monitor_up",
        "pgproxy_pool_paused",
    } <= alerted
