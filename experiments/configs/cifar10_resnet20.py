r"""The paper's setting: ResNet-20 on CIFAR-10, K = 16 agents on a ring, non-IID.

For users with internet (CIFAR-10 is downloaded and prepared once by tfds, which needs
TensorFlow: ``pip install .[tfds-prepare]``) and an accelerator. Dirichlet label skew
(alpha = 0.5) over 16 agents (about 2,810 examples each after the 10 % validation split),
ResNet-20 (0.27M parameters, BatchNorm kept local), random crop + flip on the device, SGD with
momentum and weight decay, batch 32, 9,800 steps (about 110 local epochs); DRT diffusion vs ATC
diffusion:

  python experiments/train.py --config=experiments/configs/cifar10_resnet20.py \
      --config.download=True --config.data_dir=~/tensorflow_datasets --workdir=runs/cifar10

Smoke variant (a few steps; still needs CIFAR-10 prepared, or tfds's mock data in tests):

  python experiments/train.py --config=experiments/configs/cifar10_resnet20.py:smoke \
      --workdir=/tmp/cifar10_smoke

Variants after ``:`` are comma-separated, as in big_vision: the flag ``smoke`` and the knobs of
``experiments.common.KNOBS`` as ``name=value`` (values are Python literals, else strings; knobs
apply after ``smoke``, whatever the order): ``agents`` (num_agents), ``algorithm`` (trains that
algorithm alone instead of comparing DRT and ATC), ``topology``, ``steps`` (num_steps), ``seed``,
``lr`` (learning_rate). ATC diffusion alone with 32 agents and learning rate 0.1:

  python experiments/train.py \
      --config=experiments/configs/cifar10_resnet20.py:algorithm=atc,agents=32,lr=0.1 \
      --config.download=True --config.data_dir=~/tensorflow_datasets --workdir=runs/cifar10_atc32
"""

from drt_jax import config as config_lib
from experiments import common


def get_config(arg=None):
  c = config_lib.default_config()
  c.dataset = "cifar10"
  c.num_agents = 16
  c.topology = "ring"
  c.model = "resnet20"
  c.validation_fraction = 0.1
  c.partition = "dirichlet"
  c.dirichlet_alpha = 0.5
  c.augment = "crop_flip"
  c.optimizer = "momentum"
  c.learning_rate = 0.05
  c.weight_decay = 5e-4
  c.batch_size = 32
  c.num_steps = 9800
  c.eval_every = 490
  c.eval_examples = 0
  c.train_eval_examples = 5000
  c.compare = ("drt", "atc")
  knobs, flags = common.variants(c, arg, ("smoke",))
  if "smoke" in flags:
    c.num_agents, c.num_steps, c.eval_every = 2, 2, 1
    c.batch_size = 4
    c.eval_examples = c.train_eval_examples = 16
    c.model_options.widths = (4, 8, 8)
    c.model_options.stage_sizes = (1, 1, 1)
  common.apply_knobs(c, knobs)
  return c
