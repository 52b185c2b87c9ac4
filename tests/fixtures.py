"""What several test modules share: a tiny config, tiny data, and histories without timings."""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np

from drt_jax import data, models

# Four agents, a small MLP, a few steps: compiles in seconds on a CPU.
TINY = {
    "num_agents": 4, "model": "mlp", "model_options": {"hidden": (16,)}, "batch_size": 8,
    "num_steps": 6, "eval_every": 3, "eval_examples": 64, "train_eval_examples": 64,
    "eval_batch_size": 32, "backend": "vmap", "optimizer": "momentum", "learning_rate": 0.05,
    # XLA's convolution compiles fastest on CPU; the formulations are compared in models_test.
    "conv": "xla",
}
# Fields that measure time and so differ between otherwise equal runs.
TIMING = ("wall_time", "steps_per_sec")


@functools.cache
def tiny_data(shape=(8, 8, 1), num_train=256):
  return data.synthetic(num_train=num_train, num_test=64, shape=shape, seed=0)


def untimed(rows):
  """``rows`` without their :data:`TIMING` fields, for comparing runs."""
  return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def assert_conv_matches_xla(name: str, kw: dict, conv) -> None:
  """Model ``name`` computing its convolutions with ``conv`` (a name or a function) has the same
  parameters, outputs and gradients as with XLA's, per agent under vmap."""
  xla, other = models.make(name, **kw), models.make(name, conv=conv, **kw)
  keys = jax.random.split(jax.random.key(0), 2)
  variables = jax.vmap(xla.init)(keys)
  chex.assert_trees_all_equal_shapes(variables, jax.vmap(other.init)(keys))
  x = jax.random.normal(jax.random.key(1), (2, 3, *xla.input_shape))

  def per_agent(model):
    def loss(params, xs, rest):
      return jnp.sum(model.apply({**rest, "params": params}, xs, True)[0] ** 2)

    rest = {k: v for k, v in variables.items() if k != "params"}
    return jax.jit(jax.vmap(jax.value_and_grad(loss)))(variables["params"], x, rest)

  want, got = per_agent(xla), per_agent(other)
  chex.assert_trees_all_close(got, want, rtol=2e-4, atol=2e-4)


def collectives(hlo: str) -> dict:
  """op name -> result shapes in compiled HLO text, e.g. {"all-gather": ["f32[16,1000]"]}."""
  out = {}
  for op in ("all-gather", "collective-permute", "all-to-all", "all-reduce"):
    out[op] = re.findall(r"= (\w+\[[\d,]*\])[^=]*? " + op + r"(?:-start)?\(", hlo)
  return out


def elements(shape: str) -> int:
  """The number of elements of an HLO shape such as ``f32[16,1000]``."""
  dims = shape[shape.index("[") + 1:-1]
  return int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
