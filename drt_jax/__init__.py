"""drt_jax: decentralized deep learning in JAX, with DRT diffusion and its baselines.

K agents, each with the same network and its own data, learn over a graph without a server. All
agents' variables are stacked on a leading axis K (see :mod:`drt_jax.types`); one train step is one
compiled program.

The modules, from the bottom up: ``types``; ``topology`` (graphs and their weights), ``combine``
(the combination step), ``drt`` (deep relative trust and its weights), ``robust`` and
``compression`` (robust combination rules, CHOCO's compressors), ``algorithms`` (diffusion, DRT,
gradient tracking, exact diffusion, CHOCO, push-sum around any optax optimizer), ``faults``;
``models``, ``data``, ``datasets``, ``partition``, ``inputs`` (a run's data on the devices);
``backends`` and ``distributed`` (how agents map onto devices and hosts); ``step`` (the compiled
programs), ``metrics``; ``build`` (config fields to objects), ``config``, ``workdir``,
``checkpoint``, ``train`` (``train_and_evaluate``), ``vectorize`` (a sweep's members as one
compiled program: ``train_and_evaluate_many``) and ``plotting``.
"""

from drt_jax import (
  algorithms,
  backends,
  build,
  checkpoint,
  combine,
  compression,
  config,
  data,
  datasets,
  distributed,
  drt,
  faults,
  inputs,
  metrics,
  models,
  partition,
  plotting,
  robust,
  step,
  topology,
  train,
  types,
  vectorize,
  workdir,
)
from drt_jax.types import Mixing

__version__ = "0.1.0"
__all__ = ["Mixing", "algorithms", "backends", "build", "checkpoint", "combine", "compression",
           "config", "data", "datasets", "distributed", "drt", "faults", "inputs", "metrics",
           "models", "partition", "plotting", "robust", "step", "topology", "train", "types",
           "vectorize", "workdir"]
