r"""The default experiment: DRT diffusion vs ATC diffusion on a ring, real MNIST, offline.

K = 16 agents, the small CNN (0.33M parameters), MNIST from its embedded copy split with
Dirichlet label skew (alpha = 0.5), 300 steps of 16 images per agent (about 1.3 local epochs),
SGD with momentum. A few minutes on a 2-core CPU (``make run`` runs it):

  python experiments/train.py --config=experiments/configs/default.py --workdir=runs/default

Smoke variant (seconds; CI):

  python experiments/train.py --config=experiments/configs/default.py:smoke --workdir=/tmp/smoke

Variants after ``:`` are comma-separated, as in big_vision: the flag ``smoke`` and the knobs of
``experiments.common.KNOBS`` as ``name=value`` (values are Python literals, else strings; knobs
apply after ``smoke``, whatever the order): ``agents`` (num_agents), ``algorithm`` (trains that
algorithm alone instead of comparing DRT and ATC), ``topology``, ``steps`` (num_steps), ``seed``,
``lr`` (learning_rate). ATC diffusion alone with 32 agents, smoke-sized:

  python experiments/train.py \
      --config=experiments/configs/default.py:algorithm=atc,agents=32,smoke --workdir=/tmp/atc32
"""

from drt_jax import config as config_lib
from experiments import common


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
  knobs, flags = common.variants(c, arg, ("smoke",))
  if "smoke" in flags:
    c.num_agents = 4
    c.num_steps = 4
    c.eval_every = 2
    c.eval_examples = c.train_eval_examples = 64
    c.model_options.features = (4, 8, 8)
    c.model_options.hidden = 16
  common.apply_knobs(c, knobs)
  return c
