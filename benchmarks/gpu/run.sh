#!/usr/bin/env bash
# The one prepared GPU run (H100/H200 via the device tool), in well under 8 minutes (vLLM, where present, adds 5):
#   1. install the project without network (wheels of missing baselines travel in .whl/, see README),
#   2. run the whole test suite on CUDA (the interpreter off; compiled Triton and the CUDA extension, built by the
#      install where torch has CUDA and nvcc is found, with its own check csrc/check/compile_check.sh first),
#   3. time every op against its baselines with triton.testing.do_bench, with the ceilings measured in the same run,
#   4. colocated vLLM against the native sampler and vLLM's sleep mode (benchmarks/gpu/vllm_gpu.py), where vLLM
#      imports (the lent machines have none; the script then records the skip in a second),
#   5. write everything under OUT_DIR (JSON + logs) for benchmarks/results/.
# Usage: benchmarks/gpu/run.sh OUT_DIR      (RLVR_FAST_COMMIT=<sha> names the commit when .git did not travel)
set -uo pipefail
out=${1:?usage: benchmarks/gpu/run.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! python3 -m pip install -v --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1; then  # -v: the build log
  echo "install failed:"; tail -n 40 "$out/install.log"; exit 1
fi
python3 -c "import rlvr_fast, torch, triton; print('rlvr_fast', rlvr_fast.__version__, 'cuda ext', rlvr_fast.HAS_CUDA_EXT, 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
# The CUDA extension (csrc/) builds during the install where torch has CUDA and nvcc is found; say why if it did not.
python3 -c "import rlvr_fast, sys; sys.exit(0 if rlvr_fast.HAS_CUDA_EXT else 1)" \
  || { echo "rlvr_fast._C was not built:"; grep -iE "rlvr_fast|error" "$out/install.log" | tail -n 20; }
# The kernels' own check, here with a GPU: compiles for sm_80/sm_90 and runs csrc/check/host_test.cu on the device.
PYTHON=python3 timeout 180 csrc/check/compile_check.sh >"$out/compile_check.log" 2>&1
check_rc=$?
echo "compile_check rc=$check_rc: $(grep -h "host_test:\|compile_check:" "$out/compile_check.log" | tr '\n' ' ')"

timeout 300 python3 -m pytest tests -q -x -p no:cacheprovider --junitxml="$out/tests.xml" >"$out/tests.log" 2>&1
tests_rc=$?
tail -n 25 "$out/tests.log"

timeout 240 python3 benchmarks/gpu/run_gpu.py --out "$out" --tests-rc "$tests_rc"
bench_rc=$?
timeout 300 python3 benchmarks/gpu/vllm_gpu.py --out "$out" --timeout 95 >"$out/vllm.log" 2>&1
vllm_rc=$?
tail -n 6 "$out/vllm.log"
# one LoRA and one QLoRA step of the default model, peak GPU memory each (recorded, not gating)
timeout 120 python3 benchmarks/gpu/lora_gpu.py --out "$out" >"$out/lora.log" 2>&1; tail -n 2 "$out/lora.log"
echo "tests rc=$tests_rc bench rc=$bench_rc vllm rc=$vllm_rc"
exit $(( tests_rc != 0 || bench_rc != 0 || vllm_rc != 0 ))
