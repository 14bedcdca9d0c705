#!/usr/bin/env bash
# Fresh machine to running container: set up, start ctrd on its default paths, import
# the embedded busybox image (built from the host's busybox-static) and run it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

SOCK=/run/ctrd/ctrd.sock
started=""
if ! ctr --address "$SOCK" version >/dev/null 2>&1; then
  mkdir -p /var/log
  ctrd >>/var/log/ctrd.log 2>&1 &
  started=$!
  for _ in $(seq 100); do ctr --address "$SOCK" version >/dev/null 2>&1 && break; sleep 0.1; done
  echo "quickstart: ctrd started (pid $started, log /var/log/ctrd.log)"
fi
ctr --address "$SOCK" version

IMAGE=ctrd.local/busybox:latest
ARCHIVE=$(mktemp /tmp/ctrd-busybox-XXXX.tar)
trap 'rm -f "$ARCHIVE"' EXIT
.venv/bin/python -m ctrd.oci.busybox --archive "$ARCHIVE" --name "$IMAGE"
ctr --address "$SOCK" images import "$ARCHIVE"
ctr --address "$SOCK" run --rm "$IMAGE" quickstart-$$ sh -c 'echo "hello from a ctrd container: $(uname -sr), pid $$"'
echo "quickstart: done; ctrd keeps running${started:+ (pid $started)}; stop it with: kill ${started:-\$(pidof ctrd)}"
