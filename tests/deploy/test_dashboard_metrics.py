"""The Grafana dashboard and the alert rules use only metrics the running services export.

Checked against a live ``/metrics`` scrape of a real master and pupil (``live_swarm`` in
``tests/support/live_swarm.py``), never against a hand-kept list: renaming a metric in
``shared/metrics.py`` without updating the dashboard, the alerts or docs/deployment.md fails here.
Histograms are exported as ``_bucket``/``_sum``/``_count`` series, and PromQL must name those, so
names are compared with the scrape's sample names, suffixes included.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.live_swarm import LivePrometheus, LiveSwarm, exported_metrics, exported_series

pytestmark = [pytest.mark.models, pytest.mark.broker]

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "distill-swarm.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DEPLOYMENT_DOC = ROOT / "docs" / "deployment.md"

# Series Prometheus makes itself for every target; no service exports them.
SYNTHETIC = {"up"}
# PromQL words that look like identifiers but name no metric.
KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
LABEL_LISTS = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
# Grafana's variables, with values a Prometheus accepts, for running the dashboard's queries.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$node": ".*"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = LABEL_LISTS.sub("", expr)  # label lists of aggregations and vector matching
    expr = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana variables
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if expr[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if match.group(0).lower() not in KEYWORDS:
            names.add(match.group(0))
    return names


def test_metric_names_are_found_in_promql() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, node) (rate(a_bucket{node=~"$node"}[5m])))'
        ' / on(node) group_left(x) b and time() - c{x="y"} > 180 and up == 0'
    )
    assert metric_names(expr) == {"a_bucket", "b", "c", "up"}


def _walk(node: Any, key: str) -> list[Any]:
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                found.append(v)
            found.extend(_walk(v, key))
    elif isinstance(node, list):
        for item in node:
            found.extend(_walk(item, key))
    return found


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard's panels."""
    exprs = [e for e in _walk(json.loads(DASHBOARD.read_text()), "expr") if isinstance(e, str)]
    assert exprs, "the dashboard has no queries"
    return exprs


def dashboard_variable_metrics() -> set[str]:
    """Metrics the dashboard's template variables read (``label_values(metric, label)``)."""
    variables = json.loads(DASHBOARD.read_text())["templating"]["list"]
    found = set()
    for variable in variables:
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        found.update(re.findall(r"label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,", text))
    return found


def alert_queries() -> list[str]:
    """Every alert rule's expression."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    exprs = [str(rule["expr"]) for group in groups for rule in group["rules"]]
    assert exprs, "alerts.yml has no rules"
    return exprs


@pytest.fixture(scope="module")
def exported(live_swarm: LiveSwarm) -> set[str]:
    """Series names the live master and pupil export right now."""
    return exported_series(live_swarm.master_metrics()) | exported_series(
        live_swarm.pupil_metrics()
    )


@pytest.mark.parametrize(
    ("source", "queries"),
    [("dashboard", dashboard_queries), ("alerts", alert_queries)],
)
def test_every_metric_used_is_exported(exported: set[str], source: str, queries: Any) -> None:
    used = set().union(*(metric_names(q) for q in queries()))
    if source == "dashboard":
        used |= dashboard_variable_metrics()
    missing = used - exported - SYNTHETIC
    assert not missing, f"{source} uses metrics no live service exports: {sorted(missing)}"
    assert any(name.startswith("distill_swarm_") for name in used)


def test_quantiles_are_computed_from_histogram_buckets() -> None:
    for expr in dashboard_queries():
        for inner in re.findall(r"histogram_quantile\(([^;]*)", expr):
            names = metric_names(inner)
            assert names and all(n.endswith("_bucket") for n in names), expr


def test_every_dashboard_query_runs_on_a_real_prometheus(
    live_prometheus: LivePrometheus,
) -> None:
    for expr in dashboard_queries():
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
        live_prometheus.query(expr)  # raises unless Prometheus parsed and ran it


def test_every_exported_metric_is_documented(live_swarm: LiveSwarm) -> None:
    """docs/deployment.md's metric table names exactly the families the services export."""
    families = {
        name
        for text in (live_swarm.master_metrics(), live_swarm.pupil_metrics())
        for name in exported_metrics(text)
        if name.startswith("distill_swarm_")
    }
    documented = set(re.findall(r"^\| `(distill_swarm_\w+)`", DEPLOYMENT_DOC.read_text(), re.M))
    assert families - documented == set(), "exported but not in docs/deployment.md"
    assert documented - families == set(), "in docs/deployment.md but not exported"
