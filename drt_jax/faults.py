r"""Simulated faults inside the compiled train step: agent drop-out, link failures, stragglers.

Checkpoints and faults
----------------------
Long decentralized runs meet two kinds of trouble: the machine running them stops (handled by
:mod:`drt_jax.checkpoint`: the whole state saved atomically every ``config.checkpoint_every``
steps, and an automatic resume that continues bit for bit), and the agents themselves misbehave.
This module simulates the second kind, so that an algorithm's robustness can be measured:

=================== ==========================================================================
``agent_dropout``   agent k is down for the step: it neither trains nor communicates (its
                    parameters, statistics and optimizer state stay as they were); the weight its
                    neighbours gave it moves onto their own self-weight, and its own column of
                    the combination matrix becomes the identity.
``link_failure``    an undirected edge {k, l} fails for the step, both directions together; the
                    weight a_lk (and a_kl) moves onto the self-weight a_kk (and a_ll).
``straggler``       agent k skips its local step (parameters and optimizer state as if it had
                    no gradient this step) but still sends and combines.
=================== ==========================================================================

Each is an independent Bernoulli draw per step (per agent, per edge) with the configured
probability (``config.faults.*``, 0 = off). The draws are a pure function of
``fold_in(key(faults.seed), step)``, so a resumed run meets the same faults, and they are made on
the padded neighbour list inside the jitted step: masks over ``[K]`` agents and ``[K, D]`` listed
links, with the failed weight moved onto slot 0. Every masked matrix stays non-negative with
columns summing to one, and a symmetric matrix stays symmetric (a dropped agent removes its row
and column symmetrically; an edge fails in both directions). DRT diffusion computes its layer-wise
weights on the masked base matrix, so a dropped agent or a failed link gets zero DRT weight there
too and the mass goes to the self-weight. With every probability 0 the trainer takes a Python
branch without any of this: the fault-free program is the one without faults. The probabilities
and the seed are constants of the compiled step (changing them compiles it again).

Rows of ``metrics.jsonl`` report the mean number of ``dropped_agents``, ``failed_links``
(undirected edges of the step's graph) and ``stragglers`` per step since the last evaluation.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from drt_jax.types import Mixing

KINDS = ("agent_dropout", "link_failure", "straggler")


class Spec(NamedTuple):
  """Per-step fault probabilities and the seed of their draws."""

  agent_dropout: float = 0.0
  link_failure: float = 0.0
  straggler: float = 0.0
  seed: int = 0


class Faults(NamedTuple):
  """One step's fault pattern on a ``[K, D]`` neighbour list."""

  alive: jax.Array  # bool[K]: not dropped out (trains and communicates)
  active: jax.Array  # bool[K]: takes its local step (alive and not straggling)
  link_ok: jax.Array  # bool[K, D]: the listed link works (slot 0 always does)
  mixing: Mixing  # the base weights with the failed weight moved onto the self-weight


def spec_from_config(c) -> Spec | None:
  """The ``faults`` fields of a run config, or None when every probability is 0 (no faults)."""
  f = c.faults
  spec = Spec(float(f.agent_dropout), float(f.link_failure), float(f.straggler), int(f.seed))
  return spec if any(getattr(spec, k) > 0 for k in KINDS) else None


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
    spec: the probabilities.
  """
  nbr_idx = mixing.nbr_idx
  k_count = nbr_idx.shape[0]
  key = jax.random.fold_in(key, step)
  k_drop, k_link, k_slow = (jax.random.fold_in(key, i) for i in range(3))
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
  return Faults(alive, active, link_ok, mask_mixing(mixing, alive, link_ok))


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
