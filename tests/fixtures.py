"""What several test modules share: a tiny config, tiny data, and histories without timings."""

import functools

from drt_jax import data

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
