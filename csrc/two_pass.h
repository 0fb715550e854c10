/* The C ABI of the two-pass token-local loss in two_pass.cu (SPEC section 14).
 *
 * One launch reads each active row of the logits from DRAM once, keeps it on chip (in the
 * shared memory of one thread block, or split over the blocks of a thread-block cluster on
 * sm_90, which exchange their partial softmax statistics through distributed shared memory),
 * computes the row's log-prob, entropy, per-token loss and loss coefficients, and writes the
 * row's gradient once.
 *
 * Shapes: logits and grad are (B, L, V) with element strides (stride_b, stride_l, 1); the
 * scored rows are positions [row_start, row_start + T) of each sequence: row r = b * T + t
 * reads logits[b, row_start + t, :]. Every per-row array is contiguous, N = B * T elements,
 * indexed by r. grad may be the logits themselves (same strides): each element is read before
 * it is written. Every element of grad is written: rows outside the window, and inactive
 * rows, get zeros.
 *
 * Per active row r (inactive rows, active[r] == 0, are never read: logprobs, entropy and
 * sums are 0 there), z = logits_row * inv_t, inv_t = 1 / temperature_rows[r] (NaN when that
 * is <= 0 or not finite) or the scalar inv_temperature when temperature_rows is NULL:
 *   l = (z_y - m) - log s, H = log s - u / s, with m = max z, s = sum exp(z - m),
 *   u = sum exp(z - m) (z - m) (never a rounded lse); an id outside [0, V) gives l = NaN.
 *   ratio = r_t = exp(l - old) (old = l when old_logprobs is NULL)
 *   loss, dloss/dratio: the clipped surrogate of loss_triton.py (_surrogate: delta, dual clip),
 *   times rollout[r] when given; dloss_dl = dloss/dratio * r_t; with ref_logprobs the k1/k2/k3
 *   KL of d = l - ref (times r_t with kl_ratio_weight), loss += beta kl, dloss_dl += beta dkl.
 *   c = w[r] dloss_dl scalars[0], e = mask[r] scalars[1] (0 without has_entropy_grad)
 *   grad row = (c (onehot(y) - p) + e p (u / s - (z - m))) inv_t, p = exp((z - m) - log s),
 *   the target's c (1 - p_y) written as -c expm1(l).
 *   logprobs[r] = l, entropy[r] = H,
 *   sums[k * N + r] = [w loss, mask, mask kl, mask H, mask low, mask high, mask max(low, high)]
 *   with low = ratio < 1 - eps_low and A < 0, high = ratio > 1 + eps_high and A > 0.
 * A non-finite per-token input (w, mask, A, old, ref, rollout) or a non-finite l or H on an
 * active row makes its seven sums and its gradient row NaN (logprobs and entropy stay those
 * of the logits).
 *
 * scalars is a device pointer, read on the device only (never synchronised with the host).
 * Launches are asynchronous on `stream`; the return value is the launch status.
 */
#ifndef GRPO_TWO_PASS_H_
#define GRPO_TWO_PASS_H_

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#include "grpo_sweep.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    grpo_dtype dtype;
    const void* logits;
    int64_t stride_b, stride_l;
    void* grad;
    int64_t grad_stride_b, grad_stride_l;
    int64_t B, L, V, row_start, T;

    const int64_t* ids;             /* (N,) */
    const uint8_t* active;          /* (N,) or NULL: every row active */
    const float* temperature_rows;  /* (N,) or NULL: inv_temperature */
    float inv_temperature;

    const float* w;             /* (N,) per-token weight of the loss */
    const float* mask;          /* (N,) mask weight (entropy, metrics) */
    const float* advantages;    /* (N,) A */
    const float* old_logprobs;  /* (N,) or NULL */
    const float* ref_logprobs;  /* (N,) or NULL: no KL */
    const float* rollout;       /* (N,) or NULL */
    const float* scalars;       /* (2,) device: [c scale, e scale] */

    float beta, eps_low, eps_high, delta, dual_clip;
    int has_delta, has_dual_clip, kl_estimator /* 1, 2, 3 */, kl_ratio_weight, has_entropy_grad;

    float* logprobs;  /* (N,) */
    float* entropy;   /* (N,) */
    float* sums;      /* (7, N) */

    int cluster_size;  /* 0: chosen from V and the device; else 1, 2, 4, 8 or 16 */
    size_t smem_bytes; /* 0, or grpo_two_pass_plan's for this cluster_size (skips planning again) */
} grpo_two_pass_args;

/* How the kernel would run rows of V elements of `dtype` on `device`: the blocks per row (the
 * cluster size; 1 means one block holds the row, no cluster) and the dynamic shared memory per
 * block. requested_cluster 0 chooses. cudaErrorNotSupported when no cluster size the device
 * and this build allow holds the row on chip (sm_80, or a build without sm_90 code, holds
 * only what one block's shared memory takes); `why` (if not NULL, `why_len` bytes) then says
 * so in words. */
cudaError_t grpo_two_pass_plan(grpo_dtype dtype, int64_t V, int device, int requested_cluster, int* cluster_size,
                               size_t* smem_bytes, char* why, size_t why_len);

/* Runs the two-pass loss on `stream` (the plan of grpo_two_pass_plan for args->cluster_size). */
cudaError_t grpo_two_pass(const grpo_two_pass_args* args, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* GRPO_TWO_PASS_H_ */
