"""Argument checks shared by the library: one clear line naming the argument and the range."""

from __future__ import annotations

import math


def positive(name: str, value: float, *, allow_inf: bool = False) -> float:
  """Returns ``value`` if it is a finite number > 0 (or +inf when allowed), else raises."""
  if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
    raise ValueError(f"{name} must be a number > 0, got {value!r}")
  if value <= 0 or (math.isinf(value) and not allow_inf):
    allowed = "> 0" if allow_inf else "finite and > 0"
    raise ValueError(f"{name} must be {allowed}, got {value!r}")
  return value


def non_negative(name: str, value: float) -> float:
  """Returns ``value`` if it is a finite number >= 0, else raises."""
  if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
    raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
  if value < 0:
    raise ValueError(f"{name} must be >= 0, got {value!r}")
  return value


def positive_int(name: str, value: int) -> int:
  """Returns ``value`` if it is an integer >= 1, else raises."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
  return value


def non_negative_int(name: str, value: int) -> int:
  """Returns ``value`` if it is an integer >= 0, else raises."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
  return value


def probability(
  name: str, value: float, *, low_open: bool = True, high_open: bool = False
) -> float:
  """Returns ``value`` if it lies in the interval (0, 1] (ends chosen by the flags), else raises."""
  lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
  if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
    raise ValueError(f"{name} must be a number in {lo}0, 1{hi}, got {value!r}")
  bad_low = value <= 0 if low_open else value < 0
  bad_high = value >= 1 if high_open else value > 1
  if bad_low or bad_high:
    raise ValueError(f"{name} must be in {lo}0, 1{hi}, got {value!r}")
  return value


def one_of(name: str, value: str, allowed: tuple[str, ...]) -> str:
  """Returns ``value`` if it is one of ``allowed``, else raises."""
  if value not in allowed:
    raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
  return value
