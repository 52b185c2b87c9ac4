"""The run configuration: every knob once, with its default and accepted values.

``default_config()`` returns an ``ml_collections.ConfigDict``; ``resolve(config)`` merges a user's
ConfigDict or plain dict onto it, refuses unknown fields and checks every value, raising one
``ValueError`` line that names the field, the value and what is accepted.

Security: config *files* (``experiments/configs/*.py``, ``--config=<file>``) are Python modules
that ``ml_collections`` imports, so loading one executes its code with the caller's rights. Load
config files only from sources you trust; a run's ``config.json`` (what a workdir keeps, and what
``resolve`` takes as a plain dict) is data and runs nothing.
"""

import math
from collections.abc import Mapping

import ml_collections
import optax

from drt_jax import algorithms, backends, data, datasets, drt, faults, models, partition, topology
from drt_jax.algorithms import base as algorithms_base

OPTIMIZERS = algorithms.OPTIMIZERS
SCHEDULES = algorithms_base.SCHEDULES
PRECISIONS = ("float32", "bfloat16")
AUGMENTS = ("auto",) + data.AUGMENTATIONS
# Where this host finds the data, which may differ between the hosts of one run; what the data
# is, is checked on its own (every process hashes the data it loaded).
HOST_LOCAL = ("data_dir", "download", "data_source")
# The largest seed (config.seed, faults.seed) whose PRNG key is its own: jax.random.key keeps a
# seed's low 32 bits (with 64-bit types off, the default), so key(2**32 + s) is key(s). The
# eval subsets' seed + 1 and + 2 and the graphs' seeds go to numpy, which takes any size.
MAX_SEED = 2**32 - 1


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds initialisation, partition, sampling and random graphs (split by purpose)
  c.num_agents = 16  # K
  # Graph: one of topology.KINDS; weights 'metropolis', 'uniform' or 'push' (senders split their
  # mass, for push_sum); options such as rows/cols/p.
  c.topology = "ring"
  c.topology_weights = "metropolis"
  c.topology_options = ml_collections.ConfigDict()
  c.lazy = 0.0  # alpha in alpha*I + (1-alpha)*A: slower mixing on the same graph (0 = off)
  c.self_weight = 0.0  # every agent's self-weight, neighbours rescaled (matched mixing; 0 = off)
  # Algorithm: one of algorithms.NAMES.
  c.algorithm = "atc"
  c.comm_every = 1  # combine every H-th step (local steps in between)
  # The algorithm's own options (algorithms.options(name)), e.g. {'compressor': 'top_k'} for choco.
  c.algorithm_options = ml_collections.ConfigDict()
  c.combine_batch_stats = False  # share BatchNorm statistics through the combine (else local)
  c.drt = ml_collections.ConfigDict()
  c.drt.strength = 1.0  # rho: gamma^(p) = rho * n^(p)^2
  c.drt.floor = 0.05  # self-weight floor delta in [0, 1)
  c.drt.eps = 1e-6  # relative norm guard
  c.drt.granularity = "module"  # layers: 'module' or 'leaf'
  c.drt.reference = "init"  # n^(p): norm at initialisation ('init') or current mean ('current')
  # Model: one of models.NAMES, with its options.
  c.model = "cnn"
  c.model_options = ml_collections.ConfigDict()
  # Compute dtype of the model: 'float32', or 'bfloat16' (mixed precision: parameters, optimizer
  # state, gradients' accumulation into them and the combination stay float32).
  c.precision = "float32"
  # How convolutions are computed, same parameters either way: 'xla', 'taps' (one matrix
  # product per kernel tap; see models.shifted_matmul_conv) or 'auto' (the measured-best for the
  # platform and the agents each device vmaps: backends.best_conv). Formulations still under
  # measurement live in the lab (benchmarks/conv_formulations.py).
  c.conv = "auto"
  c.same_init = True  # all agents start from one initialisation
  # Local optimizer (state local to each agent).
  c.optimizer = "sgd"  # one of OPTIMIZERS
  c.learning_rate = 0.05
  c.momentum = 0.9  # for 'momentum' / 'nesterov'
  c.weight_decay = 0.0
  c.schedule = "constant"  # learning rate over the run: one of SCHEDULES ('cosine': decays to 0)
  # Data.
  # 'synthetic' (built in) or a tfds image-classification name (datasets.SUPPORTED and others);
  # used when train_and_evaluate gets no in-memory data. mnist and fashion_mnist load offline
  # from their embedded copies (python -m drt_jax.install_data).
  c.dataset = "mnist"
  c.data_dir = ""  # tfds data folder ('' = tfds's default, ~/tensorflow_datasets)
  c.download = False  # let tfds download and prepare an absent dataset (needs internet)
  c.data_source = "auto"  # one of datasets.SOURCES: embedded copy where installed, else tfds
  c.validation_fraction = 0.0  # held out of the training split, evaluated as val_* (0 = none)
  c.partition = "iid"  # one of partition.KINDS
  c.dirichlet_alpha = 0.5  # partition 'dirichlet': small = label skew, large = near IID
  c.classes_per_agent = 2  # partition 'shards'
  c.min_per_agent = 0  # fewest examples per agent (0 = partition's default, >= batch_size)
  c.augment = "auto"  # one of AUGMENTS: 'auto' = random crop + flip for CIFAR, none otherwise
  c.batch_size = 32  # per agent
  c.num_steps = 200
  c.eval_every = 50  # also evaluates at step 0 and at the end
  c.eval_examples = 1024  # test examples per evaluation (0 = the whole test split)
  c.train_eval_examples = 1024  # fixed train subset for the generalization gap (0 = all)
  c.eval_batch_size = 256
  c.final_full_test = False  # at the last step, also evaluate on the whole test split (final_*)
  # Execution.
  c.backend = "auto"  # one of backends.BACKENDS
  c.chunk_size = 0  # agents per group for backend 'chunked'
  c.log_every = 0  # progress lines every N steps (0 = at evaluations only)
  # Reliability (see drt_jax.checkpoint and drt_jax.faults).
  c.checkpoint_every = 0  # save the whole state to <workdir>/checkpoints every N steps (0 = off)
  c.keep_checkpoints = 2  # how many of the latest checkpoints stay on disk
  c.faults = ml_collections.ConfigDict()  # simulated faults inside the compiled step, per step:
  c.faults.agent_dropout = 0.0  # probability an agent drops out (neither trains nor communicates)
  c.faults.link_failure = 0.0  # probability an undirected link fails (both directions)
  c.faults.straggler = 0.0  # probability an agent skips its local step (still communicates)
  c.faults.byzantine = 0  # number of Byzantine agents (a set drawn from faults.seed)
  c.faults.attack = "sign_flip"  # what they send instead of their own variables: faults.ATTACKS
  c.faults.attack_scale = 10.0  # the attack's size (see faults.ATTACKS)
  c.faults.seed = 0  # seeds the fault patterns (a pure function of this seed and the step)
  # Objects train_and_evaluate was given in place of model, optimizer, topology or algorithm:
  # that field then says 'custom' and this holds a short description (written by the trainer).
  c.custom = ml_collections.ConfigDict()
  return c


def shared_json(c: ml_collections.ConfigDict) -> str:
  """``c`` as JSON without its :data:`HOST_LOCAL` fields: what every process of a run must share."""
  d = c.copy_and_resolve_references()
  with d.unlocked():
    for field in HOST_LOCAL:
      if field in d:
        del d[field]
  return d.to_json(sort_keys=True)


def _shown(value) -> str:
  """``value`` as one short line (a nested ConfigDict's repr spans lines)."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  text = repr(value)
  return text if len(text) <= 200 else text[:197] + "..."


def _fail(field, value, accepted):
  raise ValueError(f"config.{field}={_shown(value)} is not accepted; expected {accepted}")


def _by_factory(field, value, check, *args, **kw):
  """``check(*args, **kw)``, its refusal said in terms of the config field."""
  try:
    check(*args, **kw)
  except (ValueError, TypeError) as e:
    raise ValueError(f"config.{field}={_shown(value)} is not accepted: {e}") from None


def _int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _real(v) -> bool:
  """A finite number (bool excluded): inf and nan are refused where they are set, not found as
  non-finite parameters steps later."""
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _one_of(c, field, options):
  if c[field] not in options:
    _fail(field, c[field], "one of: " + ", ".join(options))


def resolve(config: Mapping | ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
  """Defaults overridden by ``config``; unknown fields and bad values raise ValueError."""
  c = default_config()
  if config is not None:
    if not isinstance(config, (Mapping, ml_collections.ConfigDict)):
      raise ValueError(f"a config is a mapping of fields, e.g. {{'num_agents': 8}}; got "
                       f"{type(config).__name__}")
    user = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    _merge(c, user, "")
  validate(c)
  return c


# An example field of each group whose keys are free, for the refusal of a non-mapping.
_GROUP_EXAMPLE = {"topology_options": "rows", "model_options": "hidden", "custom": "model",
                  "algorithm_options": "compressor"}


def _merge(base, user, prefix):
  for key, value in user.items():
    if key not in base:
      raise ValueError(f"unknown config field {f'{prefix}{key}'!r}; known fields: "
                       f"{', '.join(sorted(base.keys()))}")
    if isinstance(base[key], ml_collections.ConfigDict):
      if not isinstance(value, (Mapping, ml_collections.ConfigDict)):
        first = _GROUP_EXAMPLE.get(key) or sorted(base[key].keys())[0]
        _fail(f"{prefix}{key}", value, f"a mapping of its fields, e.g. {{{first!r}: ...}}")
      value = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else dict(value)
      if key.endswith("options") or key == "custom":  # free keys, checked by validate
        base[key] = ml_collections.ConfigDict(value)
      else:
        _merge(base[key], value, f"{prefix}{key}.")
    else:
      try:
        base[key] = value  # type-safe: an int where a float is due becomes that float
      except TypeError:
        # Any other type: kept as given, so that validate refuses it in the field's own terms
        # (what is accepted) rather than ml_collections' TypeError.
        with base.ignore_type():
          base[key] = value


def _check_custom(c) -> None:
  for field, what in c.custom.items():
    if field not in ("model", "optimizer", "topology", "algorithm") or not isinstance(what, str):
      _fail(f"custom.{field}", what, "a description of the model, optimizer, topology or "
            "algorithm object passed to train_and_evaluate")
  for field in ("model", "optimizer", "topology", "algorithm"):
    if c[field] == "custom" and field not in c.custom:
      _fail(field, "custom", f"one of its names; 'custom' records an object passed as "
            f"train_and_evaluate({field}=...): pass that object again")


def validate(c: ml_collections.ConfigDict) -> None:
  """Checks every field's value (not the data, which is checked when it is known)."""
  _check_custom(c)
  custom = tuple(c.custom.keys())
  if "topology" not in custom:
    _one_of(c, "topology", topology.KINDS)
  _one_of(c, "topology_weights", topology.WEIGHT_RULES)
  if "algorithm" not in custom:
    _one_of(c, "algorithm", algorithms.NAMES)
  if "optimizer" not in custom:
    _one_of(c, "optimizer", OPTIMIZERS)
    _one_of(c, "schedule", SCHEDULES)
  _one_of(c, "precision", PRECISIONS)
  _one_of(c, "conv", ("auto",) + models.CONVS)
  _one_of(c, "backend", backends.BACKENDS)
  for field in ("num_agents", "batch_size", "eval_batch_size"):
    if not _int(c[field]) or c[field] < 1:
      _fail(field, c[field], "an integer >= 1")
  for field in ("num_steps", "eval_every", "eval_examples", "train_eval_examples",
                "chunk_size", "log_every", "checkpoint_every"):
    if not _int(c[field]) or c[field] < 0:
      _fail(field, c[field], "an integer >= 0")
  for field in ("seed", "faults.seed"):
    seed = c.faults.seed if field == "faults.seed" else c.seed
    if not _int(seed) or not 0 <= seed <= MAX_SEED:
      _fail(field, seed, f"an integer in [0, 2**32 - 1 = {MAX_SEED}]: jax.random.key(seed) keeps "
            "32 bits, so 2**32 + s would be seed s")
  if not _int(c.keep_checkpoints) or c.keep_checkpoints < 1:
    _fail("keep_checkpoints", c.keep_checkpoints, "an integer >= 1")
  for field in ("agent_dropout", "link_failure", "straggler"):
    p = c.faults[field]
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
      _fail(f"faults.{field}", p, "a probability in [0, 1]")
  for field in ("byzantine", "attack", "attack_scale"):  # each on its own, named by its field
    spec = faults.Spec(byzantine=1 if c.num_agents > 1 else 0)._replace(**{field: c.faults[field]})
    _by_factory(f"faults.{field}", c.faults[field], faults.check_spec, spec, c.num_agents)
  if not (_real(c.learning_rate) and c.learning_rate > 0):
    _fail("learning_rate", c.learning_rate, "a finite number > 0")
  if not (_real(c.momentum) and 0.0 <= c.momentum < 1.0):
    _fail("momentum", c.momentum, "a number in [0, 1)")
  if not (_real(c.weight_decay) and c.weight_decay >= 0.0):
    _fail("weight_decay", c.weight_decay, "a finite number >= 0")
  if not (_real(c.lazy) and 0.0 <= c.lazy < 1.0):
    _fail("lazy", c.lazy, "a number in [0, 1)")
  if not (_real(c.self_weight) and 0.0 <= c.self_weight < 1.0):
    _fail("self_weight", c.self_weight, "a number in [0, 1) (0 = the weight rule's own)")
  # Options a factory owns are checked by the factory's own rule, each field on its own.
  _by_factory("comm_every", c.comm_every, algorithms.check_comm_every, c.comm_every)
  if "algorithm" not in custom:
    _check_algorithm_options(c)
  defaults = {"floor": 0.05, "eps": 1e-6, "strength": 1.0, "reference": "init",
              "granularity": "module"}
  for field in ("strength", "floor", "eps", "granularity", "reference"):
    _by_factory(f"drt.{field}", c.drt[field], drt.check_options, "drt",
                **{**defaults, field: c.drt[field]})
  if "model" not in custom and c.model not in models.NAMES:
    _fail("model", c.model, "one of: " + ", ".join(models.NAMES))
  for field, name, accepted in (("topology_options", c.topology, topology.options),
                                ("model_options", c.model, models.options)):
    if name == "custom":
      continue
    for key in c[field]:
      if key not in accepted(name):
        _fail(f"{field}.{key}", c[field][key], f"an option of {name!r}, one of: "
              + (", ".join(accepted(name)) or "none"))
  if "topology" not in custom:
    _check_topology_options(c)
  if "model" not in custom:
    _check_model_options(c)
  for field in ("same_init", "combine_batch_stats", "final_full_test"):
    if not isinstance(c[field], bool):
      _fail(field, c[field], "True or False")
  if not isinstance(c.data_dir, str):
    _fail("data_dir", c.data_dir, "a folder, or '' for tfds's default")
  if not isinstance(c.dataset, str) or not c.dataset.strip():
    _fail("dataset", c.dataset, "'synthetic' or a tfds name, e.g. one of: "
          + ", ".join(datasets.SUPPORTED))
  _one_of(c, "data_source", datasets.SOURCES)
  _one_of(c, "partition", partition.KINDS)
  _one_of(c, "augment", AUGMENTS)
  if not isinstance(c.download, bool):
    _fail("download", c.download, "True or False")
  if not (_real(c.validation_fraction) and 0.0 <= c.validation_fraction < 1.0):
    _fail("validation_fraction", c.validation_fraction, "a number in [0, 1)")
  if not (_real(c.dirichlet_alpha) and c.dirichlet_alpha > 0):
    _fail("dirichlet_alpha", c.dirichlet_alpha, "a finite number > 0 (small: label skew, large: "
          "near IID)")
  if not _int(c.classes_per_agent) or c.classes_per_agent < 1:
    _fail("classes_per_agent", c.classes_per_agent, "an integer >= 1")
  if not _int(c.min_per_agent) or c.min_per_agent < 0:
    _fail("min_per_agent", c.min_per_agent, "an integer >= 0 (0 = default)")
  _by_factory("chunk_size", c.chunk_size, backends.check_chunks, c.backend, c.num_agents,
              c.chunk_size or None)


# Algorithm options with config fields of their own (build.algorithm_options passes them).
_OWN_FIELDS = {"comm_every": "comm_every", **{f: f"drt.{f}" for f in
                                             ("strength", "floor", "eps", "granularity",
                                              "reference")}}


def _check_algorithm_options(c) -> None:
  """``algorithm_options`` holds options the algorithm takes (and that have no field of their
  own), with values its factory accepts; ``comm_every`` other than 1 only where it applies."""
  accepted = algorithms.options(c.algorithm)
  free = [o for o in accepted if o not in _OWN_FIELDS]
  for key, value in c.algorithm_options.items():
    if key in _OWN_FIELDS:
      _fail(f"algorithm_options.{key}", value, f"set in config.{_OWN_FIELDS[key]}, not here")
    if key not in free:
      _fail(f"algorithm_options.{key}", value, f"an option of {c.algorithm!r}, one of: "
            + (", ".join(free) or "none"))
  if c.comm_every != 1 and "comm_every" not in accepted:
    _fail("comm_every", c.comm_every, f"1: {c.algorithm!r} communicates every step")
  if c.algorithm_options:
    _by_factory("algorithm_options", c.algorithm_options.to_dict(), algorithms.make,
                c.algorithm, optax.identity(), **c.algorithm_options.to_dict())


def _divisors(n: int) -> list[int]:
  small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
  return sorted(set(small + [n // d for d in small]))


def _check_topology_options(c) -> None:
  """The graph options' values, here rather than when the graph is built (after the data is
  loaded), and those that would say something else than what is used."""
  o, k = c.topology_options, c.num_agents
  if "p" in o and not (_real(o.p) and 0.0 < o.p <= 1.0):
    _fail("topology_options.p", o.p, "an edge probability in (0, 1]")
  if "period" in o and not (_int(o.period) and o.period >= 1):
    _fail("topology_options.period", o.period, "an integer >= 1 (steps per matching schedule)")
  for field in ("lazy", "self_weight"):
    if field not in o:
      continue
    if not (_real(o[field]) and 0.0 <= o[field] < 1.0):
      _fail(f"topology_options.{field}", o[field], "a number in [0, 1)")
    if c[field] and o[field] and c[field] != o[field]:  # config.<field> would win, unsaid
      _fail(f"topology_options.{field}", o[field], f"one of config.{field}={c[field]!r} and "
            f"config.topology_options.{field}: set one")
  if "rows" not in o and "cols" not in o:
    return
  divisors = _divisors(k)
  for field in ("rows", "cols"):
    if field in o and not (_int(o[field]) and o[field] in divisors):
      _fail(f"topology_options.{field}", o[field], f"a divisor of num_agents={k} (rows x cols = "
            f"K): one of {', '.join(map(str, divisors))}")
  if "rows" in o and "cols" in o and o.rows * o.cols != k:
    rows = max(d for d in divisors if d * d <= k)
    _fail("topology_options", {"rows": o.rows, "cols": o.cols}, f"rows x cols = num_agents={k}, "
          f"e.g. rows={rows}, cols={k // rows}")


def _widths(v, least: int = 0) -> bool:
  return (isinstance(v, (list, tuple)) and len(v) >= least
          and all(_int(w) and w >= 1 for w in v))


# (model, option) -> (test, what is accepted): a value of another type would fail only inside
# flax's trace, after the data has loaded, with a traceback.
_MODEL_OPTIONS = {
    ("mlp", "hidden"): (_widths, "a tuple of hidden widths >= 1, e.g. (256, 256), or () for "
                                 "none"),
    ("cnn", "features"): (lambda v: _widths(v, 1), "a tuple of conv widths >= 1, e.g. "
                                                   "(16, 32, 64)"),
    ("cnn", "hidden"): (lambda v: _int(v) and v >= 1, "an integer >= 1, e.g. 96"),
    ("cnn", "batch_norm"): (lambda v: isinstance(v, bool), "True or False"),
    ("resnet20", "stage_sizes"): (lambda v: _widths(v, 1), "a tuple of blocks per stage >= 1, "
                                                           "e.g. (3, 3, 3)"),
    ("resnet20", "widths"): (lambda v: _widths(v, 1), "a tuple of widths per stage >= 1, e.g. "
                                                      "(16, 32, 64)"),
}


def _check_model_options(c) -> None:
  o = c.model_options
  for key in o:
    test, accepted = _MODEL_OPTIONS.get((c.model, key), (None, ""))
    if test is not None and not test(o[key]):
      _fail(f"model_options.{key}", o[key], accepted)
  if "dtype" in o:  # build.model would take it over config.precision, unsaid
    _fail("model_options.dtype", o.dtype, "no dtype here: config.precision ('float32' or "
          "'bfloat16') sets the model's compute dtype")
  if "conv" in o:
    if not (callable(o.conv) or o.conv in models.CONVS):
      raise ValueError(f"config.model_options.conv={_shown(o.conv)} is not accepted: unknown "
                       f"conv {o.conv!r}; expected one of: {', '.join(models.CONVS)}, or leave it "
                       "out (config.conv picks)")
    if c.conv not in ("auto", o.conv):  # the option would win, unsaid
      _fail("model_options.conv", o.conv, f"one of config.conv={c.conv!r} and "
            "config.model_options.conv: set one")
  if c.model == "resnet20" and ("stage_sizes" in o or "widths" in o):
    stages, widths = o.get("stage_sizes", (3, 3, 3)), o.get("widths", (16, 32, 64))
    if len(stages) != len(widths):
      _fail("model_options", {"stage_sizes": stages, "widths": widths}, "as many widths as "
            "stages")


def split_items(text: str) -> list[str]:
  """``text`` split at its top-level commas: those inside brackets or quotes belong to an item
  (``"a=(1, 2),b='x,y'"`` -> ``["a=(1, 2)", "b='x,y'"]``). Items are not stripped; unbalanced
  brackets or quotes raise ValueError."""
  items, depth, quote, start = [], 0, "", 0
  for i, ch in enumerate(text):
    if quote or ch in "'\"":
      quote = "" if ch == quote else quote or ch
    else:
      depth += (ch in "([{") - (ch in ")]}")
    if depth < 0:
      break
    if ch == "," and depth == 0 and not quote:
      items.append(text[start:i])
      start = i + 1
  if depth or quote:
    raise ValueError(f"unbalanced brackets or quotes in {text!r}")
  return items + [text[start:]]


def parse_arg(arg: str | None, knobs: Mapping[str, object],
              flags: tuple[str, ...] = ()) -> tuple[dict, set]:
  """What a config file's ``get_config(arg)`` was asked for: ``(knobs set, flags set)``.

  ``arg`` is what follows ``:`` in ``--config=<file>:<arg>``, comma-separated items in the manner
  of big_vision: a bare word is a flag of ``flags`` (``smoke``), ``name=value`` sets a knob of
  ``knobs`` (short name -> the file's default), e.g. ``algorithm=atc,agents=32,smoke``. A value is
  a Python literal where it parses as one (``32``, ``0.1``, ``(8, 8)``: commas inside brackets
  or quotes belong to the value), else a string, and must be of its default's type (an int where the
  default is a float, a list where it is a tuple, are converted). Returns only the knobs ``arg``
  sets, so that the file applies them after its flags whatever their order; no ``arg`` (None or
  '') sets nothing. An unknown or repeated name, a malformed pair or a value of the wrong type
  raises a one-line ValueError that names it and lists what the file accepts.
  """
  import ast

  listed = ", ".join(f"{name}={default!r}" for name, default in knobs.items()) or "none"
  accepted = f"accepted: knobs {listed}; flags {', '.join(flags) or 'none'}"

  def refuse(problem):
    raise ValueError(f"{problem}; {accepted}")

  text = arg or ""
  try:
    items = split_items(text)
  except ValueError:
    refuse(f"unbalanced brackets or quotes in config variant {text!r}")

  values, named = {}, set()
  for item in (item.strip() for item in items):
    if not item:  # a stray comma asks for nothing
      continue
    name, eq, raw = (part.strip() for part in item.partition("="))
    if name in values or name in named:
      refuse(f"{name!r} given twice in config variant {text!r}")
    if not eq:
      if name in knobs:
        refuse(f"knob {name!r} needs a value, e.g. {name}={knobs[name]!r}")
      if name not in flags:
        refuse(f"unknown variant {name!r}")
      named.add(name)
      continue
    if not name or not raw:
      refuse(f"malformed config variant {item!r}; expected name=value")
    if name in flags:
      refuse(f"flag {name!r} takes no value, got {item!r}")
    if name not in knobs:
      refuse(f"unknown knob {name!r} in {item!r}")
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
      value = raw  # a bare word such as atc
    default = knobs[name]
    if isinstance(default, float) and type(value) is int:
      value = float(value)
    if isinstance(default, tuple) and isinstance(value, list):
      value = tuple(value)
    # bool is an int to isinstance: agents=True must not pass as 1 agent.
    if default is not None and type(value) is not type(default):
      refuse(f"knob {name!r} takes a value of type {type(default).__name__} such as "
             f"{name}={default!r}, got {item!r}")
    values[name] = value
  return values, named
