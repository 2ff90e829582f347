"""The server-side subcommands of `fedboard`: aggregator, broker-config, export-bundle.

`register(subparsers)` adds them to the `fedboard` parser; each sets `args.handler`, which
the main program calls with the parsed arguments and whose return value is the exit code.
Heavy imports (TensorFlow for export-bundle, paho for the aggregator) happen inside handlers.

`fedboard aggregator` takes its settings from `--config aggregator.toml` and/or flags (a
flag wins over the file). The file has two tables:

    [broker]                    # protocol.transport.MqttSettings, plus password_file
    host = "broker.example.org"
    port = 8883
    username = "aggregator"
    password_file = "credentials/aggregator.password"
    tls_ca = "ca.crt"

    [aggregator]                # every AggregatorConfig field, plus the service keys below
    fleet = "home"
    bundle = "model.fbz"        # from `fedboard export-bundle`
    key = "keys/aggregator.key" # from `fedboard keygen`
    checkpoint_dir = "state"
    rounds = 0                  # 0 = run until SIGTERM
    metrics_port = 9100
    clients_per_round = 20
    min_reports = 0             # the report floor (0 = the goal at the deadline, never below half of it)
    checkin_patience_s = inf    # a round below the floor waits for devices (the service default)
    weight_cap = 10.0           # an update weighs at most 10 x the cohort's median declared examples

Relative paths are relative to the file.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import signal
import sys
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.cli_entry import HelpFormatter

log = logging.getLogger(__name__)

AGGREGATOR_EXAMPLES = """examples:
  fedboard aggregator --config aggregator.toml
  fedboard aggregator --broker 127.0.0.1:1883 --bundle model.fbz --key keys/aggregator.key --rounds 10
"""
BROKER_CONFIG_EXAMPLES = """examples:
  fedboard broker-config --out broker --devices 2 --fleet home
  fedboard broker-config --out broker --devices 50 --tls-ca ca.crt --tls-cert server.crt --tls-key server.key
"""
EXPORT_BUNDLE_EXAMPLES = """examples:
  fedboard export-bundle --corpus builtin --out model.fbz
  fedboard export-bundle --vocab words.txt --out model.fbz --embed-dim 96 --units 256
"""

SERVICE_KEYS = ("bundle", "key", "rounds", "until_round", "eval_corpus", "eval_format", "client_id", "worker")
PATH_KEYS = ("bundle", "key", "checkpoint_dir", "metrics_jsonl", "eval_corpus")
BROKER_PATH_KEYS = ("password_file", "tls_ca", "tls_cert", "tls_key")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `aggregator`, `broker-config` and `export-bundle` to the `fedboard` parser."""
    _register_aggregator(subparsers)
    _register_broker_config(subparsers)
    _register_export_bundle(subparsers)


# -- fedboard aggregator ---------------------------------------------------------------------------
def _register_aggregator(subparsers: argparse._SubParsersAction) -> None:
    from aggregator.config import AggregatorConfig

    p = subparsers.add_parser(
        "aggregator", help="run the aggregator (rounds, intake, publishing) against a broker",
        description="Run federated rounds against an MQTT broker until SIGTERM (or --rounds N). With "
                    "--checkpoint-dir, a restart (also after kill -9) continues the interrupted round. "
                    "--worker ID runs a scale-out intake worker instead (see aggregator/SCALE_OUT.md).",
        formatter_class=HelpFormatter, epilog=AGGREGATOR_EXAMPLES)
    p.add_argument("--config", type=Path, help="aggregator.toml (flags override it)")
    p.add_argument("--bundle", type=Path, help="training bundle file (.fbz) from `fedboard export-bundle`")
    p.add_argument("--key", type=Path, help="the aggregator's Ed25519 private key from `fedboard keygen`")
    p.add_argument("--rounds", type=int, help="stop after N rounds (default 0 = until SIGTERM)")
    p.add_argument("--until-round", type=int, help="stop once round N has ended, counting rounds of earlier runs "
                   "from the checkpoint (a restarted aggregator does not start the count again)")
    p.add_argument("--eval-corpus", help="held-out evaluation on this corpus's test split (with --eval-every N)")
    p.add_argument("--eval-format", help="format of --eval-corpus (default: guessed)")
    p.add_argument("--client-id", help="MQTT client id (default aggregator-FLEET; keep it stable across restarts)")
    p.add_argument("--worker", metavar="ID", help="run as scale-out intake worker ID of the coordinator")
    p.add_argument("--recover-from-broker", action="store_true",
                   help="model.npz is lost: continue from the signed model the broker retains (verified with --key) "
                        "at its version + 1; the server optimizer's state restarts. A flag, never a config key: "
                        "without it an aggregator that finds traces of an earlier run refuses to start (exit 3)")
    broker = p.add_argument_group("broker")
    broker.add_argument("--broker", metavar="HOST:PORT", help="the MQTT broker (default 127.0.0.1:1883)")
    broker.add_argument("--username", help="broker user name (default: none, or [broker] username)")
    broker.add_argument("--password-file", type=Path, help="file holding the broker password")
    broker.add_argument("--tls-ca", help="CA certificate: enables TLS")
    broker.add_argument("--tls-cert", help="client certificate, for brokers that require one")
    broker.add_argument("--tls-key", help="the client certificate's private key")
    broker.add_argument("--mqtt-version", type=int, choices=(3, 5), help="MQTT protocol version (default: 5)")
    rounds = p.add_argument_group("rounds, aggregation, publishing (AggregatorConfig)")
    for f in dataclasses.fields(AggregatorConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            rounds.add_argument(flag, dest=f"cfg_{f.name}", action=argparse.BooleanOptionalAction, default=None,
                                help=f"default {f.default!r}")
        else:
            kind = type(f.default) if f.default is not None else str
            rounds.add_argument(flag, dest=f"cfg_{f.name}", type=kind, default=None, metavar=f.name.upper(),
                                help=f"default {f.default!r}")
    p.set_defaults(handler=aggregator_command)


@dataclass(frozen=True)
class ServiceConfig:
    """Everything `fedboard aggregator` needs, from the TOML file and the flags."""

    config: Any                 # AggregatorConfig
    mqtt: Any                   # MqttSettings
    bundle: Path
    key: Path | None
    rounds: int = 0
    until_round: int = 0
    eval_corpus: str | None = None
    eval_format: str | None = None
    client_id: str | None = None
    worker: str | None = None
    recover_from_broker: bool = False   # aggregator/recovery.py (a flag only: each use is deliberate)


def load_service_config(args: argparse.Namespace) -> ServiceConfig:
    from aggregator.config import AggregatorConfig, check_field_types
    from protocol.transport import MqttSettings

    table: dict[str, Any] = {}
    broker: dict[str, Any] = {}
    if args.config is not None:
        try:
            data = tomllib.loads(Path(args.config).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {args.config} not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{args.config} is not valid TOML: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"{args.config} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except (ValueError, RecursionError) as exc:  # tomllib: a 4,300+ digit integer, arrays nested too deep
            raise ValueError(f"{args.config} is not valid TOML: {str(exc)[:200]}") from None
        unknown = sorted(set(data) - {"aggregator", "broker"})
        if unknown:
            raise ValueError(f"{args.config}: unknown table(s) {unknown}; expected [aggregator] and [broker]")
        for name in ("aggregator", "broker"):
            if not isinstance(data.get(name, {}), dict):
                raise ValueError(f"{args.config}: {name} must be a table [{name}], not a plain key")
        base = Path(args.config).resolve().parent
        table = dict(data.get("aggregator", {}))
        broker = dict(data.get("broker", {}))
        for key in PATH_KEYS:
            if isinstance(table.get(key), str):
                table[key] = str(base / table[key])
        for key in BROKER_PATH_KEYS:
            if isinstance(broker.get(key), str):
                broker[key] = str(base / broker[key])
    # flags win over the file
    for f in dataclasses.fields(AggregatorConfig):
        value = getattr(args, f"cfg_{f.name}", None)
        if value is not None:
            table[f.name] = value
    for key in SERVICE_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            table[key] = str(value) if isinstance(value, Path) else value
    if args.broker:
        host, _, port = args.broker.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--broker {args.broker!r} is not HOST:PORT")
        broker["host"], broker["port"] = host, int(port)
    for key in ("username", "tls_ca", "tls_cert", "tls_key", "mqtt_version"):
        if getattr(args, key, None) is not None:
            broker[key] = getattr(args, key)
    if args.password_file is not None:
        broker["password_file"] = str(args.password_file)

    service = {k: table.pop(k) for k in SERVICE_KEYS if k in table}
    names = {f.name for f in dataclasses.fields(AggregatorConfig)}
    unknown = sorted(set(table) - names)
    if unknown:
        raise ValueError(f"unknown [aggregator] setting(s) {unknown}; see `fedboard aggregator --help`")
    check_field_types(ServiceConfig, service, "[aggregator]")
    # a service waits for its fleet: a round without enough check-ins keeps its window open (logged
    # once a minute) instead of being abandoned again and again before the devices come
    table.setdefault("checkin_patience_s", math.inf)
    config = AggregatorConfig(**table)
    password_file = broker.pop("password_file", None)
    if password_file is not None:
        try:
            broker["password"] = Path(password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise FileNotFoundError(f"broker password file {password_file}: {exc.strerror}") from None
    mqtt_names = {f.name for f in dataclasses.fields(MqttSettings)}
    unknown = sorted(set(broker) - mqtt_names)
    if unknown:
        raise ValueError(f"unknown [broker] setting(s) {unknown}; known: {sorted(mqtt_names | {'password_file'})}")
    check_field_types(MqttSettings, broker, "[broker]")
    mqtt = MqttSettings(**broker)
    if "bundle" not in service:
        raise ValueError("no training bundle: pass --bundle FILE (see `fedboard export-bundle`) or set "
                         "[aggregator] bundle")
    if "key" not in service and not service.get("worker"):
        raise ValueError("no signing key: pass --key FILE (see `fedboard keygen`) or set [aggregator] key")
    return ServiceConfig(config=config, mqtt=mqtt, bundle=Path(service["bundle"]),
                         key=Path(service["key"]) if "key" in service else None, rounds=int(service.get("rounds", 0)),
                         until_round=int(service.get("until_round", 0)),
                         eval_corpus=service.get("eval_corpus"), eval_format=service.get("eval_format"),
                         client_id=service.get("client_id"), worker=service.get("worker"),
                         recover_from_broker=bool(getattr(args, "recover_from_broker", False)))


def aggregator_command(args: argparse.Namespace) -> int:
    from models.bundle import read_bundle

    service = load_service_config(args)
    bundle = read_bundle(service.bundle)
    if service.worker:
        return _run_worker(service, bundle)
    from aggregator.checkpoint import CheckpointError
    from aggregator.fleet_lease import FLEET_TAKEN_EXIT, FleetTaken

    try:
        return _run_aggregator(service, bundle)
    except CheckpointError as exc:
        print(f"fedboard aggregator: checkpoint error: {exc}", file=sys.stderr)
        return 3
    except FleetTaken as exc:  # another aggregator serves the fleet: stop, never fight over its session
        print(f"fedboard aggregator: STOPPED: {exc}", file=sys.stderr)
        return FLEET_TAKEN_EXIT


def _run_aggregator(service: ServiceConfig, bundle: Any) -> int:
    from aggregator.server import Aggregator, AggregatorStopped
    from protocol.signing import load_private_key

    assert service.key is not None
    eval_hook = None
    if service.eval_corpus:
        from aggregator.evaluation import heldout_from_corpus

        eval_hook = heldout_from_corpus(bundle, service.eval_corpus, service.eval_format, seed=service.config.seed)
        if not service.config.eval_every:
            service = dataclasses.replace(service, config=dataclasses.replace(service.config, eval_every=1))
    agg = Aggregator(service.config, bundle, service.mqtt, load_private_key(service.key),
                     client_id=service.client_id, eval_hook=eval_hook,
                     recover_from_broker=service.recover_from_broker)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        log.info("received %s: stopping (a restart continues from the checkpoint)", signal.Signals(signum).name)
        stop.set()
        agg.request_stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    done = 0
    try:
        agg.start()
        log.info("aggregator of fleet %s running: model %s v%d, %s", service.config.fleet, bundle.model_id,
                 agg.version, f"{service.rounds} round(s)" if service.rounds else "until SIGTERM")
        while not stop.is_set() and (not service.rounds or done < service.rounds):
            if service.until_round and agg.round_id >= service.until_round and not agg.round_in_progress:
                log.info("round %d has ended: stopping (--until-round)", agg.round_id)
                break
            result = agg.run_round()
            done += 1
            print(f"round {result.round}: {'committed v%d' % result.version if result.committed else 'abandoned'} "
                  f"{result.participants}/{result.goal} reports, {result.wall_s:.1f} s", flush=True)
    except AggregatorStopped:
        pass
    finally:
        agg.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _run_worker(service: ServiceConfig, bundle: Any) -> int:
    from aggregator.scale_out import IntakeWorker

    worker = IntakeWorker(service.config.fleet, bundle.param_count, service.mqtt, service.worker,
                          group=service.config.share_group, max_payload=service.config.max_payload)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda s, f: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        worker.start()
        log.info("intake worker %s of fleet %s running (group %s)", service.worker, service.config.fleet,
                 service.config.share_group)
        while not stop.wait(3600):
            pass
    finally:
        worker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("worker %s stopped: %d updates accepted", service.worker, worker.accepted_total)
    return 0


# -- fedboard broker-config ----------------------------------------------------------------------------
def _register_broker_config(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "broker-config", help="write a Mosquitto config, password file and ACL for a fleet",
        description="Writes DIR/mosquitto.conf, DIR/passwd ($7$ hashes), DIR/acl and "
                    "DIR/credentials/<user>.password. Each device (username = device id) may write only its "
                    "own checkin/update/status topics; the aggregator user may use all of its fleet.",
        formatter_class=HelpFormatter, epilog=BROKER_CONFIG_EXAMPLES)
    p.add_argument("--out", type=Path, required=True, help="directory for the files")
    p.add_argument("--devices", type=int, required=True, help="number of devices (ids PREFIX-0001 ...)")
    p.add_argument("--fleet", default="demo", help="fleet name: the topic prefix fedboard/FLEET/...")
    p.add_argument("--device-prefix", default="device", help="device ids are PREFIX-0001, PREFIX-0002, ...")
    p.add_argument("--aggregator-user", default="aggregator", help="the aggregator's broker user name")
    p.add_argument("--workers", type=int, default=0, help="scale-out workers: a broker user each "
                   "(AGGREGATOR-worker-N) and a secret share group in credentials/share-group")
    p.add_argument("--port", type=int, default=0, help="listener port (default 8883 with TLS, 1883 without)")
    p.add_argument("--bind", default="0.0.0.0", help="listener address")
    p.add_argument("--tls-ca", help="CA certificate that signed the server certificate")
    p.add_argument("--tls-cert", help="the broker's certificate")
    p.add_argument("--tls-key", help="the broker's private key")
    p.add_argument("--require-client-cert", action="store_true", help="mutual TLS")
    p.add_argument("--user", help="`user` line: the account Mosquitto drops to when started as root")
    p.add_argument("--force", action="store_true", help="replace an existing password file (new passwords)")
    p.set_defaults(handler=broker_config_command)


def broker_config_command(args: argparse.Namespace) -> int:
    from aggregator.broker_config import BrokerSetup, device_ids, write_broker_config

    setup = BrokerSetup(fleet=args.fleet, devices=device_ids(args.devices, args.device_prefix),
                        aggregator_user=args.aggregator_user, port=args.port, bind=args.bind, tls_ca=args.tls_ca,
                        tls_cert=args.tls_cert, tls_key=args.tls_key, require_client_cert=args.require_client_cert,
                        run_as_user=args.user, workers=args.workers)
    try:
        files = write_broker_config(args.out, setup, overwrite=args.force)
    except FileExistsError as exc:
        raise ValueError(str(exc)) from None
    print(f"mosquitto config: {files.conf}")
    print(f"password file:    {files.passwd}  ({len(setup.devices)} devices + {setup.aggregator_user})")
    print(f"ACL file:         {files.acl}")
    print(f"passwords:        {args.out / 'credentials'}/<user>.password  (give each device its own)")
    if setup.workers:
        print(f"share group:      {files.credentials['share-group']}  (pass it to every worker as --share-group; "
              "never to a device)")
    for note in files.notes:
        print(f"WARNING: {note}", file=sys.stderr)
    print(f"start it with:    mosquitto -c {files.conf}")
    return 0


# -- fedboard export-bundle ------------------------------------------------------------------------------
def _register_export_bundle(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export-bundle", help="build the TFLite training bundle (model + vocabulary) for an aggregator",
        description="Builds the vocabulary from a corpus (or reads --vocab) and exports the training bundle "
                    "(TensorFlow needed, on the server only). The aggregator publishes it to the devices.",
        formatter_class=HelpFormatter, epilog=EXPORT_BUNDLE_EXAMPLES)
    p.add_argument("--out", type=Path, required=True, help="bundle file to write (.fbz)")
    p.add_argument("--corpus", help="corpus to build the vocabulary (and the output prior) from; "
                                    "`builtin` for the built-in synthetic keyboard corpus")
    p.add_argument("--format", help="corpus format: speakers, tsv, jsonl, dir or builtin (default: guessed)")
    p.add_argument("--vocab", type=Path, help="a vocabulary instead: fedboard-vocab JSON, or one word per line")
    p.add_argument("--vocab-size", type=int, default=5000, help="most frequent words kept (with --corpus)")
    p.add_argument("--seq-len", type=int, default=20, help="words of context per training window")
    p.add_argument("--embed-dim", type=int, default=96, help="word embedding size of the CIFG-LSTM")
    p.add_argument("--units", type=int, default=256, help="LSTM units")
    p.add_argument("--batch-size", type=int, default=16, help="static batch of the train signature")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights (and of the corpus split)")
    p.set_defaults(handler=export_bundle_command)


def read_vocabulary_file(path: Path) -> Any:
    from models.tokenizer import SPECIALS, Vocabulary

    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("{"):
        return Vocabulary.load(path)
    words = [w.strip() for w in text.splitlines() if w.strip()]
    words = [w for w in words if w not in SPECIALS]
    return Vocabulary(tuple(SPECIALS) + tuple(words))


def export_bundle_command(args: argparse.Namespace) -> int:
    from models.bundle_cache import get_or_export_bundle
    from models.config import ModelConfig

    if bool(args.corpus) == bool(args.vocab):
        raise ValueError("give either --corpus (the vocabulary is built from it) or --vocab FILE")
    counts = None
    if args.vocab:
        vocab = read_vocabulary_file(args.vocab)
    else:
        from models.corpus import read_corpus
        from models.task import build_task

        builtin = args.format == "builtin" or args.corpus == "builtin"
        corpus = read_corpus(None if builtin else args.corpus, "builtin" if builtin else args.format, seed=args.seed)
        task = build_task(corpus, vocab_size=args.vocab_size,
                          seq_len=args.seq_len)
        vocab, counts = task.vocab, task.target_counts()
    config = ModelConfig(vocab_size=vocab.size, embed_dim=args.embed_dim, units=args.units, seq_len=args.seq_len,
                         batch_size=args.batch_size)
    bundle = get_or_export_bundle(config, vocab.to_json(), seed=args.seed, target_counts=counts)
    path = bundle.write(args.out)
    print(f"bundle {bundle.model_id}: {bundle.param_count} parameters, vocabulary {vocab.size}, written to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (tests, and a server without the full CLI): `python -m aggregator.commands`."""
    from protocol.cli_entry import run_commands

    return run_commands(register, argv)


if __name__ == "__main__":
    sys.exit(main())
