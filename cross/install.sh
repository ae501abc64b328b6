#!/bin/sh
# Installs edgec on a fresh Debian/Ubuntu x86-64 machine: a virtual environment in .venv with edgec, its
# reference runtimes, IREE and test tools, plus the system packages (compilers, qemu, oneDNN for host offload)
# and the aarch64 TVM runtime that cross builds and qemu runs need. Run it as a normal user (it uses sudo for
# apt) or as root.
#   PYTHON=python3.11 sh cross/install.sh
set -eu
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Debian's python3 needs python3-venv before it can make a virtual environment with pip in it.
if ! "$PYTHON" -c "import ensurepip" 2>/dev/null; then
  as_root sh -c 'apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv'
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# bench: IREE, the second peer of `edgec bench` and bench/ (PyPI has wheels for CPython 3.11 on x86-64 Linux).
.venv/bin/python -m pip install -q -e ".[test,bench]"
as_root env PYTHON="$PWD/.venv/bin/python" sh cross/setup-aarch64.sh
echo "edgec is installed in $PWD/.venv: run '. .venv/bin/activate' and then 'edgec --help'"
