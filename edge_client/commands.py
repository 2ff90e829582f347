"""The device-side subcommands of `fedboard`: client, client add-text, keygen, predict.

`register(subparsers)` adds them to the `fedboard` parser; each sets `args.handler`, which
the main program calls with the parsed arguments and whose return value is the exit code.
Every import of a heavy module happens inside a handler, so `fedboard --help` stays instant
and nothing here can pull TensorFlow onto a device.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from protocol.cli_entry import HelpFormatter

IMPORT_FORMATS = ("lines", "tsv", "jsonl")
DEFAULT_CONFIG = "/etc/fedboard/client.toml"

CLIENT_EXAMPLES = """examples:
  fedboard client --config /etc/fedboard/client.toml
  fedboard client add-text --config client.toml "see you at the station"
"""
ADD_TEXT_EXAMPLES = """examples:
  fedboard client add-text --config client.toml "i am going to the park" "see you"
  fedboard client add-text --config client.toml --file chat.jsonl --format jsonl
"""
KEYGEN_EXAMPLES = """examples:
  fedboard keygen --out keys
  fedboard keygen --out keys --force     # replace the pair: every device needs the new .pub
"""
ROTATE_KEY_EXAMPLES = """examples:
  sudo systemctl stop fedboard-client
  fedboard client rotate-key --config /etc/fedboard/client.toml
  fedboard client rotate-key --config client.toml --key-file /run/fedboard-rotate/store.key
"""
PREDICT_EXAMPLES = """examples:
  fedboard predict "i am going to" --config client.toml
  fedboard predict "see you" --bundle model.fbz -k 5
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `client`, `keygen` and `predict` to the `fedboard` parser's subcommands."""
    client = subparsers.add_parser(
        "client", help="run the device client (a Raspberry Pi or any Linux box) against a real broker",
        description="Run the federated keyboard client until SIGTERM/SIGINT. `client add-text` appends "
                    "typed text to the device's private text store.",
        formatter_class=HelpFormatter, epilog=CLIENT_EXAMPLES)
    client.add_argument("--config", type=Path, help="client.toml (see edge_client/deploy/client.example.toml; "
                        f"default: $FEDBOARD_CLIENT_CONFIG or {DEFAULT_CONFIG})")
    client.set_defaults(handler=run_client)
    actions = client.add_subparsers(dest="client_command", metavar="ACTION")
    add = actions.add_parser("add-text", help="append text to the device's text store (never sent anywhere)",
                             description="Append typed text to the device's private text store (never sent "
                                         "anywhere; the client trains on it).",
                             formatter_class=HelpFormatter, epilog=ADD_TEXT_EXAMPLES)
    add.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="client.toml")
    add.add_argument("text", nargs="*", help="texts to add, one entry each")
    add.add_argument("--file", type=Path, help="import a file instead (see --format)")
    add.add_argument("--format", choices=IMPORT_FORMATS, default="lines",
                     help="lines: one text per line; tsv: ts<TAB>text[<TAB>app]; jsonl: {\"text\", \"ts\", \"app\"}")
    add.add_argument("--app", help="name of the app the text was typed in (kept locally)")
    add.set_defaults(handler=add_text)
    rotate = actions.add_parser(
        "rotate-key", help="re-encrypt the device's stored text, residual and outbox with a new store key",
        description="Re-seal the text store, the residual and the outbox with a new store key, then replace "
                    "[device] key_file with it. Crash-safe: the new key is staged as KEY_FILE.next first; "
                    "after a crash, run it again to finish. Stop the client service first.",
        formatter_class=HelpFormatter, epilog=ROTATE_KEY_EXAMPLES)
    rotate.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="client.toml")
    rotate.add_argument("--key-file", type=Path, help="the key file to rotate instead of [device] key_file "
                                                      "(e.g. a key taken out of its systemd credential)")
    rotate.set_defaults(handler=rotate_key_command)

    keygen = subparsers.add_parser(
        "keygen", help="create the aggregator's Ed25519 signing key pair (on the server)",
        description="Writes NAME.key (private, mode 0600: keep it on the aggregator) and NAME.pub "
                    "(copy it to every device as [trust] aggregator_public_key).",
        formatter_class=HelpFormatter, epilog=KEYGEN_EXAMPLES)
    keygen.add_argument("--out", type=Path, required=True, help="directory for the key files")
    keygen.add_argument("--name", default="aggregator", help="file name stem")
    keygen.add_argument("--force", action="store_true", help="replace an existing key pair (devices need the new .pub)")
    keygen.set_defaults(handler=keygen_command)

    predict = subparsers.add_parser(
        "predict", help="show the next-word suggestions of the device's model for a text",
        description="Top-k next words for TEXT, from the newest verified global model the device holds "
                    "(--config: the int8 inference model the client fetched for suggestions, or the float "
                    "model it last trained on; the output says which version) or from a bundle file "
                    "(--bundle, optionally with --weights).",
        formatter_class=HelpFormatter, epilog=PREDICT_EXAMPLES)
    predict.add_argument("text", help="the text typed so far, e.g. 'i am going to'")
    source = predict.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, help="client.toml: use the device's cached bundle and model "
                                                    f"(default: $FEDBOARD_CLIENT_CONFIG or {DEFAULT_CONFIG})")
    source.add_argument("--bundle", type=Path, help="a training bundle file (.fbz)")
    predict.add_argument("--weights", type=Path, help="with --bundle: float32 weights (.npy, or raw little-endian)")
    predict.add_argument("--int8", type=Path, help="an int8 inference model (.tflite) to run instead")
    predict.add_argument("-k", type=int, default=3, help="number of suggestions")
    predict.set_defaults(handler=predict_command)


# -- handlers -------------------------------------------------------------------------------------
def default_config_path() -> Path:
    """Where a deployed device keeps its client.toml (README, Raspberry Pi section); FEDBOARD_CLIENT_CONFIG wins."""
    return Path(os.environ.get("FEDBOARD_CLIENT_CONFIG") or DEFAULT_CONFIG)


def _require_config(args: argparse.Namespace) -> Path:
    config = getattr(args, "config", None)
    if config is None:
        config = default_config_path()
        if not config.exists():
            raise ValueError(f"no --config given and {config} does not exist: pass --config client.toml "
                             "(see edge_client/deploy/client.example.toml) or set FEDBOARD_CLIENT_CONFIG")
    return config


def run_client(args: argparse.Namespace) -> int:
    from edge_client.app import ClientApp
    from edge_client.client_config import load_client_config

    return ClientApp(load_client_config(_require_config(args))).run()


def add_text(args: argparse.Namespace) -> int:
    from edge_client.at_rest import StateLock, device_keyring, open_text_store
    from edge_client.client_config import load_client_config

    config = load_client_config(_require_config(args))
    if bool(args.text) == bool(args.file):
        raise ValueError("give either texts to add or --file PATH, not both and not neither")
    with StateLock(config.device.state_dir, exclusive=False), \
            open_text_store(config, device_keyring(config)) as store:
        if args.file:
            added = store.import_file(args.file, args.format)
        else:
            added = store.add_many(args.text, app=args.app)
        total = store.count()
    print(f"added {added} text(s) to {config.device.data} ({total} stored)")
    return 0


def rotate_key_command(args: argparse.Namespace) -> int:
    from edge_client.at_rest import rotate_key
    from edge_client.client_config import load_client_config

    report = rotate_key(load_client_config(_require_config(args)), key_file=args.key_file)
    print(f"store key rotated: {report.texts} text(s), {'the residual, ' if report.residual else ''}"
          f"{report.outbox_items} outbox item(s) re-encrypted; key id {report.old_key_id} -> {report.new_key_id}"
          f"{' (an interrupted rotation finished)' if report.resumed else ''}")
    return 0


def keygen_command(args: argparse.Namespace) -> int:
    from protocol.signing import key_fingerprint, load_public_key, write_keypair

    try:
        private, public = write_keypair(args.out, args.name, overwrite=args.force)
    except FileExistsError:
        raise ValueError(f"a key pair {args.name}.key/{args.name}.pub already exists in {args.out}; pass --force "
                         "to replace it (every device must then be given the new .pub)") from None
    print(f"private key: {private}  (keep it on the aggregator only)")
    print(f"public key:  {public}  (copy it to every device)")
    print(f"fingerprint: {key_fingerprint(load_public_key(public))}")
    return 0


def predict_command(args: argparse.Namespace) -> int:
    from edge_client.suggest import Suggester

    if args.bundle is None:
        args.config = _require_config(args)
    int8 = args.int8.read_bytes() if args.int8 else None
    if args.config is not None:
        from edge_client.client_config import load_client_config
        from edge_client.serving import load_serving_model

        if args.weights is not None:
            raise ValueError("--weights goes with --bundle; with --config the device's latest model is used")
        served = load_serving_model(load_client_config(args.config))  # the newest verified: int8 or float
        bundle, weights = served.bundle, served.weights
        if int8 is None:
            int8, source = served.tflite, served.describe()
        else:
            source = f"int8 model {args.int8}"
    else:
        from models.bundle import read_bundle

        bundle = read_bundle(args.bundle)
        weights = _read_weights(args.weights, bundle.param_count) if args.weights else None
        source = str(args.weights) if weights is not None else "the bundle's initial weights"
        source = f"int8 model {args.int8}" if int8 is not None else f"float model, {source}"
    suggester = Suggester(bundle, weights, int8_model=int8)
    suggester.suggest(args.text, args.k)  # the first call allocates the interpreter's tensors
    words = suggester.suggest(args.text, args.k)
    print(f"{args.text!r} -> {', '.join(words)}")
    print(f"latency: {suggester.last_latency_ms:.1f} ms ({source})")
    return 0


def _read_weights(path: Path, size: int):
    import numpy as np

    if path.suffix == ".npy":
        weights = np.load(path, allow_pickle=False)
    else:
        weights = np.fromfile(path, dtype="<f4")
    weights = np.asarray(weights, dtype=np.float32).reshape(-1)
    if weights.size != size:
        raise ValueError(f"{path} holds {weights.size} values, the bundle's model has {size}")
    return weights


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (for tests and for a device without the lead's CLI): `python -m edge_client.commands`."""
    from protocol.cli_entry import run_commands

    return run_commands(register, argv)


if __name__ == "__main__":
    sys.exit(main())
