"""Frozen config dataclasses as command-line flags: one mechanism for every experiment.

A config is a frozen, keyword-only dataclass whose fields are the flags (``batch_size`` ->
``--batch-size``); :func:`option` attaches the help text and, where needed, the choices or
a parser. :func:`parse` builds the flags from the field types, applies presets (``--quick``),
constructs the config and reports any bad value as ONE line on stderr (exit status 2):

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config(RunSettings):
      PRESETS: ClassVar = {"quick": {"epochs": 2}}
      epochs: int = option(30, "training epochs")

    cfg = parse(Config, sys.argv[1:], description="...")

Types understood: ``bool`` (``--x`` / ``--no-x``), ``int``, ``float`` (``inf`` allowed where
the config accepts it), ``str``, ``X | None`` (``none`` gives None), ``tuple[int, ...]`` and
``tuple[float, ...]`` (comma-separated; ``none`` gives ``()``). Values are checked by the
config's own ``__post_init__``, whose messages name the flag.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import operator
import sys
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["UsageError", "flag", "main", "option", "parse", "usage_errors"]

T = TypeVar("T")
R = TypeVar("R")


class UsageError(ValueError):
  """A setting that is valid alone but not for this data; reported like a bad flag."""


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
  """Turns the errors of loading data or calibrating noise into :class:`UsageError`."""
  try:
    yield
  except (ValueError, FileNotFoundError, RuntimeError) as err:
    if isinstance(err, UsageError):
      raise
    raise UsageError(str(err)) from err


_UNSET = object()


def option(
  default: Any,
  help: str,
  *,
  choices: Sequence[str] | None = None,
  parse: Callable[[str], Any] | None = None,
  check: str | None = None,
) -> Any:
  """A config field with its flag's help text, and optionally its choices, a value parser,
  and a check of its value (a name in ``jaxdp.experiment.settings.CHECKS``: "positive",
  "positive_int", "non_negative_int", "fraction", "decay", "positive_ints"), applied by the
  config's ``__post_init__`` with a message that names the flag."""
  meta = {
    "help": help,
    "choices": tuple(choices) if choices else None,
    "parse": parse,
    "check": check,
  }
  return dataclasses.field(default=default, metadata=meta)


def flag(name: str) -> str:
  """The command-line flag of a config field: ``batch_size`` -> ``--batch-size``."""
  return "--" + name.replace("_", "-")


class _Parser(argparse.ArgumentParser):
  """argparse that reports a bad flag in one line (no usage block) and exits with 2."""

  def error(self, message: str) -> typing.NoReturn:  # type: ignore[override]
    self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _prog(cls: type) -> str:
  """The script that defines ``cls`` (``dp_classifier.py``), for error messages."""
  file = getattr(sys.modules.get(cls.__module__), "__file__", None)
  return Path(file).name if file else Path(sys.argv[0]).name


def _strip_none(tp: Any) -> tuple[Any, bool]:
  """(the type without None, whether None is allowed)."""
  if typing.get_origin(tp) in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    optional = len(args) < len(typing.get_args(tp))
    return (args[0] if len(args) == 1 else functools.reduce(operator.or_, args)), optional
  return tp, False


def _scalar(tp: Any, name: str) -> Callable[[str], Any]:
  """A parser of one value of type ``tp``."""
  if tp in (int, float, str):

    def parse_one(text: str) -> Any:
      try:
        return tp(text)
      except ValueError:
        kind = {int: "an integer", float: "a number"}[tp]
        raise argparse.ArgumentTypeError(f"{flag(name)} must be {kind}, got {text!r}") from None

    return parse_one
  raise TypeError(f"config field {name}: unsupported type {tp!r}; give option(parse=...)")


def _converter(name: str, tp: Any) -> Callable[[str], Any]:
  """The function that turns the flag's text into the field's value."""
  base, optional = _strip_none(tp)
  if typing.get_origin(base) is tuple:
    item = _scalar(typing.get_args(base)[0], name)

    def parse_tuple(text: str) -> tuple[Any, ...]:
      if text.strip().lower() in ("", "none"):
        return ()
      return tuple(item(v.strip()) for v in text.split(","))

    return parse_tuple
  one = _scalar(base, name)
  if not optional:
    return one
  return lambda text: None if text.strip().lower() == "none" else one(text)


def _shown(value: Any) -> str:
  if isinstance(value, tuple):
    return ",".join(map(str, value)) or "none"
  return "none" if value is None else str(value)


def _add(parser: argparse.ArgumentParser, f: dataclasses.Field, tp: Any, presets: Mapping) -> None:
  meta = f.metadata
  text = meta.get("help", "")
  default = f.default
  extra = [f"default {_shown(default)}"]
  for switch, overrides in presets.items():
    if f.name in overrides:
      extra.append(f"{_shown(overrides[f.name])} with --{switch}")
  helptext = f"{text} ({'; '.join(extra)})" if text else f"({'; '.join(extra)})"
  kwargs: dict[str, Any] = {"dest": f.name, "default": _UNSET, "help": helptext}
  if tp is bool:
    if f.name.startswith("no_"):  # argparse reads --no-x as x=False
      raise TypeError(f"config field {f.name}: name a bool positively (--x / --no-x)")
    parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
    return
  if meta.get("choices"):
    kwargs["choices"] = meta["choices"]
  kwargs["type"] = meta.get("parse") or _converter(f.name, tp)
  kwargs["metavar"] = f.name.upper() if not meta.get("choices") else None
  parser.add_argument(flag(f.name), **kwargs)


def parse(cls: type[T], argv: Sequence[str] | None = None, *, description: str = "") -> T:
  """Builds ``cls`` from command-line flags; a bad flag or value exits with one line.

  Args:
    cls: a dataclass whose fields all have defaults; a class attribute ``PRESETS`` maps a
      bool field's name (e.g. ``"quick"``) to overrides applied when it is set. A flag
      given on the command line always wins over a preset.
    argv: the arguments (default ``sys.argv[1:]``).
    description: the ``--help`` text.

  Returns:
    The validated config.
  """
  presets: Mapping[str, Mapping[str, Any]] = getattr(cls, "PRESETS", {})
  hints = typing.get_type_hints(cls)
  parser = _Parser(prog=_prog(cls), description=description)
  fields = [f for f in dataclasses.fields(cls) if f.init]
  for f in fields:
    _add(parser, f, hints[f.name], presets)
  given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not _UNSET}
  values: dict[str, Any] = {}
  for switch, overrides in presets.items():
    default = next(f.default for f in fields if f.name == switch)
    if given.get(switch, default):
      values.update(overrides)
  values.update(given)
  try:
    return cls(**values)
  except ValueError as err:
    parser.error(str(err))


def main(cls: type[T], run: Callable[[T], R], argv: Sequence[str] | None, description: str) -> R:
  """An experiment's entry point: ``run(parse(cls, argv))``; a :class:`UsageError` raised
  by ``run`` exits with one line on stderr, like a bad flag."""
  from absl import logging as absl_logging

  # dp_accounting warns for every RDP order it drops (harmless); keep the console readable.
  absl_logging.set_verbosity(absl_logging.ERROR)
  cfg = parse(cls, argv, description=description)
  try:
    return run(cfg)
  except UsageError as err:
    _Parser(prog=_prog(cls)).error(str(err))
