"""The small experiment that tests/multihost_test.py runs on 1 device, on 8 devices and as 2
processes of 4 devices each (K = 8 agents, DRT on a ring, a tiny MLP on synthetic data, 6 steps):

  python experiments/train.py --config=tests/multihost_config.py --workdir=/tmp/multihost
"""

from drt_jax import config as config_lib


def get_config(arg=None):
  if arg:
    raise ValueError(f"unknown variant {arg!r} of multihost_config.py; it has none")
  c = config_lib.default_config()
  c.num_agents = 8
  c.topology = "ring"
  c.algorithm = "drt"
  c.model = "mlp"
  c.model_options.hidden = (16,)
  c.dataset = "synthetic"
  c.optimizer = "momentum"
  c.learning_rate = 0.05
  c.batch_size = 8
  c.num_steps = 6
  c.eval_every = 3
  c.eval_examples = c.train_eval_examples = 64
  c.eval_batch_size = 32
  c.backend = "shard"
  c.checkpoint_every = 3  # step 3 for resuming, step 6 (the end) for comparing runs
  c.compare = ("drt",)
  return c
