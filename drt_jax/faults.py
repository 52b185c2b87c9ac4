r"""Simulated faults inside the compiled train step: agent drop-out, link failures, stragglers
and Byzantine agents.

Checkpoints and faults
----------------------
Long decentralized runs meet two kinds of trouble: the machine running them stops (handled by
:mod:`drt_jax.checkpoint`: the whole state saved atomically every ``config.checkpoint_every``
steps, and an automatic resume that continues bit for bit), and the agents themselves misbehave.
This module simulates the second kind, so that an algorithm's robustness can be measured:

=================== ==========================================================================
``agent_dropout``   agent k is down for the step: it neither trains nor communicates (its
                    parameters, statistics and whole algorithm state -- optimizer state, CHOCO's
                    public copy, a tracker -- stay as they were); the weight its
                    neighbours gave it moves onto their own self-weight, and its own column of
                    the combination matrix becomes the identity.
``link_failure``    an undirected edge {k, l} fails for the step, both directions together; the
                    weight a_lk (and a_kl) moves onto the self-weight a_kk (and a_ll).
``straggler``       agent k skips its local step (parameters and optimizer state as if it had
                    no gradient this step) but still sends and combines.
``byzantine``       a fixed set of B agents sends attack messages instead of its own variables
                    (see *Byzantine agents* below).
=================== ==========================================================================

Each of the first three is an independent Bernoulli draw per step (per agent, per edge) with the
configured probability (``config.faults.*``, 0 = off). The draws are a pure function of
``fold_in(key(faults.seed), step)``, so a resumed run meets the same faults, and they are made on
the padded neighbour list inside the jitted step: masks over ``[K]`` agents and ``[K, D]`` listed
links, with the failed weight moved onto slot 0. Every masked matrix stays non-negative with
columns summing to one, and a symmetric matrix stays symmetric (a dropped agent removes its row
and column symmetrically; an edge fails in both directions). DRT diffusion computes its layer-wise
weights on the masked base matrix, so a dropped agent or a failed link gets zero DRT weight there
too and the mass goes to the self-weight. With every probability 0 and no Byzantine agent the
trainer takes a Python branch without any of this: the fault-free program is the one without
faults. The probabilities, the attack and the seed are constants of the compiled step (changing
them compiles it again).

Byzantine agents
----------------
``faults.byzantine = B`` agents, a set drawn once from the fault seed (:func:`byzantine_agents`,
fixed for the run), train and combine like everyone else, but every variable they send (the
parameters, shared BatchNorm statistics, any algorithm's auxiliary variables) is replaced by an
attack message. The replacement happens where every algorithm fetches its neighbours' copies,
:func:`drt_jax.combine.neighbour`: the step's :class:`~drt_jax.types.Mixing` carries an
:class:`~drt_jax.types.Attack`, so ATC, DRT, gradient tracking, ... meet Byzantine neighbours
without knowing. An agent's own copy (slot 0) is never replaced, and a Byzantine agent sends the
same message to all its out-neighbours. With ``s = faults.attack_scale`` and ``x_b`` the
variable agent b would have sent, the :data:`ATTACKS` are

=============== ==========================================================================
``sign_flip``   ``-s x_b``: the reversed model, amplified.
``scale``       ``s x_b``: the model amplified (``s = 1`` is an honest agent).
``gaussian``    ``N(0, s^2)`` per coordinate, independent of ``x_b``, drawn from a key of the
                step (so a resumed run meets the same noise), the leaf's shape and dtype, and
                the agent (two leaves of one shape and dtype receive the same noise).
``alie``        "A little is enough" (Baruch, Baruch & Goldberg 2019, arXiv 1902.06156): per
                coordinate ``mean_h - s std_h``, the mean and standard deviation over the honest
                agents (population std; the attacker is omniscient). ``s`` plays the paper's z,
                a fixed option here; the paper takes the largest z with
                ``Phi(z) < (n - m) / n``, ``m = floor(n / 2 + 1) - B`` for n agents (0.58 for
                n = 50 and B = 12), small enough to pass outlier filters: set ``attack_scale``
                to such a value for that attack (the default 10 is a loud one).
=============== ==========================================================================

Only floating-point leaves are replaced. ``sign_flip``, ``scale`` and ``gaussian`` are per-agent
elementwise (no communication on the ``shard`` back-end beyond the exchange itself); ``alie``
reduces over the agent axis (an all-reduce of one copy per leaf). Evaluation rows then report
accuracies, consensus distance and output disagreement over the honest agents alone (a Byzantine
agent's own parameters say nothing about the algorithm), and a field ``byzantine`` (B).

Rows of ``metrics.jsonl`` report the mean number of ``dropped_agents``, ``failed_links``
(undirected edges of the step's graph) and ``stragglers`` per step since the last evaluation.
"""

import functools
import math
import zlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from drt_jax.types import Attack, Mixing

KINDS = ("agent_dropout", "link_failure", "straggler")
ATTACKS = ("sign_flip", "scale", "gaussian", "alie")


class Spec(NamedTuple):
  """Per-step fault probabilities, the seed of their draws and the Byzantine agents."""

  agent_dropout: float = 0.0
  link_failure: float = 0.0
  straggler: float = 0.0
  seed: int = 0
  byzantine: int = 0  # how many agents are Byzantine (fixed for the run)
  attack: str = "sign_flip"  # what they send: one of ATTACKS
  attack_scale: float = 10.0  # s in the attack's formula


class Faults(NamedTuple):
  """One step's fault pattern on a ``[K, D]`` neighbour list."""

  alive: jax.Array  # bool[K]: not dropped out (trains and communicates)
  active: jax.Array  # bool[K]: takes its local step (alive and not straggling)
  link_ok: jax.Array  # bool[K, D]: the listed link works (slot 0 always does)
  mixing: Mixing  # the base weights with the failed weight moved onto the self-weight


def spec_from_config(c) -> Spec | None:
  """The ``faults`` fields of a run config, or None when every probability is 0 and no agent is
  Byzantine (no faults). Without Byzantine agents the attack fields are the defaults, so that
  they do not tell programs apart."""
  f, default = c.faults, Spec()
  spec = Spec(float(f.agent_dropout), float(f.link_failure), float(f.straggler), int(f.seed),
              f.get("byzantine", 0), f.get("attack", default.attack),
              f.get("attack_scale", default.attack_scale))
  if not spec.byzantine:
    spec = spec._replace(byzantine=0, attack=default.attack, attack_scale=default.attack_scale)
  else:
    spec = spec._replace(attack_scale=float(spec.attack_scale))
  on = any(getattr(spec, k) > 0 for k in KINDS) or spec.byzantine > 0
  return spec if on else None


def check_spec(spec: Spec, num_agents: int) -> None:
  """Raises ValueError in one line naming the first Byzantine field of ``spec`` outside its
  accepted values, for a run of ``num_agents`` agents (the probabilities are checked by
  :func:`drt_jax.config.validate`)."""
  b = spec.byzantine
  if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 0 <= b < num_agents:
    raise ValueError(f"faults.byzantine={b!r} must be an integer in [0, {num_agents}): the number "
                     f"of Byzantine agents among the {num_agents}, at least one honest")
  if spec.attack not in ATTACKS:
    raise ValueError(f"unknown faults.attack {spec.attack!r}; expected one of: "
                     f"{', '.join(ATTACKS)}")
  s = spec.attack_scale
  if isinstance(s, bool) or not isinstance(s, (int, float, np.number)) or not math.isfinite(s):
    raise ValueError(f"faults.attack_scale={s!r} must be a finite number (the attack's s, see "
                     "faults.ATTACKS)")


# Seeds the draw of the Byzantine set (numpy, on the host: the set is a constant of the program).
_BYZANTINE = 0x62797A6E  # "byzn"


@functools.cache
def _byzantine_set(seed: int, num_agents: int, count: int) -> tuple:
  rng = np.random.default_rng([_BYZANTINE, seed])
  return tuple(sorted(int(k) for k in rng.permutation(num_agents)[:count]))


def byzantine_agents(spec: Spec | None, num_agents: int) -> np.ndarray:
  """bool ``[K]``: the Byzantine agents of ``spec``, ``spec.byzantine`` of them drawn (without
  replacement, uniformly) from the fault seed alone; the same set at every step of the run."""
  mask = np.zeros(num_agents, bool)
  if spec is not None and spec.byzantine:
    check_spec(spec, num_agents)
    mask[list(_byzantine_set(int(spec.seed), num_agents, int(spec.byzantine)))] = True
  return mask


def honest_agents(spec: Spec | None, num_agents: int) -> np.ndarray | None:
  """The indices of the honest agents (int ``[K - B]``), or None when every agent is honest."""
  mask = byzantine_agents(spec, num_agents)
  return np.flatnonzero(~mask) if mask.any() else None


def _leaf_salt(x) -> int:
  """A number of the leaf's shape and dtype: leaves of other shapes draw other noise."""
  return zlib.crc32(f"{x.shape}{x.dtype}".encode()) & 0x7FFFFFFF


def message(x, attack: Attack | None):
  """Leaf ``x[K, ...]`` as the neighbours receive it: the Byzantine agents' rows replaced by the
  attack message (module docstring), the others unchanged; ``x`` itself without an attack."""
  if attack is None or not jnp.issubdtype(x.dtype, jnp.inexact):
    return x
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  byz = attack.byzantine.reshape((-1,) + (1,) * (x.ndim - 1))
  s = attack.scale
  if attack.kind == "sign_flip":
    sent = -s * x.astype(dtype)
  elif attack.kind == "scale":
    sent = s * x.astype(dtype)
  elif attack.kind == "gaussian":
    key = jax.random.fold_in(attack.key, _leaf_salt(x))
    sent = s * jax.random.normal(key, x.shape, dtype)
  elif attack.kind == "alie":
    h = (~byz).astype(dtype)
    xf = x.astype(dtype)
    n = jnp.sum(h, axis=0)
    mean = jnp.sum(h * xf, axis=0) / n
    std = jnp.sqrt(jnp.sum(h * jnp.square(xf - mean), axis=0) / n)
    sent = jnp.broadcast_to(mean - s * std, x.shape)
  else:
    raise ValueError(f"unknown attack {attack.kind!r}; expected one of: {', '.join(ATTACKS)}")
  return jnp.where(byz, sent.astype(x.dtype), x)


def pair_ids(nbr_idx):
  """An id per listed link that is the same for both directions: ``min(k, l) * K + max(k, l)``."""
  k_count = nbr_idx.shape[0]
  k = jnp.broadcast_to(jnp.arange(k_count, dtype=jnp.int32)[:, None], nbr_idx.shape)
  l = nbr_idx.astype(jnp.int32)
  return jnp.minimum(k, l) * k_count + jnp.maximum(k, l)


def mask_mixing(mixing: Mixing, alive, link_ok) -> Mixing:
  """Drops the links of dead agents and failed links; their weight moves onto the self-weight.

  Args:
    mixing: base weights on a padded neighbour list (slot 0 = self).
    alive: bool ``[K]``; a dead agent's column becomes the identity and its row loses every
      off-diagonal weight.
    link_ok: bool ``[K, D]``; ``link_ok[k, j]`` false drops the link from ``nbr_idx[k, j]`` to k.
      Pass a mask that is the same for both directions (:func:`pair_ids`) to keep symmetry.
  """
  nbr_idx, w = mixing.nbr_idx, mixing.nbr_w
  off = (jnp.arange(w.shape[1]) > 0)[None, :]
  keep = off & link_ok & alive[:, None] & alive[nbr_idx]
  kept = jnp.where(keep, w, 0.0)
  kept_off = jnp.sum(kept, axis=1)  # slot 0 is not kept here
  dropped = jnp.sum(jnp.where(off, w, 0.0), axis=1) - kept_off
  # An agent left without neighbours keeps itself exactly, not 1 up to rounding.
  self_w = jnp.where(jnp.any(keep & (w > 0), axis=1), w[:, 0] + dropped, 1.0)
  return mixing._replace(nbr_w=kept.at[:, 0].set(self_w.astype(w.dtype)))


# Folded into the fault seed's key so that fault draws share no key with the run's own streams
# (initialisation and sampling fold 0 and 1 into jax.random.key(config.seed), and the fault seed
# defaults to the same number).
_STREAM = 0x6661756C  # "faul"


def stream_key(seed: int) -> jax.Array:
  """The run's fault key: the root of every fault pattern of fault seed ``seed``."""
  return jax.random.fold_in(jax.random.key(seed), _STREAM)


def sample(key, step, mixing: Mixing, spec: Spec) -> Faults:
  """The fault pattern at ``step`` (may be traced): a pure function of ``(key, step)``.

  Args:
    key: the run's fault key, :func:`stream_key` of ``spec.seed``.
    step: the step index, folded into the key.
    mixing: the base weights this step would use.
    spec: the probabilities and the Byzantine agents.

  With Byzantine agents the returned mixing carries the step's :class:`~drt_jax.types.Attack`.
  """
  nbr_idx = mixing.nbr_idx
  k_count = nbr_idx.shape[0]
  key = jax.random.fold_in(key, step)
  k_drop, k_link, k_slow, k_attack = (jax.random.fold_in(key, i) for i in range(4))
  alive = jnp.ones(k_count, bool)
  if spec.agent_dropout > 0:
    alive = ~jax.random.bernoulli(k_drop, spec.agent_dropout, (k_count,))
  link_ok = jnp.ones(nbr_idx.shape, bool)
  if spec.link_failure > 0:
    ids = pair_ids(nbr_idx)
    u = jax.vmap(lambda e: jax.random.uniform(jax.random.fold_in(k_link, e)))(ids.reshape(-1))
    link_ok = (u.reshape(ids.shape) >= spec.link_failure) | (jnp.arange(ids.shape[1]) == 0)
  active = alive
  if spec.straggler > 0:
    active = alive & ~jax.random.bernoulli(k_slow, spec.straggler, (k_count,))
  masked = mask_mixing(mixing, alive, link_ok)
  if spec.byzantine:  # a Python branch: no attack code without Byzantine agents
    byzantine = jnp.asarray(byzantine_agents(spec, k_count))
    masked = masked._replace(attack=Attack(byzantine, k_attack, spec.attack,
                                           float(spec.attack_scale)))
  return Faults(alive, active, link_ok, masked)


def counts(f: Faults, mixing: Mixing) -> dict:
  """Scalars for the metrics: dropped agents, failed links and stragglers of one step.

  ``failed_links`` counts the edges of the step's graph (positive base weight) whose link failed,
  an undirected edge once; a link to a dropped agent is not counted as failed.
  """
  nbr_idx, w = mixing.nbr_idx, mixing.nbr_w
  k_count, width = nbr_idx.shape
  listed = (jnp.arange(width) > 0)[None, :] & (w > 0)
  failed = listed & ~f.link_ok & f.alive[:, None] & f.alive[nbr_idx]
  # Edge l -> k is listed by k; when l lists k too, the edge appears twice.
  me = jnp.arange(k_count)[:, None, None]
  has_back = jnp.any((nbr_idx[nbr_idx] == me) & listed[nbr_idx], axis=-1)  # [K, D]
  links = jnp.sum(jnp.where(failed, jnp.where(has_back, 0.5, 1.0), 0.0))
  return {"dropped_agents": jnp.sum(~f.alive).astype(jnp.float32),
          "failed_links": links.astype(jnp.float32),
          "stragglers": jnp.sum(f.alive & ~f.active).astype(jnp.float32)}


def select(mask, new, old):
  """Per agent, ``new`` where ``mask[k]`` else ``old``, for every leaf of stacked trees."""

  def one(n, o):
    return jnp.where(mask.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)

  return jax.tree.map(one, new, old)


def select_stacked(mask, new, old):
  """:func:`select` on the leaves that carry the agent axis (leading size K = ``len(mask)``);
  the others (step counts, shared scalars of an algorithm's state) are ``new``'s."""
  k_count = mask.shape[0]

  def one(n, o):
    if n.ndim == 0 or n.shape[0] != k_count:
      return n
    return jnp.where(mask.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)

  return jax.tree.map(one, new, old)
