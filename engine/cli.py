"""``adengine`` command line.

``adengine replay`` replays a click log (or, with no ``--data``, a seeded synthetic
log from a hidden ground-truth model) with progressive validation and compares
LR, GBDT, GBDT + LR and Vowpal Wabbit on identical examples and features.

``adengine broker`` runs the embedded Kafka-compatible broker (tansu, in memory) with the
loop's topics created, prints ``bootstrap_servers=HOST:PORT`` and serves until SIGINT or
SIGTERM.
"""

from __future__ import annotations

import argparse
import gc
import json
import signal
import sys
import threading
from pathlib import Path

from engine.config import ConfigError, load_settings


def _replay(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from engine.datasets import SCHEMAS, BadRows, detect_format, read_log, synthetic_log
    from engine.replay import Replay
    from engine.report import plot_curves, render_table

    settings = load_settings(args.config)
    bad_rows = BadRows()
    if args.data is None:
        fmt = "synthetic"
        total = args.rows or settings.replay.synthetic_rows
        records = synthetic_log(total, seed=settings.replay.synthetic_seed)
        name = f"synthetic(seed={settings.replay.synthetic_seed})"
    else:
        path = Path(args.data)
        if not path.is_file():
            print(f"adengine replay: no such file: {path}", file=sys.stderr)
            return 2
        fmt = args.format or detect_format(path)
        records = read_log(path, fmt, bad_rows=bad_rows, limit=args.rows)
        total = args.rows
        name = path.name

    replay = Replay(settings, SCHEMAS[fmt], with_vw=not args.no_vw)
    with tqdm(total=total, unit="ex", disable=args.quiet or None, file=sys.stderr) as bar:
        result = replay.run(
            records, dataset=name, predictions_out=args.predictions_out, progress=bar
        )
    result.bad_rows = dict(bad_rows.counts)
    if result.n_evaluated == 0:
        print(
            "adengine replay: the log is shorter than the GBDT warm-up; nothing evaluated",
            file=sys.stderr,
        )
        return 1
    plot_path = args.plot or settings.replay.plot
    if plot_path:
        plot_curves(result, plot_path)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(render_table(result))
        if plot_path:
            print(f"NE over the stream: {plot_path}")
    return 0


def _broker(args: argparse.Namespace) -> int:
    import signal
    import threading

    from streams.broker import BrokerError, EmbeddedBroker
    from streams.topics import TopicError, ensure_topics

    settings = load_settings(args.config)
    kafka = settings.kafka
    port = kafka.embedded_port if args.port is None else args.port
    host = args.host or kafka.embedded_host
    if kafka.bootstrap_servers:
        print(
            f"adengine broker: note: [kafka] bootstrap_servers={kafka.bootstrap_servers!r} is "
            "set; this embedded broker is separate from it",
            file=sys.stderr,
        )
    stop = threading.Event()

    def on_signal(_signum, _frame):
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    broker = EmbeddedBroker(host, port, startup_timeout=kafka.embedded_startup_timeout_s)
    try:
        try:
            broker.start()
            if not args.no_topics:
                ensure_topics(broker.bootstrap_servers, settings)
        except (BrokerError, TopicError) as exc:
            print(f"adengine broker: {exc}", file=sys.stderr)
            return 1
        print(f"bootstrap_servers={broker.bootstrap_servers}", flush=True)
        while not stop.wait(0.5):
            if not broker.running:
                print(
                    f"adengine broker: tansu exited unexpectedly\n{broker.log_tail()}",
                    file=sys.stderr,
                )
                return 1
        return 0
    finally:
        broker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _freeze_heap() -> None:
    """Collect once, then exempt every live object from later collections (``gc.freeze``).

    A full collection walks every tracked object: with the imports and a catalogue of
    thousands of ads that is a 60-100 ms pause of the whole server every few seconds
    under load. Frozen objects are still freed by reference counting, only never scanned;
    the models the trainer publishes add a few hundred tracked objects, not worth a pass.
    """
    gc.collect()
    gc.freeze()


def _serve(args: argparse.Namespace) -> int:
    """Run the ad server and campaign API (FastAPI under uvicorn) until interrupted.

    With a broker configured the catalogue is the campaigns topic (every replica reads it;
    see :mod:`auction.catalogue`), otherwise it lives in this process only.
    """
    import uvicorn

    from auction.api import app_from_settings
    from streams.redis_store import close_embedded

    settings = load_settings(args.config)
    app = app_from_settings(settings)
    _freeze_heap()  # the imports, settings and clients: most of the heap
    catalogue = app.state.catalogue
    if catalogue is not None:  # and again once the campaigns topic is loaded

        def freeze_when_ready() -> None:
            while not catalogue.wait_ready(60.0):
                pass
            _freeze_heap()

        threading.Thread(target=freeze_when_ready, name="gc-freeze", daemon=True).start()
    # uvicorn shuts down gracefully on SIGTERM and then re-raises it; a Python handler
    # (rather than the default, which kills the process) lets the cleanup below run.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.run(
            app,
            host=args.host or settings.auction.api_host,
            port=args.port if args.port is not None else settings.auction.api_port,
            log_level="warning",
        )
    finally:
        app.state.close()
        if not settings.redis.url:
            close_embedded(settings.redis.embedded_path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adengine", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="settings file (default configs/default.toml)")
    commands = parser.add_subparsers(dest="command", required=True)

    replay = commands.add_parser("replay", help="replay a click log with progressive validation")
    replay.add_argument("--data", help="click log; omitted: a seeded synthetic log")
    replay.add_argument(
        "--format",
        choices=["criteo", "avazu", "talkingdata"],
        help="log format (default: detected from the file)",
    )
    replay.add_argument("--rows", type=int, help="replay at most this many rows")
    replay.add_argument("--json", action="store_true", help="print one JSON object")
    replay.add_argument("--predictions-out", help="CSV of every evaluated example's predictions")
    replay.add_argument("--plot", help="PNG of NE over the stream (default from settings)")
    replay.add_argument("--no-vw", action="store_true", help="skip the Vowpal Wabbit peer")
    replay.add_argument("--quiet", action="store_true", help="no progress bar")
    replay.set_defaults(handler=_replay)

    broker = commands.add_parser(
        "broker", help="run the embedded Kafka-compatible broker with the topics created"
    )
    broker.add_argument("--host", help="listen address (default [kafka] embedded_host)")
    broker.add_argument(
        "--port", type=int, help="listen port (default [kafka] embedded_port; 0 = any free one)"
    )
    broker.add_argument("--no-topics", action="store_true", help="do not create the topics")
    broker.set_defaults(handler=_broker)

    serve = commands.add_parser("serve", help="run the ad server and campaign API over HTTP")
    serve.add_argument("--host", help="listen address (default [auction] api_host)")
    serve.add_argument("--port", type=int, help="listen port (default [auction] api_port)")
    serve.set_defaults(handler=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"adengine: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
