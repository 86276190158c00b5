#!/usr/bin/env bash
# On a GPU machine: the GPU tests, every benchmark on CUDA (one JSON line each) and the smoke
# pipeline end to end on the GPU (in a temporary copy of the repository).
#   bash scripts/gpu_check.sh            # from the repository root, after `make setup`
set -euo pipefail
nvidia-smi --query-gpu=name,memory.total --format=csv
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
python -m pytest -q tests/test_distributed.py tests/test_bench.py
for b in loader trajectories distill-step sampling scaling; do
  python -m cmpipe.bench "$b" --device cuda --steps 5 || echo "{\"bench\": \"$b\", \"failed\": true}"
done
tmp=$(mktemp -d)
git ls-files -co --exclude-standard | grep -v '^reports/\|^dvc.lock' | while read -r f; do
  mkdir -p "$tmp/$(dirname "$f")"; cp "$f" "$tmp/$f"; done
cp params-smoke.yaml "$tmp/params.yaml"
( cd "$tmp" && git init -q && git add -A && git -c user.name=gpu -c user.email=gpu@check commit -qm smoke \
  && PYTHONPATH="$tmp/src" DVC_NO_ANALYTICS=1 dvc repro && cat reports/metrics.json )
rm -rf "$tmp"
