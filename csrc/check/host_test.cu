// Host test of the CUDA kernels' building blocks, without torch (csrc/check/compile_check.sh builds and runs it).
//
// One translation unit includes both kernel files, so the __host__ __device__ pieces the kernels are made of run
// here on the CPU, bit for bit as on the device (rf_math.cuh never contracts or approximates):
//   - bf16 round-to-nearest-even against cuda_bf16.h's own host conversion, on specials and 2^20 random floats;
//   - one AdamW entry update against the same formula in double precision, over many steps;
//   - the segment lookup (binary search) against a linear scan; the tile count and the vector-I/O flag;
//   - the advantage formulas and the (count, mean, M2) combination against direct double computations;
//   - the C ABI's argument errors (and, without a GPU, that a launch reports an error instead of crashing).
// With a CUDA device present it also launches both kernels on small inputs and checks the device results equal
// the host functions bit for bit.

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "../group_advantage.cu"
#include "../sparse_adamw.cu"

namespace {

int failures = 0;

#define EXPECT(cond, ...)                                    \
  do {                                                       \
    if (!(cond)) {                                           \
      ++failures;                                            \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                              \
      std::printf("\n");                                     \
    }                                                        \
  } while (0)

uint16_t cuda_bf16_bits(float x) {
  const __nv_bfloat16 b = __float2bfloat16_rn(x);
  uint16_t u;
  std::memcpy(&u, &b, sizeof(u));
  return u;
}

void test_bf16_rounding() {
  const float specials[] = {0.0f, -0.0f, 1.0f, -1.0f, INFINITY, -INFINITY, 3.0e38f, -3.0e38f, 1e-40f, -1e-40f,
                            1.00390625f /* 1 + 2^-8: a tie, rounds to even 1.0 */,
                            1.01171875f /* 1 + 3 * 2^-8: a tie, rounds up */, 65504.0f, 3.3895314e38f};
  for (float x : specials) {
    EXPECT(rf::bf16_bits_rne(x) == cuda_bf16_bits(x), "x=%a ours=0x%04x cuda=0x%04x", x, rf::bf16_bits_rne(x),
           cuda_bf16_bits(x));
  }
  EXPECT(rf::bf16_bits_rne(1.00390625f) == 0x3F80, "tie to even");
  EXPECT(rf::bf16_bits_rne(1.01171875f) == 0x3F82, "tie up to even");
  EXPECT(rf::bf16_bits_rne(3.4e38f) == 0x7F80, "overflow rounds to inf");
  EXPECT(rf::bf16_bits_rne(NAN) == 0x7FC0, "NaN is torch's canonical 0x7FC0");
  std::mt19937 rng(1234);
  int mismatches = 0;
  for (int i = 0; i < (1 << 20); ++i) {
    const float x = rf::bits_float(static_cast<uint32_t>(rng()));
    if (x != x) continue;  // cuda_bf16.h keeps NaN payloads; torch and we return 0x7FC0 (checked above)
    if (rf::bf16_bits_rne(x) != cuda_bf16_bits(x)) ++mismatches;
    const uint16_t b = rf::bf16_bits_rne(x);
    if (rf::bf16_bits_rne(rf::bf16_bits_to_float(b)) != b) ++mismatches;  // bf16 -> fp32 -> bf16 is exact
  }
  EXPECT(mismatches == 0, "%d random floats round differently from cuda_bf16.h", mismatches);
}

rf::sparse_adamw::Coeffs coeffs(double lr, double beta1, double beta2, double eps, double wd, int step) {
  return rf::sparse_adamw::Coeffs{static_cast<float>(1.0 - lr * wd),
                                  static_cast<float>(1.0 - beta1),
                                  static_cast<float>(beta2),
                                  static_cast<float>(1.0 - beta2),
                                  static_cast<float>(lr / (1.0 - std::pow(beta1, step))),
                                  static_cast<float>(std::sqrt(1.0 - std::pow(beta2, step))),
                                  static_cast<float>(eps)};
}

void test_adamw_entry() {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const double lr = 1e-2, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, wd = 0.1;
  double worst = 0.0;
  for (int trial = 0; trial < 2000; ++trial) {
    float p = normal(rng), m = 0.0f, v = 0.0f;
    double pd = p, md = 0.0, vd = 0.0;
    for (int t = 1; t <= 20; ++t) {
      const float g = normal(rng) * 1e-2f;
      rf::sparse_adamw::adamw_entry(p, m, v, g, coeffs(lr, beta1, beta2, eps, wd, t));
      pd *= 1.0 - lr * wd;
      md = beta1 * md + (1.0 - beta1) * g;
      vd = beta2 * vd + (1.0 - beta2) * static_cast<double>(g) * g;
      pd -= lr / (1.0 - std::pow(beta1, t)) * md / (std::sqrt(vd) / std::sqrt(1.0 - std::pow(beta2, t)) + eps);
    }
    worst = std::fmax(worst, std::fabs(p - pd) / std::fmax(std::fabs(pd), 1.0));  // parameters are O(1)
    EXPECT(std::fabs(m - md) <= 1e-5 * std::fabs(md) + 1e-9, "exp_avg %g vs %g", m, md);
    EXPECT(std::fabs(v - vd) <= 1e-5 * std::fabs(vd) + 1e-12, "exp_avg_sq %g vs %g", v, vd);
  }
  EXPECT(worst < 2e-6, "worst parameter error after 20 steps %g", worst);
  std::printf("adamw_entry: worst error after 20 steps vs double: %.3g\n", worst);

  // lerp at weight 1 (beta1 = 0) is exact: m == g
  float p = 0.5f, m = 3.0f, v = 0.0f;
  rf::sparse_adamw::adamw_entry(p, m, v, 0.25f, coeffs(1e-3, 0.0, 0.999, 1e-8, 0.0, 1));
  EXPECT(m == 0.25f, "m=%a", m);
  // lr = 0: the parameter keeps its bits
  p = 0.1234567f;
  m = 0.0f, v = 0.0f;
  rf::sparse_adamw::adamw_entry(p, m, v, 2.0f, coeffs(0.0, 0.9, 0.999, 1e-8, 0.1, 1));
  EXPECT(p == 0.1234567f, "p=%a", p);
  // a NaN gradient propagates (as torch.optim.AdamW)
  p = 1.0f, m = 0.0f, v = 0.0f;
  rf::sparse_adamw::adamw_entry(p, m, v, NAN, coeffs(1e-3, 0.9, 0.999, 1e-8, 0.0, 1));
  EXPECT(p != p && m != m && v != v, "NaN must propagate");
}

void test_segment_lookup() {
  std::mt19937 rng(3);
  for (int trial = 0; trial < 300; ++trial) {
    const int n = 1 + static_cast<int>(rng() % 300);
    std::vector<int32_t> first(n);
    int32_t tiles = 0;
    for (int i = 0; i < n; ++i) {
      first[i] = tiles;
      tiles += static_cast<int32_t>(rf_sparse_adamw_tiles(1 + static_cast<int64_t>(rng() % 20000)));
    }
    for (int32_t b = 0; b < tiles; ++b) {
      int32_t expected = 0;
      while (expected + 1 < n && first[expected + 1] <= b) ++expected;
      const int32_t got = rf::sparse_adamw::find_segment(first.data(), n, b);
      if (got != expected) {
        EXPECT(got == expected, "n=%d tile=%d got %d expected %d", n, b, got, expected);
        return;
      }
    }
  }
  EXPECT(rf_sparse_adamw_tiles(1) == 1 && rf_sparse_adamw_tiles(RF_SPARSE_ADAMW_TILE) == 1 &&
             rf_sparse_adamw_tiles(RF_SPARSE_ADAMW_TILE + 1) == 2 && rf_sparse_adamw_tiles(3000000000LL) == 732422,
         "tile counts");
  EXPECT(rf_sparse_adamw_flags(1, 4096, 8192, 4) == (RF_SEG_DENSE | RF_SEG_VECTOR_IO), "aligned dense fp32");
  EXPECT(rf_sparse_adamw_flags(1, 4096 + 4, 8192, 4) == RF_SEG_DENSE, "misaligned dense fp32: scalar path");
  EXPECT(rf_sparse_adamw_flags(1, 4096 + 8, 8192, 2) == (RF_SEG_DENSE | RF_SEG_VECTOR_IO), "bf16: 8-byte vectors");
  EXPECT(rf_sparse_adamw_flags(0, 4096, 8192, 4) == 0, "masked segments gather");
}

// The kernel's per-group statistics (pass 0-2 of group_statistics) on the host, one lane: the values in units of
// unit_of(max |r|), the mean clamped to [min, max], the scale-invariant std.
rf::group_advantage::Pass1 host_group_statistics(const std::vector<float>& r) {
  using namespace rf;
  float count = 0.0f, lo = INFINITY, hi = -INFINITY;
  for (float x : r) count = add(count, 1.0f), lo = fminf(lo, x), hi = fmaxf(hi, x);
  const float unit = group_advantage::unit_of(fmaxf(-lo, hi));
  float sum = 0.0f;
  for (float x : r) sum = add(sum, div(x, unit));
  const float lo_u = div(lo, unit), hi_u = div(hi, unit);
  const float mean = fminf(fmaxf(div(sum, count), lo_u), hi_u);
  const float top = fmaxf(sub(hi_u, mean), sub(mean, lo_u));
  float sq = 0.0f;
  for (float x : r) sq = add(sq, group_advantage::squared_ratio(sub(div(x, unit), mean), top > 0.0f ? top : 1.0f));
  group_advantage::Pass1 p;
  p.stats = group_advantage::GroupStats{count, mean, group_advantage::bessel_std(sq, count, top), unit, hi == lo};
  p.n_correct = 0.0f, p.m2 = sq, p.scale = top;
  return p;
}

// Finite rewards near float32's maximum give finite, correct advantages (the sums, means, stds and
// deviations of the kernel are all taken in units of a power of two near the largest |reward|).
void test_near_float_max() {
  using rf::group_advantage::advantage_of;
  using rf::group_advantage::unit_of;
  EXPECT(unit_of(0.0f) == 1.0f && unit_of(0.75f) == 1.0f && unit_of(1.0f) == 1.0f && unit_of(3.0f) == 2.0f,
         "unit_of small");
  EXPECT(unit_of(3.4e38f) == std::ldexp(1.0f, 127) && unit_of(1e-40f) == 1.0f, "unit_of at the extremes");
  struct Case {
    std::vector<float> r;
  };
  const Case cases[] = {{{3e38f, -3e38f}}, {{3.4e38f, 3.3e38f}}, {{3.4e38f, -3.4e38f, 1.0f}},
                        {{3.4028235e38f, 3.4028235e38f, 3.4028235e38f}}, {{1.0f, 0.0f, 0.0f, 2.0f, 5.0f}}};
  for (const Case& cs : cases) {
    const std::vector<float>& r = cs.r;
    const rf::group_advantage::Pass1 p = host_group_statistics(r);
    const auto& st = p.stats;
    double mu = 0.0;
    for (float x : r) mu += x;
    mu /= r.size();
    double q = 0.0;
    for (float x : r) q += (x - mu) * (x - mu);
    const double sd = std::sqrt(q / (r.size() - 1));
    const double mean = static_cast<double>(st.mean) * st.unit;
    EXPECT(std::isfinite(mean) && std::fabs(mean - mu) <= 1e-6 * std::fabs(r[0]), "mean %g vs %g", mean, mu);
    for (float x : r) {
      const float dev = rf::sub(rf::div(x, st.unit), st.mean);
      const float a = advantage_of(RF_GA_GRPO, RF_GA_SCALE_GROUP, RF_GA_SAMPLE_ALL, dev, 0.0f, st,
                                   rf::add(st.std, rf::div(1e-6f, st.unit)), 1.0f, 0.1f);
      const double want = st.all_equal ? 0.0 : (x - mu) / (sd + 1e-6);
      EXPECT(std::isfinite(a) && std::fabs(a - want) <= 1e-5 * (1.0 + std::fabs(want)), "grpo adv %g vs %g (r=%g)",
             a, want, x);
      const float b = advantage_of(RF_GA_DR_GRPO, RF_GA_SCALE_NONE, RF_GA_SAMPLE_ALL, dev, 0.0f, st, 1.0f, 1.0f,
                                   0.1f);
      const double want_b = st.all_equal ? 0.0 : x - mu;
      // a difference beyond float32's range is inf (the op raises on it); every other one is finite and right
      if (std::fabs(want_b) < 3.4e38)
        EXPECT(std::isfinite(b) && std::fabs(b - want_b) <= 1e-6 * std::fabs(r[0]), "dr_grpo %g vs %g", b, want_b);
    }
  }
  // Chan's combination of groups in different units, with means of opposite signs near the maximum
  rf::group_advantage::Moments acc{0.0f, 0.0f, 0.0f, 0.0f, 1.0f};
  const std::vector<std::vector<float>> parts = {{3.4e38f, 3.3e38f}, {-3.4e38f, -3.0e38f}, {1.0f, 2.0f}};
  std::vector<double> all;
  for (const auto& part : parts) {
    const rf::group_advantage::Pass1 p = host_group_statistics(part);
    acc = rf::group_advantage::combine(acc, {p.stats.count, p.stats.mean, p.m2, p.scale, p.stats.unit});
    all.insert(all.end(), part.begin(), part.end());
  }
  double mu = 0.0, q = 0.0;
  for (double x : all) mu += x;
  mu /= all.size();
  for (double x : all) q += (x - mu) * (x - mu);
  const double sd = std::sqrt(q / (all.size() - 1));
  const double got = static_cast<double>(rf::group_advantage::bessel_std(acc.m2, acc.n, acc.scale)) * acc.unit;
  EXPECT(std::fabs(got - sd) <= 1e-5 * sd, "batch std near the maximum %g vs %g", got, sd);
  const float den = rf::group_advantage::batch_denominator_in(
      rf::group_advantage::bessel_std(acc.m2, acc.n, acc.scale), acc.unit, 1e-6f, 1.0f);
  const float a = rf::div(0.5f, den);  // the reward 2 of the group {1, 2} (dev 0.5 in its unit of 1)
  EXPECT(std::isfinite(a) && std::fabs(a - 0.5 / sd) <= 1e-5 * (0.5 / sd) + 1e-45, "batch adv %g vs %g", a, 0.5 / sd);
}

void test_advantage_formulas() {
  using rf::group_advantage::advantage_of;
  using rf::group_advantage::GroupStats;
  // Group [1, 0, 0, 0]: mean 0.25, Bessel std 0.5; eps 0.5 -> the success gets 0.75 / 1.0 = 0.75.
  const GroupStats st{4.0f, 0.25f, 0.5f, 1.0f, false};
  EXPECT(advantage_of(RF_GA_GRPO, RF_GA_SCALE_GROUP, RF_GA_SAMPLE_ALL, 0.75f, 0.0f, st, 1.0f, 9.0f, 0.1f) == 0.75f,
         "grpo group");
  EXPECT(advantage_of(RF_GA_GRPO, RF_GA_SCALE_BATCH, RF_GA_SAMPLE_ALL, 0.75f, 0.0f, st, 1.0f, 3.0f, 0.1f) == 0.25f,
         "grpo batch");
  EXPECT(advantage_of(RF_GA_GRPO, RF_GA_SCALE_NONE, RF_GA_SAMPLE_ALL, 0.75f, 0.0f, st, 1.0f, 3.0f, 0.1f) == 0.75f,
         "grpo none");
  EXPECT(advantage_of(RF_GA_RLOO, RF_GA_SCALE_NONE, RF_GA_SAMPLE_ALL, 0.75f, 0.0f, st, 1.0f, 1.0f, 0.1f) == 1.0f,
         "rloo: 1 - mean of the others (0) = 4/3 * 0.75");
  EXPECT(advantage_of(RF_GA_NSR, RF_GA_SCALE_NONE, RF_GA_SAMPLE_ALL, 0.0f, 0.0f, st, 1.0f, 1.0f, 0.1f) == -1.0f,
         "nsr wrong");
  EXPECT(advantage_of(RF_GA_PSR, RF_GA_SCALE_NONE, RF_GA_SAMPLE_ALL, 0.0f, 1.0f, st, 1.0f, 1.0f, 0.1f) == 1.0f,
         "psr right");
  EXPECT(advantage_of(RF_GA_W_REINFORCE, RF_GA_SCALE_NONE, RF_GA_SAMPLE_ALL, 0.0f, 1.0f, st, 1.0f, 1.0f, 0.3f) ==
             0.3f,
         "w_reinforce right -> lam");
  EXPECT(advantage_of(RF_GA_W_REINFORCE, RF_GA_SCALE_NONE, RF_GA_SAMPLE_POSITIVE, 0.0f, 0.0f, st, 1.0f, 1.0f,
                      0.3f) == 0.0f,
         "positive_only clamps -1");
  EXPECT(advantage_of(RF_GA_DR_GRPO, RF_GA_SCALE_NONE, RF_GA_SAMPLE_NEGATIVE, 0.75f, 0.0f, st, 1.0f, 1.0f, 0.1f) ==
             0.0f,
         "negative_only clamps 0.75");
  const GroupStats flat{4.0f, 2.0f, 0.0f, 2.0f, true};
  for (int e = RF_GA_GRPO; e <= RF_GA_RLOO; ++e) {
    EXPECT(advantage_of(e, e == RF_GA_GRPO ? RF_GA_SCALE_GROUP : RF_GA_SCALE_NONE, RF_GA_SAMPLE_ALL, 0.0f, 1.0f,
                        flat, 1e-6f, 1.0f, 0.1f) == 0.0f,
           "centred estimator %d on an all-equal group", e);
  }
  EXPECT(advantage_of(RF_GA_NSR, RF_GA_SCALE_NONE, RF_GA_SAMPLE_ALL, 0.0f, 0.0f, flat, 1.0f, 1.0f, 0.1f) == -1.0f,
         "nsr is not centred");

  // (count, mean, scaled M2) combined pairwise over random splits == the two-pass statistics in double, at ordinary
  // magnitudes and at 1e20 (where unscaled squares overflow float32)
  std::mt19937 rng(11);
  for (const float magnitude : {1.0f, 1e20f}) {
    std::normal_distribution<float> normal(0.5f * magnitude, 3.0f * magnitude);
    for (int trial = 0; trial < 200; ++trial) {
      const int n = 2 + static_cast<int>(rng() % 500);
      std::vector<float> x(n);
      for (float& xi : x) xi = normal(rng);
      rf::group_advantage::Moments acc{0.0f, 0.0f, 0.0f, 0.0f, 1.0f};
      for (int lo = 0; lo < n;) {
        const int step = 1 + static_cast<int>(rng() % 40);
        const int hi = lo + step > n ? n : lo + step;
        float sum = 0.0f;
        for (int i = lo; i < hi; ++i) sum += x[i];
        const float mean = sum / static_cast<float>(hi - lo);
        float top = 0.0f;
        for (int i = lo; i < hi; ++i) top = std::fmax(top, std::fabs(x[i] - mean));
        const float unit = top > 0.0f ? top : 1.0f;
        float m2 = 0.0f;
        for (int i = lo; i < hi; ++i) m2 += ((x[i] - mean) / unit) * ((x[i] - mean) / unit);
        acc = rf::group_advantage::combine(acc, {static_cast<float>(hi - lo), mean, m2, top, 1.0f});
        lo = hi;
      }
      double mean = 0.0, m2 = 0.0;
      for (float xi : x) mean += xi;
      mean /= n;
      for (float xi : x) m2 += (xi - mean) * (xi - mean);
      const double std_ref = std::sqrt(m2 / (n - 1));
      const double std_got = rf::group_advantage::bessel_std(acc.m2, acc.n, acc.scale);
      EXPECT(acc.n == static_cast<float>(n), "count");
      EXPECT(std::fabs(acc.mean - mean) <= 1e-5 * (std::fabs(mean) + 3.0 * magnitude), "mean %g vs %g", acc.mean,
             mean);
      EXPECT(std::isfinite(std_got) && std::fabs(std_got - std_ref) <= 1e-5 * std_ref, "std %g vs %g (magnitude %g)",
             std_got, std_ref, magnitude);
    }
  }
  test_near_float_max();
  EXPECT(rf::group_advantage::bessel_std(0.0f, 1.0f, 0.0f) == 0.0f &&
             rf::group_advantage::bessel_std(0.0f, 0.0f, 0.0f) == 0.0f,
         "std of fewer than 2 values is 0");
}

void test_abi_errors(bool have_device) {
  RfGroupAdvantageArgs a;
  std::memset(&a, 0, sizeof(a));
  a.n_groups = 1;
  a.group_size = 4;
  a.estimator = 9;
  EXPECT(rf_group_advantage_launch(&a, nullptr, nullptr) == RF_ERR_CODE, "estimator code out of range");
  a.estimator = RF_GA_GRPO;
  a.rewards_dtype = 7;
  EXPECT(rf_group_advantage_launch(&a, nullptr, nullptr) == RF_ERR_DTYPE, "rewards dtype out of range");
  a.rewards_dtype = RF_DTYPE_FLOAT32;
  a.scale = RF_GA_SCALE_BATCH;
  EXPECT(rf_group_advantage_launch(&a, nullptr, nullptr) == RF_ERR_SHAPE, "batch scale needs scratch");
  a.n_groups = 0;
  a.scale = RF_GA_SCALE_GROUP;
  EXPECT(rf_group_advantage_launch(&a, nullptr, nullptr) == RF_OK, "no groups: nothing to launch");
  EXPECT(rf_sparse_adamw_launch(nullptr, nullptr, 1, 1, nullptr, 4, nullptr, nullptr, 5, nullptr) == RF_ERR_DTYPE,
         "param dtype out of range");
  EXPECT(rf_sparse_adamw_launch(nullptr, nullptr, 1, 1, nullptr, 2, nullptr, nullptr, RF_DTYPE_FLOAT32, nullptr) ==
             RF_ERR_INDEX_BYTES,
         "index bytes");
  EXPECT(rf_sparse_adamw_launch(nullptr, nullptr, 0, 0, nullptr, 4, nullptr, nullptr, RF_DTYPE_FLOAT32, nullptr) ==
             RF_OK,
         "empty step");
  if (!have_device) {
    const int rc =
        rf_sparse_adamw_launch(nullptr, nullptr, 1, 1, nullptr, 4, nullptr, nullptr, RF_DTYPE_FLOAT32, nullptr);
    EXPECT(rc > 0, "a launch without a device must report a CUDA error, got %d", rc);
    std::printf("launch without a GPU reports: %s\n", rf_error_string(rc));
  }
}

// ---- with a GPU: the kernels against the host functions, bit for bit ---------------------------------------------

#define CUDA_OK(call)                                                                                \
  do {                                                                                               \
    const cudaError_t e_ = (call);                                                                   \
    if (e_ != cudaSuccess) {                                                                         \
      ++failures;                                                                                    \
      std::printf("FAIL %s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_));       \
      return;                                                                                        \
    }                                                                                                \
  } while (0)

void test_sparse_adamw_on_device() {
  // two segments: a masked one (every 3rd position of 10000, several tiles and a partial vector) and a dense one
  const int64_t numel0 = 10000, numel1 = 4099;
  std::vector<int32_t> idx;
  for (int32_t i = 0; i < numel0; i += 3) idx.push_back(i);
  const int64_t count0 = static_cast<int64_t>(idx.size());
  const int64_t start1 = (count0 + RF_ENTRY_ALIGN - 1) / RF_ENTRY_ALIGN * RF_ENTRY_ALIGN;
  const int64_t entries = start1 + numel1;
  idx.resize(start1, 0);
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> p0(numel0), g0(numel0), p1(numel1), g1(numel1), m(entries), v(entries);
  for (float& x : p0) x = normal(rng);
  for (float& x : g0) x = normal(rng);
  for (float& x : p1) x = normal(rng);
  for (float& x : g1) x = normal(rng);
  for (float& x : m) x = normal(rng) * 0.1f;
  for (float& x : v) x = std::fabs(normal(rng)) * 0.01f;

  float *dp0, *dg0, *dp1, *dg1, *dm, *dv;
  int32_t* didx;
  CUDA_OK(cudaMalloc(&dp0, numel0 * 4));
  CUDA_OK(cudaMalloc(&dg0, numel0 * 4));
  CUDA_OK(cudaMalloc(&dp1, numel1 * 4));
  CUDA_OK(cudaMalloc(&dg1, numel1 * 4));
  CUDA_OK(cudaMalloc(&dm, entries * 4));
  CUDA_OK(cudaMalloc(&dv, entries * 4));
  CUDA_OK(cudaMalloc(&didx, start1 * 4));
  CUDA_OK(cudaMemcpy(dp0, p0.data(), numel0 * 4, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(dg0, g0.data(), numel0 * 4, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(dp1, p1.data(), numel1 * 4, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(dg1, g1.data(), numel1 * 4, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(dm, m.data(), entries * 4, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(dv, v.data(), entries * 4, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(didx, idx.data(), start1 * 4, cudaMemcpyHostToDevice));

  const rf::sparse_adamw::Coeffs c = coeffs(1e-2, 0.9, 0.999, 1e-8, 0.1, 3);
  RfAdamwSegment segs[2];
  const int64_t counts[2] = {count0, numel1}, starts[2] = {0, start1};
  float* params[2] = {dp0, dp1};
  float* grads[2] = {dg0, dg1};
  int32_t first[2];
  int32_t tiles = 0;
  for (int s = 0; s < 2; ++s) {
    first[s] = tiles;
    tiles += static_cast<int32_t>(rf_sparse_adamw_tiles(counts[s]));
    segs[s] = RfAdamwSegment{starts[s], counts[s], reinterpret_cast<uint64_t>(grads[s]),
                             reinterpret_cast<uint64_t>(params[s]), c.decay, c.w1, c.beta2, c.w2, c.step_size,
                             c.bc2_sqrt, c.eps,
                             rf_sparse_adamw_flags(s == 1, reinterpret_cast<uint64_t>(params[s]),
                                                   reinterpret_cast<uint64_t>(grads[s]), 4)};
  }
  int32_t* dfirst;
  RfAdamwSegment* dsegs;
  CUDA_OK(cudaMalloc(&dfirst, sizeof(first)));
  CUDA_OK(cudaMalloc(&dsegs, sizeof(segs)));
  CUDA_OK(cudaMemcpy(dfirst, first, sizeof(first), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(dsegs, segs, sizeof(segs), cudaMemcpyHostToDevice));
  const int rc = rf_sparse_adamw_launch(dfirst, dsegs, 2, tiles, didx, 4, dm, dv, RF_DTYPE_FLOAT32, nullptr);
  EXPECT(rc == RF_OK, "launch: %s", rf_error_string(rc));
  CUDA_OK(cudaDeviceSynchronize());

  // host: the same function on the same inputs
  std::vector<float> hp0 = p0, hp1 = p1, hm = m, hv = v;
  for (int64_t e = 0; e < count0; ++e) rf::sparse_adamw::adamw_entry(hp0[idx[e]], hm[e], hv[e], g0[idx[e]], c);
  for (int64_t e = 0; e < numel1; ++e) rf::sparse_adamw::adamw_entry(hp1[e], hm[start1 + e], hv[start1 + e], g1[e], c);
  std::vector<float> rp0(numel0), rp1(numel1), rm(entries), rv(entries);
  CUDA_OK(cudaMemcpy(rp0.data(), dp0, numel0 * 4, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(rp1.data(), dp1, numel1 * 4, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(rm.data(), dm, entries * 4, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(rv.data(), dv, entries * 4, cudaMemcpyDeviceToHost));
  EXPECT(std::memcmp(rp0.data(), hp0.data(), numel0 * 4) == 0, "masked parameter differs from the host (or an "
                                                                 "unmasked entry was written)");
  EXPECT(std::memcmp(rp1.data(), hp1.data(), numel1 * 4) == 0, "dense parameter differs from the host");
  EXPECT(std::memcmp(rm.data(), hm.data(), entries * 4) == 0, "exp_avg differs (or padding was written)");
  EXPECT(std::memcmp(rv.data(), hv.data(), entries * 4) == 0, "exp_avg_sq differs (or padding was written)");
  for (void* ptr : {static_cast<void*>(dp0), static_cast<void*>(dg0), static_cast<void*>(dp1), static_cast<void*>(dg1),
                    static_cast<void*>(dm), static_cast<void*>(dv), static_cast<void*>(didx),
                    static_cast<void*>(dfirst), static_cast<void*>(dsegs)})
    cudaFree(ptr);
}

void test_group_advantage_on_device() {
  for (int64_t G : {1, 5, 16, 33, 3000}) {
    for (int scale : {RF_GA_SCALE_GROUP, RF_GA_SCALE_BATCH}) {
      const int64_t n_groups = 37, n = n_groups * G;
      std::mt19937 rng(static_cast<unsigned>(G));
      std::vector<float> r(n), c(n);
      for (int64_t i = 0; i < n; ++i) {
        r[i] = static_cast<float>(rng() % 3);
        c[i] = static_cast<float>(rng() % 2);
      }
      if (n > 7) r[7] = NAN;  // masked out
      float *dr, *dc, *dadv, *dmean, *dstd, *dsolve, *dscratch;
      int8_t* dflags;
      CUDA_OK(cudaMalloc(&dr, n * 4));
      CUDA_OK(cudaMalloc(&dc, n * 4));
      CUDA_OK(cudaMalloc(&dadv, n * 4));
      CUDA_OK(cudaMalloc(&dmean, n_groups * 4));
      CUDA_OK(cudaMalloc(&dstd, n_groups * 4));
      CUDA_OK(cudaMalloc(&dsolve, n_groups * 4));
      CUDA_OK(cudaMalloc(&dflags, 3 * n_groups));
      CUDA_OK(cudaMalloc(&dscratch, RF_GA_SCRATCH_FLOATS * 4));
      CUDA_OK(cudaMemcpy(dr, r.data(), n * 4, cudaMemcpyHostToDevice));
      CUDA_OK(cudaMemcpy(dc, c.data(), n * 4, cudaMemcpyHostToDevice));
      RfGroupAdvantageArgs a;
      std::memset(&a, 0, sizeof(a));
      a.rewards = dr, a.correct = dc, a.advantages = dadv, a.mean = dmean, a.std = dstd, a.solve_rate = dsolve;
      a.all_equal = dflags, a.all_correct = dflags + n_groups, a.all_wrong = dflags + 2 * n_groups;
      a.n_groups = n_groups, a.group_size = G, a.rewards_dtype = RF_DTYPE_FLOAT32, a.estimator = RF_GA_GRPO;
      a.scale = scale, a.sample_mode = RF_GA_SAMPLE_ALL, a.eps = 1e-6f, a.lam = 0.1f;
      const int rc = rf_group_advantage_launch(&a, dscratch, nullptr);
      EXPECT(rc == RF_OK, "launch: %s", rf_error_string(rc));
      CUDA_OK(cudaDeviceSynchronize());
      std::vector<float> adv(n), mean(n_groups), stdv(n_groups);
      CUDA_OK(cudaMemcpy(adv.data(), dadv, n * 4, cudaMemcpyDeviceToHost));
      CUDA_OK(cudaMemcpy(mean.data(), dmean, n_groups * 4, cudaMemcpyDeviceToHost));
      CUDA_OK(cudaMemcpy(stdv.data(), dstd, n_groups * 4, cudaMemcpyDeviceToHost));
      // double-precision expectation
      double bsum = 0.0, bcnt = 0.0;
      for (float x : r)
        if (std::isfinite(x)) bsum += x, bcnt += 1;
      double bm2 = 0.0;
      for (float x : r)
        if (std::isfinite(x)) bm2 += (x - bsum / bcnt) * (x - bsum / bcnt);
      const double batch_std = bcnt > 1 ? std::sqrt(bm2 / (bcnt - 1)) : 0.0;
      for (int64_t gi = 0; gi < n_groups; ++gi) {
        double s = 0.0, k = 0.0, lo = INFINITY, hi = -INFINITY;
        for (int64_t j = 0; j < G; ++j) {
          const float x = r[gi * G + j];
          if (std::isfinite(x)) s += x, k += 1, lo = std::fmin(lo, x), hi = std::fmax(hi, x);
        }
        const double mu = k > 0 ? s / k : 0.0;
        double q = 0.0;
        for (int64_t j = 0; j < G; ++j) {
          const float x = r[gi * G + j];
          if (std::isfinite(x)) q += (x - mu) * (x - mu);
        }
        const double sd = std::sqrt(q / std::fmax(k - 1, 1.0));
        EXPECT(std::fabs(mean[gi] - mu) <= 1e-5 * (1 + std::fabs(mu)), "G=%lld mean %g vs %g", (long long)G,
               mean[gi], mu);
        EXPECT(std::fabs(stdv[gi] - sd) <= 1e-5 * (1 + sd), "G=%lld std %g vs %g", (long long)G, stdv[gi], sd);
        const bool equal = k < 2 || hi == lo;
        for (int64_t j = 0; j < G; ++j) {
          const float x = r[gi * G + j];
          const double den = (scale == RF_GA_SCALE_BATCH ? batch_std : sd) + 1e-6;
          const double want = (!std::isfinite(x) || equal) ? 0.0 : (x - mu) / den;
          EXPECT(std::fabs(adv[gi * G + j] - want) <= 1e-4 * (1 + std::fabs(want)), "G=%lld scale=%d adv %g vs %g",
                 (long long)G, scale, adv[gi * G + j], want);
        }
      }
      for (void* ptr : {static_cast<void*>(dr), static_cast<void*>(dc), static_cast<void*>(dadv),
                        static_cast<void*>(dmean), static_cast<void*>(dstd), static_cast<void*>(dsolve),
                        static_cast<void*>(dflags), static_cast<void*>(dscratch)})
        cudaFree(ptr);
    }
  }
}

}  // namespace

int main() {
  test_bf16_rounding();
  test_adamw_entry();
  test_segment_lookup();
  test_advantage_formulas();
  int devices = 0;
  const bool have_device = cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0;
  cudaGetLastError();  // clear the "no device" error
  test_abi_errors(have_device);
  if (have_device) {
    test_sparse_adamw_on_device();
    test_group_advantage_on_device();
  } else {
    std::printf("no CUDA device: the on-device part of this test was skipped (host parts ran)\n");
  }
  if (failures) {
    std::printf("host_test: %d FAILED\n", failures);
    return 1;
  }
  std::printf("host_test: all checks passed%s\n", have_device ? " (host and device)" : " (host only)");
  return 0;
}
