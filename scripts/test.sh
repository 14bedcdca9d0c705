#!/usr/bin/env bash
# The project's test command: set up the machine, check generated code, run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# setup.sh regenerated ctrd/api from proto/; the committed tree must not have changed.
if git rev-parse --git-dir >/dev/null 2>&1 && [ -n "$(git status --porcelain -- ctrd/api)" ]; then
  git status --porcelain -- ctrd/api | head -20
  echo "test: ctrd/api differs from a fresh generation: run scripts/genproto.py and commit" >&2
  exit 1
fi
exec .venv/bin/python -m pytest -q -ra "$@"
