#!/usr/bin/env bash
# One short check of hpctrain on a CUDA node (a few minutes): the CUDA training path
# in float32 and float64, throughput at a few batch sizes, the same data on the
# node's CPU cores for comparison, and the exported model evaluated on the GPU
# against the CPU (fresh processes, metatomic's ASE calculator).
#
#   bash benchmarks/gpu.sh results/            # JSON files land in results/
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu.sh /tmp/smoke   # tiny CPU smoke run
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${1:-gpu-results}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -n "${QUICK:-}" ]; then N=40; EPOCHS=2; WIDTH=16; else N=400; EPOCHS=4; WIDTH=64; fi

$PY - <<'PY' | tee "$OUT/machine.txt"
import torch, metatomic.torch, vesin, hpctrain
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "count", torch.cuda.device_count())
print("metatomic-torch", metatomic.torch.__version__, "vesin", vesin.__version__, "hpctrain", hpctrain.__version__)
PY

data=$(mktemp -d)
$PY benchmarks/make_emt_dataset.py -n "$N" --atoms 32 -o "$data/emt.xyz"
$PY benchmarks/train_speed.py --data examples/rmd17_ethanol_100.xyz --device "$DEVICE" \
  --precision 32 64 --batch-size 8 32 --epochs "$EPOCHS" --d-model "$WIDTH" \
  --out "$OUT/ethanol-$DEVICE.json"
$PY benchmarks/train_speed.py --data "$data/emt.xyz" --device "$DEVICE" \
  --precision 32 --batch-size 16 64 --epochs "$EPOCHS" --d-model "$WIDTH" --check-export \
  --out "$OUT/emt-$DEVICE.json"
if [ "$DEVICE" != cpu ]; then
  $PY benchmarks/train_speed.py --data "$data/emt.xyz" --device cpu \
    --precision 32 --batch-size 16 --epochs 2 --d-model "$WIDTH" --out "$OUT/emt-cpu.json"
fi
rm -rf "$data"
echo "results in $OUT"
