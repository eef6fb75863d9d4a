"""Grafana dashboards and the Prometheus config against what the components really export.

The exported metric names come from the exporters themselves (the API app's ``/metrics``
after an ad request, :class:`streams.trainer.TrainerMetrics`, the joiner's and the billing
worker's registries), so a renamed metric breaks this test instead of silently emptying a
panel, and a new metric that no panel shows breaks it too.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from auction.api import create_app
from auction.auth import OPERATOR, hash_key
from auction.campaigns import CampaignService
from auction.metrics import ServingMetrics
from auction.serving import AdResponse, AdServer, ServedAd
from engine.config import load_settings
from engine.events import Impression, ScoredFeatures
from streams.trainer import TrainerMetrics

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
DASHBOARDS = sorted((CONFIGS / "grafana" / "dashboards").glob("*.json"))
OPERATOR_KEY = "op_test-dashboards-operator-key"
COST = 16
NOW = 1_800_000_000.0

# Series Prometheus adds to every scrape target, rather than any component exporting them.
PROMETHEUS_SERIES = {"up"}
TARGET_LABELS = {"job", "instance"}  # attached by Prometheus to every scraped sample

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}
_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "and", "or", "unless", "inf", "nan",
}  # fmt: skip
_SELECTOR = re.compile(
    r"(?<![\w:.])([A-Za-z_:][\w:]*)?\s*(\{[^}]*\})"  # name{matchers} or {matchers}
    r"|(?<![\w:.])([A-Za-z_:][\w:]*)"  # a bare name, function, keyword
)
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"(\d+)"')


# --------------------------------------------------------------------------- PromQL


def selectors(expr: str) -> list[tuple[str, dict[str, tuple[str, str]]]]:
    """Every ``(series name, {label: (operator, value)})`` a PromQL expression reads.

    Grafana variables, range and offset durations, grouping label lists, functions and
    keywords are not series; string literals are set aside so their contents never are.
    """
    strings: list[str] = []

    def keep(match: re.Match) -> str:
        strings.append(match[0][1:-1])
        return f'"{len(strings) - 1}"'

    expr = re.sub(r'"(?:[^"\\]|\\.)*"', keep, expr)
    expr = re.sub(r"\$\{?\w+\}?", "1m", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", expr)
    expr = re.sub(r"\boffset\s+\w+", "", expr)
    out = []
    for match in _SELECTOR.finditer(expr):
        name = match[1] or match[3]
        if match[2] is None:
            rest = expr[match.end() :].lstrip()
            call = rest.startswith("(") or re.match(r"(by|without)\b", rest)
            if call or name.lower() in _PROMQL_WORDS:
                continue
        labels = {m[1]: (m[2], strings[int(m[3])]) for m in _MATCHER.finditer(match[2] or "")}
        if name is None:
            name = labels.pop("__name__", ("=", ""))[1]
        out.append((name, labels))
    return out


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression reads."""
    return {name for name, _ in selectors(expr)}


def test_promql_parsing_finds_series_and_skips_functions_labels_and_variables():
    expr = (
        'histogram_quantile(0.99, sum by (le, route) (rate(a_seconds_bucket{route="/x",'
        'status=~"5.."}[$__rate_interval]))) / ignoring(stage) group_left sum(b_total) '
        "+ 3600 * max(c) offset 5m"
    )
    assert metric_names(expr) == {"a_seconds_bucket", "b_total", "c"}
    assert dict(selectors(expr))["a_seconds_bucket"] == {
        "route": ("=", "/x"),
        "status": ("=~", "5.."),
    }


# --------------------------------------------------------------------------- exporters


class Exported:
    """Series names (as scraped) and observed label values of one or more registries."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.families: dict[str, str] = {}  # series name -> family name
        self.labels: dict[str, dict[str, set[str]]] = {}  # family -> label -> values

    def add_registry(self, registry: CollectorRegistry) -> None:
        for family in registry.collect():
            series = {family.name + s for s in _SUFFIXES.get(family.type, ("",))}
            series |= {sample.name for sample in family.samples}
            for name in series:
                self.families[name] = family.name
            self.names |= series
            labels = self.labels.setdefault(family.name, {})
            for sample in family.samples:
                for label, value in sample.labels.items():
                    labels.setdefault(label, set()).add(value)

    def add_text(self, text: str) -> None:
        registry = CollectorRegistry()
        families = list(text_string_to_metric_families(text))
        names = {f.name for f in families}  # the parser reads x_created as a family of its own
        families = [f for f in families if f.name.removesuffix("_created") not in names - {f.name}]

        class Parsed:
            def collect(self):
                return families

        registry.register(Parsed())
        self.add_registry(registry)


def _catalog(service: CampaignService) -> None:
    adv = service.create_advertiser(OPERATOR, "adv").advertiser_id
    campaign = {
        "name": "c",
        "daily_budget": 50.0,
        "total_budget": 500.0,
        "start_ts": NOW - 86400,
        "end_ts": NOW + 86400,
        "pricing": "cpc",
        "bid": 0.5,
        "targeting": {},
    }
    cid = service.create_campaign(OPERATOR, campaign, advertiser_id=adv).campaign_id
    service.create_ad(OPERATOR, cid, {"category": "shoes", "landing_domain": "x.example"})


@pytest.fixture(scope="module")
def api_metrics() -> str:
    """The API's ``/metrics`` after one ad request (2 slots, one ad, no model)."""
    service = CampaignService(clock=lambda: NOW)
    _catalog(service)
    server = AdServer(service, lambda: None, prior_ctr=0.02)
    app = create_app(
        service, None, hash_key(OPERATOR_KEY, cost=COST), key_cost=COST, ad_server=server
    )
    with TestClient(app) as client:
        request = {"request_id": "r1", "ts": NOW, "user": {"user_id": "u1"}, "slots": 2}
        headers = {"Authorization": f"Bearer {OPERATOR_KEY}"}
        response = client.post("/v1/ad-requests", json=request, headers=headers)
        assert response.status_code == 200 and len(response.json()["ads"]) == 1
        return client.get("/metrics").text


def _registry(name: str, modules: tuple[str, ...]) -> CollectorRegistry | None:
    """A fresh registry of the metrics class ``name`` from the first module defining it."""
    for module in modules:
        try:
            metrics = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if metrics is not None:
            return metrics().registry
    return None


# dashboard -> (component, metrics class, modules) of the workers that may not exist yet
WORKERS = {
    "joiner": ("joiner", "JoinerMetrics", ("streams.joiner", "streams.join_worker")),
    "spend": ("billing", "BillingMetrics", ("auction.billing",)),
}


@pytest.fixture(scope="module")
def exported(api_metrics) -> dict[str, Exported]:
    """What each component exports: the API (serving included), the trainer, the joiner."""
    api = Exported()
    api.add_text(api_metrics)
    trainer = Exported()
    trainer.add_registry(TrainerMetrics().registry)
    out = {"api": api, "trainer": trainer}
    for component, name, modules in WORKERS.values():
        registry = _registry(name, modules)
        if registry is not None:
            out[component] = Exported()
            out[component].add_registry(registry)
    return out


def _values(text: str) -> dict[str, float]:
    """``{name or name{"label": "value"}: value}`` of every sample in ``text``."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = json.dumps(sample.labels, sort_keys=True) if sample.labels else ""
            out[sample.name + labels] = sample.value
    return out


def test_the_api_exports_what_an_ad_request_served(api_metrics):
    values = _values(api_metrics)
    assert values["adengine_serving_requests_total"] == 1
    assert values["adengine_serving_slots_requested_total"] == 2
    assert values["adengine_serving_slots_filled_total"] == 1  # fill rate 1/2
    assert values["adengine_serving_prior_fallbacks_total"] == 1  # no model
    assert values["adengine_serving_pctr_count"] == 1
    assert values["adengine_serving_pctr_sum"] == pytest.approx(0.02)  # the prior
    assert values['adengine_serving_candidates_total{"stage": "matched"}'] == 1
    spend = values['adengine_serving_expected_spend_total{"pricing": "cpc"}']
    assert 0 < spend <= 0.5 * 0.02  # GSP price (at most the bid) x pCTR
    assert values["adengine_serving_model_version"] == 0  # nothing but the prior served
    key = '{"method": "POST", "route": "/v1/ad-requests", "status": "200"}'
    assert values["adengine_api_requests_total" + key] == 1


def _served(version: str, exploration: bool = False) -> AdResponse:
    impression = Impression(
        impression_id="i1", request_id="r1", ts=NOW, ad_id="a1", campaign_id="c1",
        advertiser_id="adv", position=0, price=4.0, model_version=version,
        exploration=exploration, pctr=0.1, features=ScoredFeatures(indices=[], values=[]),
    )  # fmt: skip
    ad = ServedAd(
        ad_id="a1", campaign_id="c1", advertiser_id="adv", position=0, price=4.0,
        pricing="cpm", bid=5.0, pctr=0.1, score=0.0, impression=impression,
    )  # fmt: skip
    return AdResponse("r1", [ad], model_available=True, model_version=version)


def test_serving_metrics_follow_the_model_version_and_exploration():
    metrics = ServingMetrics()
    metrics.observe(1, _served("7"))
    metrics.observe(3, _served("t3.w17", exploration=True))
    metrics.observe(1, AdResponse("r3", [], model_available=False))
    values = _values(generate_latest(metrics.registry).decode())
    assert values["adengine_serving_model_version"] == 7
    assert values["adengine_serving_tree_version"] == 3
    assert values["adengine_serving_weights_version"] == 17
    assert values["adengine_serving_exploration_impressions_total"] == 1
    assert values["adengine_serving_slots_requested_total"] == 5
    assert values["adengine_serving_slots_filled_total"] == 2
    assert values["adengine_serving_prior_fallbacks_total"] == 1
    assert values['adengine_serving_expected_spend_total{"pricing": "cpm"}'] == 2 * 4.0 / 1000


# --------------------------------------------------------------------------- dashboards


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _targets(board: dict):
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            yield panel, target


def _datasource_uid() -> str:
    text = (CONFIGS / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    return re.search(r"^\s*uid:\s*(\S+)", text, re.M)[1]


def test_dashboards_exist_with_unique_uids():
    assert {p.stem for p in DASHBOARDS} >= {"serving", "learning", "joiner", "spend"}
    uids = [_load(p)["uid"] for p in DASHBOARDS]
    assert len(set(uids)) == len(uids)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_layout_and_datasource(path):
    board = _load(path)
    uid = _datasource_uid()
    ids, cells = set(), set()
    assert board["panels"], "an empty dashboard"
    for panel in board["panels"]:
        assert panel["id"] not in ids, f"duplicate panel id {panel['id']}"
        ids.add(panel["id"])
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"] and panel["description"], panel["title"]
        pos = panel["gridPos"]
        x, y, w, h = pos["x"], pos["y"], pos["w"], pos["h"]
        assert x >= 0 and x + w <= 24, panel["title"]
        area = {(i, j) for i in range(x, x + w) for j in range(y, y + h)}
        assert not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"]["uid"] == uid


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_panel_reads_exported_metrics(path, exported):
    component, name, _ = WORKERS.get(path.stem, (None, "", ()))
    if component is not None and component not in exported:
        pytest.skip(f"no {name} to check the {path.stem} dashboard against")
    known = Exported()
    for part in exported.values():
        known.names |= part.names
        known.families |= part.families
        for family, labels in part.labels.items():
            known.labels.setdefault(family, {}).update(labels)
    for panel, target in _targets(_load(path)):
        for name, labels in selectors(target["expr"]):
            where = f"{path.name} / {panel['title']!r}: {target['expr']}"
            if name in PROMETHEUS_SERIES:
                continue
            assert name in known.names, f"{name} is exported by no component ({where})"
            observed = known.labels.get(known.families[name], {})
            for label, (op, value) in labels.items():
                if label in TARGET_LABELS or not observed:
                    continue  # no samples yet: label names unknown
                assert label in observed, f"{name} has no label {label!r} ({where})"
                if op == "=" and label != "le":
                    assert value in observed[label], f"{name}{{{label}={value!r}}} ({where})"


def test_every_exported_metric_is_on_a_dashboard(exported):
    used = {
        name
        for path in DASHBOARDS
        for _, target in _targets(_load(path))
        for name in metric_names(target["expr"])
    }
    for component, part in exported.items():
        graphed = {part.families[n] for n in used if n in part.families}
        missing = set(part.labels) - graphed
        assert not missing, f"{component} metrics on no dashboard: {sorted(missing)}"


# --------------------------------------------------------------------------- Prometheus config


def scrape_jobs(text: str) -> dict[str, dict]:
    """``{job: {"metrics_path", "targets"}}`` of a Prometheus config with static targets."""
    jobs = {}
    for block in re.split(r"^\s*- job_name:", text, flags=re.M)[1:]:
        name = block.split("\n", 1)[0].strip().strip("\"'")
        path = re.search(r"^\s*metrics_path:\s*(\S+)", block, re.M)
        targets = [t for m in re.finditer(r"targets:\s*(\[.*\])", block) for t in json.loads(m[1])]
        jobs[name] = {"metrics_path": path[1] if path else "/metrics", "targets": targets}
    return jobs


def _port(target: str) -> int:
    return int(target.rsplit(":", 1)[1])


def test_prometheus_config_scrapes_every_component_at_its_configured_port():
    settings = load_settings(env={})
    jobs = scrape_jobs((CONFIGS / "prometheus.yml").read_text())
    assert {"adengine-api", "adengine-trainer", "adengine-joiner", "adengine-billing"} <= set(jobs)
    api = jobs["adengine-api"]
    assert api["metrics_path"] == "/metrics"
    assert [_port(t) for t in api["targets"]] == [settings.auction.api_port]
    monitoring = (REPO / "docs" / "monitoring.md").read_text()
    ports = {settings.auction.api_port}
    for component in ("trainer", "joiner", "billing"):
        (target,) = jobs[f"adengine-{component}"]["targets"]
        port = _port(target)
        configured = getattr(getattr(settings, component, None), "metrics_port", 0)
        # 0 = the exporter is off by default: the docs say which port to turn it on at
        assert port == configured or (
            configured == 0 and f"ADENGINE_{component.upper()}_METRICS_PORT={port}" in monitoring
        ), f"{component}: scraped at {port}, configured {configured}"
        assert port not in ports
        ports.add(port)


def test_compose_mounts_the_configs_where_prometheus_and_grafana_read_them():
    compose = (REPO / "docker-compose.yml").read_text()
    mounts = dict(re.findall(r"^\s*- \./(\S+?):(/\S+?)(?::ro)?\s*$", compose, re.M))
    for source in mounts:
        assert (REPO / source).exists(), source
    assert mounts["configs/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in compose
    assert mounts["configs/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = (CONFIGS / "grafana" / "provisioning" / "dashboards" / "adengine.yml").read_text()
    path = re.search(r"^\s*path:\s*(\S+)", provider, re.M)[1]
    assert mounts["configs/grafana/dashboards"] == path
    home = re.search(r"GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH:\s*\"?([^\"\s]+)", compose)[1]
    assert home.startswith(path + "/")
    assert (CONFIGS / "grafana" / "dashboards" / Path(home).name).exists()
