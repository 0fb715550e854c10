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
#include <optional>
#include <vector>

#include "grpo_sweep.h"

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
}
