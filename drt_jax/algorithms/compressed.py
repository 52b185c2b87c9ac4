r"""CHOCO-SGD: decentralized SGD with compressed communication.

Koloskova, Stich & Jaggi 2019, "Decentralized Stochastic Optimization and Gossip Algorithms with
Compressed Communication", arXiv 1902.00340, Algorithm 2. Every agent k keeps its parameters x_k
and a public copy x_hat_k that all its neighbours hold too; per step, with Q a compressor of
:mod:`drt_jax.compression` and a_lk the topology's weights (columns summing to one)::

  x_half_k = x_k + update(g_k(x_k))                      (the local optimizer's step)
  q_k      = Q(x_half_k - x_hat_k);  x_hat_k <- x_hat_k + q_k   (k sends q_k to its neighbours)
  x_k     <- x_half_k + gamma sum_l a_lk (x_hat_l - x_hat_k)

Every agent that listens to k applies the same q_k to its copy of x_hat_k, so one stacked x_hat
represents all copies exactly. The consensus term changes the network's sum by
``gamma sum_l x_hat_l (sum_k a_lk - sum_k a_kl)``: it preserves the average of the x_k only when
the weights are doubly stochastic, which :func:`choco` requires. Time-varying graphs are fine.

Choices made by this project (not in the paper):

* ``x_hat(0) = x(0)`` where the paper starts from ``x_hat(0) = 0``: it makes consensus a fixed
  point from the first step (with a random compressor, zero public copies would pull identical
  agents apart for a while). It costs nothing with a shared initialisation (the trainer's
  ``same_init``) and one uncompressed exchange otherwise, which :func:`choco`'s
  ``message_bytes`` does not count.
* The default consensus step gamma is the compressor's contraction parameter delta
  (:func:`drt_jax.compression.delta`: 1 for ``none``, where the step is ATC diffusion up to
  rounding; about ``ratio`` for top_k and random_k; 1 / tau of the largest leaf for quantize).
  The paper tunes gamma per experiment and its theorem asks for much less. In our gossip runs
  (a ring of 16 agents, 4000 entries, no gradients) gamma = delta reached consensus with every
  compressor, while 3 delta diverged for random_k (ratio 0.1) and quantize (2 bits); top_k and
  quantize with 4 bits tolerate larger steps, so tune ``consensus_step`` for speed.
* Each leaf is compressed on its own (k entries, or one norm, per leaf and agent); random_k and
  quantize draw from ``fold_in(fold_in(fold_in(key(seed), step), agent), leaf)``.
* BatchNorm statistics (``combine_stats``) are mixed with the step's weights, uncompressed.
* Agents outside ``active`` skip their local step (x_half = x) but still send their q.
"""

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from drt_jax import combine as combine_lib
from drt_jax import compression
from drt_jax.algorithms import base
from drt_jax.types import PyTree


class ChocoState(NamedTuple):
  """State of CHOCO-SGD."""

  opt_state: Any  # stacked local optimizer state
  count: jax.Array  # int32 scalar: steps taken
  x_hat: PyTree  # the public copies x_hat_k, stacked like the parameters
  consensus_step: jax.Array  # gamma, a float32 scalar, so that sweeping it does not recompile
  seed: jax.Array  # int32 scalar, traced for the same reason
  compression_error: jax.Array  # ||Q(v) - v||^2 / ||v||^2 over all agents, last step


def _acc(x):
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _expand(w, x):
  return w.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)


def disagreement(x_hat: PyTree, mixing) -> PyTree:
  """``sum_l a_lk (x_hat_l - x_hat_k)`` for every agent k (leaves in float32 or wider).

  Summed over the neighbour slots 1..D-1 only: slot 0 (k itself) adds nothing, so the term is
  exactly zero for one agent and on padding slots, whatever the self-weights sum to.
  """

  def leaf(h):
    out = jnp.zeros(h.shape, jnp.promote_types(h.dtype, jnp.float32))
    for j in range(1, mixing.nbr_w.shape[1]):
      nbr = _acc(combine_lib.neighbour(h, mixing, j))  # sent in the leaf's own dtype
      out = out + _expand(mixing.nbr_w[:, j], out) * (nbr - _acc(h))
    return out

  return jax.tree.map(leaf, x_hat)


def _sum_sq(tree) -> jax.Array:
  return sum((jnp.sum(jnp.square(_acc(x))) for x in jax.tree.leaves(tree)), jnp.zeros(()))


def _agent_sq(tree) -> jax.Array:
  """Per-agent squared norm over all leaves: ``[K]``."""
  return sum(jnp.sum(jnp.square(_acc(x)).reshape(x.shape[0], -1), axis=1)
             for x in jax.tree.leaves(tree))


def _check_step(consensus_step) -> None:
  if consensus_step is None:
    return
  if (isinstance(consensus_step, bool) or not isinstance(consensus_step, numbers.Real)
      or not 0 < consensus_step <= 1):
    raise ValueError(f"consensus_step={consensus_step!r} must be a number in (0, 1] or None "
                     "(None: the compressor's delta)")


def choco(local_optimizer: optax.GradientTransformation, *, compressor: str = "top_k",
          ratio: float = 0.1, bits: int = 4, consensus_step: float | None = None,
          seed: int = 0) -> base.Algorithm:
  """CHOCO-SGD (see the module docstring) around ``local_optimizer``.

  Args:
    local_optimizer: optax transformation applied per agent.
    compressor: one of :data:`drt_jax.compression.COMPRESSORS` (``none``, ``top_k``,
      ``random_k``, ``quantize``).
    ratio: fraction in (0, 1] of each leaf's entries that top_k and random_k send.
    bits: quantize's bits per level, 1..16 (s = 2^bits - 1 levels; the sign is one more bit).
    consensus_step: gamma in (0, 1]; None (default) takes the compressor's delta on the
      parameters, 1 for ``none`` (then the step is ATC diffusion).
    seed: seeds random_k's indices and quantize's rounding (with the step and the agent).

  Needs doubly stochastic weights (checked by ``init`` when given a Topology).

  ``message_bytes(nbytes)`` counts exactly what one agent sends a neighbour per step: the
  compressed parameters (:func:`drt_jax.compression.message_bytes` of the per-leaf shapes that
  ``init`` records) plus, uncompressed, whatever ``nbytes`` holds beyond the parameters (the
  BatchNorm statistics when they are shared). It also takes one agent's tree of arrays or
  ``jax.ShapeDtypeStruct`` s, all compressed. Before any ``init`` an int is an estimate, as if
  the parameters were one float32 vector.
  """
  compression.check_options(compressor, ratio, bits)
  _check_step(consensus_step)
  if (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
      or not 0 <= seed < 2 ** 31):
    raise ValueError(f"seed={seed!r} must be an integer in [0, 2^31)")
  comp = compression.make(compressor, ratio=ratio, bits=bits)
  recorded = {}  # one agent's parameter shapes and dtypes, from init: static data only

  def init(params, topology=None):
    base.require_weights(topology, "doubly", "choco")
    per_agent = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), params)
    recorded["params"] = per_agent
    gamma = comp.delta(per_agent) if consensus_step is None else consensus_step
    return ChocoState(jax.vmap(local_optimizer.init)(params), jnp.zeros((), jnp.int32),
                      jax.tree.map(jnp.copy, params),  # a buffer of its own: states are donated
                      jnp.asarray(gamma, jnp.float32), jnp.asarray(seed, jnp.int32),
                      jnp.zeros((), jnp.float32))

  def step(params, grads, state, topology, active=None):
    m = combine_lib.as_mixing(topology, state.count)
    x_half, opt_state = base.local_update(local_optimizer, grads, state.opt_state, params,
                                          active)
    # v and q in the parameters' dtype: q is what travels (message_bytes counts that dtype)
    v = jax.tree.map(lambda a, h: (_acc(a) - _acc(h)).astype(a.dtype), x_half, state.x_hat)
    key = jax.random.fold_in(jax.random.key(state.seed), state.count)
    q = compression.compress_stacked(comp, v, key)
    x_hat = jax.tree.map(lambda h, d: (_acc(h) + _acc(d)).astype(h.dtype), state.x_hat, q)
    gamma = state.consensus_step
    new = jax.tree.map(lambda a, d: (_acc(a) + gamma.astype(d.dtype) * d).astype(a.dtype),
                       x_half, disagreement(x_hat, m))
    v_sq = _sum_sq(v)
    err_sq = _sum_sq(jax.tree.map(lambda a, b: _acc(a) - _acc(b), v, q))
    error = jnp.where(v_sq > 0, err_sq / jnp.where(v_sq > 0, v_sq, 1.0), 0.0)
    return new, state._replace(opt_state=opt_state, count=state.count + 1, x_hat=x_hat,
                               compression_error=error.astype(jnp.float32))

  def combine_stats(stats, state, topology):
    return combine_lib.combine(stats, base.last_mixing(topology, state))

  def metrics(params, state, topology):
    m = base.last_mixing(topology, state)
    gap_sq = _agent_sq(jax.tree.map(lambda x, h: _acc(x) - _acc(h), params, state.x_hat))
    x_sq = _agent_sq(params)
    gap = jnp.sqrt(gap_sq / jnp.where(x_sq > 0, x_sq, 1.0))
    return {"compression_error": state.compression_error,  # 1 - the step's effective delta
            "public_gap": jnp.mean(gap),  # mean_k ||x_k - x_hat_k|| / ||x_k||
            "self_weight_mean": jnp.mean(m.nbr_w[:, 0]), **base.graph_metrics(params, m)}

  def message_bytes(shared):
    if not isinstance(shared, numbers.Number):  # one agent's tree: every leaf compressed
      return float(comp.message_bytes(shared))
    params = recorded.get("params")
    raw = None if params is None else compression.message_bytes(params)
    if raw is None or shared < raw:  # no init yet (or another model's): one float32 vector
      return float(comp.message_bytes(jax.ShapeDtypeStruct((int(shared) // 4,), jnp.float32)))
    return float(comp.message_bytes(params) + shared - raw)  # the rest goes uncompressed

  return base.Algorithm(init, step, None, combine_stats, metrics, message_bytes)
