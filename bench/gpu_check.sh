#!/usr/bin/env bash
# One command for a GPU machine: build the CUDA extension, run the GPU tests, run the benchmarks,
# and write everything (card, versions, every number) to $OUT (if set) and bench/results/.
#
#   bash bench/gpu_check.sh [build] [tests] [bench] [profile] [layers] [e2e]
#   (no argument: all but profile)
#
# Offline machines: bring peers along in .whl/ (see README, "GPU workflow"): wheels in .whl/*.whl are
# installed into /tmp/site, and .whl/mamba_src/ (an unpacked mamba_ssm source tree) is used for
# mamba_ssm's Triton ops. Environment: BENCH_OPS, BENCH_SHAPES, BENCH_IMPLS restrict the kernel suite;
# PYTEST_ARGS adds pytest arguments (e.g. "-k gdn").
set -uo pipefail
cd "$(dirname "$0")/.."
stages="${*:-build tests bench layers e2e}"
# On the lent GPU machine only $OUT comes back: write there; copy into bench/results/ afterwards.
results="${OUT:-bench/results}"
out="$results"
mkdir -p "$results"
stamp=$(date +%Y%m%d-%H%M%S)
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
status=0

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
[ -d .whl/mamba_src/mamba_ssm ] && export GKA_BENCH_MAMBA_SRC="$PWD/.whl/mamba_src"

python3 - <<'PY' | tee "$out/env-$stamp.json"
import json, platform, subprocess, torch, triton
p = torch.cuda.get_device_properties(0)
nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1:]
print(json.dumps({"card": p.name, "sm": f"{p.major}{p.minor}", "sms": p.multi_processor_count,
                  "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                  "nvcc": nvcc, "python": platform.python_version()}, indent=1))
PY

if [[ " $stages " == *" build "* ]]; then
  echo "== build (GKA_KERNELS_BUILD_CUDA=on, sm 90)"
  GKA_KERNELS_BUILD_CUDA=on GKA_KERNELS_CUDA_ARCHS="${GKA_KERNELS_CUDA_ARCHS:-90}" \
    python3 -m pip install --no-build-isolation --no-deps -e . > "$out/build-$stamp.log" 2>&1 || { status=1; tail -30 "$out/build-$stamp.log"; }
  python3 -c "import gka_kernels; print('cuda_available:', gka_kernels.cuda_available())"
fi

if [[ " $stages " == *" tests "* ]]; then
  # One pytest per test file, each under its own time limit and with its own log, so a hanging file
  # costs only itself. GPU_TEST_FILES restricts the files; PER_FILE_TIMEOUT (s) bounds each;
  # GPU_TEST_JOBS files run at once (Triton JIT compiles are CPU-bound; the card is shared).
  run_test_file() {
    local f=$1 flog="$out/gpu-tests-$stamp-$(basename "$1" .py).log"
    timeout "${PER_FILE_TIMEOUT:-300}" python3 -m pytest -m gpu -q -p no:cacheprovider -rfE ${PYTEST_ARGS:-} "$f" \
      > "$flog" 2>&1
    local rc=$?
    echo "== pytest -m gpu $f: exit $rc, $(tail -1 "$flog")"
    { [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ]; } || touch "$out/gpu-tests-$stamp.failed"
  }
  for f in ${GPU_TEST_FILES:-$(grep -l "mark.gpu" tests/test_*.py)}; do
    while [ "$(jobs -rp | wc -l)" -ge "${GPU_TEST_JOBS:-1}" ]; do wait -n; done
    run_test_file "$f" &
  done
  wait
  [ -e "$out/gpu-tests-$stamp.failed" ] && status=1
  echo "== failures"; grep -hE "^(FAILED|ERROR)" "$out"/gpu-tests-"$stamp"-*.log | head -60
fi

if [[ " $stages " == *" bench "* ]]; then
  echo "== kernel benchmarks"
  python3 -m bench --out "$results" --ops "${BENCH_OPS:-gdn,gla,mamba2,gka,attention}" \
    --shapes "${BENCH_SHAPES:-train-4k,long-32k,decode-64,decode-1}" --impls "${BENCH_IMPLS:-}" --rep "${BENCH_REP:-100}" --tag "$stamp" || status=1
fi

if [[ " $stages " == *" profile "* ]]; then
  # Per-kernel GPU time, ours and peers side by side (PROFILE_OPS, PROFILE_SHAPES).
  echo "== per-kernel profile"
  python3 -m bench.profile_kernels --out "$results" --ops "${PROFILE_OPS:-gdn,gka}" \
    --shapes "${PROFILE_SHAPES:-train-4k}" --tag "$stamp" || status=1
fi

if [[ " $stages " == *" layers "* ]] && [ -f bench/bench_layers.py ]; then
  echo "== layer benchmarks"
  python3 -m bench.bench_layers --out "$results" || status=1
fi

if [[ " $stages " == *" e2e "* ]] && [ -f bench/bench_e2e.py ]; then
  echo "== end-to-end decode benchmark"
  python3 -m bench.bench_e2e --out "$results" || status=1
fi
exit $status
