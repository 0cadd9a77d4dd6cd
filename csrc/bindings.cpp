// torch.library registration of the CUDA ops of rlvr_fast (torch.ops.rlvr_fast.*) and their input checks.
//
// Only checks and the host-side launch table live here; the kernels are in sparse_adamw.cu and group_advantage.cu
// behind the C ABI of rlvr_fast_kernels.h (they compile without torch headers). Every check names the argument, the
// expected and the actual value. The Python entry points (rlvr_fast.optim.sparse_adamw, rlvr_fast.ops.group_advantage)
// check user input first; these checks guard the ops when called directly.

#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "rlvr_fast_kernels.h"

namespace {

constexpr int64_t kHyperRows = 7;  // RfAdamwSegment's float fields: rlvr_fast.optim.sparse_adamw.HYPER_FIELDS

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

void check_cuda_tensor(const at::Tensor& t, const char* op, const std::string& name, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, " (with the other tensors), got ",
              t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides());
}

void check_host_vector(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype, int64_t n) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor (it is read on the host), got one on ",
              t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape (", n, ",), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides());
}

void check_launch(int rc, const char* op) {
  TORCH_CHECK(rc == RF_OK, op, ": kernel launch failed: ", rf_error_string(rc), " (code ", rc, ")");
}

// ---- sparse_adamw_step ------------------------------------------------------------------------------------------

void sparse_adamw_step(at::TensorList params, at::TensorList grads, const at::Tensor& indices,
                       const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, const at::Tensor& entry_start,
                       const at::Tensor& count, const at::Tensor& dense, const at::Tensor& hyper) {
  constexpr const char* op = "rlvr_fast::sparse_adamw_step";
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == n, op, ": grads must have one tensor per parameter (", n,
              "), got ", grads.size());
  if (n == 0) return;
  TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(), op, ": at most 2^31 - 1 parameters per launch, got ", n);

  const at::Device device = exp_avg.device();
  check_cuda_tensor(exp_avg, op, "exp_avg", device);
  check_cuda_tensor(exp_avg_sq, op, "exp_avg_sq", device);
  check_cuda_tensor(indices, op, "indices", device);
  TORCH_CHECK(exp_avg.scalar_type() == at::kFloat && exp_avg.dim() == 1, op,
              ": exp_avg must be a 1-D float32 tensor, got ", exp_avg.scalar_type(), " of shape ", exp_avg.sizes());
  TORCH_CHECK(exp_avg_sq.scalar_type() == at::kFloat && exp_avg_sq.sizes() == exp_avg.sizes(), op,
              ": exp_avg_sq must be float32 of exp_avg's shape ", exp_avg.sizes(), ", got ", exp_avg_sq.scalar_type(),
              " of shape ", exp_avg_sq.sizes());
  TORCH_CHECK(indices.dim() == 1 && (indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong), op,
              ": indices must be a 1-D int32 or int64 tensor, got ", indices.scalar_type(), " of shape ",
              indices.sizes());
  TORCH_CHECK(aligned16(exp_avg) && aligned16(exp_avg_sq) && aligned16(indices), op,
              ": exp_avg, exp_avg_sq and indices must start on 16-byte boundaries (the kernel reads them as aligned "
              "vectors); pass whole buffers, not views at an offset");
  check_host_vector(entry_start, op, "entry_start", at::kLong, n);
  check_host_vector(count, op, "count", at::kLong, n);
  check_host_vector(dense, op, "dense", at::kBool, n);
  TORCH_CHECK(hyper.device().is_cpu() && hyper.scalar_type() == at::kFloat && hyper.dim() == 2 &&
                  hyper.size(0) == kHyperRows && hyper.size(1) == n && hyper.is_contiguous(),
              op, ": hyper must be a contiguous float32 CPU tensor of shape (", kHyperRows, ", ", n, "), got ",
              hyper.scalar_type(), " of shape ", hyper.sizes(), " on ", hyper.device());

  const at::ScalarType dtype = params[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, op,
              ": parameters must be float32 or bfloat16, got params[0] of dtype ", dtype);
  const int64_t n_entries = exp_avg.numel();
  const int64_t n_indexed = indices.numel();
  const int64_t elem_bytes = static_cast<int64_t>(c10::elementSize(dtype));

  // The table: int32 first_tile[n] (padded to 64 bytes), then n segments of 64 bytes; one pinned buffer, one copy.
  const int64_t head = ((4 * n + 63) / 64) * 64;
  at::Tensor host = at::empty({head + n * static_cast<int64_t>(sizeof(RfAdamwSegment))},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* first_tile = reinterpret_cast<int32_t*>(host.data_ptr<uint8_t>());
  auto* segments = reinterpret_cast<RfAdamwSegment*>(host.data_ptr<uint8_t>() + head);
  const int64_t* starts = entry_start.data_ptr<int64_t>();
  const int64_t* counts = count.data_ptr<int64_t>();
  const bool* dense_flags = dense.data_ptr<bool>();
  const float* h = hyper.data_ptr<float>();

  int64_t tiles = 0;
  int64_t previous_end = 0;
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    check_cuda_tensor(p, op, "params[" + std::to_string(i) + "]", device);
    check_cuda_tensor(g, op, "grads[" + std::to_string(i) + "]", device);
    TORCH_CHECK(p.scalar_type() == dtype, op, ": every parameter must have params[0]'s dtype ", dtype,
                ", got params[", i, "] of dtype ", p.scalar_type());
    TORCH_CHECK(g.scalar_type() == dtype && g.sizes() == p.sizes(), op, ": grads[", i,
                "] must match params[", i, "] (dtype ", dtype, ", shape ", p.sizes(), "), got dtype ",
                g.scalar_type(), ", shape ", g.sizes());
    const int64_t start = starts[i], entries = counts[i];
    const bool is_dense = dense_flags[i];
    TORCH_CHECK(entries >= 1, op, ": count[", i, "] must be >= 1, got ", entries);
    TORCH_CHECK(start % RF_ENTRY_ALIGN == 0 && start >= previous_end, op, ": entry_start[", i,
                "] must be a multiple of ", RF_ENTRY_ALIGN, " at or after the previous segment's end (",
                previous_end, "): segments are sorted and disjoint, got ", start);
    TORCH_CHECK(start + entries <= n_entries, op, ": segment ", i, " (entries [", start, ", ", start + entries,
                ")) exceeds exp_avg's ", n_entries, " entries");
    if (is_dense) {
      TORCH_CHECK(entries == p.numel(), op, ": dense segment ", i, " must have count == params[", i,
                  "].numel() = ", p.numel(), ", got ", entries);
    } else {
      TORCH_CHECK(entries <= p.numel(), op, ": count[", i, "] = ", entries, " exceeds params[", i,
                  "].numel() = ", p.numel());
      TORCH_CHECK(start + entries <= n_indexed, op, ": masked segment ", i, " (entries [", start, ", ",
                  start + entries, ")) exceeds indices' ", n_indexed, " entries");
    }
    previous_end = start + entries;

    first_tile[i] = static_cast<int32_t>(tiles);
    tiles += rf_sparse_adamw_tiles(entries);
    TORCH_CHECK(tiles <= std::numeric_limits<int32_t>::max(), op, ": the step needs ", tiles,
                " blocks, more than a grid holds");

    RfAdamwSegment& s = segments[i];
    s.entry_start = start;
    s.count = entries;
    s.grad = reinterpret_cast<uint64_t>(g.data_ptr());
    s.param = reinterpret_cast<uint64_t>(p.data_ptr());
    s.decay = h[0 * n + i];
    s.w1 = h[1 * n + i];
    s.beta2 = h[2 * n + i];
    s.w2 = h[3 * n + i];
    s.step_size = h[4 * n + i];
    s.bc2_sqrt = h[5 * n + i];
    s.eps = h[6 * n + i];
    s.flags = rf_sparse_adamw_flags(is_dense ? 1 : 0, s.param, s.grad, elem_bytes);
  }

  const c10::cuda::CUDAGuard guard(device);
  // From pinned memory on the current stream: the caching host allocator keeps `host` alive until the copy is done.
  const at::Tensor table = host.to(device, /*non_blocking=*/true);
  const uint8_t* table_ptr = table.data_ptr<uint8_t>();
  const int rc = rf_sparse_adamw_launch(
      reinterpret_cast<const int32_t*>(table_ptr), reinterpret_cast<const RfAdamwSegment*>(table_ptr + head),
      static_cast<int32_t>(n), static_cast<int32_t>(tiles), indices.data_ptr(),
      static_cast<int32_t>(indices.element_size()), exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(),
      dtype == at::kFloat ? RF_DTYPE_FLOAT32 : RF_DTYPE_BFLOAT16, c10::cuda::getCurrentCUDAStream(device.index()).stream());
  check_launch(rc, op);
}

// ---- group_advantage_fwd ----------------------------------------------------------------------------------------

int32_t reward_dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return RF_DTYPE_FLOAT32;
    case at::kDouble:
      return RF_DTYPE_FLOAT64;
    case at::kHalf:
      return RF_DTYPE_FLOAT16;
    case at::kBFloat16:
      return RF_DTYPE_BFLOAT16;
    default:
      return -1;
  }
}

void check_output(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype,
                  at::IntArrayRef shape, const at::Device& device) {
  check_cuda_tensor(t, op, name, device);
  TORCH_CHECK(t.scalar_type() == dtype && t.sizes() == shape, op, ": ", name, " must be ", dtype, " of shape ",
              shape, ", got ", t.scalar_type(), " of shape ", t.sizes());
}

void group_advantage_fwd(const at::Tensor& rewards, const std::optional<at::Tensor>& correct, int64_t group_size,
                         int64_t estimator, int64_t scale, int64_t sample_mode, double eps, double lam,
                         const at::Tensor& advantages, const at::Tensor& mean, const at::Tensor& std_out,
                         const at::Tensor& solve_rate, const at::Tensor& flags) {
  constexpr const char* op = "rlvr_fast::group_advantage_fwd";
  const at::Device device = rewards.device();
  check_cuda_tensor(rewards, op, "rewards", device);
  TORCH_CHECK(rewards.dim() == 1, op, ": rewards must be 1-D (N,), got shape ", rewards.sizes());
  const int32_t dtype_code = reward_dtype_code(rewards.scalar_type());
  TORCH_CHECK(dtype_code >= 0, op, ": rewards must be float32, float64, float16 or bfloat16, got ",
              rewards.scalar_type());
  TORCH_CHECK(group_size >= 1, op, ": group_size must be >= 1, got ", group_size);
  const int64_t n = rewards.numel();
  TORCH_CHECK(n % group_size == 0, op, ": the number of rewards (", n, ") must be divisible by group_size (",
              group_size, ")");
  const int64_t n_groups = n / group_size;
  TORCH_CHECK(estimator >= RF_GA_GRPO && estimator <= RF_GA_W_REINFORCE, op, ": estimator code must be in [",
              RF_GA_GRPO, ", ", RF_GA_W_REINFORCE, "], got ", estimator);
  TORCH_CHECK(scale >= RF_GA_SCALE_GROUP && scale <= RF_GA_SCALE_NONE, op, ": scale code must be in [",
              RF_GA_SCALE_GROUP, ", ", RF_GA_SCALE_NONE, "], got ", scale);
  TORCH_CHECK(sample_mode >= RF_GA_SAMPLE_ALL && sample_mode <= RF_GA_SAMPLE_NEGATIVE, op,
              ": sample_mode code must be in [", RF_GA_SAMPLE_ALL, ", ", RF_GA_SAMPLE_NEGATIVE, "], got ",
              sample_mode);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0, op, ": eps must be a finite number >= 0, got ", eps);
  TORCH_CHECK(std::isfinite(lam), op, ": lam must be a finite number, got ", lam);
  const bool needs_correct = estimator >= RF_GA_PSR;
  TORCH_CHECK(correct.has_value() || !needs_correct, op, ": estimator code ", estimator,
              " needs correct (0/1 verdicts), got None");
  if (correct.has_value()) {
    check_cuda_tensor(*correct, op, "correct", device);
    TORCH_CHECK(correct->scalar_type() == at::kFloat && correct->numel() == n, op,
                ": correct must be float32 0/1 with one entry per reward (", n, "), got ", correct->scalar_type(),
                " of shape ", correct->sizes());
  }
  check_output(advantages, op, "advantages", at::kFloat, {n}, device);
  check_output(mean, op, "mean", at::kFloat, {n_groups}, device);
  check_output(std_out, op, "std", at::kFloat, {n_groups}, device);
  check_output(solve_rate, op, "solve_rate", at::kFloat, {n_groups}, device);
  check_output(flags, op, "flags", at::kChar, {3, n_groups}, device);
  if (n_groups == 0) return;

  const c10::cuda::CUDAGuard guard(device);
  const bool batch = estimator == RF_GA_GRPO && scale == RF_GA_SCALE_BATCH;
  const at::Tensor scratch =
      batch ? at::empty({RF_GA_SCRATCH_FLOATS}, rewards.options().dtype(at::kFloat)) : at::Tensor();

  RfGroupAdvantageArgs args;
  std::memset(&args, 0, sizeof(args));
  args.rewards = rewards.data_ptr();
  args.correct = correct.has_value() ? correct->data_ptr<float>() : nullptr;
  args.advantages = advantages.data_ptr<float>();
  args.mean = mean.data_ptr<float>();
  args.std = std_out.data_ptr<float>();
  args.solve_rate = solve_rate.data_ptr<float>();
  int8_t* flag_rows = flags.data_ptr<int8_t>();
  args.all_equal = flag_rows;
  args.all_correct = flag_rows + n_groups;
  args.all_wrong = flag_rows + 2 * n_groups;
  args.n_groups = n_groups;
  args.group_size = group_size;
  args.rewards_dtype = dtype_code;
  args.estimator = static_cast<int32_t>(estimator);
  args.scale = static_cast<int32_t>(scale);
  args.sample_mode = static_cast<int32_t>(sample_mode);
  args.eps = static_cast<float>(eps);
  args.lam = static_cast<float>(lam);
  const int rc = rf_group_advantage_launch(&args, batch ? scratch.data_ptr<float>() : nullptr,
                                           c10::cuda::getCurrentCUDAStream(device.index()).stream());
  check_launch(rc, op);
}

}  // namespace

TORCH_LIBRARY(rlvr_fast, m) {
  m.def(
      "sparse_adamw_step(Tensor(a!)[] params, Tensor[] grads, Tensor indices, Tensor(b!) exp_avg, "
      "Tensor(c!) exp_avg_sq, Tensor entry_start, Tensor count, Tensor dense, Tensor hyper) -> ()");
  m.def(
      "group_advantage_fwd(Tensor rewards, Tensor? correct, int group_size, int estimator, int scale, "
      "int sample_mode, float eps, float lam, Tensor(a!) advantages, Tensor(b!) mean, Tensor(c!) std, "
      "Tensor(d!) solve_rate, Tensor(e!) flags) -> ()");
}

TORCH_LIBRARY_IMPL(rlvr_fast, CUDA, m) {
  m.impl("sparse_adamw_step", &sparse_adamw_step);
  m.impl("group_advantage_fwd", &group_advantage_fwd);
}

// `import rlvr_fast._C` loads this library, whose static initialisers above register the ops; the module itself is
// empty (the ops live under torch.ops.rlvr_fast).
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT,
                               "rlvr_fast._C",
                               "CUDA kernels of rlvr_fast, registered as torch.ops.rlvr_fast.*",
                               -1,
                               nullptr,
                               nullptr,
                               nullptr,
                               nullptr,
                               nullptr};
  return PyModule_Create(&module);
}
