// fp32 arithmetic shared by the kernels, usable on the host too (csrc/check/host_test.cu runs it on the CPU).
//
// Every operation rounds to nearest-even and is never contracted into an FMA, whatever --fmad or --use_fast_math
// say: the kernels then compute exactly what torch.optim.AdamW's foreach path computes operation by operation, and
// the host and device versions of a formula agree bit for bit. The kernels are memory-bound, so the few extra
// instructions cost nothing measurable.
#pragma once

#include <stdint.h>

#ifdef __CUDACC__
#define RF_HD __host__ __device__ __forceinline__
#else
#define RF_HD inline
#endif

#ifndef __CUDA_ARCH__
#include <cmath>
#include <cstring>
#endif

namespace rf {

RF_HD float mul(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

RF_HD float add(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

RF_HD float sub(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

RF_HD float div(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

RF_HD float sqrt_rn(float a) {
#ifdef __CUDA_ARCH__
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

RF_HD uint32_t float_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

RF_HD float bits_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// bf16 <-> fp32 with integer ops only (no dependence on cuda_bf16.h or on torch's __CUDA_NO_BFLOAT16_CONVERSIONS__):
// fp32 -> bf16 rounds to nearest-even as torch's .to(torch.bfloat16) does, NaN -> 0x7FC0 (the Triton kernel's
// _bf16_rne_bits, bit for bit); overflow rounds to +-inf.
RF_HD uint16_t bf16_bits_rne(float x) {
  if (x != x) return 0x7FC0u;
  const uint32_t bits = float_bits(x);
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

RF_HD float bf16_bits_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

}  // namespace rf
