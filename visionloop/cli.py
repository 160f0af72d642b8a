"""The `visionloop` command: one entry point, a subcommand per job.

Errors a user can act on print one line on stderr and exit with their code (below); a bug
prints its traceback and exits 1. --debug prints the traceback of every error."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import traceback

from visionloop import loop_cli, settings
from visionloop.core.errors import EXIT_CODES, DiskFull, InputError, UserError
from visionloop.labeling import cli as labeling_cli
from visionloop.serving import cli as serving_cli
from visionloop.trainer import cli as trainer_cli

# (subcommand, help, adds its arguments, runs it)
COMMANDS = (
    ("data", "build datasets", trainer_cli.add_data_arguments, trainer_cli.run_data),
    ("train", "fine-tune, evaluate, calibrate, export a model version",
     trainer_cli.add_train_arguments, trainer_cli.run_train),
    ("package", "build a TorchServe .mar from a model version",
     serving_cli.add_package_arguments, serving_cli.run_package),
    ("promote", "make a version the default in running TorchServe",
     serving_cli.add_promote_arguments, serving_cli.run_promote),
    ("serve", "start, stop or inspect TorchServe on loopback",
     serving_cli.add_serve_arguments, serving_cli.run_serve),
    ("labelstudio", "start, stop or inspect Label Studio on loopback",
     labeling_cli.add_labelstudio_arguments, labeling_cli.run_labelstudio),
    ("label", "push uncertain captures to Label Studio, pull labels, serve the ML backend",
     labeling_cli.add_label_arguments, labeling_cli.run_label),
    ("retrain", "pull labels, fine-tune a challenger, promote it only if it is not worse",
     loop_cli.add_retrain_arguments, loop_cli.run_retrain),
    ("demo", "the whole loop on the long-tailed Fashion-MNIST with real servers",
     loop_cli.add_demo_arguments, loop_cli.run_demo),
)


def version() -> str:
    """The installed distribution's version (one source: pyproject.toml)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("visionloop")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


# Variables that are not a flag's (every flag's own variable is in its command's --help).
ENVIRONMENT = {
    "VISIONLOOP_CONFIG": "the config file, when --config is not given",
    "LABEL_STUDIO_URL": "a Label Studio run elsewhere (http:// or https://)",
    "LABEL_STUDIO_API_KEY": "its API token (also read as VISIONLOOP_LABELSTUDIO_TOKEN)",
    "VISIONLOOP_LABELSTUDIO_DATABASE": "postgresql://... for the Label Studio we start",
    "VISIONLOOP_BACKEND_SECRET": "the ML backend's shared secret (else made per data dir)",
    "VISIONLOOP_TORCHSERVE_URLS": "comma-separated management URLs of TorchServe replicas",
    "VISIONLOOP_TS_WORKERS, _BATCH_SIZE, _MAX_BATCH_DELAY_MS, _JOB_QUEUE_SIZE":
        "TorchServe tuning (else derived from the machine)",
    "VISIONLOOP_TS_TOKEN_AUTH": "1: TorchServe with token auth",
    "VISIONLOOP_REPLICA": "this TorchServe's name as its promoter knows it (HOST:PORT)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visionloop", description=__doc__, formatter_class=argparse.RawTextHelpFormatter,
        epilog="settings: flag > $VISIONLOOP_<SETTING> > --config FILE > default "
               "(visionloop config shows them)\n\nenvironment:\n"
               + "\n".join(f"  {name}\n      {meaning}" for name, meaning in ENVIRONMENT.items())
               + "\n\nexit codes:\n"
               + "\n".join(f"  {code}  {meaning}" for code, meaning in EXIT_CODES.items()))
    parser.add_argument("--version", action="version", version=f"visionloop {version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="debug logging, and the traceback of every error")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, add_arguments, run in COMMANDS:
        command = sub.add_parser(name, help=help_text)
        add_arguments(command)
        command.set_defaults(run=run)
    shown = sub.add_parser("config", help="print the settings a command runs with, and where "
                                          "each comes from (flag, environment, file, default)")
    shown.add_argument("words", nargs="*", metavar="COMMAND",
                       help="a command (e.g. retrain, label push); default: every command")
    shown.set_defaults(run=None)
    parser.settings_tree = settings.prepare(parser)  # type: ignore[attr-defined]
    return parser


def apply_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """Fill the parsed arguments from the environment, the config file and the defaults; the
    config file's name."""
    tree = parser.settings_tree  # type: ignore[attr-defined]
    file_name = getattr(args, "config", None) or os.environ.get(settings.CONFIG_ENV) or None
    file = settings.load_file(file_name, settings.known_keys(tree))
    path = settings.command_path(parser, args)
    if path in tree:
        settings.resolve(args, tree[path], file, file_name)
    return file_name


def show_config(parser: argparse.ArgumentParser, args: argparse.Namespace,
                file_name: str | None) -> int:
    tree = parser.settings_tree  # type: ignore[attr-defined]
    only = tuple(args.words)
    if only and not any(path[:len(only)] == only for path in tree):
        raise InputError(f"no command {' '.join(only)!r}; commands: "
                         + ", ".join(sorted({' '.join(p) for p in tree})))
    file = settings.load_file(file_name, settings.known_keys(tree))
    print(settings.describe(tree, file, file_name, only))
    return 0


def as_user_error(exc: BaseException) -> UserError | None:
    """The UserError an exception is, or stands for (the OS's own errors a user can fix)."""
    if isinstance(exc, UserError):
        return exc
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return DiskFull(f"no space left on the disk ({exc.filename or exc})",
                        hint="free some space (df -h shows where) and run it again")
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return InputError(f"{exc.filename}: no such file or directory")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose or args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        file_name = apply_settings(parser, args)
        if args.command == "config":
            return show_config(parser, args, file_name)
        return args.run(args)
    except Exception as exc:
        error = as_user_error(exc)
        if error is None:
            raise  # a bug: its traceback, exit 1
        if args.debug:
            traceback.print_exc()
        print(f"visionloop {args.command}: error: {error.one_line()}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
