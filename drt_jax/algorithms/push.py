r"""Stochastic gradient push: push-sum gossip with local optimizer steps, for directed graphs.

Push-sum (Kempe, Dobra & Gehrke 2003) averages over a graph whose *senders* split their mass:
``A[l, k] = a_lk`` is still what agent k takes from agent l (:mod:`drt_jax.types`), but every row
l sums to one (``weights="push"`` in :mod:`drt_jax.topology`) and a receiver's weights need not.
Combining alone, ``x_k <- sum_l a_lk x_l``, then keeps the total ``sum_k x_k`` but not consensus:
agent k ends at ``K pi_k`` times the average, pi the stationary vector of the mixing. So every
agent also mixes a weight y_k (y_k = 1 at the start) with the same weights, and the ratio is
unbiased: ``x_k / y_k -> (1/K) sum_l x_l(0)`` on any strongly connected graph.

Stochastic gradient push (SGP; Assran, Loizou, Ballas & Rabbat 2019, arXiv 1811.10792,
Algorithm 1) takes a local step on the numerators, with the gradient at the de-biased point::

    z_k = x_k / y_k
    x_k^(1/2) = x_k + update_k(g_k(z_k))      (the local optimizer's step; -mu g for SGD)
    x_k <- sum_l a_lk x_l^(1/2),   y_k <- sum_l a_lk y_l

With a constant step size the agents reach a neighbourhood of the minimiser of
``sum_k J_k`` whose size shrinks with the step, as for ATC.

Derived by this project (the paper states the recursion in x): the ``params`` the trainer holds
are the de-biased z, and the state keeps y, so that gradients, evaluation, consensus metrics and
checkpoints all see z; a step rebuilds ``x = y z``, so it computes
``z_k <- sum_l a_lk (y_l z_l + update_l) / sum_l a_lk y_l``, a convex combination of the
``z_l + update_l / y_l``. Non-trained statistics (BatchNorm) are push-summed the same way with the
weights y of before the last combine, kept in the state. An agent whose weight is zero after a
combine (it kept nothing and heard nothing) keeps its z, which its zero numerator leaves
undefined. With ``comm_every = H`` agents combine on steps 0, H, 2H, ... only; in between y stays
and ``z_k <- z_k + update_k / y_k``.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from drt_jax import combine as combine_lib
from drt_jax.algorithms import base


class PushSumState(NamedTuple):
  """State of stochastic gradient push."""

  opt_state: Any  # stacked local optimizer state
  count: jax.Array  # int32 scalar: steps taken
  y: jax.Array  # [K] push-sum weights: x_k = y_k z_k
  y_prev: jax.Array  # [K] the weights before the last step's combine (for combine_stats)


def _weight_dtype(params):
  dtype = jnp.float32
  for x in jax.tree.leaves(params):
    dtype = jnp.promote_types(dtype, x.dtype)
  return dtype


def _per_agent(v, x):
  """``v[K]`` shaped to broadcast against leaf ``x[K, ...]``."""
  return v.reshape((-1,) + (1,) * (x.ndim - 1))


def _de_bias(x_tree, y, fallback):
  """``x / y`` per agent, cast to the fallback's dtypes; the fallback where ``y`` is zero."""

  def leaf(x, old):
    positive = _per_agent(y > 0, x)
    z = x / _per_agent(jnp.where(y > 0, y, 1).astype(x.dtype), x)
    return jnp.where(positive, z, old).astype(old.dtype)

  return jax.tree.map(leaf, x_tree, fallback)


def _numerators(z_tree, y, updates=None):
  """``x = y z (+ update)`` per agent, in float32 or the leaf's wider dtype."""

  def leaf(z, u=None):
    dtype = jnp.promote_types(z.dtype, y.dtype)
    x = _per_agent(y, z).astype(dtype) * z.astype(dtype)
    return x if u is None else x + u.astype(dtype)

  if updates is None:
    return jax.tree.map(leaf, z_tree)
  return jax.tree.map(leaf, z_tree, updates)


def push_sum(local_optimizer: optax.GradientTransformation, *,
             comm_every: int = 1) -> base.Algorithm:
  """Stochastic gradient push (see the module docstring): push-sum averaging of the numerators
  ``x = y z`` and weights y over row-stochastic weights, gradients at ``z = x / y``.

  Args:
    local_optimizer: optax transformation applied per agent (its state stays local).
    comm_every: combine every H-th step (local steps in between).

  Needs weights whose rows sum to one (``topology.make(kind, K, weights="push")``, or any doubly
  stochastic matrix); ``init`` refuses others when given the topology.
  """
  base.check_comm_every(comm_every)
  opt = local_optimizer

  def init(params, topology=None):
    base.require_weights(topology, "rows", "push_sum")
    k_count = jax.tree.leaves(params)[0].shape[0]
    y = jnp.ones((k_count,), _weight_dtype(params))
    return PushSumState(jax.vmap(opt.init)(params), jnp.zeros((), jnp.int32), y, y)

  def mix(tree, y, count, topology):
    m = combine_lib.as_mixing(topology, count)
    return base.maybe(base.communicates(count, comm_every), comm_every,
                      lambda: (combine_lib.combine(tree, m), combine_lib.combine(y, m)),
                      lambda: (tree, y))

  def step(params, grads, state, topology, active=None):
    updates, opt_state = jax.vmap(opt.update)(grads, state.opt_state, params)
    updates = base.select(active, updates, jax.tree.map(jnp.zeros_like, updates))
    opt_state = base.select(active, opt_state, state.opt_state)
    x_half = _numerators(params, state.y, updates)
    x, y = mix(x_half, state.y, state.count, topology)
    return _de_bias(x, y, params), PushSumState(opt_state, state.count + 1, y, state.y)

  def combine_stats(stats, state, topology):
    prev = state.count - 1  # the step that just ran
    m = combine_lib.as_mixing(topology, prev)

    def push():
      return _de_bias(combine_lib.combine(_numerators(stats, state.y_prev), m), state.y, stats)

    return base.maybe(base.communicates(prev, comm_every), comm_every, push, lambda: stats)

  def metrics(params, state, topology):
    m = base.last_mixing(topology, state)
    return {"push_weight_min": jnp.min(state.y), "push_weight_max": jnp.max(state.y),
            "self_weight_mean": jnp.mean(m.nbr_w[:, 0]), **base.graph_metrics(params, m)}

  def message_bytes(nbytes):
    return (nbytes + 4) / comm_every  # the float32 weight y travels with the values

  return base.Algorithm(init, step, None, combine_stats, metrics, message_bytes)
