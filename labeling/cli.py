"""Command-line front ends of labeling: `visionloop labelstudio` and `visionloop label`.

The modules that talk to Label Studio import its SDK (pandas, opencv: seconds), so each
command imports them when it runs, not when the parser is built (`visionloop --help`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
from dataclasses import asdict
from pathlib import Path

from visionloop.core.errors import InputError
from visionloop.core.model_store import ModelStore
from visionloop.core.registry import resolve
from visionloop.core.schedule import add_schedule_arguments
from visionloop.labeling import server
from visionloop.labeling.dedupe import NEAR_DUPLICATE_CORRELATION
from visionloop.labeling.label_check import REVIEW_BELOW
from visionloop.labeling.push_options import TRANSPORTS
from visionloop.labeling.server import LabelStudioConfig, api_token, backend_secret
from visionloop.labeling.strategies import STRATEGIES

log = logging.getLogger(__name__)


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labelstudio-dir", type=Path, default=LabelStudioConfig.data_dir,
                        help="Label Studio data dir: database, media, credentials")
    parser.add_argument("--labelstudio-host", default=LabelStudioConfig.host,
                        help="where Label Studio listens (we bind it here when we start it)")
    parser.add_argument("--labelstudio-port", type=int, default=LabelStudioConfig.port,
                        help="Label Studio's port")
    parser.add_argument("--labelstudio-url",
                        help="a Label Studio run elsewhere, http(s)://HOST[:PORT] (replaces "
                             f"host and port; also ${server.URL_ENV}); its key: "
                             f"${server.API_KEY_ENV}")
    parser.add_argument("--capture-dir", type=Path, default=LabelStudioConfig.files_root,
                        help="the capture store (Label Studio serves its images)")


def server_config(args: argparse.Namespace) -> LabelStudioConfig:
    return LabelStudioConfig(data_dir=args.labelstudio_dir, host=args.labelstudio_host,
                             port=args.labelstudio_port, files_root=args.capture_dir,
                             database_url=os.environ.get(server.DATABASE_ENV) or None,
                             external_url=args.labelstudio_url)


def add_labelstudio_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("start", "stop", "status"))
    add_server_arguments(parser)


def run_labelstudio(args: argparse.Namespace) -> int:
    cfg = server_config(args)
    if cfg.external_url and args.action != "status":
        raise InputError(f"{cfg.url} is a Label Studio run elsewhere (--labelstudio-url, "
                         f"${server.URL_ENV}); it is started and stopped there")
    if args.action == "start":
        pid = server.start(cfg)
        print(f"Label Studio on {cfg.url} (pid {pid}); user {cfg.username}, "
              f"password and token in {cfg.credentials_file}")
    elif args.action == "stop":
        print("stopped" if server.stop(cfg) else "not running")
    else:
        print(json.dumps(server.status(cfg), indent=2))
    return 0


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default="classifier", help="model name in the store")
    parser.add_argument("--store", type=Path, default=Path("model_store"),
                        help="the model store: one folder per model, one per version")
    parser.add_argument("--model-version", "--version", dest="version", default="champion",
                        help="model version: champion (the one serving), latest or vN")
    parser.add_argument("--project", help="Label Studio project title "
                                          "(default: 'visionloop NAME')")
    parser.add_argument("--labels-dir", type=Path, default=Path("labels"),
                        help="pulled labels: labels.sqlite3 and an ImageFolder tree")


def add_label_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="label_action", required=True)
    push = sub.add_parser("push", help="send the most useful uncertain captures as tasks")
    push.add_argument("--budget", type=int, required=True, help="most tasks to create")
    push.add_argument("--strategy", choices=STRATEGIES, default="class_balanced",
                      help="how the budget is spent: class_balanced keeps a share for likely "
                           "minority classes, the rest by uncertainty")
    push.add_argument("--minority-share", type=float, default=0.5,
                      help="class_balanced: share of the budget kept for minority classes")
    push.add_argument("--transport", choices=TRANSPORTS, default="local-files",
                      help="how Label Studio gets the images: local-files serves them from "
                           "the capture dir, upload sends them")
    push.add_argument("--near-duplicate-correlation", type=float,
                      default=NEAR_DUPLICATE_CORRELATION,
                      help="captures this correlated with one already chosen are skipped")
    push.add_argument("--seed", type=int, default=0, help="for --strategy random")
    push.add_argument("--capture-database", metavar="URL",
                      help="the capture index the replicas write (postgresql://...; default: "
                           "$VISIONLOOP_CAPTURE_DATABASE, else SQLite in --capture-dir)")
    add_schedule_arguments(push, "keep running: push once per DURATION (e.g. 10m), each "
                                 "time up to --budget new tasks")
    pull = sub.add_parser("pull", help="bring finished annotations back as training data")
    pull.add_argument("--review-below", type=float, default=REVIEW_BELOW, metavar="P",
                      help="send a label back for review when the serving model gave it a "
                           "calibrated probability below P (0: no check; annotators' "
                           "disagreements go back regardless)")
    pull.add_argument("--capture-database", metavar="URL",
                      help="the capture index (default: $VISIONLOOP_CAPTURE_DATABASE, else "
                           "SQLite in --capture-dir)")
    backend = sub.add_parser("backend", help="serve the ML backend and the webhook receiver")
    backend.add_argument("--backend-host", "--host", dest="host", default="127.0.0.1",
                         help="where the ML backend listens")
    backend.add_argument("--backend-port", "--port", dest="port", type=int, default=9090,
                         help="the ML backend's port")
    backend.add_argument("--retrain-threshold", type=int, default=50,
                         help="annotation events that start --retrain-command")
    backend.add_argument("--retrain-command", default=None,
                         help="command run in the background past the threshold")
    connect = sub.add_parser("connect", help="point the project's ML backend and annotation "
                                             "webhook at `visionloop label backend`")
    connect.add_argument("--backend-url", default="http://127.0.0.1:9090",
                         help="where Label Studio reaches `visionloop label backend`")
    for command in (push, pull, backend, connect):
        add_model_arguments(command)
        add_server_arguments(command)
    status = sub.add_parser("status", help="per-annotator answers and agreement, labels "
                                           "waiting for review (from the last pull) and the "
                                           "serving traffic's drift; no Label Studio needed")
    status.add_argument("--labels-dir", type=Path, default=Path("labels"),
                        help="pulled labels: labels.sqlite3 and an ImageFolder tree")
    status.add_argument("--capture-dir", type=Path, default=Path("captures"),
                        help="where serving writes captures and its drift readings")
    status.add_argument("--name", default="classifier", help="the model whose drift to show")


def _project(args: argparse.Namespace, client):
    from visionloop.labeling.project import default_title, ensure_project

    store = ModelStore(args.store)
    manifest = store.load_manifest(args.name, resolve(store, args.name, args.version))
    return manifest, ensure_project(client, args.project or default_title(args.name),
                                    manifest.classes)


def _push(args: argparse.Namespace) -> int:
    from visionloop.core.schedule import JobMetrics, metrics_address, parse_duration, run_every

    if args.every:
        metrics = JobMetrics("push", metrics_address(args))
        run_every(parse_duration(args.every), lambda: _push_once(args),
                  "push (the captures wait in the store)", metrics=metrics,
                  first_retry_s=parse_duration(args.retry_after))
        return 0
    metrics_address(args)  # --metrics-port without --every: say so
    return _push_once(args)


def _push_once(args: argparse.Namespace) -> int:
    from visionloop.labeling.client import connect
    from visionloop.labeling.push import PushOptions, push

    cfg = server_config(args)
    client = connect(cfg)
    manifest, project = _project(args, client)
    minority = list(manifest.minority_classes)
    options = PushOptions(budget=args.budget, strategy=args.strategy,
                          minority_share=args.minority_share, transport=args.transport,
                          min_correlation=args.near_duplicate_correlation, seed=args.seed)
    result = push(args.capture_dir, client, project, manifest.name, minority, options,
                  files_root=cfg.files_root, capture_database=args.capture_database)
    summary = asdict(result)
    ids = summary.pop("task_ids")
    summary["task_ids"] = f"{min(ids)}-{max(ids)}" if ids else "none"
    print(json.dumps({"project": project.id, "minority": minority, **summary}, indent=2),
          flush=True)
    return 0


def _pull(args: argparse.Namespace) -> int:
    from visionloop.labeling.client import connect
    from visionloop.labeling.pull import pull

    client = connect(server_config(args))
    manifest, project = _project(args, client)
    result = pull(args.labels_dir, args.capture_dir, client, project, model=manifest.name,
                  review_below=args.review_below or None,
                  capture_database=args.capture_database)
    print(json.dumps({"project": project.id, **asdict(result)}, indent=2))
    return 0


def _backend(args: argparse.Namespace) -> int:
    from visionloop.labeling.backend_server import BackendServer
    from visionloop.labeling.events import RetrainTrigger
    from visionloop.labeling.loop_metrics import LoopStores
    from visionloop.labeling.predictor import Predictor

    cfg = server_config(args)
    predictor = Predictor(args.store, args.name, args.version, cfg.url, api_token(cfg))
    command = shlex.split(args.retrain_command) if args.retrain_command else None
    args.labels_dir.mkdir(parents=True, exist_ok=True)
    trigger = RetrainTrigger(args.labels_dir / "events.json", args.retrain_threshold, command)
    stores = LoopStores(args.labels_dir, args.capture_dir, args.store, args.name,
                        os.environ.get("VISIONLOOP_CAPTURE_DATABASE"))
    server = BackendServer((args.host, args.port), predictor, trigger, backend_secret(cfg),
                           stores)
    # SIGTERM ends serve_forever like Ctrl-C (shutdown() from this thread would deadlock)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    print(f"ML backend and webhook receiver on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _connect(args: argparse.Namespace) -> int:
    from visionloop.labeling.client import connect
    from visionloop.labeling.project import connect_backend

    cfg = server_config(args)
    client = connect(cfg)
    _, project = _project(args, client)
    connect_backend(client, project, args.backend_url, backend_secret(cfg))
    print(f"project {project.id}: ML backend and webhook at {args.backend_url}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from visionloop.core.drift import latest_readings
    from visionloop.labeling.pull import annotator_report, review_report

    drift = latest_readings(args.capture_dir, args.name)
    print(json.dumps({**annotator_report(args.labels_dir),
                      "reviews": review_report(args.labels_dir),
                      "drift": {"drifted": any(r["drifted"] for r in drift),
                                "workers": drift}}, indent=2))
    return 0


def run_label(args: argparse.Namespace) -> int:
    from visionloop.labeling.client import LabelStudioUnavailable

    run = {"push": _push, "pull": _pull, "backend": _backend, "connect": _connect,
           "status": _status}[args.label_action]
    try:
        return run(args)
    except LabelStudioUnavailable as exc:
        # nothing was recorded that did not arrive: the next run catches up
        raise LabelStudioUnavailable(f"{exc}; nothing lost",
                                     hint=exc.hint or "run it again once Label Studio "
                                                      "answers") from exc
