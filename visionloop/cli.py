"""The `visionloop` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import logging
import sys

from serving import cli as serving_cli
from trainer import cli as trainer_cli

# Errors a user can fix from the message alone: printed without a traceback, exit code 2.
USER_ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visionloop", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="build datasets")
    trainer_cli.add_data_arguments(data)
    data.set_defaults(run=trainer_cli.run_data)
    train = sub.add_parser("train", help="fine-tune, evaluate, calibrate, export a model version")
    trainer_cli.add_train_arguments(train)
    train.set_defaults(run=trainer_cli.run_train)
    package = sub.add_parser("package", help="build a TorchServe .mar from a model version")
    serving_cli.add_package_arguments(package)
    package.set_defaults(run=serving_cli.run_package)
    promote = sub.add_parser("promote", help="make a version the default in running TorchServe")
    serving_cli.add_promote_arguments(promote)
    promote.set_defaults(run=serving_cli.run_promote)
    serve = sub.add_parser("serve", help="start, stop or inspect TorchServe on loopback")
    serving_cli.add_serve_arguments(serve)
    serve.set_defaults(run=serving_cli.run_serve)
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
