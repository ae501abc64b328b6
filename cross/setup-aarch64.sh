#!/bin/sh
# Installs what edgec needs to build and run Raspberry Pi (aarch64) bundles on an x86-64 Debian/Ubuntu
# host, adds arm64 to apt's architectures (so that edgec can `apt-get download` the arm64 XNNPACK packages,
# which are never installed), then pre-fetches the aarch64 TVM runtime and the XNNPACK sysroot into edgec's cache.
#   sudo PYTHON=/path/to/venv/bin/python cross/setup-aarch64.sh
# PYTHON is the interpreter edgec is installed in (default: python3); the runtime it fetches matches that
# environment's apache-tvm / apache-tvm-ffi versions.
set -eu
PYTHON="${PYTHON:-python3}"
if [ "$(id -u)" != 0 ]; then
  echo "run it as root: sudo PYTHON=$PYTHON $0" >&2
  exit 2
fi

export DEBIAN_FRONTEND=noninteractive
# arm64 package lists: the XNNPACK offload backend's libraries for Raspberry Pi bundles (apt-get download only)
dpkg --add-architecture arm64
apt-get update -q
# libdnnl-dev: oneDNN, the offload backend of the host target (targets/host.toml [offload])
apt-get install -y -q g++-aarch64-linux-gnu qemu-user-static cmake g++ libdnnl-dev

# From the repository root, so `edgec` imports even when it is not pip-installed.
cd "$(dirname "$0")/.."
for what in fetch-runtime fetch-offload; do
  if [ -n "${SUDO_USER:-}" ]; then
    # Fill the cache of the user who will run edgec, not root's.
    sudo -u "$SUDO_USER" -H env ${EDGEC_CACHE_DIR:+"EDGEC_CACHE_DIR=$EDGEC_CACHE_DIR"} \
      "$PYTHON" -m edgec.toolchain "$what" aarch64
  else
    "$PYTHON" -m edgec.toolchain "$what" aarch64
  fi
done
