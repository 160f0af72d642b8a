"""The `visionloop` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import logging
import sys

from labeling import cli as labeling_cli
from serving import cli as serving_cli
from trainer import cli as trainer_cli
from visionloop import loop_cli

# Errors a user can fix from the message alone: printed without a traceback, exit code 2.
USER_ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visionloop", description=__doc__)
    parser.add_argument("--version", action="version", version=f"visionloop {version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, add_arguments, run in COMMANDS:
        command = sub.add_parser(name, help=help_text)
        add_arguments(command)
        command.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except USER_ERRORS as exc:
        print(f"visionloop {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
