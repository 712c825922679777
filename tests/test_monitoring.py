"""examples/monitoring/: the Prometheus alert rules and the Grafana dashboard shipped for
operators are well-formed, and every metric they use is one pipeflow exports (checked
against a real run's registry), so they cannot drift from the metric names. With
promtool installed (Debian's `prometheus` package), the rules also pass
`promtool check rules`."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from pipeflow import CircuitBreaker, Pipeline, stage

yaml = pytest.importorskip("yaml", reason="PyYAML reads the rules file")

MONITORING = Path(__file__).resolve().parent.parent / "examples" / "monitoring"
RULES = MONITORING / "pipeflow-alerts.yml"
DASHBOARD = MONITORING / "pipeflow-dashboard.json"
#: Series Prometheus itself records for every scrape target.
PROMETHEUS_OWN = {"up"}
_DURATION = re.compile(r"^\d+(ms|s|m|h|d|w|y)$")
_METRIC = re.compile(r"\b(pipeflow_[a-z0-9_]+|up)\b")


class AckingSource:
    """The smallest acking source with statistics: what a connector exports."""

    name = "jobs"

    def __init__(self, items: list[int]) -> None:
        self.items = items

    @contextlib.asynccontextmanager
    async def _open(self) -> AsyncIterator[Any]:
        async def pairs() -> AsyncIterator[tuple[int, None]]:
            for item in self.items:
                yield item, None

        yield pairs()

    def __pipeflow_open__(self, *, capacity: int) -> Any:
        return self._open()

    def statistics(self) -> Any:
        from pipeflow._sources import SourceTotals

        return SourceTotals(acked=len(self.items))


def exported_names() -> set[str]:
    """The sample names a pipeline with every kind of metric exposes after a run."""
    registry = CollectorRegistry()

    @stage(workers=2, breaker=CircuitBreaker())
    async def work(x: int) -> int:
        return x

    Pipeline(work, name="p", registry=registry).run(AckingSource([1, 2, 3]))
    return {s.name for family in registry.collect() for s in family.samples}


def metrics_in(expr: str) -> set[str]:
    # Label values and legend templates are not metrics: drop quoted strings first.
    return set(_METRIC.findall(re.sub(r'"[^"]*"', '""', expr)))


def test_the_rules_are_well_formed_alerts_on_exported_metrics():
    """Each rule has a name, an expression on metrics pipeflow exports, a severity, a
    summary and a description; durations are Prometheus durations."""
    rules = yaml.safe_load(RULES.read_text())
    exported = exported_names() | PROMETHEUS_OWN
    names = []
    for group in rules["groups"]:
        assert group["name"].startswith("pipeflow")
        for rule in group["rules"]:
            names.append(rule["alert"])
            assert re.fullmatch(r"Pipeflow[A-Za-z]+", rule["alert"])
            used = metrics_in(rule["expr"])
            assert used, rule["alert"]
            assert set() == used - exported, rule["alert"]
            assert rule["labels"]["severity"] in {"info", "warning", "critical"}
            assert rule["annotations"]["summary"]
            assert rule["annotations"]["description"]
            if "for" in rule:
                assert _DURATION.match(rule["for"]), rule["alert"]
    assert len(names) == len(set(names))
    # What an operator of a fleet needs first: failures, stalls, dead members.
    assert {"PipeflowStageFailing", "PipeflowStageStalled", "PipeflowMembersDying"} <= set(names)


def test_the_dashboard_is_a_grafana_dashboard_on_exported_metrics():
    """Every panel queries metrics pipeflow exports, through the dashboard's own
    variables; panel ids are unique and every source metric is shown somewhere."""
    dashboard = json.loads(DASHBOARD.read_text())
    exported = exported_names()
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "pipeline", "stage"} <= variables
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    shown: set[str] = set()
    for panel in dashboard["panels"]:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        for target in panel.get("targets", []):
            used = metrics_in(target["expr"])
            assert set() == used - exported, panel["title"]
            for var in re.findall(r"\$(\w+)", target["expr"]):
                assert var in variables | {"__rate_interval"}, panel["title"]
            shown |= used
    source_metrics = {n for n in exported if n.startswith("pipeflow_source_")}
    assert source_metrics
    assert set() == source_metrics - shown


def test_promtool_accepts_the_rules():
    """`promtool check rules` (skipped only where promtool is not installed)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    done = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert 0 == done.returncode, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
