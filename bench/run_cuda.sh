#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and the build tools already installed (no network): build lowbit
# for this GPU only, run the CUDA tests, then the CUDA GEMM benchmark. Logs go to $OUT (or ./out_cuda).
#   bash bench/run_cuda.sh [pytest -k expression] [bench_cuda_gemm.py arguments...]
set -uo pipefail
OUT=${OUT:-out_cuda}; mkdir -p "$OUT"
export PATH="$PATH:/usr/local/cuda/bin" PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
lscpu | grep -E 'Model name|^CPU\(s\)'; echo "amx: $(grep -o 'amx[a-z0-9_]*' /proc/cpuinfo | sort -u | tr '\n' ' ')"
cap=$($PY -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))")
[ "$cap" = 90 ] && cap=90a
LOWBIT_CUDA=ON LOWBIT_CUDA_ARCHS="${cap}-real" $PY -m pip install -q --no-build-isolation --no-deps . \
  > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
(cd /tmp && $PY -c "import lowbit, json; print(json.dumps(lowbit.build_info()['cuda']))")
KEXPR=${1:-}; shift || true
(cd /tmp && $PY -m pytest -q -p no:cacheprovider -rfE ${KEXPR:+-k "$KEXPR"} \
   "$OLDPWD/tests/test_cuda.py" "$OLDPWD/tests/test_cuda_gemm.py") 2>&1 | tee "$OUT/tests.log" | tail -40
$PY bench/bench_cuda_gemm.py --json "$OUT/bench_cuda.json" "$@" 2>&1 | tee "$OUT/bench.log"
