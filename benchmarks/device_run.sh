#!/bin/bash
# One call on the GPU machine: install the peers' wheels, run the GPU kernel tests (and the formats
# tests' triton/cuda parameters) and the GPU benchmark; logs to $OUT.
#   usage (device tool): bash benchmarks/device_run.sh [tests|bench|all]   (BENCH_ARGS: extra benchmark flags)
set -o pipefail
what=${1:-all}
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a $OUT/gpu.txt
if [ "$what" != tests ]; then
  (python3 -c "from qtorch.quant import float_quantize; print('qtorch built')" > $OUT/qtorch_build.log 2>&1) &
  QPID=$!
fi
if [ "$what" != bench ]; then
  echo "== pytest -v -n 6 tests/test_kernels_gpu.py (log: gpu_tests.log); pytest -n 6 tests -k \"triton or cuda\" (log: formats_tests_gpu.log)"
  timeout 280 python3 -m pytest -v -n 8 tests/test_kernels_gpu.py -p no:cacheprovider -rs > $OUT/gpu_tests.log 2>&1 &
  TPID=$!
  timeout 280 python3 -m pytest -q -n 6 tests -k "triton or cuda" --ignore=tests/test_kernels_gpu.py --ignore=tests/test_gptq_fast.py -p no:cacheprovider > $OUT/formats_tests_gpu.log 2>&1
  echo "== formats tests, triton/cuda parameters: $(tail -1 $OUT/formats_tests_gpu.log)"
  wait $TPID; echo "== tests/test_kernels_gpu.py: $(tail -1 $OUT/gpu_tests.log)"
fi
if [ "$what" != tests ]; then
  wait $QPID; tail -2 $OUT/qtorch_build.log
  echo "== python3 benchmarks/bench_emulation.py --device cuda"
  timeout 240 python3 benchmarks/bench_emulation.py --device cuda $BENCH_ARGS --json $OUT/bench_gpu.json 2>&1 | grep -v -i "warn" | tee $OUT/bench_gpu.log
fi
