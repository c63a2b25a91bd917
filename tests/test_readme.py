"""The README's example runs as written (on a tiny synthetic set instead of MNIST)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import jaxdp

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
  """The python block under the README's "Train your own Flax model privately"."""
  text = README.read_text()
  section = text[text.index("## Train your own Flax model privately") :]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow  # the documentation's example (its privacy is the library's, tested elsewhere)
def test_readme_example_trains_privately(monkeypatch, capsys):
  code = readme_example()
  assert len(code.splitlines()) <= 30
  monkeypatch.setattr(jaxdp, "load_dataset", lambda name: jaxdp.synthetic_splits(2000, 300))
  exec(compile(code, str(README), "exec"), {})
  out = dict(line.rsplit(" ", 1) for line in capsys.readouterr().out.strip().splitlines()[-2:])
  assert 2.9 <= float(out["epsilon"]) <= 3.0
  assert float(out["test accuracy"]) > 0.5


LIBRARY = README.parent / "docs" / "library.md"


def library_examples() -> list[str]:
  """The python blocks of docs/library.md's "Any JAX model" section (NNX; plain function)."""
  text = LIBRARY.read_text()
  section = text[text.index("## Any JAX model") :]
  return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.mark.slow
@pytest.mark.parametrize("which", [0, 1], ids=["nnx", "plain_function_own_loop"])
def test_library_examples_train_privately(which, monkeypatch, capsys):
  code = library_examples()[which]
  monkeypatch.setattr(jaxdp, "load_dataset", lambda name: jaxdp.synthetic_splits(2000, 300))
  exec(compile(code, str(LIBRARY), "exec"), {})
  out = dict(line.rsplit(" ", 1) for line in capsys.readouterr().out.strip().splitlines()[-2:])
  assert 2.9 <= float(out["epsilon"]) <= 3.0
  assert float(out["test accuracy"]) > 0.5
