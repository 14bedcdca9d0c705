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

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q -e '.[dev]'
# pip has just rewritten the shim's console script; make it the lean launcher again.
.venv/bin/python -m ctrd.shim.launcher >/dev/null
.venv/bin/python scripts/genproto.py >/dev/null
echo "setup: ready (.venv/bin/ctrd, .venv/bin/ctrctl, .venv/bin/containerd-shim-ctrd-v2)"
