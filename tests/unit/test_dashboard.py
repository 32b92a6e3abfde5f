"""The Grafana dashboard (charts/clearcri/dashboards/clearcri.json): every PromQL query
names only metrics the daemon exports.

The exported names come from the daemon's own metrics code, not from a list: the
registry ``RuntimeMetrics`` builds, with the scrape-time collector registered by
``MetricsExporter`` as the daemon does it, rendered for a fake runtime (two pod VMs, a
container image, fake /proc and KSM files) after one event of every kind, so every
family has samples; the names are those of the samples in the exposition text, with
the suffixes the client library adds (``_total``, ``_bucket``, ``_sum``, ``_count``,
``_created``). The queries are read by a small PromQL tokenizer below; where the PromQL
parser package is installed, its syntax tree must agree with the tokenizer."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.protocol import ContainerStats
from cri.metrics import PAGE_SIZE, MetricsExporter, RuntimeCollector, RuntimeMetrics
from cri.runtime.state import RUNNING
from sandbox.api import BaseStandby, BootTimes, PoolReport
from tests.unit.test_metrics import (
    IMAGE_ID,
    FakeImage,
    FakeImages,
    FakeMachine,
    FakeRecords,
    FakeRuntime,
    FakeSandbox,
    container_record,
    fake_ksm,
    fake_proc,
    pod_record,
)

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "charts" / "clearcri" / "dashboards" / "clearcri.json"

# -- a small PromQL tokenizer -----------------------------------------------------------

#: Aggregation operators: an identifier that names one is never a metric, even when
#: ``by (...)`` or ``without (...)`` stands between it and its parenthesis.
AGGREGATIONS = frozenset(
    {
        "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
        "bottomk", "topk", "quantile", "limitk", "limit_ratio",
    }
)  # fmt: skip
#: Keywords followed by a list of label names in parentheses.
LABEL_LISTS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
#: Other words of the language that are not metric names.
KEYWORDS = frozenset({"bool", "and", "or", "unless", "offset", "atan2", "inf", "nan"})

IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
NUMBER_OR_DURATION = re.compile(r"(0[xX][0-9a-fA-F]+|[0-9.]+([eE][+-]?[0-9]+)?[A-Za-z0-9]*)")
GRAFANA_VARIABLE = re.compile(r"\$(\{[^}]*\}|[A-Za-z0-9_]+)")
NAME_MATCHER = re.compile(r"""__name__\s*(=~|!=|!~|=)\s*(["'`])((?:\\.|(?!\2).)*)\2""")


class PromqlError(ValueError):
    """A query the tokenizer cannot read (unbalanced brackets, an open string, a
    metric name given by a pattern)."""


def _string_end(expr: str, start: int) -> int:
    """Index after the string literal opening at ``start`` ("...", '...' or `...`)."""
    quote = expr[start]
    i = start + 1
    while i < len(expr):
        if expr[i] == "\\" and quote != "`":
            i += 2
            continue
        if expr[i] == quote:
            return i + 1
        i += 1
    raise PromqlError(f"unterminated string at {start} in {expr!r}")


def _closing(expr: str, start: int) -> int:
    """Index of the bracket that closes the one at ``start`` (strings skipped)."""
    pairs = {"(": ")", "[": "]", "{": "}"}
    stack = [pairs[expr[start]]]
    i = start + 1
    while i < len(expr):
        c = expr[i]
        if c in "\"'`":
            i = _string_end(expr, i)
            continue
        if c in pairs:
            stack.append(pairs[c])
        elif c in ")]}":
            if c != stack.pop():
                raise PromqlError(f"mismatched {c!r} at {i} in {expr!r}")
            if not stack:
                return i
        i += 1
    raise PromqlError(f"unclosed {expr[start]!r} at {start} in {expr!r}")


def _names_in_matchers(body: str) -> set[str]:
    """Metric names given inside ``{...}`` as ``__name__="..."``."""
    names = set()
    for op, _, value in NAME_MATCHER.findall(body):
        if op != "=":
            raise PromqlError(f"a metric name matched by {op}{value!r} cannot be checked")
        names.add(value)
    return names


def _next_char(expr: str, i: int) -> str:
    while i < len(expr) and expr[i].isspace():
        i += 1
    return expr[i] if i < len(expr) else ""


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects.

    Skipped: string literals, label matchers in ``{}`` (but ``__name__="x"`` there is a
    name), ranges and subquery steps in ``[]``, label lists after ``by``, ``without``,
    ``on``, ``ignoring``, ``group_left`` and ``group_right``, numbers and durations,
    Grafana variables (``$name``, ``${name}``), keywords and aggregation operators,
    and every identifier followed by ``(`` (a function). What is left of the
    identifiers are metric names."""
    names: set[str] = set()
    depth = 0  # open parentheses
    i = 0
    while i < len(expr):
        c = expr[i]
        if c in "\"'`":
            i = _string_end(expr, i)
        elif c == "{":
            end = _closing(expr, i)
            names |= _names_in_matchers(expr[i + 1 : end])
            i = end + 1
        elif c == "[":
            i = _closing(expr, i) + 1
        elif c in "()":
            depth += 1 if c == "(" else -1
            if depth < 0:
                raise PromqlError(f"unopened ')' at {i} in {expr!r}")
            i += 1
        elif c in "]}":
            raise PromqlError(f"unopened {c!r} at {i} in {expr!r}")
        elif c == "$":
            match = GRAFANA_VARIABLE.match(expr, i)
            if match is None:
                raise PromqlError(f"stray $ at {i} in {expr!r}")
            i = match.end()
        elif c.isdigit() or (c == "." and expr[i + 1 : i + 2].isdigit()):
            match = NUMBER_OR_DURATION.match(expr, i)
            assert match is not None
            i = match.end()
        elif c.isalpha() or c in "_:":
            match = IDENTIFIER.match(expr, i)
            assert match is not None
            word, i = match.group(), match.end()
            lowered = word.lower()
            following = _next_char(expr, i)
            if lowered in LABEL_LISTS:
                if following == "(":
                    i = _closing(expr, expr.index("(", i)) + 1
            elif lowered in AGGREGATIONS or lowered in KEYWORDS:
                pass
            elif following == "(":
                pass  # a function call
            else:
                names.add(word)
        else:
            i += 1  # operators, commas, blanks
    if depth:
        raise PromqlError(f"unclosed '(' in {expr!r}")
    return names


LABEL_VALUES = re.compile(r"^\s*label_values\((?P<args>.*)\)\s*$", re.DOTALL)
QUERY_RESULT = re.compile(r"^\s*query_result\((?P<expr>.*)\)\s*$", re.DOTALL)


def variable_metric_names(query: str) -> set[str]:
    """Metric names of a Grafana Prometheus variable query: ``label_values(selector,
    label)``, ``label_values(label)``, ``query_result(expr)``; ``label_names()`` and
    ``metrics(regex)`` select none."""
    if match := LABEL_VALUES.match(query):
        selector, comma, _label = match["args"].rpartition(",")
        return metric_names(selector) if comma else set()
    if match := QUERY_RESULT.match(query):
        return metric_names(match["expr"])
    return set()


# -- the dashboard ----------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """``(where, PromQL)`` of every panel target and variable query."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} target {target['refId']}", target["expr"]


def variable_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        yield f"variable {variable['name']}", query if isinstance(query, str) else query["query"]


def unknown_metrics(dashboard: dict[str, Any], exported: set[str]) -> dict[str, set[str]]:
    """``{where: names not exported}`` for every query naming a metric not in ``exported``."""
    unknown = {}
    found = [(w, metric_names(q)) for w, q in queries(dashboard)]
    found += [(w, variable_metric_names(q)) for w, q in variable_queries(dashboard)]
    for where, names in found:
        if missing := names - exported:
            unknown[where] = missing
    return unknown


# -- what the daemon exports ------------------------------------------------------------


async def exported_families(tmp_path: Path) -> dict[str, set[str]]:
    """``{family: sample names}`` of one scrape of the daemon's registry, every kind of
    event having happened once."""
    os_image = tmp_path / "os.img"
    os_image.write_bytes(b"\0" * (16 * PAGE_SIZE))
    images = FakeImages(tmp_path / "rootfs", [FakeImage(IMAGE_ID, ("busybox:1",), "img1")])
    images.root.mkdir()
    images.rootfs_path(IMAGE_ID).write_bytes(b"\0" * (8 * PAGE_SIZE))
    images.stats.blob_bytes = 4096
    proc = tmp_path / "proc"
    fake_proc(proc, 101, pss_kib=50_000, anon_kib=40_000, ticks=150)
    fake_proc(proc, 102, pss_kib=60_000, anon_kib=45_000, ticks=300)
    records = FakeRecords()
    records.pods["p1"] = pod_record("p1", "web")
    records.pods["p2"] = pod_record("p2", "db")
    records.containers["c1"] = container_record("c1", "p1", RUNNING)
    machine = FakeMachine(os_image)
    sandboxes = {
        "p1": FakeSandbox("p1", 101, machine, {0: "img1"}, containers=[ContainerStats(id="c1")]),
        "p2": FakeSandbox("p2", 102, machine, {0: "img1"}),
    }
    runtime = FakeRuntime(records, sandboxes, images)
    collector = RuntimeCollector(
        proc=proc, ksm_dir=fake_ksm(tmp_path / "ksm"), resident=lambda p: 4 * PAGE_SIZE
    )
    metrics = RuntimeMetrics()
    standby = PoolReport(
        (BaseStandby(vcpus=1, memory_mib=256, target=1, pids=(102,)),), taken=3, missed=1
    )
    # registers the collector
    exporter = MetricsExporter(metrics, runtime, collector, standby=lambda: standby)
    metrics.observe_cri("RunPodSandbox", "OK", 0.5)
    metrics.observe_cri("ContainerStatus", "NOT_FOUND", 0.001)
    metrics.sandbox_started("p1", BootTimes(vmm_spawn=0.05, restore=0.02, agent_ready=0.4), 0.6)
    metrics.sandbox_started("p2", BootTimes(vmm_spawn=0.05, kernel=1.2, agent_ready=1.4), 3.0)
    metrics.container_phases({"image_attach": 0.5, "crun_create": 0.6, "agent_create": 1.2})
    metrics.container_started("p1", 0.05)
    metrics.vm_crashed("qemu exited")
    metrics.image_pulled(True, 1.5)
    body, _ = await exporter.render()
    return {
        family.name: {sample.name for sample in family.samples}
        for family in text_string_to_metric_families(body.decode())
    }


@pytest.fixture
async def families(tmp_path: Path) -> dict[str, set[str]]:
    return await exported_families(tmp_path)


@pytest.fixture
def exported(families: dict[str, set[str]]) -> set[str]:
    return set[str]().union(*families.values())


# -- tests ------------------------------------------------------------------------------


def test_every_metric_family_has_samples_in_the_fake_scrape(
    families: dict[str, set[str]],
) -> None:
    # otherwise a family the fake world leaves empty would hide its names from the check
    assert {name for name, samples in families.items() if not samples} == set()
    assert len(families) >= 30


def test_exported_names_carry_the_client_suffixes(exported: set[str]) -> None:
    assert "clearcri_cri_requests_total" in exported
    assert "clearcri_cri_requests" not in exported
    for suffix in ("_bucket", "_sum", "_count"):
        assert f"clearcri_sandbox_boot_seconds{suffix}" in exported
    assert "clearcri_sandbox_boot_seconds" not in exported
    assert {"clearcri_sandbox_memory_pss_bytes", "clearcri_ksm_saved_bytes"} <= exported
    assert {"clearcri_vm_crashes_total", "clearcri_shared_image_saved_bytes"} <= exported


def test_every_query_names_only_exported_metrics(exported: set[str]) -> None:
    dashboard = load_dashboard()
    assert unknown_metrics(dashboard, exported) == {}
    used = set[str]().union(*(metric_names(q) for _, q in queries(dashboard)))
    assert len(used) >= 20  # the dashboard's queries were read, not skipped


def test_a_query_naming_a_metric_the_daemon_lacks_fails(exported: set[str]) -> None:
    dashboard = load_dashboard()
    bad = copy.deepcopy(dashboard)
    target = bad["panels"][-1]["targets"][0]
    # the family name without the _total the client adds, and a name never exported
    target["expr"] = 'sum(rate(clearcri_vm_crashes{instance=~"$instance"}[5m])) + clearcri_pod_vms'
    where = f"panel {bad['panels'][-1]['title']!r} target {target['refId']}"
    assert unknown_metrics(bad, exported) == {where: {"clearcri_vm_crashes", "clearcri_pod_vms"}}
    variable = next(v for v in bad["templating"]["list"] if v["type"] == "query")
    variable["query"]["query"] = "label_values(clearcri_nodes, instance)"
    assert unknown_metrics(bad, exported)[f"variable {variable['name']}"] == {"clearcri_nodes"}


def test_kubelet_figures_are_not_on_the_metrics_endpoint(exported: set[str]) -> None:
    # the cAdvisor-style names go to kubelet through CRI (ListPodSandboxMetrics)
    assert "container_memory_working_set_bytes" not in exported
    assert "clearcri_pod_memory_pss_bytes" not in exported


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        (
            'sum by (le, phase) (rate(a_bucket{phase!="x", le=~"0.5|1"}[$__rate_interval]))',
            {"a_bucket"},
        ),
        ("histogram_quantile(0.99, sum without (pod) (rate(b_bucket[5m])))", {"b_bucket"}),
        ("a / on (instance) group_left (pod) b", {"a", "b"}),
        ("a - ignoring(kind) b and bool c or d unless e", {"a", "b", "c", "d", "e"}),
        ("topk(5, x) > bool 1e3", {"x"}),
        ('count_values by (v) ("v", y)', {"y"}),
        ("max_over_time(z[1h:5m] offset 30m) * 2.5", {"z"}),
        ('label_replace(m, "dst", "$1", "src", "(.*)")', {"m"}),
        ('{__name__="by_name", job="j"} + sum(rate(q[${interval}]))', {"by_name", "q"}),
        ('sum by (instance) (n{instance=~"$instance"}) / count(n) * inf', {"n"}),
        ("vector(1) + time() - scalar(s) + 0x1F + .5", {"s"}),
        ('sum by (code) (rate(r{code!="OK", m="a}b"}[$__range]))', {"r"}),
    ],
)
def test_tokenizer(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


@pytest.mark.parametrize(
    "expr",
    ["sum(rate(x[5m])", "x)", 'x{a="b}', "x}", '{__name__=~"clearcri_.*"}', "rate(x[5m)]"],
)
def test_tokenizer_refuses_what_it_cannot_read(expr: str) -> None:
    with pytest.raises(PromqlError):
        metric_names(expr)


def test_variable_queries() -> None:
    assert variable_metric_names('label_values(a{x=~"$y"}, namespace)') == {"a"}
    assert variable_metric_names("label_values(instance)") == set()
    assert variable_metric_names("query_result(topk(3, b))") == {"b"}
    assert variable_metric_names("metrics(clearcri_.*)") == set()


def test_the_promql_parser_agrees() -> None:
    """Every query is valid PromQL once Grafana's variables are filled in, and selects
    the metrics the tokenizer found."""
    promql: Any = pytest.importorskip("promql_parser", reason="pip install promql-parser")
    fill = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "6h"}

    def parsed_names(query: str) -> set[str]:
        for variable, value in fill.items():
            query = query.replace(variable, value)
        query = GRAFANA_VARIABLE.sub(".*", query)  # only inside regex matchers here
        names: set[str] = set()

        def visit(node: Any) -> None:
            if isinstance(node, promql.VectorSelector):
                if node.name:
                    names.add(node.name)
                for matcher in node.matchers.matchers:
                    if matcher.name == "__name__":
                        names.add(matcher.value)

        promql.walk(promql.parse(query), pre_visit=visit)
        return names

    for where, query in queries(load_dashboard()):
        assert parsed_names(query) == metric_names(query), where


def test_dashboard_is_wired_to_its_variables() -> None:
    dashboard = load_dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["type"] == "query"
    assert variables["instance"]["multi"] and variables["instance"]["includeAll"]
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    assert "__inputs" not in dashboard  # loads through the sidecar as it is
    for where, query in queries(dashboard):
        assert 'instance=~"$instance"' in query, where
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
    # one selector per metric in a query, every one filtered by node
    for where, query in queries(dashboard):
        selectors = re.findall(r"\b(clearcri_[a-z_]+)(\{[^}]*\})?", query)
        assert all(sel for _, sel in selectors), where
        assert all("$instance" in sel for _, sel in selectors), where


def test_dashboard_covers_the_issue() -> None:
    """Boot phases, pod start, PSS per pod, DAX and KSM savings, CRI latency and
    errors, VM crashes: each has a panel over the metric that answers it."""
    used = {name for _, q in queries(load_dashboard()) for name in metric_names(q)}
    assert {
        "clearcri_sandbox_boot_seconds_bucket",
        "clearcri_sandbox_start_seconds_bucket",
        "clearcri_container_start_seconds_bucket",
        "clearcri_container_phase_seconds_sum",
        "clearcri_sandbox_memory_pss_bytes",
        "clearcri_shared_image_saved_bytes",
        "clearcri_ksm_saved_bytes",
        "clearcri_cri_request_duration_seconds_bucket",
        "clearcri_cri_requests_total",
        "clearcri_vm_crashes_total",
        "clearcri_jit_flushes_total",
    } <= used
