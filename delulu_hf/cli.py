"""One argument system for every command line: ``HfArgumentParser`` over dataclasses.

Every script in ``training/`` declares its options as a dataclass (field = flag, default = default,
``metadata={"help": ...}`` = help) and parses them with ``ArgumentParser.parse``, which adds what
the scripts need on top of transformers' parser:

* **One flag style**: ``--field_name`` (as transformers' own scripts). The hyphenated spelling
  ``--field-name`` and renamed flags still work, with a one-line deprecation warning.
* **A YAML config**: ``--config FILE`` sets the defaults (every key must be a field); flags on the
  command line override it. A script may name a default config, whose values ``--help`` shows.
* **Mapping fields** (``dict``-typed, e.g. ``model``): ``--model.hidden_size 256`` sets one key,
  ``--model "{hidden_size: 256}"`` several; values are read as YAML.
* **Errors a person can read**: an unknown flag (with the closest known one), a bad value, or a
  dataclass ``__post_init__`` check that fails prints one line to stderr and exits with code 2.

``main_entry`` runs a script's ``main`` and turns a ``UserError`` raised anywhere below it (a
missing path, a corrupt file, labels made with another k) into the same one line and exit code 2;
program errors keep their traceback. Under ``accelerate launch``/``torchrun`` only rank 0 prints
errors every rank meets alike, so the message is not repeated once per process.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn, Union

import yaml
from transformers import HfArgumentParser

from delulu_hf.errors import UserError

__all__ = ["ArgumentParser", "UserError", "is_rank_zero", "main_entry", "require_path", "suggest"]

_NONE_WORDS = ("none", "null", "~")


def is_rank_zero() -> bool:
    """True in a single process and in the first process of a distributed launch."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def suggest(name: str, known: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the closest of ``known`` to ``name``, or an empty string."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def require_path(path: str | os.PathLike | None, flag: str, kind: str = "any") -> None:
    """Raise a ``UserError`` naming ``flag`` unless ``path`` exists (``kind``: any, file or dir)."""
    if path is None:
        return
    text = os.fspath(path)
    ok = {"any": os.path.exists, "file": os.path.isfile, "dir": os.path.isdir}[kind](text)
    if not ok:
        what = {"any": "file or folder", "file": "file", "dir": "folder"}[kind]
        exists = os.path.exists(text)
        raise UserError(f"{flag} {text}: {'not a ' + what if exists else 'no such ' + what}")


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``Optional[X]``, ``(hint, False)`` otherwise."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0], True
    return hint, False


def _is_mapping(hint: Any) -> bool:
    hint, _ = _unwrap_optional(hint)
    return hint is dict or typing.get_origin(hint) is dict


def _none_or(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type`` that also accepts none/null for optional fields."""

    def parse(text: str) -> Any:
        return None if text.strip().lower() in _NONE_WORDS else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names it in "invalid X value"
    return parse


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help of every flag, the script's docstring kept as written, and only the
    current spelling of each flag (the hyphenated aliases are deprecated)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required:  # a required flag has no default to show
            return action.help or ""
        return super()._get_help_string(action)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return (
                action.option_strings[0]
                if action.option_strings
                else super()._format_action_invocation(action)
            )
        return f"{action.option_strings[0]} {self._format_args(action, self._get_default_metavar_for_optional(action))}"


class ArgumentParser(HfArgumentParser):
    """``HfArgumentParser`` with a YAML ``--config``, mapping fields, deprecated spellings and one-line errors.

    Args:
        dataclass_types: the dataclass (or dataclasses) whose fields are the flags.
        prog: the script name used in messages (default: ``sys.argv[0]``'s file name).
        description: shown by ``--help`` (e.g. the script's docstring).
        default_config: YAML file whose values are the defaults when ``--config`` is not given.
        renamed: old flag -> new flag, for options whose name changed (accepted with a warning).
    """

    def __init__(
        self,
        dataclass_types: Any,
        prog: str | None = None,
        description: str | None = None,
        default_config: str | None = None,
        renamed: dict[str, str] | None = None,
    ) -> None:
        types_ = list(dataclass_types) if isinstance(dataclass_types, (list, tuple)) else [dataclass_types]
        self._hints = {}
        self._mapping_fields: dict[str, Any] = {}
        for dtype in types_:
            hints = typing.get_type_hints(dtype)
            for f in dataclasses.fields(dtype):
                if f.init:
                    self._hints[f.name] = hints[f.name]
                    if _is_mapping(hints[f.name]):
                        self._mapping_fields[f.name] = f
        super().__init__(
            types_,
            prog=prog or os.path.basename(sys.argv[0] or "script"),
            description=description,
            formatter_class=_HelpFormatter,
            allow_abbrev=False,  # `--learning_rat` must not silently mean `--learning_rate`
        )
        self.add_argument(
            "--config",
            default=default_config,
            metavar="FILE",
            help="YAML file of option values (command-line flags override it)",
        )
        self.default_config = default_config
        self.renamed = dict(renamed or {})
        # After `parse`: option -> where the person set it ("on the command line" or "in FILE" for a
        # --config file they passed); mapping keys appear as "model.hidden_size". Values that come
        # from the defaults or from `default_config` are not in it.
        self.explicit: dict[str, str] = {}
        for name in self._mapping_fields:
            self.add_argument(
                f"--{name}",
                default=None,
                metavar="YAML",
                help=f"a mapping, e.g. --{name} '{{key: value}}', or one key: --{name}.KEY VALUE",
            )
        for action in self._actions:
            hint = self._hints.get(action.dest)
            optional = hint is not None and _unwrap_optional(hint)[1]
            if optional and "none" not in (action.choices or ()) and callable(action.type):
                action.type = _none_or(action.type)  # optional fields also take none/null (unless a choice)
            if not action.help:  # argparse shows defaults only for flags with a help text
                name = getattr(action.type, "__name__", "value") if action.type else "flag"
                action.help = "bool" if name == "string_to_bool" else name

    @staticmethod
    def _parse_dataclass_field(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
        if _is_mapping(field.type):
            return  # added by __init__ (a YAML mapping plus dotted keys)
        hint, _ = _unwrap_optional(field.type)
        if hint is tuple or typing.get_origin(hint) is tuple:  # e.g. --adam_betas 0.9 0.98
            args = [a for a in typing.get_args(hint) if a is not Ellipsis] or [str]
            default = (
                field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
            )
            kwargs = dict(field.metadata)
            kwargs.pop("aliases", None)
            names = [f"--{field.name}"] + ([f"--{field.name.replace('_', '-')}"] if "_" in field.name else [])
            if default is dataclasses.MISSING:
                kwargs["required"] = True
            else:
                kwargs["default"] = default
            parser.add_argument(*names, type=args[0], nargs="+", **kwargs)
            return
        HfArgumentParser._parse_dataclass_field(parser, field)

    # ------------------------------------------------------------------------------------------
    # Errors
    # ------------------------------------------------------------------------------------------

    def error(self, message: str) -> NoReturn:
        """One line on stderr (rank 0 only), exit code 2: no usage block, no traceback."""
        if is_rank_zero():
            message = re.sub(r"(--\w+)/--[\w-]+", r"\1", message)  # drop argparse's hyphenated alias
            print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)

    def warn(self, message: str) -> None:
        if is_rank_zero():
            print(f"{self.prog}: warning: {message}", file=sys.stderr)

    def _known_flags(self) -> list[str]:
        """Canonical flags only (the hyphenated aliases are deprecated and not suggested)."""
        flags = []
        for action in self._actions:
            for option in action.option_strings:
                if option.startswith("--") and "-" not in option[2:]:
                    flags.append(option)
        return flags

    # ------------------------------------------------------------------------------------------
    # Parsing
    # ------------------------------------------------------------------------------------------

    def _canonical(self, flag: str) -> str:
        """Map a deprecated spelling to the current flag (with a warning); leave others alone."""
        if flag in self.renamed:
            self.warn(f"{flag} is deprecated, use {self.renamed[flag]}")
            return self.renamed[flag]
        known = set(self._known_flags())
        if flag not in known and "-" in flag[2:]:
            candidate = "--" + flag[2:].replace("-", "_")
            base = candidate.split(".", 1)[0]
            if candidate in known or base[2:] in self._mapping_fields:
                self.warn(f"{flag} is deprecated, use {candidate}")
                return candidate
        return flag

    def _preprocess(self, argv: Sequence[str]) -> tuple[list[str], dict[str, dict[str, Any]], str | None]:
        """Rewrite deprecated spellings; pull out ``--config`` and mapping-field values."""
        out: list[str] = []
        mappings: dict[str, dict[str, Any]] = {}
        config: str | None = None
        tokens = list(argv)
        i = 0
        while i < len(tokens):
            token = tokens[i]
            i += 1
            if not token.startswith("--") or token == "--":
                out.append(token)
                continue
            flag, has_value, inline = token.partition("=")
            flag = self._canonical(flag)
            base = flag[2:].split(".", 1)[0]
            takes_value = has_value or (i < len(tokens) and not tokens[i].startswith("--"))
            if flag == "--config" or base in self._mapping_fields:
                if not takes_value:
                    self.error(f"{flag} needs a value")
                value = inline if has_value else tokens[i]
                i += 0 if has_value else 1
                if flag == "--config":
                    config = value
                    continue
                try:
                    parsed = yaml.safe_load(value)
                except yaml.YAMLError as err:
                    self.error(f"{flag}: cannot read {value!r} as YAML ({str(err).splitlines()[0]})")
                entry = mappings.setdefault(base, {})
                if "." in flag:
                    entry[flag.split(".", 1)[1]] = parsed
                elif isinstance(parsed, dict):
                    entry.update(parsed)
                elif parsed is not None:
                    self.error(f"{flag} needs a mapping such as '{{key: value}}', got {value!r}")
                continue
            hint = self._hints.get(base)
            list_like = hint is not None and typing.get_origin(_unwrap_optional(hint)[0]) in (list, tuple)
            list_like = list_like or (hint is not None and _unwrap_optional(hint)[0] in (list, tuple))
            if list_like and takes_value:
                value = inline if has_value else tokens[i]
                stripped = value.strip()
                if stripped.startswith(("[", "(")):  # old YAML-list style: --adam_betas "[0.9, 0.98]"
                    i += 0 if has_value else 1
                    items = yaml.safe_load(stripped.replace("(", "[").replace(")", "]"))
                    out += [flag, *[str(v) for v in items]]
                    continue
            out.append(f"{flag}={inline}" if has_value else flag)
        return out, mappings, config

    def _load_config(self, path: str) -> dict[str, Any]:
        if not os.path.isfile(path):
            self.error(f"--config {path}: no such file")
        try:
            with open(path, encoding="utf-8") as handle:
                values = yaml.safe_load(handle) or {}
        except yaml.YAMLError as err:
            self.error(f"--config {path}: not valid YAML ({str(err).splitlines()[0]})")
        if not isinstance(values, dict):
            self.error(f"--config {path}: expected a mapping of option names to values")
        for key in values:
            if key not in self._hints:
                self.error(f"{path}: unknown option {key!r}{suggest(key, self._hints)}")
        return values

    def parse(self, argv: Sequence[str] | None = None) -> tuple[Any, ...]:
        """Parse ``argv`` (default ``sys.argv[1:]``) into the dataclass instances, in order."""
        argv = list(sys.argv[1:] if argv is None else argv)
        tokens, mapping_flags, config_path = self._preprocess(argv)
        config_path = config_path or self.default_config
        file_values = self._load_config(config_path) if config_path else {}
        if config_path and file_values:
            self.set_defaults(**{k: v for k, v in file_values.items() if k not in self._mapping_fields})
        if config_path != self.default_config:
            self.set_defaults(config=config_path)

        user_config = config_path if config_path != self.default_config else None
        self.explicit = {}
        if user_config:
            for key, value in file_values.items():
                if key in self._mapping_fields and isinstance(value, dict):
                    self.explicit.update({f"{key}.{sub}": f"in {user_config}" for sub in value})
                else:
                    self.explicit[key] = f"in {user_config}"
        for name, entries in mapping_flags.items():
            self.explicit.update({f"{name}.{sub}": "on the command line" for sub in entries})
        for token in tokens:  # before argparse, whose "required" check would hide a misspelled flag
            flag = token.split("=", 1)[0]
            if flag.startswith("--") and flag != "--" and flag not in self._option_string_actions:
                self.error(f"unknown option {flag}{suggest(flag, self._known_flags())}")
            if flag in self._option_string_actions:
                self.explicit[self._option_string_actions[flag].dest] = "on the command line"
        namespace, rest = self.parse_known_args(tokens)
        if rest:
            first = rest[0]
            if first.startswith("-"):
                flag = first.split("=", 1)[0]
                self.error(f"unknown option {flag}{suggest(flag, self._known_flags())}")
            self.error(f"unexpected argument {first!r}: options are --name value")
        values = vars(namespace)
        values.pop("config", None)
        for name in self._mapping_fields:
            merged = dict(file_values.get(name) or {})
            if values.get(name) is not None:  # never set: mappings come through `mapping_flags`
                merged.update(values[name])
            merged.update(mapping_flags.get(name, {}))
            values[name] = merged
        outputs = []
        for dtype in self.dataclass_types:
            names = {f.name for f in dataclasses.fields(dtype) if f.init}
            kwargs = {k: v for k, v in values.items() if k in names}
            try:
                outputs.append(dtype(**kwargs))
            except (ValueError, TypeError) as err:
                self.error(str(err).splitlines()[0] if str(err) else type(err).__name__)
        return tuple(outputs)

    def parse_one(self, argv: Sequence[str] | None = None) -> Any:
        """``parse`` for a parser over a single dataclass."""
        (out,) = self.parse(argv)
        return out


def main_entry(main: Callable[[], int | None]) -> NoReturn:
    """Run a script's ``main()``; a ``UserError`` becomes one line on stderr and exit code 2.

    A ``UserError`` raised after setup on one process only (e.g. a corrupt file met mid-run) is
    printed by that process; the rest (same on every process) by rank 0 only.
    """
    try:
        code = main()
    except UserError as err:
        if is_rank_zero() or getattr(err, "rank_specific", False):
            prog = os.path.basename(sys.argv[0] or "script")
            print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(code or 0)
