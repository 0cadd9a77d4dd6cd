// Group-relative advantages and group statistics, in one launch.
//
// Semantics: rlvr_fast/ops/group_advantage.py (the reference and the formula table); outputs as the Triton kernel
// kernels/group_advantage.py writes them. A team of TEAM lanes owns one group at a time: TEAM = next power of two
// >= G for 4 <= G <= 32, 4 below (several groups per warp, reductions by xor-shuffles within the team), a warp for
// G <= RF_GA_WARP_MAX_GROUP, a whole block beyond (warp shuffles, then shared memory). Every lane of a team ends a
// reduction with the same value (xor butterflies add the same pairs in the same order; the block's last step is one
// fixed-order loop), so all lanes take the same branches.
//
// Per group: pass 0 reads the rewards (count of finite rewards, min, max, number correct), pass 1 sums them in units
// of the group's power-of-two unit (unit_of(max |r|): rewards / unit lie in (-2, 2), so neither the sum nor the mean
// nor a deviation overflows for any finite reward, and the division is exact), pass 2 the squared deviations from
// the mean (two passes, as the reference: no cancellation from E[r^2] - E[r]^2), pass 3 writes the advantages. The
// std is scale-invariant like the reference's: each deviation is divided by the group's largest |deviation|
// (max(hi - mean, mean - lo), known after pass 1, so no extra pass) before squaring. Passes 1-3 re-read the group
// from L1/L2. Non-finite rewards (reaching the kernel only under invalid="mask") are left out of every statistic and
// get advantage 0. Only the unnormalised advantages (dr_grpo, rloo, grpo scale="none") and the std output are
// converted back to reward units, where a value beyond float32's range is inf (the op raises on such advantages).
//
// scale="batch" (grpo's denominator is the Bessel std over the whole batch) needs every group before any advantage:
// a cooperative launch, each block reduces its groups to (count, mean, M2) (Chan et al.'s pairwise combination),
// one grid-wide barrier, then every block combines the per-block partials in the same fixed order (so all blocks
// agree bit for bit) and writes its groups. The whole batch is read twice, not once per block as in the Triton kernel.

#include <cooperative_groups.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "rf_math.cuh"
#include "rlvr_fast_kernels.h"

namespace rf {
namespace group_advantage {

constexpr int THREADS = RF_GA_THREADS;
constexpr unsigned FULL_MASK = 0xffffffffu;

// ---- the per-group formulas (host and device: csrc/check/host_test.cu runs them on the CPU) ---------------------

struct GroupStats {
  float count;  // finite rewards in the group
  float mean;  // mean / unit
  float std;  // Bessel-corrected std / unit, 0 below 2 rewards
  float unit;  // the group's power-of-two unit (unit_of)
  bool all_equal;  // fewer than 2 finite rewards, or all equal
};

// 2^floor(log2(peak)) for peak >= 1, else 1: the exponent bits of peak (rlvr_fast.ops.group_advantage.unit_of and the
// Triton kernel's _unit_of take the same bits). Values / unit lie in (-2, 2); dividing by it is exact.
RF_HD float unit_of(float peak) { return fmaxf(bits_float(float_bits(peak) & 0x7F800000u), 1.0f); }

// The advantage of one completion (the torch path's ESTIMATORS formulas and SAMPLE_MODES), before the `valid` mask.
// dev = (r - mean) / unit (0 when invalid), c = 0/1 verdict, the denominators = grpo's (std + eps) / unit (group or
// batch). Normalised advantages are ratios of scaled values; unnormalised ones go back to reward units last.
RF_HD float advantage_of(int estimator, int scale, int sample_mode, float dev, float c, const GroupStats& st,
                         float group_denominator, float batch_denominator, float lam) {
  float a;
  switch (estimator) {
    case RF_GA_GRPO:
      a = scale == RF_GA_SCALE_GROUP ? div(dev, group_denominator)
          : scale == RF_GA_SCALE_BATCH ? div(dev, batch_denominator)
                                       : mul(dev, st.unit);
      break;
    case RF_GA_DR_GRPO:
      a = mul(dev, st.unit);
      break;
    case RF_GA_RLOO:  // r_i - mean_{j != i} r_j = n / (n - 1) (r_i - mean)
      a = mul(mul(dev, div(st.count, fmaxf(sub(st.count, 1.0f), 1.0f))), st.unit);
      break;
    case RF_GA_PSR:
      a = c;
      break;
    case RF_GA_NSR:
      a = sub(c, 1.0f);
      break;
    default:  // RF_GA_W_REINFORCE
      a = c > 0.5f ? lam : -1.0f;
      break;
  }
  // centred estimators: a group with nothing to compare gets exactly 0
  if (estimator <= RF_GA_RLOO && st.all_equal) a = 0.0f;
  if (sample_mode == RF_GA_SAMPLE_POSITIVE) a = fmaxf(a, 0.0f);
  if (sample_mode == RF_GA_SAMPLE_NEGATIVE) a = fminf(a, 0.0f);
  return a;
}

// (count, mean, M2) of a set of values, M2 held scaled: the sum of squared deviations is m2 * scale^2, with scale
// at least every |deviation| that went into it, so m2 stays near n and never overflows. mean and scale are in units
// of `unit` (a power of two, unit_of), so they stay below 4 for any finite values. combine() merges two disjoint
// sets (Chan, Golub & LeVeque 1979): both to the larger unit (an exact power-of-two ratio), then both M2s to the
// larger of their scales and the distance between the means.
struct Moments {
  float n, mean, m2, scale, unit;
};

RF_HD float squared_ratio(float x, float s) {
  const float r = div(x, s);
  return mul(r, r);
}

RF_HD Moments combine(const Moments& a, const Moments& b) {
  if (b.n == 0.0f) return a;
  if (a.n == 0.0f) return b;
  const float unit = fmaxf(a.unit, b.unit);
  const float fa = div(a.unit, unit), fb = div(b.unit, unit);  // powers of two <= 1
  const float a_mean = mul(a.mean, fa), b_mean = mul(b.mean, fb);
  const float a_scale = mul(a.scale, fa), b_scale = mul(b.scale, fb);
  const float n = add(a.n, b.n);
  const float delta = sub(b_mean, a_mean);
  const float mean = add(a_mean, mul(delta, div(b.n, n)));
  const float s = fmaxf(fmaxf(a_scale, b_scale), fabsf(delta));
  if (s == 0.0f) return Moments{n, mean, 0.0f, 0.0f, unit};
  const float within = add(mul(a.m2, squared_ratio(a_scale, s)), mul(b.m2, squared_ratio(b_scale, s)));
  const float between = mul(squared_ratio(delta, s), div(mul(a.n, b.n), n));
  return Moments{n, mean, add(within, between), s, unit};
}

// grpo's batch denominator (batch std + eps) in the units of a group of unit `group_unit` (the torch path's
// (b.std + eps / b.unit) * (b.unit / m.unit), operation by operation).
RF_HD float batch_denominator_in(float batch_std, float batch_unit, float eps, float group_unit) {
  return mul(add(batch_std, div(eps, batch_unit)), div(batch_unit, group_unit));
}

// Bessel-corrected std of a set whose squared deviations sum to m2 * scale^2; 0 below 2 values.
RF_HD float bessel_std(float m2, float n, float scale) {
  return mul(scale, sqrt_rn(div(m2, fmaxf(sub(n, 1.0f), 1.0f))));
}

// ---- team reductions -------------------------------------------------------------------------------------------

struct Sum {
  __device__ __forceinline__ float operator()(float a, float b) const { return add(a, b); }
};
struct Min {
  __device__ __forceinline__ float operator()(float a, float b) const { return fminf(a, b); }
};
struct Max {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Every lane of the team gets op over the team's lanes. All 32 lanes of each warp call it (teams without a group
// run along with neutral values), so full-mask shuffles are legal.
template <int TEAM, typename Op>
__device__ __forceinline__ float team_reduce(float x, Op op) {
  if constexpr (TEAM <= 32) {
#pragma unroll
    for (int offset = TEAM / 2; offset > 0; offset /= 2) x = op(x, __shfl_xor_sync(FULL_MASK, x, offset, TEAM));
    return x;
  } else {
    static_assert(TEAM == THREADS, "a team is at most a warp, or the whole block");
    __shared__ float partial[THREADS / 32];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) x = op(x, __shfl_xor_sync(FULL_MASK, x, offset));
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = x;
    __syncthreads();
    float r = partial[0];
#pragma unroll
    for (int w = 1; w < THREADS / 32; ++w) r = op(r, partial[w]);
    __syncthreads();  // partial is reused by the next reduction
    return r;
  }
}

__device__ __forceinline__ float load_reward(const void* rewards, int32_t dtype, int64_t i) {
  switch (dtype) {
    case RF_DTYPE_FLOAT32:
      return __ldg(static_cast<const float*>(rewards) + i);
    case RF_DTYPE_FLOAT64:
      return static_cast<float>(__ldg(static_cast<const double*>(rewards) + i));
    case RF_DTYPE_FLOAT16:
      return __half2float(__ushort_as_half(__ldg(static_cast<const unsigned short*>(rewards) + i)));
    default:  // RF_DTYPE_BFLOAT16
      return bf16_bits_to_float(__ldg(static_cast<const unsigned short*>(rewards) + i));
  }
}

__device__ __forceinline__ bool is_finite(float x) { return fabsf(x) < INFINITY; }

struct Pass1 {
  GroupStats stats;
  float n_correct;
  float m2;  // sum of squared deviations from the mean, divided by scale^2
  float scale;  // the group's largest |deviation| / unit (0 when all equal or empty)
};

// Passes 1 and 2 over group `group` (a team-uniform call; `active` false: the team has no group this round).
template <int TEAM>
__device__ __forceinline__ Pass1 group_statistics(const RfGroupAdvantageArgs& a, int64_t group, bool active,
                                                  int lane) {
  const int64_t G = a.group_size;
  const int64_t base = group * G;
  float count = 0.0f, lo = INFINITY, hi = -INFINITY, n_correct = 0.0f;
  for (int64_t j = lane; j < G; j += TEAM) {
    if (!active) break;
    const float r = load_reward(a.rewards, a.rewards_dtype, base + j);
    if (is_finite(r)) {
      count = add(count, 1.0f);
      lo = fminf(lo, r);
      hi = fmaxf(hi, r);
      if (a.correct != nullptr) n_correct = add(n_correct, __ldg(a.correct + base + j));
    }
  }
  count = team_reduce<TEAM>(count, Sum{});
  lo = team_reduce<TEAM>(lo, Min{});
  hi = team_reduce<TEAM>(hi, Max{});
  n_correct = team_reduce<TEAM>(n_correct, Sum{});
  const float unit = unit_of(count > 0.0f ? fmaxf(-lo, hi) : 0.0f);

  float sum = 0.0f;
  for (int64_t j = lane; j < G; j += TEAM) {
    if (!active) break;
    const float r = load_reward(a.rewards, a.rewards_dtype, base + j);
    if (is_finite(r)) sum = add(sum, div(r, unit));
  }
  sum = team_reduce<TEAM>(sum, Sum{});
  const float lo_u = div(lo, unit), hi_u = div(hi, unit);
  // the mean / unit, kept within [min, max] (rounding may not leave it; at float32's maximum it would overflow)
  const float mean = count > 0.0f ? fminf(fmaxf(div(sum, count), lo_u), hi_u) : 0.0f;
  const float top = count > 0.0f ? fmaxf(sub(hi_u, mean), sub(mean, lo_u)) : 0.0f;
  const float top_unit = top > 0.0f ? top : 1.0f;  // divide by 1 when every deviation is 0

  float sq = 0.0f;
  for (int64_t j = lane; j < G; j += TEAM) {
    if (!active) break;
    const float r = load_reward(a.rewards, a.rewards_dtype, base + j);
    if (is_finite(r)) {
      sq = add(sq, squared_ratio(sub(div(r, unit), mean), top_unit));
    }
  }
  sq = team_reduce<TEAM>(sq, Sum{});
  Pass1 out;
  out.stats = GroupStats{count, mean, bessel_std(sq, count, top), unit, hi == lo || count < 2.0f};
  out.n_correct = n_correct;
  out.m2 = sq;
  out.scale = top;
  return out;
}

// Pass 3 and the per-group outputs.
template <int TEAM>
__device__ __forceinline__ void write_group(const RfGroupAdvantageArgs& a, int64_t group, bool active, int lane,
                                            const Pass1& p1, float batch_std, float batch_unit) {
  if (!active) return;
  const GroupStats& st = p1.stats;
  const int64_t G = a.group_size;
  const int64_t base = group * G;
  const float group_denominator = add(st.std, div(a.eps, st.unit));
  const float batch_denominator = batch_denominator_in(batch_std, batch_unit, a.eps, st.unit);
  for (int64_t j = lane; j < G; j += TEAM) {
    const float r = load_reward(a.rewards, a.rewards_dtype, base + j);
    const bool valid = is_finite(r);
    const float c = (valid && a.correct != nullptr) ? __ldg(a.correct + base + j) : 0.0f;
    const float dev = valid ? sub(div(r, st.unit), st.mean) : 0.0f;
    const float adv = advantage_of(a.estimator, a.scale, a.sample_mode, dev, c, st, group_denominator,
                                   batch_denominator, a.lam);
    a.advantages[base + j] = valid ? adv : 0.0f;
  }
  if (lane == 0) {
    a.mean[group] = mul(st.mean, st.unit);
    a.std[group] = mul(st.std, st.unit);  // inf where the std itself is beyond float32's range
    a.all_equal[group] = st.all_equal ? 1 : 0;
    const bool has_correct = a.correct != nullptr;
    a.solve_rate[group] = has_correct ? div(p1.n_correct, fmaxf(st.count, 1.0f)) : 0.0f;
    a.all_correct[group] = (has_correct && p1.n_correct == st.count && st.count > 0.0f) ? 1 : 0;
    a.all_wrong[group] = (has_correct && p1.n_correct == 0.0f && st.count > 0.0f) ? 1 : 0;
  }
}

// BATCH: grpo with scale="batch", launched cooperatively (grid.sync()); scratch holds two float4 per block.
// Launched with THREADS threads. No __launch_bounds__: with it ptxas 13.0 squeezes some instantiations to 32
// registers and spills; without, 40-54 registers and no spill (csrc/check/compile_check.sh fails on any spill).
template <int TEAM, bool BATCH>
__global__ void group_advantage_kernel(RfGroupAdvantageArgs a, float4* scratch) {
  constexpr int TEAMS = THREADS / TEAM;  // groups per block per round
  const int team = static_cast<int>(threadIdx.x) / TEAM;
  const int lane = static_cast<int>(threadIdx.x) % TEAM;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * TEAMS;
  float batch_std = 0.0f, batch_unit = 1.0f;

  if constexpr (BATCH) {
    // Phase 1: (count, mean, M2) of this block's groups, combined in group order per team, then team order.
    Moments mine{0.0f, 0.0f, 0.0f, 0.0f, 1.0f};
    for (int64_t first = static_cast<int64_t>(blockIdx.x) * TEAMS; first < a.n_groups; first += stride) {
      const int64_t group = first + team;
      const bool active = group < a.n_groups;
      const Pass1 p1 = group_statistics<TEAM>(a, group, active, lane);
      if (active) mine = combine(mine, Moments{p1.stats.count, p1.stats.mean, p1.m2, p1.scale, p1.stats.unit});
    }
    __shared__ Moments per_team[TEAMS];
    __shared__ float shared_std, shared_unit;
    if (lane == 0) per_team[team] = mine;
    __syncthreads();
    if (threadIdx.x == 0) {
      Moments block = per_team[0];
      for (int t = 1; t < TEAMS; ++t) block = combine(block, per_team[t]);
      scratch[2 * blockIdx.x] = make_float4(block.n, block.mean, block.m2, block.scale);
      scratch[2 * blockIdx.x + 1] = make_float4(block.unit, 0.0f, 0.0f, 0.0f);
    }
    cooperative_groups::this_grid().sync();
    // Phase 2: every block combines the partials the same way: lane l of warp 0 folds blocks l, l + 32, ...,
    // then a fixed tree over the lanes (shfl_down: lane 0 ends with the total).
    if (threadIdx.x < 32) {
      Moments acc{0.0f, 0.0f, 0.0f, 0.0f, 1.0f};
      for (unsigned b = threadIdx.x; b < gridDim.x; b += 32) {
        const float4 t = scratch[2 * b];
        acc = combine(acc, Moments{t.x, t.y, t.z, t.w, scratch[2 * b + 1].x});
      }
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) {
        const Moments other{__shfl_down_sync(FULL_MASK, acc.n, offset), __shfl_down_sync(FULL_MASK, acc.mean, offset),
                            __shfl_down_sync(FULL_MASK, acc.m2, offset),
                            __shfl_down_sync(FULL_MASK, acc.scale, offset),
                            __shfl_down_sync(FULL_MASK, acc.unit, offset)};
        acc = combine(acc, other);
      }
      if (threadIdx.x == 0) {
        shared_std = bessel_std(acc.m2, acc.n, acc.scale);
        shared_unit = acc.unit;
      }
    }
    __syncthreads();
    batch_std = shared_std;
    batch_unit = shared_unit;
  }

  for (int64_t first = static_cast<int64_t>(blockIdx.x) * TEAMS; first < a.n_groups; first += stride) {
    const int64_t group = first + team;
    const bool active = group < a.n_groups;
    const Pass1 p1 = group_statistics<TEAM>(a, group, active, lane);
    write_group<TEAM>(a, group, active, lane, p1, batch_std, batch_unit);
  }
}

template <int TEAM>
int launch_team(const RfGroupAdvantageArgs& a, float* scratch, cudaStream_t stream) {
  constexpr int TEAMS = THREADS / TEAM;
  const int64_t blocks = (a.n_groups + TEAMS - 1) / TEAMS;
  if (a.estimator == RF_GA_GRPO && a.scale == RF_GA_SCALE_BATCH) {
    // Cooperative: every block must be resident at once (grid.sync); the grid strides over the groups.
    auto kernel = group_advantage_kernel<TEAM, true>;
    int device = 0, sms = 0, per_sm = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, THREADS, 0);
    if (err != cudaSuccess) return static_cast<int>(err);
    int64_t grid = blocks;
    if (grid > static_cast<int64_t>(sms) * per_sm) grid = static_cast<int64_t>(sms) * per_sm;
    if (grid > RF_GA_BATCH_MAX_BLOCKS) grid = RF_GA_BATCH_MAX_BLOCKS;
    if (grid < 1) grid = 1;
    RfGroupAdvantageArgs args = a;
    float4* partials = reinterpret_cast<float4*>(scratch);  // two per block
    void* params[] = {&args, &partials};
    err = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(static_cast<unsigned>(grid)),
                                      dim3(THREADS), params, 0, stream);
    const cudaError_t last = cudaGetLastError();  // also clears a failed launch's error for later callers
    return static_cast<int>(err != cudaSuccess ? err : last);
  }
  // One round per block when the grid allows it; the grid-stride loop covers the rest.
  const int64_t grid = blocks < 0x7fffffff ? blocks : 0x7fffffff;
  group_advantage_kernel<TEAM, false>
      <<<static_cast<unsigned>(grid), THREADS, 0, stream>>>(a, static_cast<float4*>(nullptr));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace group_advantage
}  // namespace rf

extern "C" int rf_group_advantage_launch(const RfGroupAdvantageArgs* args, float* scratch, void* stream) {
  using namespace rf::group_advantage;
  const RfGroupAdvantageArgs& a = *args;
  if (a.n_groups < 0 || a.group_size < 1) return RF_ERR_SHAPE;
  if (a.rewards_dtype < RF_DTYPE_FLOAT32 || a.rewards_dtype > RF_DTYPE_FLOAT64) return RF_ERR_DTYPE;
  if (a.estimator < RF_GA_GRPO || a.estimator > RF_GA_W_REINFORCE || a.scale < RF_GA_SCALE_GROUP ||
      a.scale > RF_GA_SCALE_NONE || a.sample_mode < RF_GA_SAMPLE_ALL || a.sample_mode > RF_GA_SAMPLE_NEGATIVE)
    return RF_ERR_CODE;
  if (a.estimator == RF_GA_GRPO && a.scale == RF_GA_SCALE_BATCH && scratch == nullptr) return RF_ERR_SHAPE;
  if (a.n_groups == 0) return RF_OK;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int64_t G = a.group_size;
  if (G > RF_GA_WARP_MAX_GROUP) return launch_team<THREADS>(a, scratch, s);
  if (G > 16) return launch_team<32>(a, scratch, s);
  if (G > 8) return launch_team<16>(a, scratch, s);
  if (G > 4) return launch_team<8>(a, scratch, s);
  return launch_team<4>(a, scratch, s);  // G <= 4: a few idle lanes cost less than two more instantiations
}
