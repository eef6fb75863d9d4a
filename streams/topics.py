"""The topics of the online-learning loop, created idempotently.

:func:`ensure_topics` creates every topic in ``[kafka]`` with its partition count and
replication factor, and accepts topics that already exist with the same partition count.
An existing topic with a *different* partition count is an error naming the topic: key ->
partition routing (and faust, which stops with ``PartitionsMismatch`` when a source topic
and its table changelog disagree) depends on the count, so it is never silently changed.

The campaigns topic is created with ``cleanup.policy=compact`` (latest record per catalogue
id). tansu, the embedded broker, accepts and reports that config; a broker that rejects it
gets the topic without it and a warning in the log.

It uses aiokafka's admin client, the client faust itself runs on (kafka-python's works
against tansu too, but its admin API changed shape between 2.x and 3.x).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from engine.config import ConfigError, KafkaSettings, Settings

log = logging.getLogger(__name__)

COMPACT = {"cleanup.policy": "compact"}
_TOPIC_ALREADY_EXISTS = 36
_CONFIG_REJECTED = {40, 44}  # INVALID_CONFIG, POLICY_VIOLATION


class TopicError(RuntimeError):
    """A topic could not be created or exists with an incompatible layout."""


@dataclass(frozen=True)
class TopicSpec:
    role: str  # the settings prefix: "impressions", "campaigns", ...
    name: str
    partitions: int
    replication_factor: int
    configs: dict[str, str] = field(default_factory=dict)


ROLES = (
    "impressions",
    "engagements",
    "examples",
    "model_updates",
    "dead_letters",
    "late_clicks",
    "campaigns",
)


def topic_specs(settings: Settings | KafkaSettings) -> list[TopicSpec]:
    """Every topic in ``[kafka]``, validated (names unique, counts >= 1)."""
    kafka = settings.kafka if isinstance(settings, Settings) else settings
    if kafka.replication_factor < 1:
        raise ConfigError(
            f"[kafka] replication_factor must be >= 1, got {kafka.replication_factor}"
        )
    specs, seen = [], {}
    for role in ROLES:
        name = getattr(kafka, f"{role}_topic").strip()
        partitions = getattr(kafka, f"{role}_partitions")
        if not name:
            raise ConfigError(f"[kafka] {role}_topic is empty")
        if name in seen:
            raise ConfigError(f"[kafka] {role}_topic and {seen[name]}_topic are both {name!r}")
        if partitions < 1:
            raise ConfigError(f"[kafka] {role}_partitions must be >= 1, got {partitions}")
        seen[name] = role
        configs = dict(COMPACT) if role == "campaigns" else {}
        specs.append(TopicSpec(role, name, partitions, kafka.replication_factor, configs))
    return specs


def ensure_topics(
    bootstrap_servers: str, settings: Settings | KafkaSettings, *, timeout_s: float = 30.0
) -> dict[str, str]:
    """Create the missing topics; ``{topic: "created" | "exists"}``.

    Raises :class:`TopicError` for a topic whose partition count differs from the settings
    or that the broker refuses to create. Synchronous: from a running event loop (a faust
    app's startup hook) await :func:`ensure_topics_async` instead.
    """
    return asyncio.run(ensure_topics_async(bootstrap_servers, settings, timeout_s=timeout_s))


async def ensure_topics_async(
    bootstrap_servers: str, settings: Settings | KafkaSettings, *, timeout_s: float = 30.0
) -> dict[str, str]:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaConnectionError

    specs = topic_specs(settings)
    deadline = time.monotonic() + timeout_s
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap_servers,
        client_id="adengine-topics",
        request_timeout_ms=max(1000, int(timeout_s * 1000)),
    )
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        existing = await _partition_counts(admin)
        _check_counts(specs, existing)
        missing = [spec for spec in specs if spec.name not in existing]
        status = {spec.name: "exists" for spec in specs if spec.name in existing}
        if missing:
            await _create(admin, missing)
            # metadata reaches every broker of a real cluster a little after CreateTopics
            while True:
                existing = await _partition_counts(admin)
                _check_counts(specs, existing)  # a concurrent creator may have won the race
                if all(spec.name in existing for spec in missing):
                    break
                if time.monotonic() >= deadline:
                    absent = [spec.name for spec in missing if spec.name not in existing]
                    raise TopicError(f"topics created but not yet in metadata: {absent}")
                await asyncio.sleep(0.1)
            status.update({spec.name: "created" for spec in missing})
        return status
    except TimeoutError as exc:
        raise TopicError(f"no answer from Kafka at {bootstrap_servers} in {timeout_s:g}s") from exc
    except KafkaConnectionError as exc:
        raise TopicError(f"cannot reach Kafka at {bootstrap_servers}: {exc}") from exc
    finally:
        await admin.close()


async def _partition_counts(admin) -> dict[str, int]:
    counts = {}
    for topic in await admin.describe_topics():
        if topic["error_code"] == 0:
            counts[topic["topic"]] = len(topic["partitions"])
    return counts


def _check_counts(specs: list[TopicSpec], existing: dict[str, int]) -> None:
    wrong = [
        f"topic {spec.name!r} ([kafka] {spec.role}) has {existing[spec.name]} partitions, "
        f"settings say {spec.partitions}"
        for spec in specs
        if spec.name in existing and existing[spec.name] != spec.partitions
    ]
    if wrong:
        raise TopicError(
            "; ".join(wrong)
            + ". Partition counts are never changed automatically (keyed routing and faust's "
            "co-partitioning depend on them): fix the settings, or recreate the topic."
        )


async def _create(admin, specs: list[TopicSpec]) -> None:
    from aiokafka.admin import NewTopic
    from aiokafka.errors import for_code

    def new(spec: TopicSpec, with_configs: bool = True) -> NewTopic:
        configs = spec.configs if with_configs else {}
        return NewTopic(spec.name, spec.partitions, spec.replication_factor, topic_configs=configs)

    response = await admin.create_topics([new(spec) for spec in specs])
    by_name = {spec.name: spec for spec in specs}
    retry, failures = [], []
    for result in response.topic_errors:
        name, code = result[0], result[1]
        message = result[2] if len(result) > 2 else None
        if code in (0, _TOPIC_ALREADY_EXISTS):
            continue
        spec = by_name[name]
        if code in _CONFIG_REJECTED and spec.configs:
            log.warning(
                "broker rejected %s for topic %r (%s); creating it without",
                spec.configs,
                name,
                message or for_code(code).__name__,
            )
            retry.append(spec)
            continue
        failures.append(f"{name!r}: {for_code(code).__name__} ({message or 'no message'})")
    if retry:
        response = await admin.create_topics([new(spec, with_configs=False) for spec in retry])
        for result in response.topic_errors:
            if result[1] not in (0, _TOPIC_ALREADY_EXISTS):
                failures.append(f"{result[0]!r}: {for_code(result[1]).__name__}")
    if failures:
        raise TopicError("could not create " + "; ".join(failures))


async def topic_configs(bootstrap_servers: str, topic: str) -> dict[str, str]:
    """The broker's view of one topic's configs (for checks such as cleanup.policy)."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="adengine-topics")
    try:
        await admin.start()
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        await admin.close()
    configs = {}
    for response in responses:
        for resource in response.resources:
            for entry in resource[4]:
                configs[entry[0]] = entry[1]
    return configs
