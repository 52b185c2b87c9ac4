r"""Metrics of a decentralized run, computed on device (spec: "What to measure").

* consensus distance: (1/K) sum_k ||w_k - w_bar||^2 over parameters, in total and per layer;
* output disagreement: mean over inputs x of (1/K) sum_k ||p_k(x) - p_bar(x)||^2 with p_k the
  softmax output of agent k and p_bar the agents' mean -- the function-space consensus DRT targets;
* mean deep relative trust over the graph's edges (reported as mean log(1 + DRT), which stays
  finite, and as mean DRT);
* self-weights a_kk (per layer for DRT) and the bytes each agent sends per step.
"""

import jax
import jax.numpy as jnp
import numpy as np

from drt_jax.topology import Topology


def centroid(stacked_tree):
  """w_bar = mean_k w_k for every leaf."""
  return jax.tree.map(lambda x: jnp.mean(x.astype(jnp.float32), axis=0).astype(x.dtype),
                      stacked_tree)


def consensus_distance(stacked_tree, names: list[str]) -> tuple[jax.Array, dict]:
  """(1/K) sum_k ||w_k - w_bar||^2 in total and per layer (dict layer -> scalar)."""
  per_layer = {}
  for name, x in zip(names, jax.tree.leaves(stacked_tree)):
    x = x.astype(jnp.float32)
    sq = jnp.sum(jnp.square(x - jnp.mean(x, axis=0, keepdims=True))) / x.shape[0]
    per_layer[name] = per_layer[name] + sq if name in per_layer else sq
  total = sum(per_layer.values()) if per_layer else jnp.zeros(())
  return total, per_layer


def output_disagreement(probs_KxBxC, mask_B=None) -> jax.Array:
  """Sum over the batch of (1/K) sum_k ||p_k - p_bar||^2 (masked examples excluded)."""
  dev = jnp.sum(jnp.square(probs_KxBxC - jnp.mean(probs_KxBxC, axis=0)), axis=-1)  # [K, B]
  per_example = jnp.mean(dev, axis=0)
  if mask_B is not None:
    per_example = jnp.where(mask_B, per_example, 0.0)
  return jnp.sum(per_example)


def bytes_per_agent_step(topology: Topology, message_bytes: float) -> float:
  """Average bytes an agent sends per step: ``message_bytes`` (what an algorithm sends one
  out-neighbour per step on average, ``Algorithm.message_bytes``) to each of its out-neighbours."""
  edges = np.mean([topology.num_edges(t) for t in range(topology.period)])
  return float(edges / topology.num_agents * message_bytes)


def tree_bytes(tree, stacked: bool = True) -> int:
  """Bytes of one agent's copy of ``tree`` (``stacked``: leaves carry the agent axis K)."""
  leaves = jax.tree.leaves(tree)
  return int(sum((x.size // (x.shape[0] if stacked else 1)) * x.dtype.itemsize for x in leaves))

