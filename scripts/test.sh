#!/usr/bin/env bash
# The test suite, with its own set-up. Extra arguments go to pytest, e.g. scripts/test.sh -k ddp.
# CI runs it as it is; `scripts/test.sh --full` adds the tests marked slow (second proofs of what the
# default run proves, and end-to-end runs of the benchmark tool: about 12 more minutes).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# dev tools plus the engines the tests exercise for real: DeepSpeed (an extra) and Horovod (built
# once by scripts/install_horovod.sh, then installed from its cached wheel).
source "$ROOT/scripts/setup_env.sh" dev,deepspeed
bash "$ROOT/scripts/install_horovod.sh"
cd "$ROOT"
# lint and types first (seconds): configured in pyproject.toml; see docs/architecture.md
ruff check .
mypy
exec python -m pytest "$@"
