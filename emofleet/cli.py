"""The `emofleet` command. Heavy modules (torch, funasr, Kafka clients) are imported inside commands."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from emofleet.core import config as cfg
from emofleet.core.errors import UserFacingError


# ---------------------------------------------------------------- settings


def load_settings(args: argparse.Namespace, env: dict[str, str] | None = None) -> cfg.Settings:
    """Env, then the running embedded stack's addresses (when env names none), then flags."""
    env = dict(os.environ) if env is None else env
    settings = cfg.from_env(env)
    if getattr(args, "data_dir", None):
        settings = cfg.with_overrides(settings, data_dir=args.data_dir)
    settings = _with_embedded_stack(settings, env)
    overrides = {name: getattr(args, name) for name in vars(args) if "__" in name}
    return cfg.with_overrides(settings, **overrides)


def _with_embedded_stack(settings: cfg.Settings, env: dict[str, str]) -> cfg.Settings:
    from emofleet.infra.local_stack import LocalStack

    state = LocalStack(settings.data_dir, settings.cache.redis_url).read_state()
    if state is None:
        return settings
    if f"{cfg.ENV_PREFIX}KAFKA_BOOTSTRAP_SERVERS" not in env:  # the embedded Tansu: see streams/consumer.py let_go
        settings = cfg.with_overrides(settings, kafka__bootstrap_servers=state.bootstrap_servers,
                                      kafka__leave_group_on_close=False)
    if f"{cfg.ENV_PREFIX}CACHE_REDIS_URL" not in env:
        settings = cfg.with_overrides(settings, cache__redis_url=state.redis_url)
    return settings


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="state, logs and chDB files (env EMOFLEET_DATA_DIR; default .emofleet)")
    parser.add_argument("--bootstrap-servers", dest="kafka__bootstrap_servers",
                        help="Kafka bootstrap servers (default: the running embedded stack)")


# ---------------------------------------------------------------- commands


def cmd_stack(args: argparse.Namespace) -> int:
    from emofleet.infra.local_stack import LocalStack

    settings = cfg.with_overrides(cfg.from_env(), data_dir=args.data_dir)
    stack = LocalStack(settings.data_dir, settings.cache.redis_url)
    if args.action == "start":
        state = stack.start()
        print(f"broker  {state.bootstrap_servers}\nredis   {state.redis_url}\nchdb    {state.chdb_path}")
    elif args.action == "stop":
        print("stopped" if stack.stop() else "nothing was running")
    else:
        for name, value in stack.status().items():
            print(f"{name:<7} {value}")
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from emofleet.streams.topics import ensure_topics, partition_counts, pipeline_topics

    settings = load_settings(args)
    admin = _admin(settings)
    specs = pipeline_topics(settings.kafka)
    if args.action == "create":
        _print_topics(ensure_topics(admin, specs))
    else:
        counts = partition_counts(admin, [s.name for s in specs])
        for spec in specs:
            print(f"{spec.name}  partitions={counts.get(spec.name, 'missing')}")
    return 0


def _admin(settings: cfg.Settings) -> Any:
    from confluent_kafka.admin import AdminClient

    return AdminClient(settings.kafka.client_config())


def _print_topics(statuses: list[Any]) -> None:
    for status in statuses:
        print(f"{status.outcome:<8} {status.name}  partitions={status.partitions}")


def cmd_produce(args: argparse.Namespace) -> int:
    from emofleet.streams.references import references_from_manifest, references_from_paths

    if not args.paths and not args.manifest:
        raise UserFacingError("nothing to produce", "give audio paths/globs or --manifest FILE.jsonl|.csv")
    path_map = _path_map(args.path_map or [])
    settings = load_settings(args)
    defaults = {"tenant": args.tenant, "source": args.source, "channel": args.channel}
    items: list[Any] = list(references_from_paths(args.paths, defaults=defaults, path_map=path_map))
    for manifest in args.manifest or []:
        if not Path(manifest).is_file():
            raise UserFacingError(f"manifest {manifest} does not exist", "check the path")
        items.extend(references_from_manifest(Path(manifest), defaults=defaults, path_map=path_map))
    report, failed = _produce(settings, items)
    print(f"sent {report.sent}, failed {failed}")
    return 1 if failed else 0


def _path_map(texts: Sequence[str]) -> list[Any]:
    """--path-map values, each source directory resolved as the file paths are (symlinks followed)."""
    from dataclasses import replace
    from pathlib import PurePosixPath

    from emofleet.streams.references import InvalidReference, parse_path_mapping

    mappings = []
    for text in texts:
        try:
            mapping = parse_path_mapping(text)
        except InvalidReference as error:
            raise UserFacingError(str(error), "e.g. --path-map ./audio:/audio (host dir : dir the processors read)") from None
        mappings.append(replace(mapping, source=PurePosixPath(Path(mapping.source).resolve())))
    return mappings


def _produce(settings: cfg.Settings, items: list[Any]) -> tuple[Any, int]:
    """Send the valid references, print one line per failed item; returns (delivery report, failures)."""
    from emofleet.schemas.codec import make_codec
    from emofleet.streams.producer import AudioReferenceProducer
    from emofleet.streams.references import ItemError

    errors = [item for item in items if isinstance(item, ItemError)]
    references = [item for item in items if not isinstance(item, ItemError)]
    codec = make_codec(settings.kafka.schema_registry_url, settings.kafka.registry_config)
    with _progress(len(references), "produce", unit="ref") as bar, \
            AudioReferenceProducer(settings.kafka, codec, on_delivery=lambda *_: bar.update(1)) as producer:
        for reference in references:
            producer.send(reference)
    for error in errors:
        print(f"error: {error.item}: {error.reason}", file=sys.stderr)
    for audio_id, reason in producer.report.failed:
        print(f"error: {audio_id}: delivery failed: {reason}", file=sys.stderr)
    return producer.report, len(errors) + len(producer.report.failed)


def _start_backend(base: cfg.Settings, stack: contextlib.ExitStack) -> cfg.Settings:
    """Kafka, Redis and ClickHouse for `up`, from EMOFLEET_BACKEND (infra/backends.py)."""
    from emofleet.infra.backends import backend_name, containers, external_endpoints
    from emofleet.infra.local_stack import LocalStack

    backend = backend_name()
    if backend == "embedded":
        state = LocalStack(base.data_dir, base.cache.redis_url).start()
        print(f"stack up: broker {state.bootstrap_servers}, redis {state.redis_url}, chdb {state.chdb_path}")
        return cfg.with_overrides(base, kafka__bootstrap_servers=state.bootstrap_servers,
                                  cache__redis_url=state.redis_url, kafka__leave_group_on_close=False)
    endpoints = external_endpoints() if backend == "external" else stack.enter_context(containers())
    print(f"{backend} backend: broker {endpoints.bootstrap_servers}, clickhouse {endpoints.clickhouse_dsn}")
    return cfg.with_overrides(base, kafka__bootstrap_servers=endpoints.bootstrap_servers,
                              cache__redis_url=endpoints.redis_url, clickhouse__dsn=endpoints.clickhouse_dsn,
                              clickhouse__username=endpoints.clickhouse_username,
                              clickhouse__password=endpoints.clickhouse_password,
                              kafka__schema_registry_url=endpoints.schema_registry_url or None)


def _stored_rows_runner(settings: cfg.Settings, stack: contextlib.ExitStack) -> Callable[[], Any]:
    from emofleet.sinks.query_server import direct_runner, owner_runner

    if settings.clickhouse_dsn.startswith("chdb://"):
        return lambda: owner_runner(settings.data_dir)
    from emofleet.sinks.clickhouse import connect

    client = connect(settings.clickhouse, settings.clickhouse_dsn)
    stack.callback(client.close)
    run = direct_runner(client)
    return lambda: run


def cmd_up(args: argparse.Namespace) -> int:
    import time

    from emofleet.samples import write_samples
    from emofleet.schemas.codec import make_codec
    from emofleet.streams.references import references_from_paths
    from emofleet.streams.topics import ensure_topics, pipeline_topics
    from emofleet.up import (CrashLoopError, ResultsTap, RunTracker, StalledError, Supervisor, child_env,
                             follow_run, gateway_url, pipeline_commands, run_key, with_gateway)

    with contextlib.ExitStack() as stack:
        base = load_settings(args)
        settings = _start_backend(base, stack)
        _print_topics(ensure_topics(_admin(settings), pipeline_topics(settings.kafka)))
        if args.audio:
            audio = Path(args.audio).resolve()
            paths, root = [str(audio)], audio if audio.is_dir() else audio.parent
        else:
            root = (settings.data_dir / "samples").resolve()
            paths = [str(p) for p in write_samples(root, args.samples)]
        settings = cfg.with_overrides(settings, audio__file_roots=[*settings.audio.file_roots, root])
        settings, key_file = with_gateway(settings)
        logs = settings.data_dir / "logs"
        supervisor = Supervisor(pipeline_commands(args.processors, settings.observability.metrics_port,
                                                  gateway=True), child_env(settings), logs)
        supervisor.start()
        stack.callback(supervisor.stop)
        started = time.monotonic()
        url = gateway_url(settings)
        keys = f"API key in {key_file}" if key_file else "API keys as configured (EMOFLEET_GATEWAY_API_KEYS*)"
        print(f"gateway {url} (page {url}/, docs {url}/docs; {keys})")
        tap = ResultsTap(settings, make_codec(settings.kafka.schema_registry_url,  # before anything is sent
                                              settings.kafka.registry_config))
        stack.callback(tap.close)
        items = list(references_from_paths(paths, defaults={"tenant": "demo", "source": "up"}))
        report, failed = _produce(settings, items)
        undelivered = {audio_id for audio_id, _ in report.failed}
        tracker = RunTracker({run_key(item) for item in items if isinstance(item, dict)
                              and item["audio_id"] not in undelivered}, started_ms=int(time.time() * 1000))
        print(f"enqueued {report.sent} references ({failed} failed); {args.processors} processor(s), the sink, "
              f"the aggregator and the gateway running, logs in {logs}")
        try:
            with _progress(len(tracker.expected), "in ClickHouse", unit="ref", always=True) as bar:
                follow_run(tracker, tap, _stored_rows_runner(settings, stack), settings.clickhouse.database,
                           supervisor, timeout=args.timeout, stall_seconds=args.stall_timeout, progress=bar.update)
        except (CrashLoopError, StalledError) as error:
            print(f"{tracker.summary()}\nlast lines of {error.log}:\n{error.tail}", file=sys.stderr)
            raise UserFacingError(str(error), f"the whole log is {error.log}") from None
        print(f"{tracker.summary()} ({time.monotonic() - started:.1f}s)\n")
        run, close = _query_runner(settings)
        stack.callback(close)
        _print_report(run, settings, plot=None)
        if args.keep_running:
            print("pipeline keeps running (Ctrl-C stops it); try `emofleet report` in another terminal")
            key = f"$(tail -n1 {key_file} | cut -d: -f2-)" if key_file else "<your key>"
            print(f"analyze a clip over HTTP: curl -H \"Authorization: Bearer {key}\" -H 'Content-Type: audio/wav' "
                  f"--data-binary @clip.wav {url}/v1/analyze   (or open {url}/ in a browser)")
            while True:
                supervisor.check()
                time.sleep(1)
        return 0 if tracker.done and not failed else 1


def cmd_bench(args: argparse.Namespace) -> int:
    """Load test: the pipeline started as `up` starts it (or --attach to a running one), logic in loadtest.py."""
    from emofleet.loadtest import (BenchError, find_pipeline_processes, markdown, options_from, run_bench,
                                   stack_processes)
    from emofleet.streams.topics import ensure_topics, pipeline_topics
    from emofleet.up import Supervisor, child_env, pipeline_commands

    try:
        options = options_from(args)
    except ValueError as error:
        raise UserFacingError(str(error), "see `emofleet bench --help`") from None
    with contextlib.ExitStack() as stack:
        settings = load_settings(args)
        members, check = find_pipeline_processes, (lambda: None)
        if not args.attach:
            settings = _start_backend(settings, stack)
            _print_topics(ensure_topics(_admin(settings), pipeline_topics(settings.kafka)))
            root = (settings.data_dir / "samples").resolve()
            settings = cfg.with_overrides(settings, audio__file_roots=[*settings.audio.file_roots, root])
            supervisor = Supervisor(pipeline_commands(args.processors, settings.observability.metrics_port),
                                    child_env(settings), settings.data_dir / "logs")
            supervisor.start()
            stack.callback(supervisor.stop)
            members, check = (lambda: {n: c.pid for n, c in supervisor.children.items()}), supervisor.check
        try:
            report = run_bench(settings, options, runner=_stored_rows_runner(settings, stack), check=check,
                               processes=lambda: members() | stack_processes(settings.data_dir)
                               | {"bench": os.getpid()})
        except BenchError as error:
            raise UserFacingError(str(error), "without --attach the pipeline's logs are in <data dir>/logs") from None
    print(markdown(report))
    return 0 if report["complete"] and not report["send_failures"] else 1


def cmd_process(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    _configure_logging(args.log_level, settings)
    from emofleet.processors.service import run_processor

    if not settings.audio.file_roots and "file" in settings.audio.allowed_schemes:
        logging.getLogger("emofleet").warning(
            "no file roots configured: file:// references will be dead-lettered (set EMOFLEET_AUDIO_FILE_ROOTS "
            "or --file-root)")
    return run_processor(settings)


def cmd_sink(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    _configure_logging(args.log_level, settings)
    from emofleet.sinks.service import run_sink

    return run_sink(settings)


def cmd_serve(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    _configure_logging(args.log_level, settings)
    from emofleet.gateway.server import run_gateway

    return run_gateway(settings)


def cmd_migrate(args: argparse.Namespace) -> int:
    from emofleet.sinks.clickhouse import chdb_lock_holder, connect
    from emofleet.sinks.migrations import check_drift, migrate

    settings = load_settings(args)
    dsn, database = settings.clickhouse_dsn, settings.clickhouse.database
    path = dsn.removeprefix("chdb://")
    if dsn.startswith("chdb://") and (holder := chdb_lock_holder(path)):
        raise UserFacingError(f"the chDB directory {path} is open in another process ({holder}); chDB allows one process "
                        "per directory", "a running sink applies the migrations itself when it starts; stop it to "
                                         "migrate by hand")
    client = connect(settings.clickhouse, dsn)
    try:
        applied = migrate(client, database, settings=settings.clickhouse)  # retention TTLs too
        check_drift(client, database)
    finally:
        client.close()
    where = f"database {database} at {cfg.redact_url(dsn)}"
    print("\n".join([f"applied {name}" for name in applied]
                    + [f"{where}: {len(applied)} migration(s) applied, schema up to date"]))
    return 0


def cmd_aggregate(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    _configure_logging(args.log_level, settings)
    from emofleet.streams.aggregator import run_aggregator

    return run_aggregator(settings)


def _query_runner(settings: cfg.Settings) -> tuple[Any, Callable[[], None]]:
    """Through the process that owns the embedded chDB directory when one runs, else directly."""
    from emofleet.sinks.query_server import direct_runner, owner_runner

    dsn = settings.clickhouse_dsn
    if dsn.startswith("chdb://") and (remote := owner_runner(settings.data_dir)) is not None:
        return remote, lambda: None
    if dsn.startswith("chdb://") and not Path(dsn.removeprefix("chdb://")).is_dir():
        raise UserFacingError(f"no ClickHouse data at {dsn}", "run `emofleet up` or `emofleet sink` first")
    from emofleet.sinks.clickhouse import connect

    client = connect(settings.clickhouse, dsn)
    return direct_runner(client), client.close


def cmd_query(args: argparse.Namespace) -> int:
    from emofleet.sinks.analytics import render_rows

    settings = load_settings(args)
    run, close = _query_runner(settings)
    try:
        rows = run(args.sql, {})
    finally:
        close()
    print(render_rows(rows, args.format))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from emofleet.sinks.analytics import parse_time_bound

    now = datetime.now(UTC)
    try:
        since, until = (parse_time_bound(text, now) if text else None for text in (args.since, args.until))
    except ValueError as error:
        raise UserFacingError(str(error), "e.g. --since 2h, or --since 2026-11-25 --until 2026-11-26") from None
    settings = load_settings(args)
    run, close = _query_runner(settings)
    try:
        _print_report(run, settings, plot=Path(args.plot) if args.plot else None, since=since, until=until,
                      fmt=args.format)
    finally:
        close()
    return 0


def _print_report(run: Any, settings: cfg.Settings, plot: Path | None, *, since: datetime | None = None,
                  until: datetime | None = None, fmt: str = "text") -> None:
    from emofleet.sinks.analytics import build_report, format_report, plot_report

    report = build_report(run, settings.clickhouse.database, since=since, until=until)
    print(json.dumps(report.to_dict(), indent=2) if fmt == "json" else format_report(report))
    if plot:
        plot_report(report, plot)
        print(f"plot written to {plot}", file=sys.stderr if fmt == "json" else sys.stdout)


def _configure_logging(level: str, settings: cfg.Settings | None = None) -> None:
    """Text or JSON lines (EMOFLEET_OBSERVABILITY_LOG_FORMAT / --log-format), every secret masked."""
    from emofleet.core.logs import configure_logging, secret_values

    settings = settings or cfg.Settings()
    configure_logging(level, settings.observability.log_format, secret_values(settings))


def _add_observability(parser: argparse.ArgumentParser, port_help: str) -> None:
    parser.add_argument("--metrics-port", dest="observability__metrics_port", type=int, metavar="PORT",
                        help=port_help)
    parser.add_argument("--log-format", dest="observability__log_format", choices=("text", "json"),
                        help="text (default) or json lines with partition/offset/audio_id")


def cmd_config(args: argparse.Namespace) -> int:
    print(json.dumps(cfg.describe(load_settings(args)), indent=2))
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from emofleet import results_cmd

    return results_cmd.run(args, load_settings(args), _query_runner, _progress)


def cmd_dead_letters(args: argparse.Namespace) -> int:
    from emofleet import dead_letters_cmd

    return dead_letters_cmd.run(args, load_settings(args), _query_runner, _progress)


def cmd_schemas(args: argparse.Namespace) -> int:
    """The Avro contracts shipped in the package: names, one schema's .avsc, or the single-object fingerprints."""
    from fastavro.schema import fingerprint, to_parsing_canonical_form

    from emofleet.schemas.codec import SCHEMA_DIR, SCHEMA_NAMES, load_schema, schema_versions

    if args.name is not None and args.name not in SCHEMA_NAMES:
        raise UserFacingError(f"no schema named {args.name!r}", f"one of: {', '.join(SCHEMA_NAMES)}")
    names = [args.name] if args.name else list(SCHEMA_NAMES)
    if args.fingerprint:
        for name in names:
            for version, path in schema_versions(name).items():
                crc = fingerprint(to_parsing_canonical_form(load_schema(name, version)), "CRC-64-AVRO")
                print(f"{name}  v{version}  c301{crc}  {path.relative_to(SCHEMA_DIR)}")
    elif args.name:
        print(schema_versions(args.name)[max(schema_versions(args.name))].read_text(encoding="utf-8"), end="")
    else:
        for name in names:
            print(f"{name}  {load_schema(name)['name']}  versions {len(schema_versions(name))}")
    return 0


# ---------------------------------------------------------------- plumbing


class _NoBar:
    def update(self, _n: int) -> None: ...
    def __enter__(self) -> _NoBar:
        return self
    def __exit__(self, *_exc: object) -> None: ...


def _progress(total: int, description: str, unit: str, always: bool = False) -> Any:
    """A tqdm bar on a terminal for large batches (or ``always``); silent otherwise."""
    if (total < 200 and not always) or not sys.stderr.isatty():
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit=unit)


class _HelpFormatter(argparse.HelpFormatter):
    """Metavars named after the option (--bootstrap-servers BOOTSTRAP_SERVERS), not its settings dest
    (kafka__bootstrap_servers)."""

    def _get_default_metavar_for_optional(self, action: argparse.Action) -> str:
        return max(action.option_strings, key=len).lstrip("-").replace("-", "_").upper()


class _VersionAction(argparse.Action):
    """--version from the installed package's metadata, read only when asked (it costs ~40 ms)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_args: Any) -> None:
        from importlib.metadata import version

        print(f"emofleet {version('emofleet')}")
        parser.exit()


DESCRIPTION = ("Speech-emotion analytics at scale: publish references to audio on Kafka, run emotion2vec+ on a fleet "
               "of processors, store the emotion events in ClickHouse, aggregate and alert on them. "
               "`emofleet up --model tiny` runs it all on this machine.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emofleet", description=DESCRIPTION, epilog="Every command has --help.")
    parser.add_argument("--version", action=_VersionAction, help="print the version and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, formatter_class=_HelpFormatter)
        sub.set_defaults(handler=handler)
        _add_common(sub)
        return sub

    stack = command("stack", cmd_stack, "start / stop / show the embedded local stack (Tansu broker, Redis, chDB dir)")
    stack.add_argument("action", choices=("start", "stop", "status"), nargs="?", default="status")

    topics = command("topics", cmd_topics, "create the pipeline's topics (idempotent) or list them")
    topics.add_argument("action", choices=("create", "list"), nargs="?", default="list")
    topics.add_argument("--partitions", dest="kafka__partitions", type=int, help="partitions per topic (default 8)")
    topics.add_argument("--replication-factor", dest="kafka__replication_factor", type=int, help="default 1")

    produce = command("produce", cmd_produce, "publish AudioReference events for audio files or a manifest")
    produce.add_argument("paths", nargs="*", metavar="PATH_OR_GLOB", help="audio files, directories or globs")
    produce.add_argument("--manifest", action="append", metavar="FILE",
                         help="a .jsonl or .csv manifest (fields: uri, audio_id, tenant, source, channel, call_id, "
                              "content_type, attributes / attr.NAME columns); repeatable")
    produce.add_argument("--tenant", help="tenant for items that do not name one")
    produce.add_argument("--source", help="source for items that do not name one")
    produce.add_argument("--channel", help="channel for items that do not name one")
    produce.add_argument("--topic", dest="kafka__audio_topic", help="audio topic (default emofleet.audio)")
    produce.add_argument("--path-map", action="append", metavar="HOST_DIR:TARGET_DIR",
                         help="publish file:// paths under HOST_DIR as under TARGET_DIR, where the processors read "
                              "them (e.g. ./audio:/audio for docker-compose.yml); repeatable")

    up = command("up", cmd_up, "run the pipeline on the embedded stack: start it, create topics, run processors, "
                               "enqueue audio, wait until every reference has a result or a dead letter")
    up.add_argument("--audio", help="an audio file or directory to enqueue (default: generated sample clips)")
    up.add_argument("--samples", type=int, default=50, help="number of generated sample clips (default 50)")
    up.add_argument("--processors", type=int, default=2, help="processor processes to run (default 2)")
    up.add_argument("--model", dest="model__model",
                    help="tiny | a local model dir | a hub id (default iic/emotion2vec_plus_large) | "
                         "simulated:<audio-s/s>[,<ms per forward>] (benchmarks only, README)")
    up.add_argument("--timeout", type=float, default=3600.0, help="give up waiting after this many seconds")
    up.add_argument("--stall-timeout", type=float, default=300.0,
                    help="fail when no reference got a result or was stored for this many seconds (default 300; "
                         "the first run of a hub model downloads it meanwhile: raise it on slow links)")
    up.add_argument("--keep-running", action="store_true", help="leave the processors running afterwards")
    _add_observability(up, "serve /metrics /healthz /readyz: processors on PORT, PORT+1, ..., the sink, then the "
                           "aggregator (default 0: off)")

    from emofleet.loadtest import add_arguments as add_bench_arguments

    bench = command("bench", cmd_bench, "load test: references at --rate against the pipeline (started as `up` does, "
                                        "or --attach), measured from outside: refs/s, latency P50/P95/P99, dead-letter "
                                        "and cache hit rates, CPU and RSS per process; JSON, markdown and PNG report")
    add_bench_arguments(bench)

    process = command("process", cmd_process,
                      "run one member of the processor group: audio references in, emotion events out")
    process.add_argument("--model", dest="model__model",
                         help="tiny | a local model dir | a hub id (default iic/emotion2vec_plus_large) | "
                         "simulated:<audio-s/s>[,<ms per forward>] (benchmarks only, README)")
    process.add_argument("--device", dest="model__device", help="auto | cpu | cuda[:N] (default auto)")
    process.add_argument("--file-root", dest="audio__file_roots", action="append", type=Path,
                         help="directory file:// references may read from; repeatable")
    process.add_argument("--max-clips", dest="batch__max_clips", type=int, help="clips per model batch (default 16)")
    process.add_argument("--group-instance-id", dest="kafka__group_instance_id",
                         help="static membership id (keeps partitions across quick restarts)")
    process.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    _add_observability(process, "serve /metrics /healthz /readyz on this port (default 0: off; containers use 9400)")

    sink = command("sink", cmd_sink, "write emotion events and dead letters into ClickHouse, effectively once")
    sink.add_argument("--dsn", dest="clickhouse__dsn",
                      help="chdb:///path or http(s)://host:port (default: chDB under the data dir)")
    sink.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    _add_observability(sink, "serve /metrics /healthz /readyz on this port (default 0: off; containers use 9400)")

    serve = command("serve", cmd_serve, "the HTTP front door: POST /v1/analyze a clip and get its emotions, over the "
                                        "same Kafka pipeline (API keys, rate limits, OpenAPI docs at /docs)")
    serve.add_argument("--host", dest="gateway__host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", dest="gateway__port", type=int, help="port to listen on (default 8000)")
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    serve.add_argument("--log-format", dest="observability__log_format", choices=("text", "json"),
                       help="text (default) or json lines")

    aggregate = command("aggregate", cmd_aggregate, "windowed emotion aggregates per source / channel / call and "
                                                    "alerts (faust-streaming app over the results topic)")
    aggregate.add_argument("--grace-seconds", dest="aggregate__grace_seconds", type=int,
                           help="out-of-order events up to this far behind the watermark still count (default 30)")
    aggregate.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    _add_observability(aggregate, "serve /metrics /healthz /readyz on this port (default 0: off; containers use "
                                   "9400)")

    migrate = command("migrate", cmd_migrate, "apply the ClickHouse schema migrations and check the tables (the sink "
                                              "does this when it starts); embedded chDB: only while no sink runs")
    migrate.add_argument("--dsn", dest="clickhouse__dsn",
                         help="chdb:///path or http(s)://host:port (default: chDB under the data dir)")

    query = command("query", cmd_query, "run a read-only SQL query against the analytics tables")
    query.add_argument("sql", help='e.g. "SELECT label, count() FROM emofleet.emotion_events GROUP BY label"')
    query.add_argument("--format", choices=("table", "csv", "json"), default="table")
    query.add_argument("--dsn", dest="clickhouse__dsn", help="ClickHouse DSN (default: chDB under the data dir)")

    report = command("report", cmd_report, "print the analytics report (distribution, timeline, dead letters, ...)")
    report.add_argument("--since", metavar="TIME", help="from this time on: 15m, 2h, 7d (ago) or ISO 8601 "
                                                        "(2026-11-25T14:00Z; no zone = UTC); default: all time")
    report.add_argument("--until", metavar="TIME", help="before this time (same forms as --since); default: no limit")
    report.add_argument("--format", choices=("text", "json"), default="text", help="text tables (default) or JSON")
    report.add_argument("--plot", metavar="FILE.png", help="also draw the report as a PNG")
    report.add_argument("--dsn", dest="clickhouse__dsn", help="ClickHouse DSN (default: chDB under the data dir)")

    command("config", cmd_config, "print the effective settings (secrets masked)")

    from emofleet import dead_letters_cmd, results_cmd

    results = command("results", cmd_results, "print emotion results: a range or --follow of the results topic, or one "
                                              "reference / call from ClickHouse, filtered; table or JSON lines")
    results_cmd.add_arguments(results)
    dead_letters = command("dead-letters", cmd_dead_letters, "list, summarise and show dead letters (from ClickHouse); "
                                                             "replay a selection onto the audio topic")
    dead_letters_cmd.add_arguments(dead_letters)
    schemas = command("schemas", cmd_schemas, "the Avro schemas of the topics: names, one .avsc, or --fingerprint "
                                              "(the single-object header of every version)")
    schemas.add_argument("name", nargs="?", help="print this schema's current .avsc (emotion_event, dead_letter, ...)")
    schemas.add_argument("--fingerprint", action="store_true",
                         help="print each version's header bytes (C3 01 + CRC-64-AVRO fingerprint, hex) and file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # user-facing errors become one line; anything else is a bug
        message, hint = _user_message(error)
        if message is None:
            raise
        print(f"emofleet: error: {message}", file=sys.stderr)
        if hint:
            print(f"  hint: {hint}", file=sys.stderr)
        return 2


def _user_message(error: Exception) -> tuple[str | None, str]:
    from confluent_kafka import KafkaException

    if isinstance(error, UserFacingError):
        return error.message, error.hint
    if isinstance(error, KafkaException):
        return f"Kafka: {error.args[0].str() if error.args else error}", \
            "is the broker up? `emofleet stack start` runs the embedded one"
    return None, ""


if __name__ == "__main__":
    sys.exit(main())
