r"""The default experiment: DRT diffusion vs ATC diffusion on a ring, real MNIST, offline.

K = 16 agents, the small CNN (0.33M parameters), MNIST from its embedded copy split with
Dirichlet label skew (alpha = 0.5), 300 steps of 16 images per agent (about 1.3 local epochs),
SGD with momentum. A few minutes on a 2-core CPU (``make run`` runs it):

  python experiments/train.py --config=experiments/configs/default.py --workdir=runs/default

Smoke variant (seconds; CI):

  python experiments/train.py --config=experiments/configs/default.py:smoke --workdir=/tmp/smoke
"""

from drt_jax import config as config_lib


def get_config(arg=None):
  c = config_lib.default_config()
  c.num_agents = 16
  c.topology = "ring"
  c.model = "cnn"
  c.dataset = "mnist"
  c.partition = "dirichlet"
  c.dirichlet_alpha = 0.5
  c.optimizer = "momentum"
  c.learning_rate = 0.01
  c.batch_size = 16
  c.num_steps = 300
  c.eval_every = 50
  c.eval_examples = 1000
  c.train_eval_examples = 500
  c.compare = ("drt", "atc")
  if arg == "smoke":
    c.num_agents = 4
    c.num_steps = 4
    c.eval_every = 2
    c.eval_examples = c.train_eval_examples = 64
    c.model_options.features = (4, 8, 8)
    c.model_options.hidden = 16
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of default.py; expected: smoke (or none)")
  return c
