set -o pipefail; OUT=${OUT:-/tmp/out}; mkdir -p $OUT
{ source benchmarks/gpu_build.sh; nvidia-smi -L
export TACA_CUDA_LIB=$PWD/build/libtaca_fwd_ctypes.so PYTHONPATH=/tmp/site:$PWD/tests/cuda_harness PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 150 python3 -m pytest -q -rs tests/test_cuda_bwd.py tests/test_cuda_features.py tests/test_cuda.py > $OUT/pytest.txt 2>&1
echo "pytest rc=$?: $(tail -1 $OUT/pytest.txt)"; grep -E "^(FAILED|ERROR)" $OUT/pytest.txt | head -8
echo "tests done at $SECONDS s"; } 2>&1 | tee $OUT/log0.txt
unset TACA_CUDA_LIB
MODES=v6,v6@s4 SHAPES=flux1024_b2,sd35m_cfg,flux1024_b1 ROUNDS=3 BUILD=0 OUT=$OUT/xp timeout $((415 - SECONDS)) bash benchmarks/gpu_modes_xproc.sh 2>&1 | tail -8
echo "all done at $SECONDS s"
