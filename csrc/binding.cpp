// The torch side of csrc/: checks the tensors, then calls the C ABI of grpo_sweep.h on the
// current CUDA stream. The contract is docs/design.md's backend sweep contract, the same
// one grpo_kernels/torch_path.py and grpo_kernels/triton/logprobs.py implement:
//
//   forward(logits, ids, temperature) -> (logprobs, entropy, lse, mean_z)      each (B, T) fp32
//   backward(logits, ids, temperature, lse, mean_z, grad_logprobs | None,
//            grad_entropy | None, grad_out) -> None                            writes grad_out
//
// The per-token (B, T) tensors are small (1/V of the logits), so they are made contiguous
// here (int64 ids, fp32 gradients) rather than carried through the kernels with strides; the
// (B, T, V) tensors are never copied.
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cmath>
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

// A (B, T) per-token tensor as a contiguous tensor of `dtype` on logits' device.
at::Tensor per_token(const at::Tensor& t, const at::Tensor& logits, at::ScalarType dtype, const char* name) {
    TORCH_CHECK(t.device() == logits.device(), name, " is on ", t.device(), " but logits are on ", logits.device());
    TORCH_CHECK(t.dim() == 2 && t.size(0) == logits.size(0) && t.size(1) == logits.size(1), name,
                " must have shape (B, T) = (", logits.size(0), ", ", logits.size(1), "), got ", t.sizes());
    return t.to(dtype).contiguous();
}

float inverse_temperature(double temperature) {
    TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0, "temperature must be finite and > 0, got ",
                temperature);
    return static_cast<float>(1.0 / temperature);
}

void check_launch(cudaError_t status, const char* what) {
    TORCH_CHECK(status == cudaSuccess, what, " failed to launch: ", cudaGetErrorString(status));
}

std::vector<at::Tensor> forward(const at::Tensor& logits, const at::Tensor& ids, double temperature) {
    check_vocab_tensor(logits, "logits");
    const grpo_dtype dtype = dtype_of(logits);
    const float inv_temperature = inverse_temperature(temperature);
    const c10::cuda::CUDAGuard guard(logits.device());
    const at::Tensor ids64 = per_token(ids, logits, at::kLong, "ids");

    const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
    // One allocation for the four outputs, as the other backends return them.
    at::Tensor out = at::empty({4, B, T}, logits.options().dtype(at::kFloat));
    float* base = out.data_ptr<float>();
    const int64_t n = B * T;
    check_launch(grpo_sweep_forward(dtype, logits.data_ptr(), logits.stride(0), logits.stride(1),
                                    ids64.data_ptr<int64_t>(), base, base + n, base + 2 * n, base + 3 * n, B, T, V,
                                    inv_temperature, c10::cuda::getCurrentCUDAStream().stream()),
                 "grpo_sweep_forward");
    return out.unbind(0);
}

void backward(const at::Tensor& logits, const at::Tensor& ids, double temperature, const at::Tensor& lse,
              const at::Tensor& mean_z, const std::optional<at::Tensor>& grad_logprobs,
              const std::optional<at::Tensor>& grad_entropy, const at::Tensor& grad_out) {
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
    const float inv_temperature = inverse_temperature(temperature);
    const c10::cuda::CUDAGuard guard(logits.device());

    const at::Tensor ids64 = per_token(ids, logits, at::kLong, "ids");
    const at::Tensor lse32 = per_token(lse, logits, at::kFloat, "lse");
    at::Tensor gl, ge, mean_z32;
    if (grad_logprobs.has_value()) gl = per_token(*grad_logprobs, logits, at::kFloat, "grad_logprobs");
    if (grad_entropy.has_value()) {
        ge = per_token(*grad_entropy, logits, at::kFloat, "grad_entropy");
        mean_z32 = per_token(mean_z, logits, at::kFloat, "mean_z");
    }

    check_launch(grpo_sweep_backward(dtype, logits.data_ptr(), logits.stride(0), logits.stride(1),
                                     grad_out.data_ptr(), grad_out.stride(0), grad_out.stride(1),
                                     ids64.data_ptr<int64_t>(), lse32.data_ptr<float>(),
                                     mean_z32.defined() ? mean_z32.data_ptr<float>() : nullptr,
                                     gl.defined() ? gl.data_ptr<float>() : nullptr,
                                     ge.defined() ? ge.data_ptr<float>() : nullptr, logits.size(0), logits.size(1),
                                     logits.size(2), inv_temperature, c10::cuda::getCurrentCUDAStream().stream()),
                 "grpo_sweep_backward");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "grpo_kernels CUDA C++ vocabulary sweeps (csrc/); call through grpo_kernels.cuda";
    m.def("forward", &forward, "logits (B, T, V), ids (B, T) -> [logprobs, entropy, lse, mean_z], each (B, T) fp32",
          py::arg("logits"), py::arg("ids"), py::arg("temperature"));
    m.def("backward", &backward,
          "Writes dL/dlogits = (gl (onehot - p) + ge p (mean_z - z)) / temperature into grad_out (may be logits)",
          py::arg("logits"), py::arg("ids"), py::arg("temperature"), py::arg("lse"), py::arg("mean_z"),
          py::arg("grad_logprobs"), py::arg("grad_entropy"), py::arg("grad_out"));
}
