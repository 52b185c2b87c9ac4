"""What the experiment binaries share: config files, data loaded once, host devices.

An experiment config file defines ``get_config(arg=None)`` returning an ``ml_collections``
ConfigDict: the library's fields (:func:`drt_jax.config.default_config`) plus the experiment field
``compare``, the algorithms the binary trains side by side (each into ``<workdir>/<algorithm>``).
``arg`` selects a variant, e.g. ``smoke`` (``--config=experiments/configs/default.py:smoke``).
"""

import ast
import sys

import ml_collections
from absl import app, flags

from drt_jax import config as config_lib
from drt_jax import data as data_lib
from drt_jax import datasets, inputs

EXPERIMENT_FIELDS = ("compare",)


def split(c: ml_collections.ConfigDict) -> tuple[dict, dict]:
  """``(library overrides, experiment fields)`` of an experiment config."""
  d = c.to_dict()
  experiment = {k: d.pop(k) for k in EXPERIMENT_FIELDS if k in d}
  return d, experiment


_DATA: dict = {}


def data_for(c) -> data_lib.Data:
  """The dataset of config ``c``, loaded once per process (sweeps reuse it)."""
  c = config_lib.resolve(c)
  key = (c.dataset, c.data_dir, c.download, c.data_source, c.seed if c.dataset == "synthetic"
         else None)
  if key not in _DATA:
    _DATA[key] = inputs.load_data(c)
  return _DATA[key]


def _one_line(e: BaseException) -> str:
  """The line of an error's message that names the problem."""
  text = str(e).strip()
  if isinstance(e, KeyError):  # str() of a KeyError is the repr of its key
    text = text.strip("\"'")
  text = text or type(e).__name__
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  errno = [line for line in lines if line.startswith("[Errno")]
  if errno:  # e.g. a config file that is not there: the OS's reason names the path
    return errno[-1]
  if "Traceback (most recent call last):" in lines:  # raised inside a config file's get_config
    return f"{lines[0]} {lines[-1]}"
  return lines[0]


def _unknown_field(argv) -> str | None:
  """The first ``--config.a.b=...`` of ``argv`` whose path the default config lacks, as a line."""
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].split("=", 1)[0].split(".")
    node = config_lib.default_config()
    for depth, key in enumerate(path):
      known = sorted(node.keys()) + (list(EXPERIMENT_FIELDS) if depth == 0 else [])
      if key not in known:
        return (f"unknown config field {'.'.join(path[:depth + 1])!r}; known fields"
                f"{' of ' + '.'.join(path[:depth]) if depth else ''}: {', '.join(known)}")
      if depth == 0 and key in EXPERIMENT_FIELDS:
        break
      node = node[key]
      if not isinstance(node, ml_collections.ConfigDict):
        break
  return None


def _options_overrides(argv) -> tuple[list, list]:
  """Splits ``--config.<x>_options.<key>=<value>`` off ``argv``: ml_collections overrides only
  fields that exist, and an options dict starts empty. Values are Python literals (``3``,
  ``(8, 8)``) or else strings."""
  rest, overrides = [], []
  for arg in argv:
    head, eq, value = arg.partition("=")
    parts = head[2:].split(".") if head.startswith("--") else []
    if eq and len(parts) == 3 and parts[1].endswith("_options"):
      try:
        value = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        pass
      overrides.append((parts, value))
    else:
      rest.append(arg)
  return rest, overrides


def parse_flags(argv):
  """absl flag parsing that answers a bad ``--config.<field>`` with one line, not a traceback,
  and takes ``--config.topology_options.rows=4``-style options."""
  rest, options = _options_overrides(argv)
  command_line = sys.argv[:]
  sys.argv[:] = rest  # config_flags reads its overrides from sys.argv
  try:
    parsed = flags.FLAGS(rest)
    for (flag, field, key), value in options:
      options_dict = flags.FLAGS[flag].value[field]
      with options_dict.unlocked():
        options_dict[key] = value
    return parsed
  except (AttributeError, KeyError) as e:  # ml_collections: an unknown config field
    line = _unknown_field(argv) or f"unknown config field {_one_line(e)!r}"
    sys.exit(f"error: {line}")
  except (flags.Error, ValueError, TypeError) as e:
    sys.exit(f"error: {_one_line(e)}")
  finally:
    sys.argv[:] = command_line


def run(main):
  """``absl.app.run(main)`` that ends on bad input (ValueError, a usage error, a path it cannot
  read or write, a missing dataset), divergence (FloatingPointError) or an unreachable
  coordinator (ConnectionError) with one line, not a traceback or the help text."""

  def guarded(argv):
    try:
      main(argv)
    except (ValueError, app.UsageError, OSError, FloatingPointError, ConnectionError,
            datasets.DatasetUnavailableError) as e:
      sys.exit(f"error: {_one_line(e)}")

  app.run(guarded, flags_parser=parse_flags)
