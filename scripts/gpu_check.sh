#!/usr/bin/env bash
# The GPU path, checked and timed on a machine with a CUDA GPU (where PyTorch sees one):
#  1. `emscale bench scale` of each kind twice on the same LocalCluster, once with the workers
#     declaring the GPU (training and encoding there) and once with CUDA hidden (the CPU path):
#     the EELS workflow (MLP), the 4D-STEM workflow (polar features, MLP) and 4D-STEM patterns
#     through the conv autoencoder (the case where a GPU is expected to pay);
#  2. the training tests with CUDA visible (device "auto" then picks it).
# Usage: bash scripts/gpu_check.sh OUTDIR [SIZE_GB] [WORKERS]
#   ONLY="conv-cpu tests" runs only those parts (a rerun); BENCH_SECONDS, TEST_SECONDS cap each.
# Figures: OUTDIR/*.json (bench scale's JSON) and OUTDIR/log.txt. Needs emscale importable
# (pip install -e ., or PYTHONPATH) and about SIZE_GB of disk under SCANS (default OUTDIR/scans).
# Training on the CPU gets WORKERS threads (train.threads), the GPU's runs the same setting.
set -u
out=${1:?usage: gpu_check.sh OUTDIR [SIZE_GB] [WORKERS]}
size=${2:-1}
workers=${3:-8}
py=${PYTHON:-python3}
scans=${SCANS:-$out/scans}   # scans and cluster files (keep them out of OUTDIR for the device tool)
mkdir -p "$out" "$scans"
export PYTHONUNBUFFERED=1
step() { echo "== $* ($(date +%T))"; }
wanted() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }

step environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
nproc
$py -c "import emscale, dask, distributed, zarr, xarray, numpy, sklearn
print(*(f'{m.__name__} {m.__version__}' for m in (dask, distributed, zarr, xarray, numpy, sklearn)))"

for gpus in 1 0; do
    cat >"$scans/cluster-gpu$gpus.yaml" <<EOF
type: local
workers: $workers
threads: 1
memory: 8GiB
dashboard_address: null
gpus: $gpus
EOF
done

# the conv autoencoder on the binned, centred, sqrt-scaled patterns (no polar features): the
# previous 4D-STEM workflow's model (channels 16, 32, 64)
conv=(--set 'preprocess.steps=[{step: bin, factor: 2}, {step: centre, method: com}, {step: scale, method: sqrt}]'
      --set train.model=conv --set 'train.widths=[16, 32, 64]' --set train.batch_size=128
      --set train.pca_path=false --set train.epochs=${CONV_EPOCHS:-5})
bench() {  # NAME GPUS KIND [--set ...]
    local name=$1 gpus=$2 kind=$3; shift 3
    wanted "$name" || return 0
    step "bench scale $name ($kind $size GB, gpus $gpus)"
    if [ "$gpus" = 0 ]; then hide=(env CUDA_VISIBLE_DEVICES=); else hide=(); fi
    timeout "${BENCH_SECONDS:-300}" "${hide[@]}" $py -m emscale bench scale --sizes "$size" \
        --kind "$kind" --dir "$scans" --cluster "$scans/cluster-gpu$gpus.yaml" \
        --json "$out/$name.json" --set train.threads="$workers" "$@" 2>&1 | grep -v -E '^\s*$|chunks done' | tail -30
}
bench eels-gpu 1 eels
bench eels-cpu 0 eels
bench conv-gpu 1 4dstem "${conv[@]}"
bench conv-cpu 0 4dstem "${conv[@]}"
bench polar-gpu 1 4dstem
bench polar-cpu 0 4dstem
if wanted tests; then
    step "tests with CUDA visible"
    timeout "${TEST_SECONDS:-150}" $py -m pytest -q -p no:cacheprovider --tb=line --show-capture=no \
        tests/test_train.py 2>&1 | grep -v -E '^(INFO|WARNING) ' | tail -25
fi
step done
