#!/usr/bin/env bash
# Prepare a Debian 12 machine for ctrd: system packages, a virtualenv in .venv with
# ctrd installed (editable), and generated protobuf code. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  runc                           # the OCI runtime the shims drive
  containerd                     # `ctr`, the reference daemon, containerd-shim-runc-v2
  busybox-static                 # the embedded default image and test images
  umoci skopeo                   # OCI image tooling used by some tests
  docker-registry                # a real registry on 127.0.0.1 for pull/push tests
  containernetworking-plugins    # CNI plugins for CRI networking
  golang-github-containerd-containerd-dev golang-github-containerd-ttrpc-dev
  golang-github-containerd-cgroups-dev   # upstream .proto files: wire-identity tests
  apache2-utils                  # htpasswd for registry auth tests
  iproute2 debootstrap python3-venv python3-dev gcc
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# CPython 3.12 when the machine has it: its immortal objects let a forked shim share
# far more memory with the zygote (shim/immortal.py). 3.11 works, with bigger shims.
pick_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  local candidate
  for candidate in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
    if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      echo "$candidate"; return
    fi
  done
  echo python3
}
PY=$(pick_python)
want=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ -x .venv/bin/python ] && [ "$(.venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')" != "$want" ]; then
  echo "setup: .venv is not Python $want; building it again"
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q -e '.[dev]'
# pip has just rewritten the shim's console script; make it the lean launcher again.
.venv/bin/python -m ctrd.shim.launcher >/dev/null
.venv/bin/python scripts/genproto.py >/dev/null
echo "setup: ready (.venv/bin/ctrd, .venv/bin/ctrctl, .venv/bin/containerd-shim-ctrd-v2)"
