"""What the experiment binaries share: config files, data loaded once, host devices.

An experiment config file defines ``get_config(arg=None)`` returning an ``ml_collections``
ConfigDict: the library's fields (:func:`drt_jax.config.default_config`) plus the experiment field
``compare``, the algorithms the binary trains side by side (each into ``<workdir>/<algorithm>``).
``arg`` selects a variant, e.g. ``smoke`` (``--config=experiments/configs/default.py:smoke``).
"""

import ast
import importlib.util
import os
import sys
from collections.abc import Mapping

import ml_collections
from absl import app, flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from drt_jax import config as config_lib
from drt_jax import data as data_lib
from drt_jax import datasets, inputs

EXPERIMENT_FIELDS = ("compare",)


def split(c: ml_collections.ConfigDict) -> tuple[dict, dict]:
  """``(library overrides, experiment fields)`` of an experiment config."""
  d = c.to_dict()
  experiment = {k: d.pop(k) for k in EXPERIMENT_FIELDS if k in d}
  return d, experiment



# The knobs every config file of experiments/configs takes after ':' besides its flags, as in
# --config=experiments/configs/default.py:algorithm=atc,agents=32,smoke.
KNOBS = {  # short name on the command line -> the config field it sets
    "agents": "num_agents",  # K
    "algorithm": "algorithm",  # also compare = (algorithm,): one run instead of a comparison
    "topology": "topology",  # one of topology.KINDS
    "steps": "num_steps",
    "seed": "seed",
    "lr": "learning_rate",
}


def variants(c: ml_collections.ConfigDict, arg, flags=()) -> tuple[dict, set]:
  """``(knobs set, flags set)`` of a config file's ``arg``; each knob's default is ``c``'s value
  of its field (``algorithm``'s is ``''``: keep ``compare``). Apply the flags, then
  :func:`apply_knobs`, so that knobs win whatever their order."""
  defaults = {k: c[field] for k, field in KNOBS.items()} | {"algorithm": ""}
  return config_lib.parse_arg(arg, defaults, flags)


def apply_knobs(c: ml_collections.ConfigDict, knobs: dict) -> None:
  for k, value in knobs.items():
    c[KNOBS[k]] = value
  if "algorithm" in knobs:
    c.compare = (knobs["algorithm"],)


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


def _named(e: BaseException) -> str:
  """``Type: the line naming the problem`` (the type alone where the message is empty)."""
  return f"{type(e).__name__}: {_one_line(e)}" if str(e).strip() else type(e).__name__


class ConfigFileError(ValueError):
  """A config file that cannot give a config: not there, fails to import, no ``get_config``, or
  ``get_config`` raised or returned something else than a config."""


class _ConfigFileParser(flags.ArgumentParser):
  """Loads a config file as ``ml_collections``' parser does (the module's ``get_config(arg)``,
  locked), with every failure said in one line.

  ``ml_collections`` lets an exception raised while the file is imported (a syntax error, any
  error of its code) escape flag parsing as a traceback, a missing ``get_config`` read as an
  unknown config field, and a ``get_config`` returning None or a dict fail later on. A plain dict
  is taken as the ConfigDict it spells.
  """

  def __init__(self, parser: ConfigFileFlagParser):
    self._module_name = f"{getattr(parser, 'name', 'config')}_config"
    self._lock = getattr(parser, "_lock_config", True)
    self._flag_type = parser.flag_type()

  def flag_type(self):
    return self._flag_type

  def parse(self, argument):
    if isinstance(argument, ml_collections.ConfigDict):  # a default already loaded
      return argument
    path, colon, arg = str(argument).partition(":")
    if not os.path.isfile(path):
      reason = "is a folder" if os.path.isdir(path) else "[Errno 2] No such file or directory"
      raise ConfigFileError(f"config file {path!r}: {reason}; give a Python file defining "
                            "get_config(arg=None), e.g. experiments/configs/default.py")
    try:
      spec = importlib.util.spec_from_file_location(self._module_name, path)
      module = importlib.util.module_from_spec(spec)
      sys.modules[self._module_name] = module  # as ml_collections does: dataclasses need it
      spec.loader.exec_module(module)
    except Exception as e:  # whatever the file's code raised, in one line
      raise ConfigFileError(f"config file {path!r} failed to load: {_named(e)}") from None
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
      raise ConfigFileError(f"config file {path!r} defines no get_config(arg=None) returning an "
                            "ml_collections.ConfigDict")
    try:
      config = get_config(arg) if colon else get_config()
    except ValueError as e:  # the file's own refusal of its variant: as it is
      raise ConfigFileError(f"config file {argument!r}: {_one_line(e)}") from None
    except Exception as e:
      raise ConfigFileError(f"config file {argument!r}: get_config raised {_named(e)}") from None
    if isinstance(config, Mapping) and not isinstance(config, ml_collections.ConfigDict):
      config = ml_collections.ConfigDict(dict(config))
    if not isinstance(config, ml_collections.ConfigDict):
      raise ConfigFileError(f"config file {argument!r}: get_config returned "
                            f"{type(config).__name__}; return an ml_collections.ConfigDict (or a "
                            "dict) of config fields")
    if self._lock:
      config.lock()
    return config


def _guard_config_files() -> None:
  for name in list(flags.FLAGS):
    flag = flags.FLAGS[name]
    if isinstance(flag.parser, ConfigFileFlagParser):
      flag.parser = _ConfigFileParser(flag.parser)


# Path flags of the binaries: an empty value would write into the current folder, or fail on
# the first write after the work. Fallback examples where the flag has no default.
_PATH_FLAGS = {"workdir": "runs/default", "out": "runs/out", "sweep": "runs/sweep.jsonl"}


def _empty_path() -> str | None:
  """The line refusing the first path flag given empty (``--workdir=``), if any."""
  for name, fallback in _PATH_FLAGS.items():
    if name not in flags.FLAGS:
      continue
    flag = flags.FLAGS[name]
    values = flag.value if isinstance(flag.value, list) else [flag.value]
    if any(isinstance(v, str) and not v.strip() for v in values):
      default = flag.default[0] if isinstance(flag.default, list) and flag.default else (
          flag.default)
      example = default if isinstance(default, str) and default else fallback
      what = (flag.help.splitlines() or [""])[0].strip().rstrip(".;")  # a multi flag adds lines
      return f"--{name} is empty; expected a path ({what}), e.g. --{name}={example}"
  return None


def parse_flags(argv):
  """absl flag parsing that answers a bad ``--config.<field>``, a config file that cannot give a
  config or an empty path with one line, not a traceback, and takes
  ``--config.topology_options.rows=4``-style options."""
  rest, options = _options_overrides(argv)
  command_line = sys.argv[:]
  sys.argv[:] = rest  # config_flags reads its overrides from sys.argv
  _guard_config_files()
  try:
    parsed = flags.FLAGS(rest)
    for (flag, field, key), value in options:
      options_dict = flags.FLAGS[flag].value[field]
      # Any type: config.resolve refuses a wrong one in the option's own terms.
      with options_dict.unlocked(), options_dict.ignore_type():
        options_dict[key] = value
  except (AttributeError, KeyError) as e:  # ml_collections: an unknown config field
    line = _unknown_field(argv) or f"unknown config field {_one_line(e)!r}"
    sys.exit(f"error: {line}")
  except (flags.Error, ValueError, TypeError) as e:
    cause = e if isinstance(e, ConfigFileError) else e.__context__
    sys.exit(f"error: {_one_line(cause if isinstance(cause, ConfigFileError) else e)}")
  finally:
    sys.argv[:] = command_line
  empty = _empty_path()
  if empty:
    sys.exit(f"error: {empty}")
  return parsed


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
