#!/usr/bin/env bash
# The test suite, with its own set-up. Extra arguments go to pytest, e.g. scripts/test.sh -k ddp
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh" dev
cd "$ROOT"
exec python -m pytest "$@"
