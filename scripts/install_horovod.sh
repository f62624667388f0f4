#!/usr/bin/env bash
# Build and install Horovod (PyTorch + Gloo, no MPI/TensorFlow/MXNet) into the project's venv.
#
# Horovod 0.28.1 (its last release) does not build against torch >= 2.1 as published: its CMake
# files force C++14 while torch's headers need C++17. This script downloads the sdist from the
# package registry, changes that one setting to C++17, builds a wheel against the venv's torch
# and installs it. The built wheel is cached (keyed by Horovod, torch and Python versions) so
# later runs on the same machine install in seconds instead of building (~3 min on 2 cores).
#
# Usage: bash scripts/install_horovod.sh            (uses .venv, or $DISTTRAIN_VENV)
# Env:   DISTTRAIN_WHEEL_CACHE  wheel cache directory (default ~/.cache/disttrain/wheels)
#        HOROVOD_BUILD_JOBS     parallel compile jobs (default: number of cores)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DISTTRAIN_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
HVD_VERSION="0.28.1"
CONSTRAINTS="$ROOT/requirements/constraints.txt"
CACHE="${DISTTRAIN_WHEEL_CACHE:-$HOME/.cache/disttrain/wheels}"
PIP=("$PY" -m pip --disable-pip-version-check)

if [ ! -x "$PY" ]; then
  echo "[horovod] no virtual environment at $VENV: run 'source scripts/setup_env.sh' first" >&2
  exit 1
fi

if "$PY" - "$HVD_VERSION" <<'PY' 2>/dev/null; then
import sys
import horovod, horovod.torch  # noqa: F401  (import fails if the torch extension is missing/broken)
sys.exit(0 if horovod.__version__ == sys.argv[1] else 1)
PY
  echo "[horovod] horovod $HVD_VERSION already installed in $VENV" >&2
  exit 0
fi

KEY="$("$PY" -c 'import sys, torch; print(f"torch{torch.__version__}-cp{sys.version_info[0]}{sys.version_info[1]}")')"
WHEEL_DIR="$CACHE/horovod-$HVD_VERSION-$KEY"
WHEEL="$(ls "$WHEEL_DIR"/horovod-"$HVD_VERSION"-*.whl 2>/dev/null | head -n1 || true)"

if [ -z "$WHEEL" ]; then
  for tool in cmake g++ make; do
    command -v "$tool" >/dev/null || { echo "[horovod] building Horovod needs '$tool' on PATH" >&2; exit 1; }
  done
  WORK="$(mktemp -d)"
  trap 'rm -rf "$WORK"' EXIT
  echo "[horovod] downloading the horovod==$HVD_VERSION sdist" >&2
  "${PIP[@]}" download -q --no-binary :all: --no-deps -d "$WORK" "horovod==$HVD_VERSION"
  tar -xzf "$WORK"/horovod-"$HVD_VERSION".tar.gz -C "$WORK"
  SRC="$WORK/horovod-$HVD_VERSION"
  # The one fix: C++17 instead of C++14 (torch's headers need it; CXXFLAGS cannot override it
  # because Horovod's CMakeLists.txt strips any -std= from them).
  for f in "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"; do
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$f"
    grep -q 'set(CMAKE_CXX_STANDARD 17)' "$f" || { echo "[horovod] could not set C++17 in $f" >&2; exit 1; }
  done
  # Build tools the non-isolated build needs (the build must see the venv's torch).
  "${PIP[@]}" install -q -c "$CONSTRAINTS" setuptools wheel
  echo "[horovod] building horovod $HVD_VERSION against $KEY (a few minutes; cached afterwards)" >&2
  start=$SECONDS
  HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
  HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=gloo \
  MAKEFLAGS="-j${HOROVOD_BUILD_JOBS:-$(nproc)}" \
    "${PIP[@]}" wheel -q --no-build-isolation --no-deps -w "$WORK/dist" "$SRC"
  echo "[horovod] built in $((SECONDS - start)) s" >&2
  mkdir -p "$WHEEL_DIR"
  cp "$WORK"/dist/horovod-"$HVD_VERSION"-*.whl "$WHEEL_DIR"/
  WHEEL="$(ls "$WHEEL_DIR"/horovod-"$HVD_VERSION"-*.whl | head -n1)"
else
  echo "[horovod] using the cached wheel $WHEEL" >&2
fi

"${PIP[@]}" install -q -c "$CONSTRAINTS" "$WHEEL"
"$PY" - <<'PY'
import sys, torch
import horovod.torch as hvd  # noqa: F401
if not torch.__version__.startswith("2.13.0"):
    sys.exit(f"[horovod] torch {torch.__version__} installed, expected 2.13.0: check requirements/constraints.txt")
print(f"[horovod] horovod {__import__('horovod').__version__} installed (torch {torch.__version__})", file=sys.stderr)
PY
