r"""Device memory of a dataset set up for K agents as training sets it up, against K copies.

The training split goes on the device once, with each agent's padded index list; with the
``shard`` back-end each device holds only its agents' examples. This loads the dataset
(``--dataset``, by the library's loader), places it for ``--k`` agents as training does (back-end
``auto``) and reports the bytes by field, the most on one device, and what K copies of the split
would take. The record goes to ``<out>.jsonl`` and ``--out`` (JSON), the line to stdout:

  python -m benchmarks.data_memory --host_devices 8                   # MNIST, K = 64
  python -m benchmarks.data_memory --smoke --host_devices 2 --out /tmp/data_memory.json   # CI
"""

import sys

from absl import app, flags, logging

from benchmarks import common
from drt_jax import backends, inputs
from drt_jax import config as config_lib


def data_memory(name: str, k_count: int) -> dict:
  """Device bytes of a dataset set up for K agents as training does (back-end ``auto``): one copy
  plus indices on one device; with ``shard``, each device its agents' examples."""
  c = config_lib.resolve({"dataset": name, "num_agents": k_count, "batch_size": 1})
  d = inputs.load_data(c)
  backend = backends.resolve(c.backend, k_count)
  dev = inputs.device_data(d, inputs.prepare_data(c, d).parts, backend)
  parts = {field: inputs.device_bytes(getattr(dev, field)) for field in dev._fields}
  per_device = inputs.bytes_per_device(dev)
  split_bytes = d.train_images.nbytes + 4 * len(d.train_labels)  # the split once, labels int32
  return {"dataset": d.name, "K": k_count, "train_examples": len(d.train_labels),
          "backend": backend, "device_bytes": sum(parts.values()), "bytes_by_field": parts,
          "max_device_bytes": max(per_device.values()), "split_bytes": split_bytes,
          "k_copies_bytes": k_count * split_bytes,
          "devices": backends.mesh_size(k_count) if backend == "shard" else 1}


def data_memory_line(m: dict) -> str:
  """:func:`data_memory`'s record as one line."""
  mib = lambda n: f"{n / 2**20:,.1f} MiB"  # noqa: E731
  spread = (f", at most {mib(m['max_device_bytes'])} on one of {m['devices']} devices "
            f"(the split once: {mib(m['split_bytes'])})" if m["backend"] == "shard" else "")
  return (f"data on device, {m['dataset']} ({m['train_examples']:,} training examples), "
          f"K = {m['K']}: {mib(m['device_bytes'])} = images {mib(m['bytes_by_field']['images'])}"
          f" + labels {mib(m['bytes_by_field']['labels'])} + index lists "
          f"{mib(m['bytes_by_field']['idx'] + m['bytes_by_field']['counts'])}{spread}; K copies "
          f"would be {mib(m['k_copies_bytes'])}")


def define_flags() -> None:
  """The command line's flags (defined by the binary only, so importing this module is free)."""
  flags.DEFINE_string("dataset", "mnist", "Dataset by the library's name (config.dataset).")
  flags.DEFINE_integer("k", 64, "Agents K.")
  flags.DEFINE_string("out", "data_memory.json", "JSON result; the record also goes to "
                      "<out>.jsonl.")
  flags.DEFINE_bool("smoke", False, "For CI: the built-in synthetic dataset.")
  flags.DEFINE_integer("host_devices", 1, "If > 1, virtual CPU devices to create (for 'shard').")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  s = {"dataset": "synthetic" if f.smoke else f.dataset, "K": f.k}
  if s["K"] < 1:
    raise app.UsageError("--k must be >= 1")
  common.check_out(f.out)
  machine = common.start(f.host_devices)
  sink = common.Sink(f.out)
  sink.write({"machine": machine, "settings": s})
  memory = data_memory(s["dataset"], s["K"])
  sink.write({"data_memory": memory})
  table = data_memory_line(memory)
  print(table)
  common.write_result(f.out, {"machine": machine, "settings": s, "argv": sys.argv,
                              "data_memory": memory, "table": table})
  logging.info("wrote %s and %s", f.out, sink.path)


if __name__ == "__main__":
  define_flags()
  common.run(main)
