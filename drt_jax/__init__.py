"""drt_jax: decentralized deep learning in JAX, with DRT diffusion and its baselines.

K agents, each with the same network and its own data, learn over a graph without a server. All
agents' variables are stacked on a leading axis K (see :mod:`drt_jax.types`); one train step is one
compiled program.
"""

from drt_jax import combine, drt, topology
from drt_jax.types import Mixing

__version__ = "0.1.0"
__all__ = ["Mixing", "combine", "drt", "topology"]
