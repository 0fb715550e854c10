/* The C ABI of the vocabulary sweeps in grpo_sweep.cu (see docs/design.md).
 *
 * Plain C types only, so the kernels build with nvcc alone (csrc/compile_check.sh) and any
 * host code can call them; binding.cpp is the torch side. Shapes: logits and grad_out are
 * (B, T, V) with element strides (stride_b, stride_t, 1); every per-token array (ids, the
 * four outputs, the upstream gradients) is a contiguous (B, T) array indexed by
 * row = b * T + t. Launches are asynchronous on `stream`; the return value is the launch
 * status (cudaSuccess = 0), never a device-side result.
 */
#ifndef GRPO_SWEEP_H_
#define GRPO_SWEEP_H_

#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    GRPO_FLOAT32 = 0,
    GRPO_FLOAT16 = 1,
    GRPO_BFLOAT16 = 2,
} grpo_dtype;

/* z = logits * inv_temperature, p = softmax(z), y = ids[row]. Writes, fp32, per row:
 * logprobs = z_y - lse, entropy = lse - mean_z, lse = logsumexp(z), mean_z = E_p[z].
 * Reads the logits once. An id outside [0, V) gives NaN instead of an out-of-bounds read. */
cudaError_t grpo_sweep_forward(
    grpo_dtype dtype, const void* logits, int64_t stride_b, int64_t stride_t,
    const int64_t* ids, float* logprobs, float* entropy, float* lse, float* mean_z,
    int64_t B, int64_t T, int64_t V, float inv_temperature, cudaStream_t stream);

/* Writes grad_out[row, v] = (gl * (onehot(y)_v - p_v) + ge * p_v * (mean_z - z_v)) * inv_temperature
 * in `dtype`. grad_logprobs (gl) or grad_entropy (ge) may be NULL: that term is zero, and
 * without ge its work is skipped. grad_out may alias logits (same strides): every element
 * is read before the same thread writes it. */
cudaError_t grpo_sweep_backward(
    grpo_dtype dtype, const void* logits, int64_t stride_b, int64_t stride_t,
    void* grad_out, int64_t grad_stride_b, int64_t grad_stride_t,
    const int64_t* ids, const float* lse, const float* mean_z,
    const float* grad_logprobs, const float* grad_entropy,
    int64_t B, int64_t T, int64_t V, float inv_temperature, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* GRPO_SWEEP_H_ */
