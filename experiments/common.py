"""What the experiment binaries share: config files, data loaded once, host devices.

An experiment config file defines ``get_config(arg=None)`` returning an ``ml_collections``
ConfigDict: the library's fields (:func:`drt_jax.config.default_config`) plus the experiment field
``compare``, the algorithms the binary trains side by side (each into ``<workdir>/<algorithm>``).
``arg`` selects a variant, e.g. ``smoke`` (``--config=experiments/configs/default.py:smoke``).
"""

import sys

import ml_collections
from absl import app, flags

from drt_jax import config as config_lib
from drt_jax import data as data_lib
from drt_jax import datasets, train

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
    _DATA[key] = train.load_data(c)
  return _DATA[key]


def _one_line(e: BaseException) -> str:
  text = str(e).strip().strip("\"'") or type(e).__name__
  return text.splitlines()[0]


def parse_flags(argv):
  """absl flag parsing that answers a bad ``--config.<field>`` with one line, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # ml_collections: an unknown config field
    field = _one_line(e)
    known = ", ".join(sorted(config_lib.default_config().keys()) + list(EXPERIMENT_FIELDS))
    sys.exit(f"error: unknown config field {field!r}; known fields: {known}")
  except (flags.Error, ValueError, TypeError) as e:
    sys.exit(f"error: {_one_line(e)}")


def run(main):
  """``absl.app.run(main)`` that ends on bad input (ValueError, a missing dataset), divergence
  (FloatingPointError) or an unreachable coordinator (ConnectionError) with one line, not a
  traceback."""

  def guarded(argv):
    try:
      main(argv)
    except (ValueError, FloatingPointError, ConnectionError,
            datasets.DatasetUnavailableError) as e:
      sys.exit(f"error: {_one_line(e)}")

  app.run(guarded, flags_parser=parse_flags)
