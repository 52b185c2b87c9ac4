r"""The Fashion-MNIST study setting: K = 16 agents on a ring, non-IID, about 10 local epochs.

Fashion-MNIST from its embedded Debian copy (offline), 10 % of the training split held out for
tuning, the rest split with Dirichlet label skew (alpha = 0.3) over 16 agents (about 3,375
examples each); a CNN with two convolutions (8 and 16 channels) and a dense layer of 96: 0.30M
parameters, over-parameterized for the data, at 0.6M multiply-adds per image so that a study fits
on a CPU; SGD with momentum, batch 32, 1,050 steps (about 10 local epochs); DRT diffusion vs ATC
diffusion. A few minutes per algorithm on a 2-core CPU:

  python experiments/train.py --config=experiments/configs/fashion_mnist.py \
      --workdir=runs/fashion_mnist

The earlier study of docs/results.md swept this config; the current one
(``experiments/study.py``) trains the ``convnet`` with K = 8. Smoke variant (seconds):

  python experiments/train.py --config=experiments/configs/fashion_mnist.py:smoke \
      --workdir=/tmp/fashion_mnist_smoke

Variants after ``:`` are comma-separated, as in big_vision: the flag ``smoke`` and the knobs of
``experiments.common.KNOBS`` as ``name=value`` (values are Python literals, else strings; knobs
apply after ``smoke``, whatever the order): ``agents`` (num_agents), ``algorithm`` (trains that
algorithm alone instead of comparing DRT and ATC), ``topology``, ``steps`` (num_steps), ``seed``,
``lr`` (learning_rate). DRT diffusion alone on a torus of 16 agents, seed 1:

  python experiments/train.py \
      --config=experiments/configs/fashion_mnist.py:algorithm=drt,topology=torus,seed=1 \
      --workdir=runs/fashion_mnist_drt_torus
"""

from drt_jax import config as config_lib
from experiments import common

DATASET = "fashion_mnist"


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
  knobs, flags = common.variants(c, arg, ("smoke",))
  if "smoke" in flags:
    c.num_agents, c.num_steps, c.eval_every = 4, 4, 2
    c.eval_examples = c.train_eval_examples = 64
    c.model_options.features, c.model_options.hidden = (4, 8, 8), 16
  common.apply_knobs(c, knobs)
  return c
