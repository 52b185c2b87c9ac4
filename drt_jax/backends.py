"""How the per-agent computation runs over the stacked agent axis.

A per-agent function ``fn(*args)`` (one agent's arrays) becomes a function of stacked arrays (every
leaf with leading axis K) through one of these back-ends:

=========== =================================================================================
``vmap``    ``jax.vmap``: one batched program. Convolutions over stacked kernels lower to grouped
            convolutions, which are slow on some platforms (see ``docs/performance.md``).
``chunked`` groups of ``chunk_size`` agents vmapped, the groups run one after another
            (``lax.map``): bounds peak memory at large K.
``map``     ``lax.map`` over agents: one agent at a time inside one compiled program.
``shard``   ``jax.shard_map`` over a 1-D mesh of the local devices on axis ``agents``; each
            device vmaps its K / n_devices agents. Needs K divisible by the device count.
``auto``    ``shard`` when several local devices exist and divide K, else ``vmap``.
=========== =================================================================================
"""

from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BACKENDS = ("auto", "vmap", "chunked", "map", "shard")
AGENTS = "agents"


def check(backend: str, num_agents: int, chunk_size: int | None = None) -> None:
  """Raises ValueError for an unknown back-end or a shape it cannot run."""
  if backend not in BACKENDS:
    raise ValueError(f"unknown backend {backend!r}; expected one of: {', '.join(BACKENDS)}")
  if backend == "chunked":
    if not chunk_size or chunk_size < 1 or num_agents % chunk_size:
      raise ValueError(f"backend 'chunked' needs a chunk_size >= 1 dividing K={num_agents}; "
                       f"got {chunk_size}")
  if backend == "shard":
    n = jax.local_device_count()
    if num_agents % n:
      raise ValueError(f"backend 'shard' splits K={num_agents} agents over {n} local devices; "
                       f"K must be a multiple of {n} (or use backend 'vmap')")


def resolve(backend: str, num_agents: int) -> str:
  """The concrete back-end ``auto`` stands for on this machine."""
  if backend != "auto":
    return backend
  n = jax.local_device_count()
  return "shard" if n > 1 and num_agents % n == 0 else "vmap"


def best_conv(conv: str = "auto", precision: str = "float32") -> str:
  """The convolution formulation (``models.CONVS``) ``auto`` stands for on this platform.

  Measured on an H200 (ResNet-20, 64 agents vmapped, docs/performance.md): in float32 one matmul
  per kernel tap ran 1.43x faster than XLA's grouped convolution; in bfloat16 the grouped
  convolution was 1.47x faster than the taps. Elsewhere (CPU, TPU) nothing measured beats
  ``'xla'``.
  """
  if conv != "auto":
    return conv
  return "taps" if jax.default_backend() == "gpu" and precision == "float32" else "xla"


def agents_mesh() -> Mesh:
  """A 1-D mesh of the local devices with axis ``agents``."""
  return Mesh(np.array(jax.local_devices()), (AGENTS,))


def per_agent(fn: Callable, backend: str, num_agents: int, chunk_size: int | None = None,
              shared: tuple[int, ...] = ()) -> Callable:
  """Lifts ``fn`` (one agent's arrays -> pytree) to stacked arrays with the chosen back-end.

  Positional arguments listed in ``shared`` are the same for every agent (no agent axis), e.g.
  an evaluation batch.
  """
  check(backend, num_agents, chunk_size)
  backend = resolve(backend, num_agents)
  def in_axes(n):
    return tuple(None if i in shared else 0 for i in range(n))

  if backend == "vmap":
    return lambda *args: jax.vmap(fn, in_axes=in_axes(len(args)))(*args)

  def split(args):
    stacked = tuple(a for i, a in enumerate(args) if i not in shared)
    return stacked, lambda st: _merge(args, st, shared)

  if backend == "map":
    def mapped(*args):
      stacked, merge = split(args)
      return jax.lax.map(lambda st: fn(*merge(st)), stacked)

    return mapped
  if backend == "chunked":
    groups = num_agents // chunk_size

    def chunked(*args):
      stacked, merge = split(args)
      grouped = jax.tree.map(lambda x: x.reshape((groups, chunk_size) + x.shape[1:]), stacked)
      vfn = jax.vmap(fn, in_axes=in_axes(len(args)))
      out = jax.lax.map(lambda st: vfn(*merge(st)), grouped)
      return jax.tree.map(lambda x: x.reshape((num_agents,) + x.shape[2:]), out)

    return chunked
  mesh = agents_mesh()

  def sharded(*args):
    specs = tuple(PartitionSpec() if i in shared else PartitionSpec(AGENTS)
                  for i in range(len(args)))
    return jax.shard_map(jax.vmap(fn, in_axes=in_axes(len(args))), mesh=mesh, in_specs=specs,
                         out_specs=PartitionSpec(AGENTS))(*args)

  return sharded


def shardings(shapes, backend: str, num_agents: int, *, stacked: bool = True):
  """The shardings :func:`place` would give a tree of these shapes (None: JAX's default)."""
  if resolve(backend, num_agents) != "shard":
    return None
  mesh = agents_mesh()
  split, replicated = (NamedSharding(mesh, PartitionSpec(AGENTS)),
                       NamedSharding(mesh, PartitionSpec()))

  def pick(x):
    is_stacked = stacked and len(getattr(x, "shape", ())) >= 1 and x.shape[0] == num_agents
    return split if is_stacked else replicated

  return jax.tree.map(pick, shapes)


def place(tree, backend: str, num_agents: int, *, stacked: bool = True):
  """Puts ``tree`` where the compiled step expects it, so the step compiles once.

  With the ``shard`` back-end, leaves whose leading axis is the agent axis K are split over the
  agents mesh (when ``stacked``) and every other leaf is replicated on it; other back-ends leave
  placement to JAX (the default device).
  """
  if resolve(backend, num_agents) != "shard":
    return tree
  mesh = agents_mesh()
  split, replicated = NamedSharding(mesh, PartitionSpec(AGENTS)), NamedSharding(mesh,
                                                                               PartitionSpec())

  def put(x):
    is_stacked = stacked and getattr(x, "ndim", 0) >= 1 and x.shape[0] == num_agents
    return jax.device_put(x, split if is_stacked else replicated)

  return jax.tree.map(put, tree)


def _merge(args, stacked, shared):
  it = iter(stacked)
  return tuple(a if i in shared else next(it) for i, a in enumerate(args))


def use_host_devices(n: int) -> None:
  """Splits the CPU into ``n`` virtual devices so ``shard`` can run agents in parallel on a host.

  Must run before JAX's first operation (binaries call it at start-up); no effect on the devices
  of a GPU or TPU platform.
  """
  if n < 1:
    raise ValueError(f"host device count {n} must be >= 1")
  try:
    jax.config.update("jax_num_cpu_devices", int(n))
  except RuntimeError as e:
    raise RuntimeError(f"use_host_devices({n}) came after JAX started; call it before any JAX "
                       "operation") from e
