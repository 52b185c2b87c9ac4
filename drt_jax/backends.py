"""How the per-agent computation runs over the stacked agent axis.

A per-agent function ``fn(*args)`` (one agent's arrays) becomes a function of stacked arrays (every
leaf with leading axis K) through one of these back-ends:

=========== =================================================================================
``vmap``    ``jax.vmap``: one batched program. Convolutions over stacked kernels lower to grouped
            convolutions, which are slow on some platforms (see ``docs/performance.md``).
``chunked`` groups of ``chunk_size`` agents vmapped, the groups run one after another
            (``lax.map``): bounds peak memory at large K.
``map``     ``lax.map`` over agents: one agent at a time inside one compiled program.
``shard``   ``jax.shard_map`` over a 1-D mesh of devices on axis ``agents``; each device vmaps its
            K / m agents. In one process the mesh is the first m devices, m the largest device
            count that divides K (8 devices: K = 12 runs on 6, K = 4 on 4); over several
            processes it is every device, and K must be a multiple of their count.
``auto``    ``shard`` when at least two devices can split K evenly, else ``vmap``.
=========== =================================================================================

A run over several processes (:mod:`drt_jax.distributed`) needs ``shard``: the other back-ends
compute every agent on one device. Arrays enter the mesh as global arrays (:func:`place`,
:func:`from_agent_rows`) and leave it through :func:`to_host`, which also works for arrays whose
shards live partly in other processes.
"""

import os
import platform
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BACKENDS = ("auto", "vmap", "chunked", "map", "shard")
AGENTS = "agents"


def check_chunks(backend: str, num_agents: int, chunk_size: int | None = None) -> None:
  """Raises ValueError for an unknown back-end or a chunk size that does not divide K (what can
  be checked without looking at the devices)."""
  if backend not in BACKENDS:
    raise ValueError(f"unknown backend {backend!r}; expected one of: {', '.join(BACKENDS)}")
  if backend == "chunked":
    if not chunk_size or chunk_size < 1 or num_agents % chunk_size:
      raise ValueError(f"backend 'chunked' needs a chunk_size >= 1 dividing K={num_agents}; "
                       f"got {chunk_size}")


def check(backend: str, num_agents: int, chunk_size: int | None = None) -> None:
  """Raises ValueError for an unknown back-end or a shape it cannot run."""
  check_chunks(backend, num_agents, chunk_size)
  n, processes = jax.device_count(), jax.process_count()
  where = f"{n} devices of {processes} processes"
  if processes > 1 and num_agents % n:
    # Refused rather than padded: padding agents would change the graph and the results.
    up = -(-num_agents // n) * n
    near = f"num_agents={up}" + (f" or {up - n}" if up > n else "")
    raise ValueError(f"K={num_agents} agents cannot be split evenly over {where}; use a "
                     f"multiple of {n} ({near})")
  if processes > 1 and resolve(backend, num_agents) != "shard":
    raise ValueError(f"backend {backend!r} computes every agent on one device but this run spans "
                     f"{where}; use backend 'shard' (or 'auto')")


def resolve(backend: str, num_agents: int) -> str:
  """The concrete back-end ``auto`` stands for on this machine (or these processes)."""
  if backend != "auto":
    return backend
  return "shard" if mesh_size(num_agents) > 1 else "vmap"


def mesh_size(num_agents: int) -> int:
  """How many devices the ``shard`` back-end spreads ``num_agents`` agents over.

  Over several processes every device (each process must hold agents; :func:`check` refuses a K
  they do not divide). In one process the largest device count that divides K, so that every
  device computes the same number of agents: with 8 devices, K = 16 uses 8, K = 12 uses 6, K = 4
  uses 4 and K = 11 one.
  """
  n = jax.device_count()
  if jax.process_count() > 1 or num_agents < 1:
    return n
  return max(m for m in range(1, min(n, num_agents) + 1) if num_agents % m == 0)


def vmapped_agents(backend: str, num_agents: int, chunk_size: int | None = None) -> int:
  """How many agents one device computes side by side (vmapped) under ``backend``: the group
  count a vmapped convolution gets (1: a plain convolution)."""
  backend = resolve(backend, num_agents)
  if backend == "shard":
    return num_agents // mesh_size(num_agents)
  if backend == "chunked":
    return chunk_size or 1
  return 1 if backend == "map" else num_agents


# The fewest agents per device from which ``conv='auto'`` takes one matmul per kernel tap over
# XLA's (grouped) convolution, in float32, by platform (measured: docs/performance.md).
TAPS_FROM_AGENTS = {"cpu": 2, "gpu": 4}


def best_conv(conv: str = "auto", precision: str = "float32", agents: int = 64) -> str:
  """The convolution formulation (``models.CONVS``) ``auto`` stands for on this platform, with
  ``agents`` agents vmapped on each device (:func:`vmapped_agents`).

  Measured (docs/performance.md), float32: on an H200 (ResNet-20, 64 agents vmapped) one matmul
  per kernel tap ran 1.43x faster than XLA's grouped convolution; on a 2-core CPU, with 4 to 64
  agents per device, 1.2-2.6x faster (small CNN and ResNet-20), while with one agent per device,
  where nothing is grouped, XLA's convolution ran 2.6x faster than the taps. With two agents per
  device on the CPU the taps ran 1.42x (ResNet-20) and 1.04x (small CNN) faster with host
  memory in huge pages (the Makefile's default); with 4 KiB pages XLA's convolution won for
  ResNet-20 by 1.11x. From 2 to 3 agents per device nothing is measured on a GPU, and in
  bfloat16 the grouped convolution was 1.47x faster than the taps on the H200. On a TPU nothing
  is measured: ``'xla'``.
  """
  if conv != "auto":
    return conv
  from_agents = TAPS_FROM_AGENTS.get(jax.default_backend())
  taps = from_agents is not None and agents >= from_agents and precision == "float32"
  return "taps" if taps else "xla"


def agents_mesh(num_agents: int | None = None) -> Mesh:
  """The 1-D mesh, axis ``agents``, that ``shard`` spreads ``num_agents`` agents over: the first
  :func:`mesh_size` devices (every process's); all devices when ``num_agents`` is None."""
  devices = jax.devices()
  if num_agents is not None:
    devices = devices[:mesh_size(num_agents)]
  return Mesh(np.array(devices), (AGENTS,))


def per_agent(fn: Callable, backend: str, num_agents: int, chunk_size: int | None = None,
              shared: tuple[int, ...] = (), blocks: tuple[int, ...] = ()) -> Callable:
  """Lifts ``fn`` (one agent's arrays -> pytree) to stacked arrays with the chosen back-end.

  Positional arguments listed in ``shared`` are the same for every agent (no agent axis), e.g.
  an evaluation batch. Those listed in ``blocks`` hold one block per device stacked along their
  first axis (:func:`device_blocks`): with ``shard`` each agent sees its own device's block
  whole, with the other back-ends (one block) they act as ``shared``.
  """
  check(backend, num_agents, chunk_size)
  backend = resolve(backend, num_agents)
  shared = tuple(shared) + tuple(blocks)

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
  mesh = agents_mesh(num_agents)

  def sharded(*args):
    specs = tuple(PartitionSpec() if i in shared and i not in blocks else PartitionSpec(AGENTS)
                  for i in range(len(args)))
    return jax.shard_map(jax.vmap(fn, in_axes=in_axes(len(args))), mesh=mesh, in_specs=specs,
                         out_specs=PartitionSpec(AGENTS))(*args)

  return sharded


def shardings(shapes, backend: str, num_agents: int, *, stacked: bool = True):
  """The shardings :func:`place` would give a tree of these shapes (None: JAX's default)."""
  if resolve(backend, num_agents) != "shard":
    return None
  along, whole = split(backend, num_agents), replicated(backend, num_agents)

  def pick(x):
    is_stacked = stacked and len(getattr(x, "shape", ())) >= 1 and x.shape[0] == num_agents
    return along if is_stacked else whole

  return jax.tree.map(pick, shapes)


def place(tree, backend: str, num_agents: int, *, stacked: bool = True):
  """Puts ``tree`` where the compiled step expects it, so the step compiles once.

  With the ``shard`` back-end, leaves whose leading axis is the agent axis K are split over the
  agents mesh (when ``stacked``) and every other leaf is replicated on it; other back-ends put
  host (numpy) arrays on JAX's default device and leave the rest as they are. Over several
  processes every process must pass the same values (host arrays, or arrays already on the
  mesh): each keeps only its devices' shards.
  """
  targets = shardings(tree, backend, num_agents, stacked=stacked)
  if targets is None:
    return jax.tree.map(lambda x: jax.numpy.asarray(x) if isinstance(x, np.ndarray) else x, tree)
  return jax.tree.map(_put, tree, targets)


def _put(x, sharding):
  if isinstance(x, jax.Array) and x.sharding == sharding:
    return x
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  # Across processes device_put takes host values only: each process keeps its own shards.
  if _is_key(x):
    return jax.random.wrap_key_data(_put(jax.random.key_data(x), sharding),
                                    impl=jax.random.key_impl(x))
  return jax.device_put(np.asarray(x), sharding)


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def from_agent_rows(rows: Callable[[int, int], np.ndarray], shape: tuple[int, ...], backend: str,
                    num_agents: int) -> jax.Array:
  """A stacked array ``[K, ...]`` of which each process builds only its own agents' rows.

  ``rows(start, stop)`` returns the host rows of agents ``start..stop-1``. With the ``shard``
  back-end it is called once per local device, for that device's agents; otherwise once for all.
  """
  sharding = split(backend, num_agents)
  if sharding is None:
    return jax.numpy.asarray(rows(0, num_agents))

  def block(index):
    start, stop, _ = index[0].indices(num_agents)
    return rows(start, stop)[(slice(None),) + tuple(index[1:])]

  return jax.make_array_from_callback(tuple(shape), sharding, block)


def agent_blocks(backend: str, num_agents: int) -> list[tuple[int, int]]:
  """``(start, stop)`` of the agents each device computes, in mesh order; ``[(0, K)]`` (one
  block) without the ``shard`` back-end."""
  if resolve(backend, num_agents) != "shard":
    return [(0, num_agents)]
  m = mesh_size(num_agents)
  per = num_agents // m
  return [(j * per, (j + 1) * per) for j in range(m)]


def device_blocks(block: Callable[[int], np.ndarray], shape: tuple[int, ...], backend: str,
                  num_agents: int) -> jax.Array:
  """One block of ``shape`` per entry of :func:`agent_blocks`, stacked along the first axis.

  ``block(j)`` returns the host block of the j-th device. With the ``shard`` back-end the result
  is split over the agents mesh, each device holding its own block, and each process calls
  ``block`` for its own devices only; otherwise it is ``block(0)`` on the default device.
  """
  sharding = split(backend, num_agents)
  if sharding is None:
    return jax.numpy.asarray(block(0))
  rows, m = shape[0], mesh_size(num_agents)

  def local(index):
    start, _, _ = index[0].indices(m * rows)
    return block(start // rows)[(slice(None),) + tuple(index[1:])]

  return jax.make_array_from_callback((m * rows, *shape[1:]), sharding, local)


def split(backend: str, num_agents: int) -> NamedSharding | None:
  """The sharding of stacked values, split over the agents (None: JAX's default placement)."""
  if resolve(backend, num_agents) != "shard":
    return None
  return NamedSharding(agents_mesh(num_agents), PartitionSpec(AGENTS))


def replicated(backend: str, num_agents: int) -> NamedSharding | None:
  """The sharding of values every device holds whole (None: JAX's default placement)."""
  if resolve(backend, num_agents) != "shard":
    return None
  return NamedSharding(agents_mesh(num_agents), PartitionSpec())


def local_agents(x: jax.Array) -> list[int]:
  """The agents (rows of the stacked array ``x``) whose data this process holds."""
  k_count = x.shape[0]
  return sorted({k for shard in x.addressable_shards
                 for k in range(*shard.index[0].indices(k_count))})


def to_host(tree):
  """``tree`` as numpy arrays, also when shards of a leaf live in other processes.

  Every process must call it (it gathers across processes when a leaf is split over them).
  """

  def get(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
      return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(get, tree)


def _merge(args, stacked, shared):
  it = iter(stacked)
  return tuple(a if i in shared else next(it) for i, a in enumerate(args))


# XLA:CPU aborts the whole process when the threads of one collective do not all arrive within
# 40 s, which can happen on a busy machine with more virtual devices than cores; 10 minutes
# still ends a collective that is really stuck.
_CPU_COLLECTIVE_TIMEOUTS = {"xla_cpu_collective_call_terminate_timeout_seconds": 600,
                            "xla_cpu_collective_call_warn_stuck_timeout_seconds": 300}


def patient_cpu_collectives() -> None:
  """Raises XLA:CPU's collective time-outs in ``XLA_FLAGS`` (unless set); before JAX starts."""
  flags_now = os.environ.get("XLA_FLAGS", "")
  extra = [f"--{k}={v}" for k, v in _CPU_COLLECTIVE_TIMEOUTS.items() if k not in flags_now]
  os.environ["XLA_FLAGS"] = " ".join([flags_now.strip()] + extra).strip()


def use_host_devices(n: int) -> None:
  """Splits the CPU into ``n`` virtual devices so ``shard`` can run agents in parallel on a host.

  Must run before JAX's first operation (binaries call it at start-up); no effect on the devices
  of a GPU or TPU platform.
  """
  if n < 1:
    raise ValueError(f"host device count {n} must be >= 1")
  patient_cpu_collectives()
  try:
    jax.config.update("jax_num_cpu_devices", int(n))
  except RuntimeError as e:
    raise RuntimeError(f"use_host_devices({n}) came after JAX started; call it before any JAX "
                       "operation") from e


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def host_memory_hint(thp_enabled: str = _THP_ENABLED) -> str | None:
  """One line of advice when XLA:CPU's large buffers could live in huge pages but do not.

  glibc hands XLA:CPU's large buffers out in 4 KiB pages, and on CPU a pass over the stacked
  agents' parameters then spends most of its time mapping pages: on a 2-core VM, ``x * 2`` on
  1,024 x 50,000 floats took 64-84 ms, 19-22 ms with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``
  (``docs/performance.md``, "Host memory in huge pages"). glibc reads that variable at start-up, so
  no library can set it for itself; the Makefile exports it. None where it is set or cannot help:
  not XLA:CPU, not glibc >= 2.35, or transparent huge pages off (``thp_enabled``).
  """
  if jax.default_backend() != "cpu" or HUGE_PAGES_TUNABLE in os.environ.get("GLIBC_TUNABLES", ""):
    return None
  libc, version = platform.libc_ver()
  try:
    if libc != "glibc" or tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
      return None
    with open(thp_enabled) as f:
      if "[never]" in f.read():
        return None
  except (OSError, ValueError):
    return None
  return (f"XLA:CPU buffers are in 4 KiB pages; start the process with "
          f"GLIBC_TUNABLES={HUGE_PAGES_TUNABLE} for up to 3x faster passes over the agents' "
          "parameters (as `make` does)")
