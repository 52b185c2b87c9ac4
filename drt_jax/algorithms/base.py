"""What every algorithm shares: the :class:`Algorithm` protocol, the named local optimizers,
the states of the diffusion family and the small pieces their steps are built from.

See :mod:`drt_jax.algorithms` for the protocol and the list of algorithms.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from drt_jax import combine as combine_lib
from drt_jax import drt as drt_lib
from drt_jax.topology import Topology
from drt_jax.types import PyTree


class Algorithm(NamedTuple):
  """Pure functions of one decentralized algorithm (see the module docstring)."""

  init: Callable[..., Any]
  step: Callable[..., tuple[PyTree, Any]]
  grad_point: Callable[..., PyTree] | None = None
  combine_stats: Callable[..., PyTree] | None = None
  metrics: Callable[..., dict] | None = None
  message_bytes: Callable[[int], float] | None = None


OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw")


SCHEDULES = ("constant", "cosine")


def local_optimizer(name: str, learning_rate: float, momentum: float = 0.9,
                    weight_decay: float = 0.0, schedule: str = "constant",
                    num_steps: int | None = None) -> optax.GradientTransformation:
  """A named local optimizer (one of :data:`OPTIMIZERS`) with its hyperparameters in its state
  (``optax.inject_hyperparams``), so that runs with other values share one compiled step.

  ``schedule`` (one of :data:`SCHEDULES`): ``cosine`` multiplies every update by
  ``(1 + cos(pi t / num_steps)) / 2`` at update t (Loshchilov & Hutter 2017, without restarts),
  so the learning rate decays from ``learning_rate`` to 0 over the run.

  Any other optax transformation (a schedule, ``optax.chain``, clipping) can be passed to an
  algorithm's factory or to ``train_and_evaluate(optimizer=...)`` directly.
  """

  def build(learning_rate, weight_decay, momentum):
    if name == "adam":
      opt = optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))
    elif name == "adamw":
      opt = optax.adamw(learning_rate, weight_decay=weight_decay)
    else:
      trace = () if name == "sgd" else (optax.trace(momentum, nesterov=name == "nesterov"),)
      opt = optax.chain(optax.add_decayed_weights(weight_decay), *trace,
                        optax.scale_by_learning_rate(learning_rate))
    if schedule == "cosine":  # a factor on the update is a factor on the rate, for all of these
      opt = optax.chain(opt, optax.scale_by_schedule(optax.cosine_decay_schedule(1.0, num_steps)))
    return opt

  if name not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {name!r}; expected one of: {', '.join(OPTIMIZERS)}")
  if schedule not in SCHEDULES:
    raise ValueError(f"unknown schedule {schedule!r}; expected one of: {', '.join(SCHEDULES)}")
  if schedule != "constant" and not (isinstance(num_steps, int) and num_steps >= 1):
    raise ValueError(f"schedule {schedule!r} needs num_steps, an integer >= 1 (got {num_steps!r})")
  return optax.inject_hyperparams(build)(learning_rate=learning_rate, weight_decay=weight_decay,
                                         momentum=momentum)


class DiffusionState(NamedTuple):
  """State of ATC, CTA, DSGD and local training."""

  opt_state: Any  # stacked local optimizer state
  count: jax.Array  # int32 scalar: steps taken


class DRTState(NamedTuple):
  """State of DRT diffusion."""

  opt_state: Any
  count: jax.Array
  strength: jax.Array  # rho, a traced scalar so that sweeping it does not recompile
  init_sq_norms: dict  # layer -> n_0^(p)^2
  layer_w: dict  # layer -> [K, D] weights of the last combine (for statistics and metrics)


def select(active, new, old):
  """Per agent, ``new`` where ``active[k]`` else ``old``; ``new`` itself when ``active`` is None."""
  if active is None:
    return new

  def one(n, o):
    return jnp.where(active.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)

  return jax.tree.map(one, new, old)


def local_update(opt: optax.GradientTransformation, grads, opt_state, params, active=None):
  updates, new_opt_state = jax.vmap(opt.update)(grads, opt_state, params)
  new = optax.apply_updates(params, updates)
  return select(active, new, params), select(active, new_opt_state, opt_state)


def communicates(count, comm_every: int):
  return count % comm_every == 0


def maybe(pred, comm_every: int, true_fn: Callable, false_fn: Callable):
  """``true_fn()`` on communication steps; no branch at all when every step communicates."""
  if comm_every == 1:
    return true_fn()
  return jax.lax.cond(pred, true_fn, false_fn)


def check_comm_every(comm_every) -> None:
  """Raises ValueError unless ``comm_every`` is an integer >= 1."""
  if not isinstance(comm_every, int) or isinstance(comm_every, bool) or comm_every < 1:
    raise ValueError(f"comm_every={comm_every!r} must be an integer >= 1 (combine every H-th step)")


def last_mixing(topology, state):
  """The weights the step that just ran used (the graph's, before any per-layer change)."""
  return combine_lib.as_mixing(topology, jnp.maximum(state.count - 1, 0))


def graph_metrics(params, mixing, granularity="module", eps=1e-6) -> dict:
  """Mean DRT over the graph's edges (:func:`drt_jax.drt.edge_statistics`)."""
  names = combine_lib.layer_names(params, granularity)
  return drt_lib.edge_statistics(params, mixing, names, eps)


def every(comm_every: int):
  def message_bytes(nbytes):
    return nbytes / comm_every

  return message_bytes




# What an algorithm needs of the topology's weights: name -> (the property, what it means).
_NEEDS = {
    "columns": ("column_stochastic", "every agent's weights summing to one (metropolis or uniform "
                "weights on any graph)"),
    "rows": ("row_stochastic", "every sender's weights summing to one (weights='push' on any "
             "graph, or doubly stochastic weights)"),
    "doubly": ("doubly_stochastic", "doubly stochastic weights (metropolis weights on an "
               "undirected graph, or uniform weights on a regular one)"),
    "symmetric": ("symmetric", "symmetric doubly stochastic weights (metropolis weights on an "
                  "undirected graph: ring, torus, grid, full, star, erdos_renyi, "
                  "random_matching)"),
}


def require_weights(topology, need: str, algorithm: str) -> None:
  """Raises ValueError in one line unless ``topology``'s weights are what ``algorithm`` needs:
  ``need`` is ``columns``, ``rows``, ``doubly`` or ``symmetric`` (which includes ``doubly``).

  Checked on the host when an algorithm's ``init`` is given a concrete :class:`Topology`; a
  traced one (inside a user's own jit) or a bare ``Mixing`` is taken as it is.
  """
  if not isinstance(topology, Topology) or any(
      isinstance(x, jax.core.Tracer) for x in (topology.nbr_idx, topology.nbr_w)):
    return
  # Host copies: device arrays closed over by a jitted init would stage the checks' indexing.
  topology = dataclasses.replace(topology, nbr_idx=np.asarray(topology.nbr_idx),
                                 nbr_w=np.asarray(topology.nbr_w))
  prop, what = _NEEDS[need]
  ok = getattr(topology, prop) and (need != "symmetric" or topology.column_stochastic)
  if not ok:
    raise ValueError(f"{algorithm} needs {what}; the {topology.kind} topology's weights are not "
                     f"{prop.replace('_', ' ')}: pass a topology that is")


def stats_weights(stats_names, layer_w: dict, fallback):
  """The weights of each statistics leaf: its BatchNorm layer's, else ``fallback``.

  A statistics leaf ``batch_stats/Block_0/BatchNorm_0/mean`` belongs to module
  ``batch_stats/Block_0/BatchNorm_0``; leading collection names are dropped until the module
  matches a parameter layer (``Block_0/BatchNorm_0``, or its leaves with leaf granularity).
  """
  out = []
  for name in stats_names:
    parts = name.split("/")
    match = None
    for i in range(len(parts)):
      module = "/".join(parts[i:])
      match = layer_w.get(module)
      if match is None:
        match = next((w for p, w in layer_w.items() if p.startswith(module + "/")), None)
      if match is not None:
        break
    out.append(fallback if match is None else match)
  return out
