"""Command-line front ends of the loop: `visionloop retrain` and `visionloop demo`.

The retrain job and the demo import every stage (torch, the Label Studio SDK: seconds), so
they are imported when their command runs, not when the parser is built.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import MISSING, asdict, fields
from pathlib import Path

from visionloop.configs import RETRAIN_LEARNERS, DemoConfig, RetrainConfig
from visionloop.core.field_docs import field_comments
from visionloop.core.lock import LockBusy
from visionloop.core.schedule import add_schedule_arguments
from visionloop.labeling.cli import add_server_arguments, server_config
from visionloop.serving.server import ServerConfig
from visionloop.serving.settings import BACKENDS
from visionloop.trainer.config import LEARNERS

_TYPES = {"int": int, "int | None": int, "float": float, "Path": Path, "Path | None": Path,
          "str | None": str,
          "str": str}


def add_retrain_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per RetrainConfig field (its help from the field's comment), plus where Label
    Studio and TorchServe run."""
    comments = field_comments(RetrainConfig)
    choices = {"learner": RETRAIN_LEARNERS, "backend": tuple(BACKENDS)}
    for f in fields(RetrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "capture_dir":
            continue  # shared with Label Studio's arguments below
        help_text = comments.get(f.name, f.name.replace("_", " ")).replace("%", "%%")
        if str(f.type) == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_text)
            continue
        default = None if f.default is MISSING else f.default
        parser.add_argument(flag, type=_TYPES[str(f.type)], default=default,
                            choices=choices.get(f.name), help=help_text)
    add_server_arguments(parser)
    parser.add_argument("--torchserve-home", type=Path, default=ServerConfig.home,
                        help="TorchServe's working folder: config, logs, pid file")
    parser.add_argument("--torchserve-host", default=ServerConfig.host,
                        help="where TorchServe listens")
    parser.add_argument("--torchserve-token-auth", action="store_true",
                        help="TorchServe runs with token auth (keys in its home's key_file.json)")
    parser.add_argument("--management-port", type=int, default=ServerConfig.management_port,
                        help="TorchServe's management API port")
    parser.add_argument("--torchserve-url", action="append", default=[], metavar="URL",
                        help="a TorchServe replica's management URL (repeatable: the promotion "
                             "rolls through them in order); replaces --management-port "
                             "(default: the comma-separated $VISIONLOOP_TORCHSERVE_URLS)")
    parser.add_argument("--torchserve-model-store", type=Path,
                        help="the model store every replica registers from (a shared volume; "
                             "default: TORCHSERVE_HOME/model-store)")
    add_schedule_arguments(parser, "keep running: once per DURATION (e.g. 30m, 6h)")


TORCHSERVE_URLS_ENV = "VISIONLOOP_TORCHSERVE_URLS"  # compose's replicas profile sets it


def run_retrain(args: argparse.Namespace) -> int:
    from visionloop.core.schedule import JobMetrics, metrics_address, parse_duration, run_every
    from visionloop.labeling.client import LabelStudioUnavailable
    from visionloop.retrain import retrain_once
    from visionloop.serving.promote import RolloutIncomplete, replica_configs

    cfg = RetrainConfig(**{f.name: getattr(args, f.name) for f in fields(RetrainConfig)})
    address = metrics_address(args)
    labelstudio = server_config(args)
    model_store = args.torchserve_model_store or args.torchserve_home / "model-store"
    torchserve: ServerConfig | list[ServerConfig] = ServerConfig(
        home=args.torchserve_home, host=args.torchserve_host,
        token_auth=args.torchserve_token_auth, model_store=model_store,
        management_port=args.management_port)
    urls = args.torchserve_url or [u for u in os.environ.get(TORCHSERVE_URLS_ENV, "").split(",")
                                   if u.strip()]
    if urls:
        torchserve = replica_configs(urls, model_store,
                                     args.torchserve_home if args.torchserve_token_auth else None)

    def once() -> int:
        decision = retrain_once(cfg, labelstudio, torchserve)
        print(json.dumps(asdict(decision) if decision else {"skipped": "too few new labels"},
                         indent=2), flush=True)
        return 0

    if args.every:
        run_every(parse_duration(args.every), once, "retrain run (the champion keeps serving)",
                  metrics=JobMetrics("retrain", address),
                  first_retry_s=parse_duration(args.retry_after))
        return 0
    try:
        return once()
    except LockBusy as exc:
        raise LockBusy(f"another retrain is running ({exc})") from exc
    except LabelStudioUnavailable as exc:
        raise LabelStudioUnavailable(f"{exc}; the champion keeps serving",
                                     hint=exc.hint or "run it again once Label Studio "
                                                      "answers") from exc
    except RolloutIncomplete as exc:
        raise RolloutIncomplete(exc.version, "not every replica answered", exc.serving) from exc


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="a few minutes on small settings (tests); flags still override")
    comments = field_comments(DemoConfig)
    for f in fields(DemoConfig):
        help_text = comments.get(f.name, f.name.replace("_", " ")).replace("%", "%%")
        parser.add_argument("--" + f.name.replace("_", "-"), type=_TYPES[str(f.type)],
                            default=None, choices=LEARNERS if f.name == "learner" else None,
                            help=f"{help_text} (default: {f.default})")


def run_demo(args: argparse.Namespace) -> int:
    from visionloop.demo import run_demo as demo

    given = {f.name: getattr(args, f.name) for f in fields(DemoConfig)
             if getattr(args, f.name) is not None}
    cfg = DemoConfig.quick(**given) if args.quick else DemoConfig(**given)
    print(demo(cfg))
    return 0
