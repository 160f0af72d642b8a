"""Command-line front ends of serving: `visionloop package` and `visionloop serve`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from visionloop.core.errors import Incomplete, InputError
from visionloop.core.lock import LockBusy
from visionloop.core.model_store import ModelStore, StoreError
from visionloop.core.registry import Registry
from visionloop.serving import server
from visionloop.serving.capture import CAPTURE_BELOW, capture_policy
from visionloop.serving.promote import RolloutIncomplete, promote, replica_configs, roll_out
from visionloop.serving.server import ServerConfig, management_json
from visionloop.serving.settings import BACKENDS

MODEL_STORE_HELP = ("the folder of .mar files TorchServe registers from (a shared volume for "
                    "replicas); default: TORCHSERVE_HOME/model-store")


def model_store(home: Path, given: Path | None) -> Path:
    return given if given is not None else home / "model-store"


def add_package_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("version", help="model version to package, e.g. v3 (or 'latest')")
    parser.add_argument("--name", default="classifier", help="model name in the store")
    parser.add_argument("--store", type=Path, default=Path("model_store"),
                        help="the model store: one folder per model, one per version")
    parser.add_argument("--backend", default="torchscript", choices=tuple(BACKENDS),
                        help="the artifact the archive serves")
    parser.add_argument("--torchserve-home", "--home", dest="home", type=Path,
                        default=ServerConfig.home,
                        help="TorchServe's working folder: config, logs, pid file")
    parser.add_argument("--torchserve-model-store", "--export-path", dest="export_path",
                        type=Path, help=MODEL_STORE_HELP)
    parser.add_argument("--batch-size", type=int,
                        help="default: $VISIONLOOP_TS_BATCH_SIZE, else 8 on CPU, 32 on a GPU")
    parser.add_argument("--max-batch-delay-ms", type=int,
                        help="default: $VISIONLOOP_TS_MAX_BATCH_DELAY_MS, else 10")
    parser.add_argument("--capture-below", type=float, default=CAPTURE_BELOW,
                        help="capture predictions whose calibrated confidence is below this")
    parser.add_argument("--capture-classes", default="minority",
                        help="also capture every prediction of these classes: 'minority' "
                             "(the manifest's), 'none', or comma-separated names")


def capture_classes(spec: str) -> tuple[str, ...] | None:
    """--capture-classes: None for the manifest's minority classes, () for none."""
    if spec == "minority":
        return None
    return () if spec == "none" else tuple(spec.split(","))


def _package(args: argparse.Namespace) -> tuple[str, Path]:
    """Package the version the arguments name; returns (resolved version, .mar path)."""
    # the archive and the handler's config import torch: only when packaging runs
    from visionloop.serving.archive import package
    from visionloop.serving.handler import ServingConfig

    store = ModelStore(args.store)
    version = store.resolve_version(args.name, args.version)
    manifest = store.load_manifest(args.name, version)
    serving = ServingConfig(capture=capture_policy(
        manifest, max_confidence=args.capture_below,
        always_classes=capture_classes(args.capture_classes)))
    mar = package(store.version_dir(args.name, version), model_store(args.home, args.export_path),
                  args.backend,
                  args.batch_size, args.max_batch_delay_ms, serving=serving)
    return version, mar


def run_package(args: argparse.Namespace) -> int:
    print(_package(args)[1])
    return 0


def add_promote_arguments(parser: argparse.ArgumentParser) -> None:
    add_package_arguments(parser)
    parser.add_argument("--management-port", type=int, default=ServerConfig.management_port,
                        help="TorchServe's management API port")
    parser.add_argument("--torchserve-token-auth", "--token-auth", dest="token_auth",
                        action="store_true",
                        help="TorchServe runs with token auth (keys in its home's key_file.json)")
    parser.add_argument("--torchserve-url", "--management-url", dest="management_url",
                        action="append", default=[], metavar="URL",
                        help="a replica's management API, http://HOST:PORT (repeatable: "
                             "rolled through in order; every replica registers from "
                             "--export-path, a shared volume); replaces --management-port")


def run_promote(args: argparse.Namespace) -> int:
    """Package VERSION into the running server's model store and make it the default."""
    mars = model_store(args.home, args.export_path)
    replicas = (replica_configs(args.management_url, mars, args.home if args.token_auth else None)
                if args.management_url else
                [ServerConfig(home=args.home, model_store=mars,
                              management_port=args.management_port, token_auth=args.token_auth)])
    registry = Registry(ModelStore(args.store), args.name)
    try:
        with registry.writer_lock():
            if not args.management_url:  # down: nothing packaged (roll_out checks replicas)
                management_json(replicas[0], "/models", timeout=5.0)
            version, mar = _package(args)
            print(mar)
            if len(replicas) > 1 or args.management_url:
                seconds = roll_out(replicas, args.name, version, mar.name)
                registry.set_champion(version)
                print(f"{args.name}: {version} is the default on every replica ("
                      + ", ".join(f"{u} {s:.1f} s" for u, s in seconds.items()) + ")")
                return 0
            removed = promote(replicas[0], args.name, version, mar.name)
            registry.set_champion(version)
    except LockBusy as exc:
        raise LockBusy(f"a retrain is running, nothing changed ({exc})") from exc
    except RolloutIncomplete as exc:
        raise Incomplete(str(exc), hint=f"the champion record stays {registry.champion()}; "
                                        "run promote again once every replica answers") from exc
    print(f"{args.name}: {version} is the default"
          + (f", {', '.join(removed)} removed" if removed else ""))
    return 0


def champion_archive(store_dir: Path, name: str, export_dir: Path, backend: str,
                     capture_below: float = CAPTURE_BELOW) -> str:
    """The .mar file name of NAME's champion in export_dir, packaged there if it is missing
    (with the capture policy a promotion would give it)."""
    from visionloop.serving.archive import mar_name, package
    from visionloop.serving.handler import ServingConfig

    store = ModelStore(store_dir)
    try:
        version = Registry(store, name).champion()
    except StoreError as exc:
        raise InputError(f"no version of {name!r} in {store_dir} to serve ({exc}): train one "
                         f"first (visionloop train --name {name} --out {store_dir})") from exc
    archive = mar_name(name, version, backend)
    if not (export_dir / archive).exists():
        manifest = store.load_manifest(name, version)
        package(store.version_dir(name, version), export_dir, backend,
                serving=ServingConfig(capture=capture_policy(manifest,
                                                             max_confidence=capture_below)))
    return archive


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("start", "stop", "status", "foreground", "ready"),
                        help="start (background, waits for READY), stop, status; foreground: "
                             "run in this process (containers); ready: exit 0 if every "
                             "--model name has a READY worker (healthchecks)")
    parser.add_argument("--torchserve-home", "--home", dest="home", type=Path,
                        default=ServerConfig.home,
                        help="TorchServe's working folder: config, logs, pid file")
    parser.add_argument("--torchserve-host", "--host", dest="host", default=ServerConfig.host,
                        help="where TorchServe listens (loopback; 0.0.0.0 only inside a "
                             "container network)")
    parser.add_argument("--torchserve-token-auth", "--token-auth", dest="token_auth",
                        action="store_true",
                        help="require TorchServe's keys (HOME/key_file.json) on every API")
    parser.add_argument("--torchserve-model-store", "--model-store", dest="model_store",
                        type=Path, help=MODEL_STORE_HELP)
    parser.add_argument("--capture-dir", type=Path, default=ServerConfig.capture_dir,
                        help="the capture store: images the model was unsure of, and their "
                             "index")
    parser.add_argument("--capture-database", metavar="URL",
                        help="the capture index: postgresql://... shared by replicas, or "
                             "sqlite:///PATH (default: SQLite in --capture-dir); the variable "
                             "keeps a password out of the process list")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=FILE.mar",
                        help="model to load at start (repeatable), e.g. fm=fm-v1-onnx.mar")
    parser.add_argument("--champion", metavar="NAME",
                        help="also load NAME's champion from --store, packaged into "
                             "--model-store first where it is not there: a restarted server "
                             "serves what the last promotion chose")
    parser.add_argument("--store", type=Path, default=Path("model_store"),
                        help="the model store: one folder per model, one per version")
    parser.add_argument("--backend", default="torchscript", choices=tuple(BACKENDS),
                        help="the artifact --champion's archive serves")
    parser.add_argument("--capture-below", type=float, default=CAPTURE_BELOW,
                        help="capture predictions whose calibrated confidence is below this "
                             "(when --champion is packaged here)")
    parser.add_argument("--inference-port", type=int, default=ServerConfig.inference_port,
                        help="TorchServe's inference API port (POST /predictions/NAME)")
    parser.add_argument("--management-port", type=int, default=ServerConfig.management_port,
                        help="TorchServe's management API port")
    parser.add_argument("--metrics-port", type=int, default=ServerConfig.metrics_port,
                        help="TorchServe's Prometheus metrics port")
    parser.add_argument("--grpc-inference-port", type=int,
                        default=ServerConfig.grpc_inference_port,
                        help="TorchServe's gRPC inference port")
    parser.add_argument("--grpc-management-port", type=int,
                        default=ServerConfig.grpc_management_port,
                        help="TorchServe's gRPC management port")


def run_serve(args: argparse.Namespace) -> int:
    cfg = ServerConfig(home=args.home, model_store=model_store(args.home, args.model_store),
                       capture_dir=args.capture_dir,
                       capture_database=args.capture_database,
                       host=args.host, token_auth=args.token_auth,
                       inference_port=args.inference_port, management_port=args.management_port,
                       metrics_port=args.metrics_port,
                       grpc_inference_port=args.grpc_inference_port,
                       grpc_management_port=args.grpc_management_port)
    if args.action == "ready":
        names = [m.split("=", 1)[0] for m in args.model]
        return 0 if names and all(server.workers_ready(cfg, n) for n in names) else 1
    bad = [m for m in args.model if "=" not in m]
    if bad:
        raise InputError(f"--model takes NAME=FILE.mar, got {bad}")
    models = dict(m.split("=", 1) for m in args.model)
    if args.champion and args.action in ("start", "foreground"):
        models[args.champion] = champion_archive(args.store, args.champion, cfg.model_store,
                                                 args.backend, args.capture_below)
    if args.action == "foreground":
        server.run_foreground(cfg, models)  # does not return
    if args.action == "start":
        pid = server.start(cfg, models)
        print(f"TorchServe ready (pid {pid}): inference {cfg.url('inference')}, "
              f"management {cfg.url('management')}, metrics {cfg.url('metrics')}")
    elif args.action == "stop":
        print("stopped" if server.stop(cfg) else "not running")
    else:
        print(json.dumps(server.status(cfg), indent=2))
    return 0
