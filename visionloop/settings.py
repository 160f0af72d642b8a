"""Where each command's settings come from: a flag given on the command line, else its
environment variable, else the config file, else the default.

One config file (YAML) serves the whole loop: the settings every stage shares at its top
level, each command's own settings in a section named after the command:

    name: birds                 # shared: every command that has --name reads it
    store: model_store
    data: ~/photos/birds
    train:
      learner: auto
      budget_s: 600
    retrain:
      min_new_labels: 50

A shared setting has one flag, one environment variable (VISIONLOOP_NAME) and one default in
every command that takes it; a command's own setting reads VISIONLOOP_<COMMAND>_<SETTING>
(VISIONLOOP_TRAIN_EPOCHS). `visionloop config` prints what a command would run with and where
each value came from.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from visionloop.core.errors import InputError

# Settings that mean the same in every command that takes them.
SHARED = ("name", "store", "data", "capture_dir", "capture_database", "labels_dir", "project",
          "labelstudio_url", "labelstudio_dir", "labelstudio_host", "labelstudio_port",
          "torchserve_home", "torchserve_model_store", "torchserve_url", "torchserve_host",
          "torchserve_token_auth", "management_port", "backend", "embedding_cache",
          "capture_below")
ENV_PREFIX = "VISIONLOOP_"
# read when a setting's own variable is not set: the names other tools (label-studio-sdk)
# and earlier releases use
ENV_ALIASES = {"labelstudio_url": ("LABEL_STUDIO_URL",),
               "torchserve_url": ("VISIONLOOP_TORCHSERVE_URLS",),
               "torchserve_token_auth": ("VISIONLOOP_TS_TOKEN_AUTH",)}
CONFIG_ENV = "VISIONLOOP_CONFIG"
_NOT_SETTINGS = ("help", "version", "config")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass
class Setting:
    """One optional argument of one command, as the resolver sees it."""
    key: str  # the primary flag without dashes: the file key and the environment suffix
    command: str
    action: argparse.Action
    default: Any
    required: bool

    @property
    def shared(self) -> bool:
        return self.key in SHARED

    @property
    def env(self) -> str:
        scope = "" if self.shared else self.command.replace("-", "_").upper() + "_"
        return f"{ENV_PREFIX}{scope}{self.key.upper()}"

    def from_environment(self, environ: dict[str, str]) -> tuple[str, str] | None:
        """(variable, value) of the first of its variables that is set."""
        aliases = ENV_ALIASES.get(self.key, ()) if self.shared else ()
        for name in (self.env, *aliases):
            if environ.get(name, "") != "":
                return name, environ[name]
        return None

    def parse(self, raw: Any, where: str) -> Any:
        """A value from the environment or the file, typed as the flag would be."""
        action = self.action
        if action.nargs == 0:  # store_true, --x/--no-x
            text = str(raw).strip().lower()
            if text not in _TRUE + _FALSE:
                raise InputError(f"{where}: {self.key} is a yes/no setting, got {raw!r}")
            return text in _TRUE
        if isinstance(action, argparse._AppendAction):
            items = raw if isinstance(raw, list) else [s for s in str(raw).split(",") if s]
            return [self._typed(item, where) for item in items]
        return self._typed(raw, where)

    def _typed(self, raw: Any, where: str) -> Any:
        kind = self.action.type or str
        try:
            value = kind(os.path.expanduser(str(raw)) if kind is Path else
                         raw if kind is str and isinstance(raw, str) else str(raw))
        except (TypeError, ValueError) as exc:
            raise InputError(f"{where}: {self.key} = {raw!r} is not a valid value ({exc})") \
                from None
        if self.action.choices is not None and value not in self.action.choices:
            raise InputError(f"{where}: {self.key} must be one of "
                             f"{', '.join(map(str, self.action.choices))}, got {raw!r}")
        return value


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _key(action: argparse.Action) -> str:
    long = [s for s in action.option_strings if s.startswith("--")]
    return long[0][2:].replace("-", "_")


def take_over(parser: argparse.ArgumentParser, command: str) -> list[Setting]:
    """Record every optional argument's default (and required) and clear them, so that a
    parsed None means "not on the command line"; the help says the variable and default."""
    settings = []
    for action in parser._actions:
        if not action.option_strings or action.dest in _NOT_SETTINGS or \
                isinstance(action, argparse._SubParsersAction):
            continue
        setting = Setting(_key(action), command, action, action.default, action.required)
        settings.append(setting)
        action.default, action.required = None, False
        if action.help != argparse.SUPPRESS:
            shown = "" if setting.default in (None, [], False) else f"; default: {setting.default}"
            action.help = f"{action.help or setting.key.replace('_', ' ')} [${setting.env}{shown}]"
    return settings


def prepare(parser: argparse.ArgumentParser) -> dict[tuple[str, ...], list[Setting]]:
    """take_over for every (sub)command: {("label", "push"): its settings, ...}."""
    found: dict[tuple[str, ...], list[Setting]] = {}

    def walk(node: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        if path:
            found[path] = take_over(node, path[0])
            node.add_argument("--config", metavar="FILE",
                              help=f"the loop's YAML config file [${CONFIG_ENV}]")
        for name, child in _subparsers(node).items():
            walk(child, (*path, name))

    walk(parser, ())
    return found


def load_file(path: str | Path | None, known: dict[str, set[str]]) -> dict[str, Any]:
    """The config file's mapping; a key no command knows is an error (a typo is not
    silently ignored)."""
    if not path:
        return {}
    file = Path(path).expanduser()
    if not file.is_file():
        raise InputError(f"config file {file}: no such file")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"config file {file} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"config file {file} must hold a mapping of setting: value")
    every = set().union(*known.values())
    for key, value in data.items():
        if key in known and isinstance(value, dict):
            unknown = sorted(set(value) - known[key])
            if unknown:
                raise InputError(f"config file {file}: {key}: unknown setting(s) {unknown}; "
                                 f"{key} takes {sorted(known[key])}")
        elif key not in every:
            raise InputError(f"config file {file}: unknown setting {key!r} (a command's own "
                             f"settings go in its section, e.g. train: {{epochs: 3}})")
    return data


def resolve(args: argparse.Namespace, settings: list[Setting],
            file: dict[str, Any], file_name: str | None,
            environ: dict[str, str] | None = None) -> dict[str, str]:
    """Fill args from flag > environment > file > default; returns {key: where it came
    from}. A required setting found nowhere is an InputError."""
    environ = os.environ if environ is None else environ
    sources = {}
    for setting in settings:
        dest = setting.action.dest
        section = file.get(setting.command) if isinstance(file.get(setting.command), dict) \
            else {}
        found = setting.from_environment(environ)
        if getattr(args, dest, None) is not None:
            sources[setting.key] = "flag"
        elif found is not None:
            setattr(args, dest, setting.parse(found[1], f"${found[0]}"))
            sources[setting.key] = f"${found[0]}"
        elif setting.key in section or (setting.shared or setting.command == "train") \
                and setting.key in file and not isinstance(file[setting.key], dict):
            value = section.get(setting.key, file.get(setting.key))
            setattr(args, dest, setting.parse(value, f"{file_name}"))
            sources[setting.key] = f"file {file_name}"
        elif setting.required:
            flag = setting.action.option_strings[0]
            raise InputError(f"{setting.command}: {flag} is required",
                             hint=f"pass {flag}, set ${setting.env}, or put {setting.key} in "
                                  "the config file")
        else:
            setattr(args, dest, setting.default)
            sources[setting.key] = "default"
    return sources


def known_keys(tree: dict[tuple[str, ...], list[Setting]]) -> dict[str, set[str]]:
    """{command: the keys its section may hold}; shared keys may also sit at the top."""
    known: dict[str, set[str]] = {}
    for path, settings in tree.items():
        known.setdefault(path[0], set()).update(s.key for s in settings)
    return known


def command_path(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, ...]:
    """The (sub)commands the parsed arguments name, e.g. ("label", "push")."""
    path: tuple[str, ...] = ()
    node = parser
    while True:
        sub = next((a for a in node._actions if isinstance(a, argparse._SubParsersAction)),
                   None)
        if sub is None or getattr(args, sub.dest, None) is None:
            return path
        name = getattr(args, sub.dest)
        path, node = (*path, name), sub.choices[name]


def describe(tree: dict[tuple[str, ...], list[Setting]], file: dict[str, Any],
             file_name: str | None, only: tuple[str, ...] = ()) -> str:
    """Every setting of the commands (or of `only`'s), its value and where it comes from."""
    lines = []
    for path, settings in tree.items():
        if only and path[:len(only)] != only:
            continue
        empty = argparse.Namespace(**{s.action.dest: None for s in settings})
        optional = [replace(s, required=False) for s in settings]  # show what is missing
        sources = resolve(empty, optional, file, file_name)
        lines.append(f"{' '.join(path)}:")
        for setting in settings:
            value = getattr(empty, setting.action.dest, None)
            source = sources[setting.key]
            if setting.required and source == "default":
                source = "REQUIRED, not set"
            lines.append(f"  {setting.key}: {value if value is not None else '~'}"
                         f"    # {source}; ${setting.env}")
    return "\n".join(lines)
