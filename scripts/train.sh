#!/usr/bin/env bash
# The main job: a real 2-process DDP run (torchrun, gloo on CPU / NCCL on GPUs) training a
# classifier on scikit-learn's digits. Extra arguments are Hydra overrides, e.g.
#   bash scripts/train.sh strategy=ddp trainer.max_epochs=20
# Set NPROC to change the number of processes (default 2).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh" dev
cd "$ROOT"
# torchrun --standalone --nproc-per-node=$NPROC -m disttrain ..., built by disttrain/launch.py (as launchers/ are)
exec python -m disttrain.launch --nproc "${NPROC:-2}" experiment=digits_ddp "$@"
