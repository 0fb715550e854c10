// The torch side of csrc/: checks the tensors, then calls the C ABI of grpo_sweep.h on the
// current CUDA stream. The contract is docs/design.md's backend sweep contract, the one
// grpo_kernels/sweep/torch.py and grpo_kernels/sweep/triton.py implement too (N = B * T):
//
//   forward(logits, ids, temperature, temperature_per_row | None, active | None, vocab_start)
//       -> [logprobs, entropy, m, log_sum, mean_rel]            each (N,) fp32, own allocation
//   backward(logits, ids, temperature, temperature_per_row | None, active | None, m, log_sum,
//            mean_rel, grad_logprobs | None, grad_entropy | None, grad_out, vocab_start)
//       -> None                                                 writes every element of grad_out
//
// logits and grad_out are (B, T, V) with any strides on B and T. temperature_per_row, when
// given, replaces the scalar temperature (one per row; not range-checked here, which would
// need a device sync: the caller gives finite values > 0). The per-row tensors are small
// (1/V of the logits), so they are made contiguous here (int64 ids, bool active, fp32 for the
// rest) rather than carried through the kernels with strides; they may be (N,) or (B, T).
// The (B, T, V) tensors are never copied.
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <optional>
#include <vector>

#include "grpo_sweep.h"
#include "two_pass.h"

namespace {

grpo_dtype dtype_of(const at::Tensor& logits) {
    switch (logits.scalar_type()) {
        case at::kFloat: return GRPO_FLOAT32;
        case at::kHalf: return GRPO_FLOAT16;
        case at::kBFloat16: return GRPO_BFLOAT16;
        default:
            TORCH_CHECK_TYPE(false, "backend='cuda' takes float32, bfloat16 or float16 logits, got ",
                             logits.scalar_type());
    }
}

void check_vocab_tensor(const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
    TORCH_CHECK(t.dim() == 3, name, " must have shape (B, T, V), got ", t.sizes());
    TORCH_CHECK(t.size(2) >= 1, name, " must have a vocabulary dimension of at least 1");
    TORCH_CHECK(t.stride(2) == 1 || t.size(2) == 1, name,
                " must be contiguous in the vocabulary dimension (stride(2) == 1), got strides ", t.strides());
}

// A per-row tensor, (N,) or (B, T), as a contiguous (N,)-ordered tensor of `dtype` on
// logits' device.
at::Tensor per_row(const at::Tensor& t, const at::Tensor& logits, at::ScalarType dtype, const char* name) {
    TORCH_CHECK(t.device() == logits.device(), name, " is on ", t.device(), " but logits are on ", logits.device());
    const int64_t B = logits.size(0), T = logits.size(1);
    const bool flat = t.dim() == 1 && t.size(0) == B * T;
    const bool padded = t.dim() == 2 && t.size(0) == B && t.size(1) == T;
    TORCH_CHECK(flat || padded, name, " must have shape (B*T,) = (", B * T, ",) for logits of shape ", logits.sizes(),
                ", got ", t.sizes());
    return t.to(dtype).contiguous();
}

float inverse_temperature(double temperature) {
    TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0, "temperature must be finite and > 0, got ",
                temperature);
    return static_cast<float>(1.0 / temperature);
}

// The per-row inputs both directions take: ids, active (NULL: all), the temperature.
struct RowInputs {
    at::Tensor ids, active, temperature;  // active / temperature undefined when absent
    float inv_temperature = 1.f;

    RowInputs(const at::Tensor& logits, const at::Tensor& ids_in, double temperature_in,
              const std::optional<at::Tensor>& temperature_per_row, const std::optional<at::Tensor>& active_in,
              int64_t vocab_start) {
        TORCH_CHECK(vocab_start >= 0 && vocab_start <= std::numeric_limits<int64_t>::max() - logits.size(2),
                    "vocab_start must be >= 0 (the global id of column 0 of the logits), got ", vocab_start);
        ids = per_row(ids_in, logits, at::kLong, "ids");
        if (active_in.has_value()) active = per_row(*active_in, logits, at::kBool, "active");
        if (temperature_per_row.has_value()) {
            temperature = per_row(*temperature_per_row, logits, at::kFloat, "temperature");
        } else {
            inv_temperature = inverse_temperature(temperature_in);
        }
    }

    const int64_t* ids_ptr() const { return ids.data_ptr<int64_t>(); }
    // bool is one byte, 0 or 1: the kernels read it as uint8_t.
    const uint8_t* active_ptr() const {
        return active.defined() ? reinterpret_cast<const uint8_t*>(active.data_ptr<bool>()) : nullptr;
    }
    const float* temperature_ptr() const { return temperature.defined() ? temperature.data_ptr<float>() : nullptr; }
};

void check_launch(cudaError_t status, const char* what) {
    TORCH_CHECK(status == cudaSuccess, what, " failed to launch: ", cudaGetErrorString(status));
}

std::vector<at::Tensor> forward(const at::Tensor& logits, const at::Tensor& ids, double temperature,
                                const std::optional<at::Tensor>& temperature_per_row,
                                const std::optional<at::Tensor>& active, int64_t vocab_start) {
    check_vocab_tensor(logits, "logits");
    const grpo_dtype dtype = dtype_of(logits);
    const c10::cuda::CUDAGuard guard(logits.device());
    const RowInputs rows(logits, ids, temperature, temperature_per_row, active, vocab_start);

    const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
    // Five separate allocations, as the contract asks (a caller may keep one and free the rest).
    const auto options = logits.options().dtype(at::kFloat);
    std::vector<at::Tensor> out;
    for (int i = 0; i < 5; ++i) out.push_back(at::empty({B * T}, options));
    check_launch(grpo_sweep_forward(dtype, logits.data_ptr(), logits.stride(0), logits.stride(1), rows.ids_ptr(),
                                    rows.active_ptr(), rows.temperature_ptr(), rows.inv_temperature, vocab_start,
                                    out[0].data_ptr<float>(), out[1].data_ptr<float>(), out[2].data_ptr<float>(),
                                    out[3].data_ptr<float>(), out[4].data_ptr<float>(), B, T, V,
                                    c10::cuda::getCurrentCUDAStream().stream()),
                 "grpo_sweep_forward");
    return out;
}

void backward(const at::Tensor& logits, const at::Tensor& ids, double temperature,
              const std::optional<at::Tensor>& temperature_per_row, const std::optional<at::Tensor>& active,
              const at::Tensor& m, const at::Tensor& log_sum, const at::Tensor& mean_rel,
              const std::optional<at::Tensor>& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
              const at::Tensor& grad_out, int64_t vocab_start) {
    check_vocab_tensor(logits, "logits");
    check_vocab_tensor(grad_out, "grad_out");
    const grpo_dtype dtype = dtype_of(logits);
    TORCH_CHECK(grad_out.sizes() == logits.sizes(), "grad_out must have the logits' shape ", logits.sizes(),
                ", got ", grad_out.sizes());
    TORCH_CHECK(grad_out.scalar_type() == logits.scalar_type(), "grad_out must have the logits' dtype ",
                logits.scalar_type(), ", got ", grad_out.scalar_type());
    TORCH_CHECK(grad_out.device() == logits.device(), "grad_out is on ", grad_out.device(), " but logits are on ",
                logits.device());
    // In place is fine (each element is read before it is written, by the same thread);
    // a partial overlap, or a grad_out whose elements overlap each other, would be a race.
    at::assert_no_internal_overlap(grad_out);
    TORCH_CHECK(at::get_overlap_status(logits, grad_out) != at::MemOverlapStatus::Partial,
                "grad_out must either be the logits themselves (in-place backward) or not overlap them");
    const c10::cuda::CUDAGuard guard(logits.device());
    const RowInputs rows(logits, ids, temperature, temperature_per_row, active, vocab_start);

    const at::Tensor m32 = per_row(m, logits, at::kFloat, "m");
    const at::Tensor log_sum32 = per_row(log_sum, logits, at::kFloat, "log_sum");
    at::Tensor gl, ge, mean_rel32;
    if (grad_logprobs.has_value()) gl = per_row(*grad_logprobs, logits, at::kFloat, "grad_logprobs");
    if (grad_entropy.has_value()) {
        ge = per_row(*grad_entropy, logits, at::kFloat, "grad_entropy");
        mean_rel32 = per_row(mean_rel, logits, at::kFloat, "mean_rel");
    }

    check_launch(grpo_sweep_backward(dtype, logits.data_ptr(), logits.stride(0), logits.stride(1),
                                     grad_out.data_ptr(), grad_out.stride(0), grad_out.stride(1), rows.ids_ptr(),
                                     rows.active_ptr(), rows.temperature_ptr(), rows.inv_temperature, vocab_start,
                                     m32.data_ptr<float>(), log_sum32.data_ptr<float>(),
                                     mean_rel32.defined() ? mean_rel32.data_ptr<float>() : nullptr,
                                     gl.defined() ? gl.data_ptr<float>() : nullptr,
                                     ge.defined() ? ge.data_ptr<float>() : nullptr, logits.size(0), logits.size(1),
                                     logits.size(2), c10::cuda::getCurrentCUDAStream().stream()),
                 "grpo_sweep_backward");
}

// ---------------------------------------------------------------------------------------
// The two-pass loss (two_pass.h): logits (B, L, V), the rows [row_start, row_start + T) of each
// sequence scored, every per-token tensor (N,) with N = B * T.

// A per-token tensor of N elements as a contiguous fp32 (or `dtype`) tensor on the logits' device.
at::Tensor token_vector(const at::Tensor& t, const at::Tensor& logits, int64_t N, at::ScalarType dtype,
                        const char* name) {
    TORCH_CHECK(t.device() == logits.device(), name, " is on ", t.device(), " but logits are on ", logits.device());
    TORCH_CHECK(t.numel() == N && (t.dim() == 1 || t.dim() == 2), name, " must have N = B * T = ", N,
                " elements as (N,) or (B, T), got shape ", t.sizes());
    return t.to(dtype).contiguous().view({N});
}

std::optional<at::Tensor> optional_token_vector(const std::optional<at::Tensor>& t, const at::Tensor& logits,
                                                int64_t N, at::ScalarType dtype, const char* name) {
    if (!t.has_value()) return std::nullopt;
    return token_vector(*t, logits, N, dtype, name);
}

const float* float_ptr(const std::optional<at::Tensor>& t) {
    return t.has_value() ? t->data_ptr<float>() : nullptr;
}

// (cluster size, dynamic shared memory per block) the kernel would use for these logits; raises
// with the reason (no clusters below sm_90, a row too long to hold on chip) when it cannot run.
// Planning queries the device (occupancy of each cluster size), so plans are kept per
// (device, dtype, V, requested size).
std::vector<int64_t> two_pass_plan(const at::Tensor& logits, int64_t cluster_size) {
    check_vocab_tensor(logits, "logits");
    const c10::cuda::CUDAGuard guard(logits.device());
    static std::mutex mutex;
    static std::map<std::tuple<int, int, int64_t, int64_t>, std::vector<int64_t>> plans;
    const auto key = std::make_tuple(static_cast<int>(logits.device().index()), static_cast<int>(dtype_of(logits)),
                                     logits.size(2), cluster_size);
    {
        const std::lock_guard<std::mutex> lock(mutex);
        const auto found = plans.find(key);
        if (found != plans.end()) return found->second;
    }
    int blocks = 0;
    size_t smem = 0;
    char why[384] = {0};
    const cudaError_t status = grpo_two_pass_plan(dtype_of(logits), logits.size(2), logits.device().index(),
                                                  static_cast<int>(cluster_size), &blocks, &smem, why, sizeof why);
    TORCH_CHECK(status == cudaSuccess, why[0] != 0 ? why : cudaGetErrorString(status));
    std::vector<int64_t> plan{blocks, static_cast<int64_t>(smem)};
    const std::lock_guard<std::mutex> lock(mutex);
    plans[key] = plan;
    return plan;
}

std::vector<at::Tensor> two_pass(const at::Tensor& logits, int64_t row_start, int64_t T, const at::Tensor& ids,
                                 double inv_temperature, const std::optional<at::Tensor>& temperature_rows,
                                 const std::optional<at::Tensor>& active, const at::Tensor& w, const at::Tensor& mask,
                                 const at::Tensor& advantages, const std::optional<at::Tensor>& old_logprobs,
                                 const std::optional<at::Tensor>& ref_logprobs,
                                 const std::optional<at::Tensor>& rollout, const at::Tensor& scalars, double beta,
                                 double eps_low, double eps_high, std::optional<double> delta,
                                 std::optional<double> dual_clip, int64_t kl_estimator, bool kl_ratio_weight,
                                 bool has_entropy_grad, const at::Tensor& grad, int64_t cluster_size) {
    check_vocab_tensor(logits, "logits");
    check_vocab_tensor(grad, "grad");
    const grpo_dtype dtype = dtype_of(logits);
    TORCH_CHECK(grad.sizes() == logits.sizes(), "grad must have the logits' shape ", logits.sizes(), ", got ",
                grad.sizes());
    TORCH_CHECK(grad.scalar_type() == logits.scalar_type(), "grad must have the logits' dtype ",
                logits.scalar_type(), ", got ", grad.scalar_type());
    TORCH_CHECK(grad.device() == logits.device(), "grad is on ", grad.device(), " but logits are on ",
                logits.device());
    at::assert_no_internal_overlap(grad);
    const auto overlap = at::get_overlap_status(logits, grad);
    TORCH_CHECK(overlap == at::MemOverlapStatus::No ||
                    (overlap == at::MemOverlapStatus::Full && grad.strides() == logits.strides()),
                "grad must either be the logits themselves (in place) or not overlap them");
    const int64_t B = logits.size(0), L = logits.size(1), V = logits.size(2);
    TORCH_CHECK(T >= 0 && row_start >= 0 && row_start <= L - T, "the scored rows [row_start, row_start + T) = [",
                row_start, ", ", row_start + T, ") must lie within the ", L, " positions of the logits");
    TORCH_CHECK(kl_estimator >= 1 && kl_estimator <= 3, "kl_estimator must be 1, 2 or 3, got ", kl_estimator);
    TORCH_CHECK(cluster_size >= 0 && cluster_size <= 16 && (cluster_size & (cluster_size - 1)) == 0,
                "cluster_size must be 0 (choose), 1, 2, 4, 8 or 16, got ", cluster_size);
    TORCH_CHECK(scalars.is_cuda() && scalars.device() == logits.device() && scalars.scalar_type() == at::kFloat &&
                    scalars.numel() == 2 && scalars.is_contiguous(),
                "scalars must be a contiguous (2,) float32 tensor on the logits' device, got ", scalars.sizes(), " ",
                scalars.scalar_type(), " on ", scalars.device());
    if (!temperature_rows.has_value()) {
        TORCH_CHECK(std::isfinite(inv_temperature) && inv_temperature > 0.0,
                    "inv_temperature must be finite and > 0, got ", inv_temperature);
    }
    for (const auto& [value, name] : {std::pair<std::optional<double>, const char*>{delta, "delta"},
                                      {dual_clip, "dual_clip"}}) {
        TORCH_CHECK(!value.has_value() || std::isfinite(*value), name, " must be finite, got ", *value);
    }
    const c10::cuda::CUDAGuard guard(logits.device());
    const int64_t N = B * T;
    const at::Tensor ids64 = token_vector(ids, logits, N, at::kLong, "ids");
    const auto active8 = optional_token_vector(active, logits, N, at::kBool, "active");
    const auto temperature32 = optional_token_vector(temperature_rows, logits, N, at::kFloat, "temperature_rows");
    const at::Tensor w32 = token_vector(w, logits, N, at::kFloat, "w");
    const at::Tensor mask32 = token_vector(mask, logits, N, at::kFloat, "mask");
    const at::Tensor adv32 = token_vector(advantages, logits, N, at::kFloat, "advantages");
    const auto old32 = optional_token_vector(old_logprobs, logits, N, at::kFloat, "old_logprobs");
    const auto ref32 = optional_token_vector(ref_logprobs, logits, N, at::kFloat, "ref_logprobs");
    const auto rollout32 = optional_token_vector(rollout, logits, N, at::kFloat, "rollout");

    const auto options = logits.options().dtype(at::kFloat);
    at::Tensor logprobs = at::empty({N}, options), entropy = at::empty({N}, options);
    at::Tensor sums = at::empty({7, N}, options);

    grpo_two_pass_args args{};
    args.dtype = dtype;
    args.logits = logits.data_ptr();
    args.stride_b = logits.stride(0);
    args.stride_l = logits.stride(1);
    args.grad = grad.data_ptr();
    args.grad_stride_b = grad.stride(0);
    args.grad_stride_l = grad.stride(1);
    args.B = B;
    args.L = L;
    args.V = V;
    args.row_start = row_start;
    args.T = T;
    args.ids = ids64.data_ptr<int64_t>();
    // bool is one byte, 0 or 1: the kernel reads it as uint8_t.
    args.active = active8.has_value() ? reinterpret_cast<const uint8_t*>(active8->data_ptr<bool>()) : nullptr;
    args.temperature_rows = float_ptr(temperature32);
    args.inv_temperature = static_cast<float>(inv_temperature);
    args.w = w32.data_ptr<float>();
    args.mask = mask32.data_ptr<float>();
    args.advantages = adv32.data_ptr<float>();
    args.old_logprobs = float_ptr(old32);
    args.ref_logprobs = float_ptr(ref32);
    args.rollout = float_ptr(rollout32);
    args.scalars = scalars.data_ptr<float>();
    args.beta = static_cast<float>(beta);
    args.eps_low = static_cast<float>(eps_low);
    args.eps_high = static_cast<float>(eps_high);
    args.delta = static_cast<float>(delta.value_or(0.0));
    args.dual_clip = static_cast<float>(dual_clip.value_or(0.0));
    args.has_delta = delta.has_value();
    args.has_dual_clip = dual_clip.has_value();
    args.kl_estimator = static_cast<int>(kl_estimator);
    args.kl_ratio_weight = kl_ratio_weight;
    args.has_entropy_grad = has_entropy_grad;
    args.logprobs = logprobs.data_ptr<float>();
    args.entropy = entropy.data_ptr<float>();
    args.sums = sums.data_ptr<float>();
    if (B * L > 0) {  // raises with the reason when the rows cannot be held on chip here
        const std::vector<int64_t> plan = two_pass_plan(logits, cluster_size);
        args.cluster_size = static_cast<int>(plan[0]);
        args.smem_bytes = static_cast<size_t>(plan[1]);
    }
    check_launch(grpo_two_pass(&args, c10::cuda::getCurrentCUDAStream().stream()), "grpo_two_pass");
    return {logprobs, entropy, sums};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "grpo_kernels CUDA C++ vocabulary sweeps (csrc/); call through grpo_kernels.cuda";
    m.def("forward", &forward,
          "logits (B, T, V), ids (N,) -> [logprobs, entropy, m, log_sum, mean_rel], each (N,) fp32, N = B * T",
          py::arg("logits"), py::arg("ids"), py::arg("temperature"), py::arg("temperature_per_row"),
          py::arg("active"), py::arg("vocab_start") = 0);
    m.def("backward", &backward,
          "Writes dL/dlogits = (gl (onehot - p) + ge p (mean_rel - (z - m))) / temperature, "
          "p = exp((z - m) - log_sum), into grad_out (may be logits)",
          py::arg("logits"), py::arg("ids"), py::arg("temperature"), py::arg("temperature_per_row"),
          py::arg("active"), py::arg("m"), py::arg("log_sum"), py::arg("mean_rel"), py::arg("grad_logprobs"),
          py::arg("grad_entropy"), py::arg("grad_out"), py::arg("vocab_start") = 0);
    m.def("two_pass_plan", &two_pass_plan,
          "[cluster size, shared memory bytes per block] of the two-pass kernel for these logits; raises with the "
          "reason when it cannot hold their rows on chip",
          py::arg("logits"), py::arg("cluster_size") = 0);
    m.def("two_pass", &two_pass,
          "The two-pass token-local loss (csrc/two_pass.h): writes every element of grad (B, L, V), returns "
          "[logprobs (N,), entropy (N,), sums (7, N)]",
          py::arg("logits"), py::arg("row_start"), py::arg("T"), py::arg("ids"), py::arg("inv_temperature"),
          py::arg("temperature_rows"), py::arg("active"), py::arg("w"), py::arg("mask"), py::arg("advantages"),
          py::arg("old_logprobs"), py::arg("ref_logprobs"), py::arg("rollout"), py::arg("scalars"),
          py::arg("beta"), py::arg("eps_low"), py::arg("eps_high"), py::arg("delta"), py::arg("dual_clip"),
          py::arg("kl_estimator"), py::arg("kl_ratio_weight"), py::arg("has_entropy_grad"), py::arg("grad"),
          py::arg("cluster_size") = 0);
}
