#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install disttrain into it.
# Every install passes requirements/constraints.txt, which pins torch==2.13.0 (CPU build here):
# nothing may pull a multi-GB CUDA build or upgrade torch. Re-running is cheap: the install is
# skipped while setup.cfg and the constraints are unchanged.
# Usage: source scripts/setup_env.sh [extras]   (extras default: dev)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${1:-dev}"
VENV="${DISTTRAIN_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.disttrain-installed"
HASH="$(cat "$ROOT/setup.cfg" "$ROOT/requirements/constraints.txt" | sha256sum | cut -c1-16)"
WANT="$HASH-$EXTRAS"
installed_covers() {  # the stamp's hash matches and its extras include every requested one
  [ -f "$STAMP" ] || return 1
  local have; have="$(cat "$STAMP")"
  [ "${have%%-*}" = "$HASH" ] || return 1
  local extra
  for extra in ${EXTRAS//,/ }; do
    case ",${have#*-}," in *",$extra,"*) ;; *) return 1 ;; esac
  done
}
if ! installed_covers; then
  echo "[setup] installing disttrain[$EXTRAS] with torch pinned by requirements/constraints.txt" >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$ROOT/requirements/constraints.txt" \
    -e "$ROOT[$EXTRAS]" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" >&2 || true
  "$VENV/bin/python" - <<'PY'
import sys, torch
if not torch.__version__.startswith("2.13.0"):
    sys.exit(f"[setup] torch {torch.__version__} installed, expected 2.13.0: check requirements/constraints.txt")
PY
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
