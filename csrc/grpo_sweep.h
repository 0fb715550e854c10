/* The C ABI of the vocabulary sweeps in grpo_sweep.cu (docs/design.md, "Backend sweep contract").
 *
 * Plain C types only, so the kernels build with nvcc alone (csrc/compile_check.sh) and any
 * host code can call them; binding.cpp is the torch side.
 *
 * Shapes: logits and grad_out are (B, T, V) with element strides (stride_b, stride_t, 1);
 * row r is logits[r / T, r % T]. Every per-row array (ids, active, temperature_rows, the
 * five forward outputs, the upstream gradients) is a contiguous array of N = B * T elements
 * indexed by row = b * T + t. ids are *global* vocabulary ids: column 0 of the logits is id
 * vocab_start (tensor parallelism; 0 otherwise), so the target column of a row is
 * ids[row] - vocab_start.
 *
 * Per row, z = logits * inv_t with inv_t = 1 / temperature_rows[row] (one temperature per
 * token) or, when temperature_rows is NULL, the scalar inv_temperature; p = softmax(z).
 * Per-row temperatures are not checked: they must be finite and > 0 on active rows.
 *
 * active (NULL: every row active) is a byte per row, 0 = inactive. An inactive row is never
 * read: not its logits, id, temperature or any per-row input. The forward writes 0 to its
 * five outputs; the backward writes 0 to every element of its gradient row.
 *
 * Launches are asynchronous on `stream`; the return value is the launch status
 * (cudaSuccess = 0), never a device-side result. cudaErrorInvalidValue for B < 0, T < 0,
 * V < 1, vocab_start < 0, vocab_start + V past INT64_MAX, or a NULL pointer the call needs.
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

/* Forward sweep. Reads each active row of the logits once (and its id, temperature).
 * Writes, fp32, per row (each output its own array):
 *   m        = max_v z_v
 *   log_sum  = log sum_v exp(z_v - m)
 *   mean_rel = E_p[z] - m = sum exp(z - m) (z - m) / sum exp(z - m)
 *   logprobs = (z_y - m) - log_sum       (never z_y - (m + log_sum): no rounded lse)
 *   entropy  = log_sum - mean_rel
 * and 0 to all five on inactive rows. An id outside [vocab_start, vocab_start + V) gives a
 * NaN logprob (the other four stay valid), never an out-of-bounds read. A row of all -inf,
 * or with a NaN or +inf logit, gives non-finite outputs. */
cudaError_t grpo_sweep_forward(
    grpo_dtype dtype, const void* logits, int64_t stride_b, int64_t stride_t,
    const int64_t* ids, const uint8_t* active, const float* temperature_rows, float inv_temperature,
    int64_t vocab_start,
    float* logprobs, float* entropy, float* m, float* log_sum, float* mean_rel,
    int64_t B, int64_t T, int64_t V, cudaStream_t stream);

/* Backward sweep. Reads each active row of the logits once more, with its id, temperature,
 * m, log_sum, grad_logprobs (gl) and, if grad_entropy (ge) is given, mean_rel; writes every
 * element of grad_out, in `dtype`:
 *   grad_out[row, v] = (gl * (onehot(y)_v - p_v) + ge * p_v * (mean_rel - (z_v - m))) * inv_t
 *   with p_v = exp((z_v - m) - log_sum)
 * onehot(y) is at column ids[row] - vocab_start, and absent when the id lies outside
 * [vocab_start, vocab_start + V) (another shard owns it). grad_logprobs or grad_entropy may be
 * NULL: that term is zero, and without ge its work is skipped (mean_rel may then be NULL).
 * Inactive rows: grad_out row = 0, nothing of the row read. grad_out may alias logits (same
 * strides): every element is read before the same thread writes it. */
cudaError_t grpo_sweep_backward(
    grpo_dtype dtype, const void* logits, int64_t stride_b, int64_t stride_t,
    void* grad_out, int64_t grad_stride_b, int64_t grad_stride_t,
    const int64_t* ids, const uint8_t* active, const float* temperature_rows, float inv_temperature,
    int64_t vocab_start, const float* m, const float* log_sum, const float* mean_rel,
    const float* grad_logprobs, const float* grad_entropy,
    int64_t B, int64_t T, int64_t V, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* GRPO_SWEEP_H_ */
