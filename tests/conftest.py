"""Test set-up: 8 virtual CPU devices (for the shard back-end) and a persistent compile cache.

Both must be configured before JAX initialises its backends, hence here.
"""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402

from drt_jax import backends  # noqa: E402

backends.patient_cpu_collectives()  # two test workers share two cores with 8 devices each

_CACHE = os.environ.get("DRT_JAX_COMPILE_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "drt_jax", "jax"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
