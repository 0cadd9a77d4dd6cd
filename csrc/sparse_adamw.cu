// Sparse masked AdamW: one AdamW step over the masked entries of many parameters, in one launch.
//
// Semantics and layout: rlvr_fast/optim/sparse_adamw.py and csrc/rlvr_fast_kernels.h. This is the CUDA twin of the
// Triton kernel kernels/sparse_adamw.py: the same table (segments with their coefficients, first tile per segment),
// the same tile of 4096 entries per block, the same formula (here each operation rounded on its own, no FMA
// contraction: torch.optim.AdamW's foreach path), and bf16 rounded to nearest-even.
//
// Per block (one tile of one segment), per thread: UNROLL groups of VEC = 4 consecutive state entries. All loads of
// a tile are issued before any store (compact moments and indices as aligned 16-byte vectors, then the gathers of
// gradient and parameter), so each thread keeps 4 x 4 entries in flight. Unmasked positions are never touched:
// only positions read from the index stream (or 0..count-1 of a dense segment) are loaded or stored.
//
// Bytes per masked entry: index 4 + moments 16 + gradient 4 + parameter 8 = 32 for fp32 (the floor of docs/design.md);
// dense segments skip the index (28 B, torch's fused AdamW) and move the gradient and parameter as vectors too.

#include <cuda_runtime.h>
#include <stdint.h>

#include "rf_math.cuh"
#include "rlvr_fast_kernels.h"

namespace rf {
namespace sparse_adamw {

constexpr int THREADS = RF_SPARSE_ADAMW_THREADS;
constexpr int VEC = RF_SPARSE_ADAMW_VEC;
constexpr int UNROLL = RF_SPARSE_ADAMW_UNROLL;
constexpr int TILE = RF_SPARSE_ADAMW_TILE;
static_assert(THREADS * VEC * UNROLL == TILE, "tile = threads x vector x unroll");
static_assert(RF_ENTRY_ALIGN % VEC == 0, "segments must start on a vector boundary");
static_assert(sizeof(RfAdamwSegment) == 64, "the host and the device agree on the segment layout");

struct Coeffs {
  float decay, w1, beta2, w2, step_size, bc2_sqrt, eps;
};

// One entry, in torch.optim.AdamW's order (_multi_tensor_adamw; the Triton kernel's _adamw_entries):
//   p <- p * (1 - lr wd); m <- lerp(m, g, 1 - beta1); v <- v beta2 + (1 - beta2) g^2;
//   p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
RF_HD void adamw_entry(float& p, float& m, float& v, float g, const Coeffs& c) {
  p = mul(p, c.decay);  // decoupled weight decay (Loshchilov & Hutter 2019), before the Adam step as torch does
  const float diff = sub(g, m);
  // torch.lerp's two-sided formula: exact at weight 0 and 1
  m = c.w1 < 0.5f ? add(m, mul(c.w1, diff)) : sub(g, mul(diff, sub(1.0f, c.w1)));
  v = add(mul(v, c.beta2), mul(c.w2, mul(g, g)));
  const float denom = add(div(sqrt_rn(v), c.bc2_sqrt), c.eps);
  p = sub(p, mul(c.step_size, div(m, denom)));
}

// The segment of tile `tile`: the last s with first_tile[s] <= tile (first_tile[0] == 0, strictly ascending).
RF_HD int32_t find_segment(const int32_t* first_tile, int32_t n_seg, int32_t tile) {
  int32_t lo = 0, hi = n_seg;  // invariant: first_tile[lo] <= tile < first_tile[hi] (hi == n_seg: +inf)
  while (hi - lo > 1) {
    const int32_t mid = lo + (hi - lo) / 2;
    if (first_tile[mid] <= tile) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Parameter / gradient element access: fp32 as float, bf16 as its 16 raw bits (converted with integer ops).
template <typename P>
struct Elem;

template <>
struct Elem<float> {
  __device__ __forceinline__ static float load_grad(const float* g, int64_t i) { return __ldg(g + i); }
  __device__ __forceinline__ static float load(const float* p, int64_t i) { return p[i]; }
  __device__ __forceinline__ static void store(float* p, int64_t i, float x) { p[i] = x; }
  // VEC consecutive elements at p + i (i a multiple of VEC, p aligned: RF_SEG_VECTOR_IO)
  __device__ __forceinline__ static void load_grad4(const float* g, int64_t i, float out[VEC]) {
    const float4 t = __ldg(reinterpret_cast<const float4*>(g + i));
    out[0] = t.x, out[1] = t.y, out[2] = t.z, out[3] = t.w;
  }
  __device__ __forceinline__ static void load4(const float* p, int64_t i, float out[VEC]) {
    const float4 t = *reinterpret_cast<const float4*>(p + i);
    out[0] = t.x, out[1] = t.y, out[2] = t.z, out[3] = t.w;
  }
  __device__ __forceinline__ static void store4(float* p, int64_t i, const float x[VEC]) {
    *reinterpret_cast<float4*>(p + i) = make_float4(x[0], x[1], x[2], x[3]);
  }
};

template <>
struct Elem<uint16_t> {  // bfloat16
  __device__ __forceinline__ static float load_grad(const uint16_t* g, int64_t i) {
    return bf16_bits_to_float(__ldg(reinterpret_cast<const unsigned short*>(g + i)));
  }
  __device__ __forceinline__ static float load(const uint16_t* p, int64_t i) { return bf16_bits_to_float(p[i]); }
  __device__ __forceinline__ static void store(uint16_t* p, int64_t i, float x) { p[i] = bf16_bits_rne(x); }
  __device__ __forceinline__ static void unpack(uint2 t, float out[VEC]) {
    out[0] = bf16_bits_to_float(static_cast<uint16_t>(t.x & 0xFFFFu));
    out[1] = bf16_bits_to_float(static_cast<uint16_t>(t.x >> 16));
    out[2] = bf16_bits_to_float(static_cast<uint16_t>(t.y & 0xFFFFu));
    out[3] = bf16_bits_to_float(static_cast<uint16_t>(t.y >> 16));
  }
  __device__ __forceinline__ static void load_grad4(const uint16_t* g, int64_t i, float out[VEC]) {
    unpack(__ldg(reinterpret_cast<const uint2*>(g + i)), out);
  }
  __device__ __forceinline__ static void load4(const uint16_t* p, int64_t i, float out[VEC]) {
    unpack(*reinterpret_cast<const uint2*>(p + i), out);
  }
  __device__ __forceinline__ static void store4(uint16_t* p, int64_t i, const float x[VEC]) {
    uint2 t;
    t.x = static_cast<uint32_t>(bf16_bits_rne(x[0])) | (static_cast<uint32_t>(bf16_bits_rne(x[1])) << 16);
    t.y = static_cast<uint32_t>(bf16_bits_rne(x[2])) | (static_cast<uint32_t>(bf16_bits_rne(x[3])) << 16);
    *reinterpret_cast<uint2*>(p + i) = t;
  }
};

// VEC consecutive indices (aligned: the segment starts on RF_ENTRY_ALIGN entries, the vector on VEC), streamed:
// each is read once per step, so keep it out of the way of the gathered lines in L2.
__device__ __forceinline__ void load_index4(const int32_t* idx, int64_t e, int32_t out[VEC]) {
  const int4 t = __ldcs(reinterpret_cast<const int4*>(idx + e));
  out[0] = t.x, out[1] = t.y, out[2] = t.z, out[3] = t.w;
}

__device__ __forceinline__ void load_index4(const int64_t* idx, int64_t e, int64_t out[VEC]) {
  const longlong2 a = __ldcs(reinterpret_cast<const longlong2*>(idx + e));
  const longlong2 b = __ldcs(reinterpret_cast<const longlong2*>(idx + e + 2));
  out[0] = a.x, out[1] = a.y, out[2] = b.x, out[3] = b.y;
}

__device__ __forceinline__ void load_moment4(const float* buf, int64_t e, float out[VEC]) {
  const float4 t = __ldcs(reinterpret_cast<const float4*>(buf + e));
  out[0] = t.x, out[1] = t.y, out[2] = t.z, out[3] = t.w;
}

__device__ __forceinline__ void store_moment4(float* buf, int64_t e, const float x[VEC]) {
  __stcs(reinterpret_cast<float4*>(buf + e), make_float4(x[0], x[1], x[2], x[3]));
}

template <typename P, typename I>
__global__ void __launch_bounds__(THREADS)
    sparse_adamw_kernel(const int32_t* __restrict__ first_tile, const RfAdamwSegment* __restrict__ segments,
                        int32_t n_seg, const I* __restrict__ indices, float* __restrict__ exp_avg,
                        float* __restrict__ exp_avg_sq) {
  const int32_t tile = static_cast<int32_t>(blockIdx.x);
  const int32_t s = find_segment(first_tile, n_seg, tile);  // uniform over the block: broadcast loads
  const RfAdamwSegment& seg = segments[s];
  const int64_t count = seg.count;
  const int32_t flags = seg.flags;
  const Coeffs c{seg.decay, seg.w1, seg.beta2, seg.w2, seg.step_size, seg.bc2_sqrt, seg.eps};
  P* __restrict__ param = reinterpret_cast<P*>(seg.param);
  const P* __restrict__ grad = reinterpret_cast<const P*>(seg.grad);
  float* __restrict__ m_seg = exp_avg + seg.entry_start;
  float* __restrict__ v_seg = exp_avg_sq + seg.entry_start;
  const I* __restrict__ idx_seg = indices + seg.entry_start;
  const bool dense = (flags & RF_SEG_DENSE) != 0;
  const bool vector_io = (flags & RF_SEG_VECTOR_IO) != 0;

  // int64: a parameter may hold more than 2^31 entries
  const int64_t tile_start = static_cast<int64_t>(tile - first_tile[s]) * TILE;

  float m[UNROLL][VEC], v[UNROLL][VEC], g[UNROLL][VEC], p[UNROLL][VEC];
  I idx[UNROLL][VEC];  // masked segments: the positions (a dense segment's position is its entry, local + k)
  int64_t local[UNROLL];
  int n_ok[UNROLL];  // entries of the vector inside the segment: VEC, 0, or a partial last vector

  // 1. the contiguous streams: moments and indices (aligned vectors; scalar only for a segment's last vector)
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    local[u] = tile_start + static_cast<int64_t>(u) * (THREADS * VEC) + static_cast<int64_t>(threadIdx.x) * VEC;
    const int64_t left = count - local[u];
    n_ok[u] = left >= VEC ? VEC : (left > 0 ? static_cast<int>(left) : 0);
    if (n_ok[u] == VEC) {
      load_moment4(m_seg, local[u], m[u]);
      load_moment4(v_seg, local[u], v[u]);
      if (!dense) load_index4(idx_seg, local[u], idx[u]);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        m[u][k] = 0.0f, v[u][k] = 0.0f, idx[u][k] = 0;
        if (k < n_ok[u]) {
          m[u][k] = __ldcs(m_seg + local[u] + k);
          v[u][k] = __ldcs(v_seg + local[u] + k);
          if (!dense) idx[u][k] = __ldcs(idx_seg + local[u] + k);
        }
      }
    }
  }

  // 2. the gathers: gradient and parameter at the masked positions (vectors for an aligned dense segment)
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    if (vector_io && n_ok[u] == VEC) {
      Elem<P>::load_grad4(grad, local[u], g[u]);
      Elem<P>::load4(param, local[u], p[u]);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        g[u][k] = 0.0f, p[u][k] = 0.0f;
        if (k < n_ok[u]) {
          const int64_t pos = dense ? local[u] + k : static_cast<int64_t>(idx[u][k]);
          g[u][k] = Elem<P>::load_grad(grad, pos);
          p[u][k] = Elem<P>::load(param, pos);
        }
      }
    }
  }

  // 3. the update, in fp32
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) adamw_entry(p[u][k], m[u][k], v[u][k], g[u][k], c);
  }

  // 4. the stores: moments back in place, the parameter scattered to the masked positions only
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    if (n_ok[u] == VEC) {
      store_moment4(m_seg, local[u], m[u]);
      store_moment4(v_seg, local[u], v[u]);
      if (vector_io) {
        Elem<P>::store4(param, local[u], p[u]);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          Elem<P>::store(param, dense ? local[u] + k : static_cast<int64_t>(idx[u][k]), p[u][k]);
        }
      }
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        if (k < n_ok[u]) {
          __stcs(m_seg + local[u] + k, m[u][k]);
          __stcs(v_seg + local[u] + k, v[u][k]);
          Elem<P>::store(param, dense ? local[u] + k : static_cast<int64_t>(idx[u][k]), p[u][k]);
        }
      }
    }
  }
}

template <typename P, typename I>
int launch(const int32_t* first_tile, const RfAdamwSegment* segments, int32_t n_seg, int32_t n_tiles,
           const void* indices, float* exp_avg, float* exp_avg_sq, cudaStream_t stream) {
  sparse_adamw_kernel<P, I><<<static_cast<unsigned>(n_tiles), THREADS, 0, stream>>>(
      first_tile, segments, n_seg, static_cast<const I*>(indices), exp_avg, exp_avg_sq);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace sparse_adamw
}  // namespace rf

extern "C" int rf_sparse_adamw_launch(const int32_t* first_tile, const RfAdamwSegment* segments, int32_t n_seg,
                                      int32_t n_tiles, const void* indices, int32_t index_bytes, float* exp_avg,
                                      float* exp_avg_sq, int32_t param_dtype, void* stream) {
  using namespace rf::sparse_adamw;
  if (n_seg < 0 || n_tiles < 0) return RF_ERR_SHAPE;
  if (n_seg == 0 || n_tiles == 0) return RF_OK;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (param_dtype == RF_DTYPE_FLOAT32) {
    if (index_bytes == 4)
      return launch<float, int32_t>(first_tile, segments, n_seg, n_tiles, indices, exp_avg, exp_avg_sq, s);
    if (index_bytes == 8)
      return launch<float, int64_t>(first_tile, segments, n_seg, n_tiles, indices, exp_avg, exp_avg_sq, s);
    return RF_ERR_INDEX_BYTES;
  }
  if (param_dtype == RF_DTYPE_BFLOAT16) {
    if (index_bytes == 4)
      return launch<uint16_t, int32_t>(first_tile, segments, n_seg, n_tiles, indices, exp_avg, exp_avg_sq, s);
    if (index_bytes == 8)
      return launch<uint16_t, int64_t>(first_tile, segments, n_seg, n_tiles, indices, exp_avg, exp_avg_sq, s);
    return RF_ERR_INDEX_BYTES;
  }
  return RF_ERR_DTYPE;
}

extern "C" const char* rf_error_string(int code) {
  switch (code) {
    case RF_OK:
      return "no error";
    case RF_ERR_DTYPE:
      return "unsupported dtype code";
    case RF_ERR_INDEX_BYTES:
      return "indices must be int32 or int64";
    case RF_ERR_CODE:
      return "estimator, scale or sample-mode code out of range";
    case RF_ERR_SHAPE:
      return "negative size, or more tiles than a grid holds";
    default:
      return code > 0 ? cudaGetErrorString(static_cast<cudaError_t>(code)) : "unknown rlvr_fast error";
  }
}
