"""Command-line front ends of the trainer: `visionloop data ...` and `visionloop train`.

Training and the dataset builder import torch (seconds): each command imports them when it
runs, not when the parser is built (`visionloop --help`).
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from pathlib import Path

from visionloop.core.errors import require_module
from visionloop.core.field_docs import field_comments
from visionloop.trainer.config import CHOICES, TrainConfig, load_config

# the flag other commands give the same setting comes first; the field's own name stays
_FLAGS = {"out": ("--store", "--out")}
# what the field's comment does not say on a command line
_HELP = {
    "weights": "DEFAULT (pretrained), none (random init) or a state_dict file path",
    "parent": "warm start from this version of --name (e.g. v3, or 'latest')",
    "minority": "comma-separated class names reported as minority (default: detected)",
    "extra_train": "comma-separated ImageFolder trees added to train/ (e.g. labels/images)",
    "candidates": "comma-separated, what --learner auto tries, in order",
}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, its help from the field's comment."""
    comments = field_comments(TrainConfig)
    for f in fields(TrainConfig):
        flags = _FLAGS.get(f.name, ("--" + f.name.replace("_", "-"),))
        default = None if f.default is MISSING else f.default
        if isinstance(default, tuple):
            default = ",".join(default) or None
        help_text = _HELP.get(f.name) or comments.get(f.name, f.name.replace("_", " "))
        help_text = help_text.replace("%", "%%")
        if f.type in ("bool", bool):
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
            continue
        kind = {"int": int, "int | None": int, "float": float}.get(str(f.type), str)
        parser.add_argument(*flags, dest=f.name, type=kind, default=default,
                            choices=CHOICES.get(f.name), required=f.default is MISSING,
                            help=help_text)


def run_train(args: argparse.Namespace) -> int:
    require_module("onnxruntime", "cpu", "checking the ONNX export against the model")
    from visionloop.trainer.train import run_training

    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    cfg = load_config(None, overrides)  # the CLI read the config file (visionloop.settings)
    version_dir = run_training(cfg)
    if version_dir is not None:
        from visionloop.core.manifest import ModelManifest
        from visionloop.trainer.train import format_selection

        selection = ModelManifest.load(version_dir).metrics.get("selection")
        if selection and "inherited_from" not in selection:
            print(format_selection(selection))
        print(version_dir)
    return 0


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dataset", required=True)
    fm = sub.add_parser("fashion-mnist", help="build the long-tailed Fashion-MNIST scenario")
    fm.add_argument("--out", required=True, type=Path,
                    help="the scenario's folder (train/ val/ test/ pool/), then train's --data")
    fm.add_argument("--imbalance-ratio", type=float, default=100.0,
                    help="a majority class has this many times a minority class's images")
    fm.add_argument("--pool-imbalance-ratio", type=float, default=None,
                    help="default: the same as --imbalance-ratio (a production-like pool)")
    fm.add_argument("--minority", required=True,
                    help="class names or indices, e.g. coat,sandal,bag")
    fm.add_argument("--train-per-class", type=int, default=1000,
                    help="train/ images of a majority class")
    fm.add_argument("--pool-per-class", type=int, default=1000,
                    help="unlabelled pool/ images of a majority class")
    fm.add_argument("--val-per-class", type=int, default=100,
                    help="val/ images per class (balanced)")
    fm.add_argument("--test-per-class", type=int, default=500,
                    help="test/ images per class (balanced, from the official test set)")
    fm.add_argument("--seed", type=int, default=0, help="seeds which images go where")
    fm.add_argument("--source-dir", type=Path, default=None,
                    help="folder with the *-ubyte.gz files (default: the Debian package's)")


def run_data(args: argparse.Namespace) -> int:
    from visionloop.trainer import fashion_mnist

    config = fashion_mnist.ScenarioConfig(
        out=args.out, minority=fashion_mnist.parse_minority(args.minority),
        imbalance_ratio=args.imbalance_ratio, pool_imbalance_ratio=args.pool_imbalance_ratio,
        train_per_class=args.train_per_class, pool_per_class=args.pool_per_class,
        val_per_class=args.val_per_class, test_per_class=args.test_per_class, seed=args.seed,
        source_dir=args.source_dir or fashion_mnist.DEBIAN_DIR,
    )
    summary = fashion_mnist.build_scenario(config)
    print(f"{args.out}: train {summary['counts']['train']}")
    return 0
