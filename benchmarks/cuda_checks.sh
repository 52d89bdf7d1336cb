#!/usr/bin/env bash
# The checks that need a GPU, in one run on a CUDA machine, each step under a time limit of its own
# so that a stuck step costs only its share:
#   1. the CUDA tests (tests/test_cuda.py and the tests elsewhere that skip without CUDA),
#   2. the trainer benchmark on the GPU (benchmarks/train.py --device cuda),
#   3. the kernel benchmark on the GPU (benchmarks/kernels.py --device cuda), at the default block
#      size and at the sizes around it,
#   4. the empirical kernels on the GPU (benchmarks/kernels.py --empirical-diag / --empirical-jacobian) at
#      ntkgp's memory budgets and larger ones,
#   5. the acceptance comparison with 1024 members at widths 256-1024 (docs/compare.md; 67 s on an
#      H200: 6.8 / 12 / 38 s per width), its report packed as OUT/compare_e1024.tgz,
#   6. the whole default test suite with CUDA present, in parallel, in the time that is left.
# Runs from a checkout without installing it (PYTHONPATH), with the torch and gpytorch already there.
# The figures in docs/benchmarks.md and docs/compare.md come from runs on H200s on 2026-12-04: two of
# earlier drafts' commands, then this script as a whole (445 s of a 565 s budget, with ArviZ carried
# as wheels: the 29 CUDA tests passed in 22 s; the suite 2603 passed, 3 skipped and 2 failed in 155 s,
# tests/test_benchmarks.py's count of this script's steps, written before step 4, and the version
# test, which read an installed distribution's metadata; both since fixed), then a second run of the
# CUDA tests and the empirical benchmarks with the GPU budgets that step 4 led to.
#
#     bash benchmarks/cuda_checks.sh OUT [SECONDS]     # SECONDS: the whole run's budget (default 540)
set -uo pipefail   # a failed environment check (exit 1 inside the piped group) is the script's status
out=${1:?usage: bash benchmarks/cuda_checks.sh OUT [SECONDS]}
budget=${2:-540}
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 1   # absolute: a relative OUT is the caller's, not the checkout's
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NTKGP_TEST_TIMEOUT=300
py=${PYTHON:-python3}

step() {   # step LIMIT COMMAND...: run it under a time limit, print its exit status and time
    local limit=$1 start=$SECONDS
    shift
    echo "=== $* (limit ${limit} s)"
    timeout --kill-after=5 "$limit" "$@"
    echo "=== exit status $? after $((SECONDS - start)) s"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $py -c "import torch, gpytorch, ntkgp; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'gpytorch', gpytorch.__version__, torch.cuda.get_device_name(), 'available', torch.cuda.is_available())" || exit 1
    step 120 $py -m pytest -q -p no:cacheprovider -rfEs tests/test_cuda.py \
        tests/test_finite.py::test_build_and_kernels_on_cuda tests/test_finite.py::test_deferred_first_layer_follows_cuda \
        tests/test_models.py::test_network_gp_follows_the_device_of_its_data \
        tests/test_train.py::test_training_on_cuda_matches_cpu
    step 75 $py benchmarks/train.py --device cuda --repeats 2
    step 90 $py benchmarks/kernels.py --device cuda --sizes 4000 40000 --no-compile --repeats 1 \
        --block-entries 524288 8388608 16777216 33554432
    step 45 $py benchmarks/kernels.py --device cuda --empirical-diag 2000 8000 32000 --repeats 2 \
        --empirical-bytes 16777216 268435456
    step 60 $py benchmarks/kernels.py --device cuda --empirical-jacobian 2000 8000 --repeats 1 \
        --empirical-bytes 67108864 268435456 1073741824
    step 150 $py -m ntkgp compare --preset acceptance --ensemble-size 1024 --widths 256 512 1024 --device cuda \
        --chunk-size 512 --out "$out/compare_e1024"
    tar czf "$out/compare_e1024.tgz" -C "$out" compare_e1024 && rm -rf "$out/compare_e1024"
    left=$((budget - SECONDS - 10))
    if [ "$left" -gt 30 ]; then
        OMP_NUM_THREADS=1 step "$left" $py -m pytest -q -p no:cacheprovider -n 16 -m "not slow" \
            --continue-on-collection-errors -rfE tests
    fi
} 2>&1 | tee "$out/cuda_checks.log"
