#!/usr/bin/env bash
# Compile check of the CUDA extension rlvr_fast._C on a machine without a GPU (CI). Fails on any error, warning or
# register spill; takes ~30 s on 2 cores. What it proves, and what it cannot:
#   1. every csrc/*.cu compiles for sm_80 and sm_90 with the flags torch's CUDAExtension adds (the half/bf16
#      "no conversions" macros, --expt-relaxed-constexpr), warnings as errors (nvcc -Werror all-warnings, host
#      -Wall -Wextra -Werror); ptxas' register and spill counts are printed, and a spill fails the check;
#   2. csrc/check/host_test.cu (both kernel files in one translation unit) builds for sm_90 and RUNS: the kernels'
#      __host__ __device__ arithmetic is checked on the CPU, and with a GPU present the kernels too;
#   3. csrc/bindings.cpp passes g++ -fsyntax-only against the installed torch's headers (C++20, as torch builds it),
#      the CUDA headers and Python's: the torch.library registration and every API it calls exist with those types.
# Not checked without a CUDA build of torch: linking (libtorch_cuda, libc10_cuda) and importing the extension.
# Usage: csrc/check/compile_check.sh   (env: NVCC, PYTHON, CXX override the tools)
set -uo pipefail
cd "$(dirname "$0")/../.."

NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$NVCC" ]; then
  echo "compile_check: nvcc not found (set NVCC=/path/to/nvcc)"
  exit 1
fi
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
CXX=${CXX:-g++}
# nvcc may be a wrapper outside the toolkit (/usr/local/bin/nvcc): ask it where it really lives
CUDA_ROOT=$("$NVCC" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=\(.*\)\/bin$/\1/p' | head -n 1)
CUDA_ROOT=${CUDA_ROOT:-/usr/local/cuda}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "compile_check: $("$NVCC" --version | tail -n 1), toolkit $CUDA_ROOT"
NVCC_FLAGS=(-O3 -std=c++17 -lineinfo -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr
  -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror)
ARCHS=(-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90)

pids=()
names=()
start() {  # start NAME CMD...: run in the background, log to $work/NAME.log
  local name=$1
  shift
  ("$@") >"$work/$name.log" 2>&1 &
  pids+=($!)
  names+=("$name")
}

for cu in csrc/*.cu; do
  base=$(basename "$cu" .cu)
  start "$base" "$NVCC" "${NVCC_FLAGS[@]}" "${ARCHS[@]}" -Xptxas -v -c "$cu" -o "$work/$base.o"
done
start host_test bash -c "'$NVCC' ${NVCC_FLAGS[*]} -arch=sm_90 -o '$work/host_test' csrc/check/host_test.cu && '$work/host_test'"

bindings() {
  local torch_inc py_inc
  torch_inc=$("$PYTHON" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))") || return 1
  py_inc=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])") || return 1
  # torch's CPU wheels ship the c10/cuda headers but not this one header that their CUDA build generates
  mkdir -p "$work/shim/c10/cuda/impl"
  if [ ! -f "$torch_inc/c10/cuda/impl/cuda_cmake_macros.h" ]; then
    printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$work/shim/c10/cuda/impl/cuda_cmake_macros.h"
  fi
  "$CXX" -std=c++20 -fsyntax-only -Wall -Wextra -Werror -I csrc -I "$work/shim" -isystem "$torch_inc" \
    -isystem "$torch_inc/torch/csrc/api/include" -isystem "$CUDA_ROOT/include" -isystem "$py_inc" csrc/bindings.cpp
}
start bindings bindings

status=0
for i in "${!pids[@]}"; do
  if wait "${pids[$i]}"; then
    echo "ok    ${names[$i]}"
  else
    echo "FAIL  ${names[$i]}:"
    sed 's/^/      /' "$work/${names[$i]}.log" | grep -v "^      ptxas info" | head -n 60
    status=1
  fi
done

# ptxas: registers and spills per kernel and architecture (from the -Xptxas -v logs; plain bash, no gawk)
report_ptxas() {  # report_ptxas FILE LOG: print one line per kernel and arch; fail if any spills
  local file=$1 log=$2 fn="" sm="" spill=0 bad=0 line
  local re_fn="Compiling entry function '([^']+)' for '(sm_[0-9]+)'" re_spill="([0-9]+) bytes spill stores"
  local re_regs="Used ([0-9]+) registers"
  while IFS= read -r line; do
    if [[ $line =~ $re_fn ]]; then
      fn=${BASH_REMATCH[1]} sm=${BASH_REMATCH[2]}
    elif [[ $line =~ $re_spill ]]; then
      spill=${BASH_REMATCH[1]}
    elif [[ $line =~ $re_regs ]]; then
      command -v c++filt >/dev/null && fn=$(c++filt "$fn")
      printf '      %-18s %-6s %3d registers, %d bytes spilled  %s\n' "$file" "$sm" "${BASH_REMATCH[1]}" "$spill" "${fn%%(*}"
      [ "$spill" -gt 0 ] && bad=1
    fi
  done <"$log"
  return "$bad"
}
for cu in csrc/*.cu; do
  log="$work/$(basename "$cu" .cu).log"
  [ -f "$log" ] || continue
  report_ptxas "$(basename "$cu")" "$log" || {
    echo "FAIL  $(basename "$cu"): a kernel spills registers (see above)"
    status=1
  }
done

if [ "$status" -eq 0 ]; then
  grep -h "host_test\|adamw_entry\|no CUDA device\|launch without" "$work/host_test.log" | sed 's/^/      /'
  echo "compile_check: passed"
else
  echo "compile_check: FAILED"
fi
exit "$status"
