#!/usr/bin/env bash
# The GPU path in one prepared script (issue 10, case 5), about 5 minutes on one GPU, under 8:
#   1. the CUDA-marked tests (pytest -m cuda);
#   2. a pipeline run with GPU actors (compute.device=cuda: num_gpus=1 per actor) on torchvision resnet50
#      (random init, no download) at 224² over 256 synthetic images (written here, an imagefolder);
#   3. the engine on CUDA: maps/s against the autograd bound (benchmarks/gpu_throughput.py, target >= 70%)
#      and benchmarks/explain_speed.py --device cuda.
#
#   benchmarks/gpu_check.sh                 # on a machine with a CUDA GPU
#   benchmarks/gpu_check.sh --cpu-dry-run   # the same steps on the CPU at toy sizes (proves it runs, not CUDA)
#   benchmarks/gpu_check.sh --cpu-dry-run --skip-tests   # without step 1 (the suite's smoke test)
#
# Python: $PYTHON, else .venv/bin/python, else python3 (torch, the project and its test extras installed;
# nothing is downloaded). Each step has its own time limit; the script goes on after a failed step and
# exits non-zero if any failed, printing a line per step at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
DRY=0 TESTS=1
for argument in "$@"; do
  case "$argument" in
    --cpu-dry-run) DRY=1 ;;
    --skip-tests) TESTS=0 ;;  # the suite's smoke test: SALIENCY_TEST_DEVICE=cpu pytest tests/test_cuda.py covers step 1
    *) echo "usage: $0 [--cpu-dry-run] [--skip-tests]" >&2; exit 2 ;;
  esac
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-XXXXXX")
export PREFECT_HOME="$WORK/prefect" PREFECT_LOGGING_LEVEL=WARNING RAY_USAGE_STATS_ENABLED=0 MPLBACKEND=Agg
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

SCALE=1  # the GPU limits below add up to 470 s (+ about 10 s of setup): within 8 minutes
if (( DRY )); then
  SCALE=10  # a shared CPU is slow; the 8-minute budget is the GPU run's
  DEVICE=cpu; IMAGES=8; SIZE=64; BATCH=4; PER_SHARD=4; MODEL=resnet18
  METHODS=gradient,gradcampp,gradcampp/signed,edge_sobel,random
  THROUGHPUT=(--device cpu --model resnet18 --batch 2 --size 64 --steps 2 --repeats 1)
  SPEED=(--device cpu --batch 2 --size 64 --repeats 1 --skip-peers)
  export SALIENCY_TEST_DEVICE=cpu  # tests/test_cuda.py runs its bodies on the CPU against the CPU
  echo "== CPU dry run: every step at toy sizes on the CPU; no GPU number comes out of this =="
else
  DEVICE=cuda; IMAGES=256; SIZE=224; BATCH=32; PER_SHARD=64; MODEL=resnet50
  METHODS=gradient,input_x_gradient,gradcam,gradcampp,gradcampp/signed,fullgrad,guided_backprop,lrp_epsilon_plus_flat,edge_sobel,random
  THROUGHPUT=(--device cuda --model resnet50 --batch 32 --size 224 --steps 16 --repeats 5)
  SPEED=(--device cuda --batch 16 --size 224 --repeats 3)
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device visible to torch ($PY); run with --cpu-dry-run to check the script on a CPU" >&2
    exit 2
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
"$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"

declare -a SUMMARY
FAILED=0
step() {  # step NAME SECONDS COMMAND... (a dry run on a shared CPU gets SCALE times longer)
  local name=$1 limit=$(( $2 * SCALE )); shift 2
  echo; echo "== $name (limit ${limit}s) =="
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  local took=$((SECONDS - start))
  if (( rc == 0 )); then SUMMARY+=("ok     ${took}s  $name"); else SUMMARY+=("FAILED ${took}s  $name (exit $rc)"); FAILED=1; fi
}

# 1. CUDA-marked tests
if (( TESTS )); then
  step "CUDA-marked tests" 90 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py tests/test_similarity.py
fi

# 2. pipeline with GPU actors on resnet50, 224², synthetic images
"$PY" - "$WORK/images" "$IMAGES" "$SIZE" <<'EOF'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
root, n, size = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
yy, xx = np.mgrid[0:size, 0:size] / size
for i in range(n):  # smooth coloured blobs with texture: structure for the maps, not pure noise
    folder = root / f"class{i % 4}"
    folder.mkdir(parents=True, exist_ok=True)
    cy, cx, r = rng.uniform(0.2, 0.8, 2).tolist() + [rng.uniform(0.1, 0.3)]
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    pixels = np.stack([blob * rng.uniform(0.3, 1) + rng.normal(0, 0.05, (size, size)) for _ in range(3)], -1)
    Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)).save(folder / f"{i:04d}.png")
print(f"wrote {n} synthetic {size}x{size} images to {root}")
EOF
step "pipeline: $MODEL on $DEVICE actors, $IMAGES images at ${SIZE}²" 210 "$PY" - "$WORK" <<EOF
import json, sys, time
import flows  # noqa: F401
from flows.sanity_check import sanity_check
work = sys.argv[1]
overrides = ["model.name=$MODEL", "model.num_classes=1000", "data.dataset=imagefolder", f"data.root={work}/images",
             "data.image_size=$SIZE", "data.limit=$IMAGES", "methods.ids=$METHODS", "metrics.names=ssim,spearman_abs",
             "tests.mprt.seeds=0", "tests.mprt.granularity=block", "compute.device=$DEVICE",
             "compute.batch_size=$BATCH", "compute.images_per_shard=$PER_SHARD", "storage.store_maps=sample",
             "storage.report=false", "tracking.enabled=false"]
start = time.perf_counter()
outcome = sanity_check(config=None, out=f"{work}/runs", overrides=overrides, progress=False)
stats = outcome["stats"]
print(json.dumps({"images": stats["images"], "score_rows": stats["score_rows"], "failures": stats["failures"],
                  "shard_seconds": round(stats["shard_seconds"], 1), "images_per_second": round(stats["images_per_second"], 2),
                  "wall_seconds": round(time.perf_counter() - start, 1), "run_dir": outcome["run_dir"]}))
import pyarrow.parquet as pq
verdicts = pq.read_table(outcome["run_dir"] + "/verdicts.parquet").to_pylist()
print("verdicts:", {k: sum(r["verdict"] == k for r in verdicts) for k in ("pass", "fail", "inconclusive", "uninformative")})
EOF

# 3. the engine on the device: maps/s against the autograd bound, then the side-by-side with the peers
step "engine: maps/s against the autograd bound" 90 "$PY" benchmarks/gpu_throughput.py "${THROUGHPUT[@]}"
step "engine: explain_speed (resnet18) with the peers" 80 "$PY" benchmarks/explain_speed.py "${SPEED[@]}"

echo; echo "== summary ($([[ $DRY == 1 ]] && echo 'CPU dry run' || echo "$DEVICE")) =="
printf '%s\n' "${SUMMARY[@]}"
rm -rf "$WORK"
exit $FAILED
