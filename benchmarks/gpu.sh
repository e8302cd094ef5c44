#!/usr/bin/env bash
# One short check of hpctrain on a CUDA node (about 5 minutes before the GPU-target
# checks were added; not yet timed with them, estimated 7-9):
#  1. NCCL: training steps with as many ranks as the node has GPUs (torchrun), against
#     one rank, for both reference architectures (benchmarks/scaling.py, weak scaling),
#     EMT structures of 32 atoms at batches 16 and 64 (soap_bpnn: 64), and ethanol at
#     batch 64: throughput, efficiency and the step breakdown;
#  2. the same node's CPU cores on the same EMT steps (one rank per core, global
#     batch 64): the GPU's speed-up is measured against them;
#  3. where a step's time goes on the GPU (benchmarks/step_profile.py: kernels per
#     step, device busy time, the host gaps between kernels) and the loader's own rate
#     by loader threads (benchmarks/loader.py);
#  4. bf16 mixed precision (architecture.training.mixed_precision): the same steps with
#     autocast, and a full run of benchmarks/gpu_amp_check.yaml on all GPUs (gradient
#     accumulation, clipping, EMA, checkpoints, export);
#  5. the exported model evaluated on the GPU against the CPU (benchmarks/train_speed.py).
# Everything lands as JSON in the output directory; gpu.json sums it up, and the exit
# status is non-zero if any check failed.
#
#   bash benchmarks/gpu.sh results/                          # on a GPU node
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu.sh /tmp/smoke     # tiny CPU smoke run (2 ranks)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${1:-gpu-results}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1
CORES=$($PY -c "import os; print(len(os.sched_getaffinity(0)))")
if [ "$DEVICE" = cuda ]; then
  RANKS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
  if [ "$RANKS" -lt 1 ]; then
    echo "gpu.sh: nvidia-smi lists no GPU; for a CPU smoke run: DEVICE=cpu QUICK=1" >&2
    exit 2
  fi
else
  RANKS=2
fi
THREADS=$(( CORES / RANKS > 0 ? CORES / RANKS : 1 ))
if [ -n "${QUICK:-}" ]; then  # tiny models, all ranks only, no export check
  N=24; ATOMS=8; STEPS=3; WARMUP=1; MP_BATCH=2; SOAP_BATCH=2; EPOCHS=1
  QUICKFLAG=--quick; RANK_LIST=$RANKS; THREADS=1
else
  N=1024; ATOMS=32; STEPS=10; WARMUP=3; MP_BATCH="16 64"; SOAP_BATCH=64; EPOCHS=2
  QUICKFLAG=; RANK_LIST="1 $RANKS"
fi
FAILED=()
check() {  # check NAME COMMAND...: run it, log its output, remember a failure
  local name=$1; shift
  echo "== $name: $*"
  local start=$SECONDS
  if "$@" > "$OUT/$name.log" 2>&1; then
    echo "   ok ($((SECONDS - start)) s)"
  else
    echo "   FAILED ($((SECONDS - start)) s), last lines of $OUT/$name.log:"
    tail -n 20 "$OUT/$name.log" | sed 's/^/   | /'
    FAILED+=("$name")
  fi
}

$PY - > "$OUT/machine.json" <<'PY'
import json, os, platform, socket, time
import torch, metatomic.torch, vesin, hpctrain
print(json.dumps({
    "hostname": socket.gethostname(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
    "torch": torch.__version__, "cuda": torch.version.cuda,
    "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
    "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    "metatomic-torch": metatomic.torch.__version__, "vesin": vesin.__version__,
    "hpctrain": hpctrain.__version__, "load_average": os.getloadavg(),
}, indent=1))
PY
cat "$OUT/machine.json"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
$PY benchmarks/make_emt_dataset.py -n "$N" --atoms "$ATOMS" -o "$work/emt.xyz" || exit 1
# training reads shards with their neighbour pairs (5 A, both architectures' cutoff), so
# that loader threads do not search them for every batch
$PY -m hpctrain convert "$work/emt.xyz" -o "$work/emt" --neighbors 5.0 > /dev/null || exit 1
$PY -m hpctrain convert examples/rmd17_ethanol_100.xyz -o "$work/ethanol" --neighbors 5.0 \
  > /dev/null || exit 1

scaling() {  # scaling NAME ARCHITECTURE BATCH [more scaling.py options]
  local name=$1 arch=$2 batch=$3; shift 3
  check "$name" $PY benchmarks/scaling.py --launcher torchrun --device "$DEVICE" \
    --ranks $RANK_LIST --mode weak --threads-per-rank "$THREADS" --architectures $arch \
    --data "$work/emt" --batch-size "$batch" --steps "$STEPS" --warmup "$WARMUP" \
    --timeout 150 $QUICKFLAG --out "$OUT/$name.json" "$@"
}
if [ -n "${QUICK:-}" ]; then
  scaling scaling-quick "mp_transformer soap_bpnn" 2
else
  for b in $MP_BATCH; do scaling "scaling-mp_transformer-b$b" mp_transformer "$b"; done
  for b in $SOAP_BATCH; do scaling "scaling-soap_bpnn-b$b" soap_bpnn "$b"; done
  RANK_LIST=1 scaling scaling-ethanol-mp_transformer-b64 mp_transformer 64 \
    --data "$work/ethanol" --no-stress
fi

if [ "$DEVICE" = cuda ] && [ -z "${QUICK:-}" ]; then
  check cpu-mp_transformer-b64 $PY benchmarks/scaling.py --launcher torchrun --device cpu \
    --ranks "$CORES" --mode weak --threads-per-rank 1 --architectures mp_transformer \
    --data "$work/emt" --batch-size $(( 64 / CORES > 0 ? 64 / CORES : 1 )) \
    --steps "$STEPS" --warmup "$WARMUP" --timeout 300 --out "$OUT/cpu-mp_transformer-b64.json"
  check profile-emt-b64 $PY benchmarks/step_profile.py --device cuda --data "$work/emt.xyz" \
    --stress --batch-size 64 --out "$OUT/profile-emt-b64.json" --trace "$OUT/trace-emt-b64.json"
  check profile-ethanol-b64 $PY benchmarks/step_profile.py --device cuda --batch-size 64 \
    --out "$OUT/profile-ethanol-b64.json"
  check loader $PY benchmarks/loader.py --workers 0 1 2 4 8 --out "$OUT/loader.json"
fi

if [ "$DEVICE" = cuda ]; then
  b=${MP_BATCH##* }  # the largest batch, all ranks: against the float32 rows above
  RANK_LIST=$RANKS scaling "bf16-mp_transformer-b$b" mp_transformer "$b" --mixed-precision
  b=${SOAP_BATCH##* }
  RANK_LIST=$RANKS scaling "bf16-soap_bpnn-b$b" soap_bpnn "$b" --mixed-precision
  cp benchmarks/gpu_amp_check.yaml "$work/amp.yaml"
else  # autocast is CUDA-only: the same run in float32 on the CPU ranks
  sed -e 's/^device: cuda/device: cpu/' -e 's/mixed_precision: true/mixed_precision: false/' \
    -e 's/num_epochs: 6/num_epochs: 1/' benchmarks/gpu_amp_check.yaml > "$work/amp.yaml"
fi
sed -i "s#\.\./examples/#$PWD/examples/#" "$work/amp.yaml"
check amp-run $PY -m torch.distributed.run --standalone --nproc_per_node="$RANKS" \
  -m hpctrain "$work/amp.yaml" -o "$OUT/amp-run"

if [ -z "${QUICK:-}" ]; then
  check export $PY benchmarks/train_speed.py --data "$work/emt.xyz" --device "$DEVICE" \
    --precision 32 --batch-size 16 --epochs "$EPOCHS" --d-model 16 --check-export \
    --out "$OUT/export-$DEVICE.json"
fi

FAILED_LIST="${FAILED[*]:-}" RANKS=$RANKS DEVICE=$DEVICE $PY - "$OUT" <<'PY'
import json, os, sys
from pathlib import Path

out = Path(sys.argv[1])
failed = os.environ["FAILED_LIST"].split()
summary = {
    "machine": json.loads((out / "machine.json").read_text()),
    "device": os.environ["DEVICE"],
    "ranks": int(os.environ["RANKS"]),
    "failed": failed,
    "scaling": [],
}
for path in sorted(out.glob("*.json")):
    if path.name.startswith(("scaling-", "bf16-", "cpu-")):
        data = json.loads(path.read_text())
        for r in data["results"]:
            summary["scaling"].append({
                "check": path.stem, "architecture": r["architecture"], "ranks": r["ranks"],
                "global_batch": r["global_batch"], "mixed_precision": path.stem.startswith("bf16"),
                "backend": next(x["backend"] for x in data["runs"] if x["name"] == r["run"]),
                "step_s": r["step_s"], "structures_per_s": r["structures_per_s"],
                "atoms_per_s": r["atoms_per_s"], "efficiency": r["efficiency"],
                "breakdown_fraction": r["breakdown_fraction"],
            })
run = out / "amp-run"
summary["amp_run"] = {
    "ok": "amp-run" not in failed,
    "model_pt": (run / "model.pt").exists(),
    "test_metrics": json.loads((run / "test_metrics.json").read_text())
    if (run / "test_metrics.json").exists() else None,
}
for path in out.glob("export-*.json"):
    summary["export"] = json.loads(path.read_text())
for path in out.glob("profile-*.json"):
    profile = json.loads(path.read_text())
    summary.setdefault("profiles", {})[path.stem] = {
        k: profile.get(k) for k in ("step_s", "structures_per_s", "device")
    }
if (out / "loader.json").exists():
    summary["loader"] = json.loads((out / "loader.json").read_text())["verdicts"]
(out / "gpu.json").write_text(json.dumps(summary, indent=1) + "\n")
print(f"{'check':<30}{'ranks':>6}{'batch':>6}{'step ms':>9}{'struct/s':>10}{'eff':>6}")
for r in summary["scaling"]:
    print(f"{r['check']:<30}{r['ranks']:>6}{r['global_batch']:>6}{1000 * r['step_s']:>9.1f}"
          f"{r['structures_per_s']:>10.1f}{r['efficiency']:>6.2f}")
PY
echo "results in $OUT (summary: $OUT/gpu.json)"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "gpu.sh: failed: ${FAILED[*]}" >&2
  exit 1
fi
