"""The broker layer against a real embedded tansu broker (no mocks).

Consumer groups use short session timeouts on purpose: tansu holds the first JoinGroup of
a new group for about half the session timeout (30 s with faust's default of 60 s).
"""

import asyncio
import dataclasses
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from engine.config import KafkaSettings, load_settings
from streams.broker import BrokerError, EmbeddedBroker, connect, metadata_brokers
from streams.topics import TopicError, ensure_topics, topic_configs, topic_specs

REPO = Path(__file__).resolve().parents[1]
GROUP_TIMEOUTS = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 500}
HAS_PROC = Path("/proc/self/stat").exists()
# kafka-python 3 loads its protocol schemas with importlib.resources' legacy API
pytestmark = pytest.mark.filterwarnings(r"ignore:(read|open)_text is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def settings():
    return load_settings(env={})  # the file's defaults, whatever the test environment holds


@pytest.fixture(scope="module")
def broker():
    with EmbeddedBroker() as running:
        yield running
    assert not running.running


@pytest.fixture(scope="module")
def created(broker, settings):
    """The first ensure_topics on the fresh broker, and its result."""
    return ensure_topics(broker.bootstrap_servers, settings)


def _pid_alive(pid: int) -> bool:
    """True for a live process; False once it has exited (a zombie counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        return ""


# -- the embedded broker ---------------------------------------------------------------------


def test_embedded_broker_answers_metadata(broker):
    host, port = broker.bootstrap_servers.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) == broker.port > 0
    assert [(h, p) for _node, h, p in metadata_brokers(host, int(port))] == [(host, int(port))]
    assert broker.running and _pid_alive(broker.pid)


def test_broker_stops_its_child_and_removes_its_log():
    with EmbeddedBroker() as running:
        pid, log_path, port = running.pid, running.log_path, running.port
        assert log_path.exists()
    assert not running.running and _wait_gone(pid, 1.0)
    assert not log_path.exists()
    with pytest.raises(OSError):
        metadata_brokers("127.0.0.1", port, timeout=0.5)
    with pytest.raises(BrokerError, match="not running"):
        running.bootstrap_servers  # noqa: B018 - the property is the assertion


def test_taken_port_is_a_clear_error(broker):
    with pytest.raises(BrokerError, match="already in use"):
        EmbeddedBroker(port=broker.port).start()


def test_ipv6_listen_address_is_refused():
    with pytest.raises(BrokerError, match="IPv6"):
        EmbeddedBroker("::1")


def test_child_that_dies_during_startup_reports_its_log(tmp_path):
    fake = tmp_path / "tansu"
    fake.write_text("#!/bin/sh\necho 'boom: no storage engine' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(BrokerError, match=r"(?s)exited with code 3.*boom: no storage engine"):
        EmbeddedBroker(binary=str(fake), startup_timeout=5).start()


def test_child_that_never_answers_times_out_and_is_killed(tmp_path):
    pid_file = tmp_path / "pid"
    fake = tmp_path / "tansu"
    fake.write_text(f"#!/bin/sh\necho $$ > {pid_file}\necho 'still warming up'\nexec sleep 30\n")
    fake.chmod(0o755)
    started = time.monotonic()
    with pytest.raises(BrokerError, match=r"(?s)within 0.5s.*still warming up"):
        EmbeddedBroker(binary=str(fake), startup_timeout=0.5).start()
    assert time.monotonic() - started < 5
    assert _wait_gone(int(pid_file.read_text()), 2.0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_broker_dies_with_a_killed_parent(tmp_path):
    script = textwrap.dedent(
        """
        import sys, time
        from streams.broker import EmbeddedBroker
        broker = EmbeddedBroker(log_path=sys.argv[1]).start()  # a SIGKILL skips log cleanup
        print(broker.pid, flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "tansu.log")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = _read_line(proc, 15)
        assert line.strip().isdigit(), line
        proc.kill()  # SIGKILL: no atexit, no finally
        proc.wait(5)
        assert _wait_gone(int(line), 5.0), "tansu outlived its SIGKILLed parent"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def test_connect_prefers_a_configured_cluster(settings):
    external = dataclasses.replace(settings.kafka, bootstrap_servers=" kafka-1:9092,kafka-2:9092 ")
    assert connect(external) == ("kafka-1:9092,kafka-2:9092", None)
    env = {"KAFKA_BOOTSTRAP_SERVERS": "kafka:9092"}
    assert load_settings(env=env).kafka.bootstrap_servers == "kafka:9092"
    env["ADENGINE_KAFKA_BOOTSTRAP_SERVERS"] = "other:9093"
    assert load_settings(env=env).kafka.bootstrap_servers == "other:9093"


def test_connect_starts_the_embedded_broker_when_none_is_configured(settings):
    bootstrap, embedded = connect(settings)
    try:
        assert embedded is not None and bootstrap == embedded.bootstrap_servers
        host, port = bootstrap.rsplit(":", 1)
        assert metadata_brokers(host, int(port))
    finally:
        embedded.stop()


# -- topics ----------------------------------------------------------------------------------


def test_ensure_topics_creates_every_topic_with_its_partition_count(broker, settings, created):
    from kafka import KafkaConsumer

    specs = topic_specs(settings)
    assert created == {spec.name: "created" for spec in specs}
    expected = {spec.name: spec.partitions for spec in specs}
    assert expected[settings.kafka.impressions_topic] == 4
    assert expected[settings.kafka.campaigns_topic] == 1
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers)
    try:
        actual = {name: len(consumer.partitions_for_topic(name) or ()) for name in expected}
    finally:
        consumer.close()
    assert actual == expected


def test_campaigns_topic_is_compacted(broker, settings, created):
    configs = asyncio.run(topic_configs(broker.bootstrap_servers, settings.kafka.campaigns_topic))
    assert configs.get("cleanup.policy") == "compact"


def test_ensure_topics_twice_is_fine(broker, settings, created):
    again = ensure_topics(broker.bootstrap_servers, settings)
    assert again == {name: "exists" for name in created}


def test_partition_count_mismatch_names_the_topic(broker, settings, created):
    wrong = dataclasses.replace(settings.kafka, examples_partitions=8)
    with pytest.raises(TopicError, match=r"'adengine\.examples'.* 4 partitions, settings say 8"):
        ensure_topics(broker.bootstrap_servers, wrong)


def test_unreachable_cluster_is_a_topic_error(settings):
    with pytest.raises(TopicError, match="cannot reach Kafka at 127.0.0.1:1"):
        ensure_topics("127.0.0.1:1", settings, timeout_s=5)


def test_topic_settings_are_validated():
    with pytest.raises(ValueError, match="both"):
        topic_specs(KafkaSettings(examples_topic="adengine.impressions"))
    with pytest.raises(ValueError, match="examples_partitions"):
        topic_specs(KafkaSettings(examples_partitions=0))


# -- round trips -----------------------------------------------------------------------------


def test_aiokafka_round_trip_through_a_consumer_group(broker, settings, created):
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    topic = settings.kafka.impressions_topic
    payload = uuid.uuid4().hex.encode()

    async def round_trip():
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers)
        await producer.start()
        try:
            sent = await producer.send_and_wait(topic, payload, key=b"ad-42")
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=broker.bootstrap_servers,
            group_id="test-aiokafka",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            **GROUP_TIMEOUTS,
        )
        await consumer.start()
        try:
            message = await asyncio.wait_for(consumer.getone(), 15)
            await consumer.commit()
            committed = await consumer.committed(TopicPartition(topic, message.partition))
        finally:
            await consumer.stop()
        return sent, message, committed

    sent, message, committed = asyncio.run(round_trip())
    assert (message.key, message.value) == (b"ad-42", payload)
    assert (message.partition, message.offset) == (sent.partition, sent.offset)
    assert committed == sent.offset + 1


def test_kafka_python_round_trip_through_a_consumer_group(broker, settings, created):
    from kafka import KafkaConsumer, KafkaProducer

    topic = settings.kafka.engagements_topic
    payload = uuid.uuid4().hex.encode()
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers)
    try:
        sent = producer.send(topic, payload, key=b"user-7").get(timeout=10)
    finally:
        producer.close()
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=broker.bootstrap_servers,
        group_id="test-kafka-python",
        auto_offset_reset="earliest",
        max_poll_interval_ms=2000,
        consumer_timeout_ms=15000,
        **GROUP_TIMEOUTS,
    )
    try:
        message = next(iter(consumer))
    finally:
        consumer.close()
    assert (message.key, message.value) == (b"user-7", payload)
    assert (message.partition, message.offset) == (sent.partition, sent.offset)


# -- adengine broker -------------------------------------------------------------------------


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_cli_broker_prints_its_address_and_stops_cleanly(stop_signal):
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ADENGINE_") and k != "KAFKA_BOOTSTRAP_SERVERS"
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "broker", "--port", "0"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = _read_line(proc, 20)
        assert line.startswith("bootstrap_servers="), (line, proc.poll())
        host, port = line.strip().split("=", 1)[1].rsplit(":", 1)
        assert metadata_brokers(host, int(port))
        children = _children(proc.pid) if HAS_PROC else []
        assert not HAS_PROC or len(children) == 1
        proc.send_signal(stop_signal)
        assert proc.wait(10) == 0, proc.stderr.read()
        for child in children:
            assert _wait_gone(child, 2.0), f"tansu pid {child} outlived adengine broker"
        with pytest.raises(OSError):
            metadata_brokers(host, int(port), timeout=0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
