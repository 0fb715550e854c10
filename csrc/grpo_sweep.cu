// The vocabulary sweeps of docs/design.md in CUDA C++: log pi(y), entropy, and their gradient.
//
// Per token (a "row" of the (B, T, V) logits), z = logits * inv_t (inv_t = 1 / temperature,
// one scalar or one per row), p = softmax(z), and the row's three statistics are kept apart:
// m = max z, log_sum = log sum exp(z - m), mean_rel = E_p[z] - m. They are never added into
// one rounded lse, which would cost eps * |lse| in every log-prob (docs/design.md).
//   forward   reads an active row once, each thread keeping an online triple (max m,
//             sum exp(z - m), sum exp(z - m) * (z - m)) that the block then merges, and writes
//             five fp32 numbers: logprob = (z_y - m) - log_sum, entropy = log_sum - mean_rel,
//             m, log_sum, mean_rel.
//   backward  reads the row once more and writes the gradient once:
//             grad = (c * (onehot(y) - p) + e * p * (mean_rel - (z - m))) * inv_t,
//             p = exp((z - m) - log_sum), c = dL/dlogprob and e = dL/dentropy from the loss.
// Inactive rows (active[row] == 0) are never read: outputs 0, gradient row 0. ids are global
// vocabulary ids; column 0 of the logits is id vocab_start.
//
// Rules (SPEC section 3): a 1-D grid over rows, one block per row (blocks loop past 2^31 - 1
// rows); int64 offsets; any element strides on B and T; fp32 accumulation; no atomics, and
// every reduction in a fixed order, so the same input gives bitwise the same output;
// temperature, shapes and strides are runtime arguments (only the dtype and "has an entropy
// gradient" are template parameters). Rows are read in 16-byte packs whatever their alignment.
//
// No torch headers: binding.cpp is the only torch-aware file. The C ABI is grpo_sweep.h.

#include "grpo_sweep.h"
#include "grpo_device.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>
#include <stdint.h>

namespace {

// 256 threads: 8 warps per row keep 4 x 16-byte loads in flight per thread (16 KiB per
// block). Capping registers at 64 (launch bounds) lets four blocks share an SM: 64 KiB of
// outstanding loads per SM, several times what covers HBM latency at full bandwidth
// (~3 TB/s x ~0.7 us / 132 SMs = 16 KiB). A 151,936-wide bf16 row is ~74 packs per thread.
constexpr int kThreads = 256;
constexpr int kMinBlocksPerSm = 4;
// Packs loaded per thread before any is used: independent loads in flight per thread.
constexpr int kUnroll = 4;

// ---------------------------------------------------------------------------------------
// Per-row inputs of the sweeps (grpo_device.cuh has the rest).

// 1 / temperature of the row: per row when given, else the scalar.
__device__ __forceinline__ float row_inv_temperature(const float* __restrict__ temperature_rows, int64_t row,
                                                     float inv_temperature) {
    return temperature_rows != nullptr ? 1.0f / temperature_rows[row] : inv_temperature;
}

// ---------------------------------------------------------------------------------------
// Kernels. Grid: min(rows, 2^31 - 1) blocks of kThreads, each block looping over rows
// blockIdx.x, blockIdx.x + gridDim.x, ... (one row per block whenever rows < 2^31).

/// Forward sweep.
/// Reads:  active[row] (NULL: all active); for an active row only: logits[b, t, :]
///         (row = b * T + t, element offset b * stride_b + t * stride_t), ids[row] (int64,
///         global), temperature_rows[row] (NULL: inv_temperature).
/// Writes: logprobs[row], entropy[row], m[row], log_sum[row], mean_rel[row], fp32; all 0
///         on an inactive row.
/// An id outside [vocab_start, vocab_start + V) is never dereferenced: its logprob is NaN.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
grpo_forward_kernel(const scalar_t* __restrict__ logits, int64_t stride_b, int64_t stride_t,
                    const int64_t* __restrict__ ids, const uint8_t* __restrict__ active,
                    const float* __restrict__ temperature_rows, float inv_temperature, int64_t vocab_start,
                    float* __restrict__ logprobs, float* __restrict__ entropy, float* __restrict__ m_out,
                    float* __restrict__ log_sum_out, float* __restrict__ mean_rel_out, int64_t n_rows,
                    int64_t T, int64_t V) {
    constexpr int kVec = Pack<scalar_t>::kVec;
    for (int64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
        if (!row_is_active(active, row)) {  // uniform over the block: no thread reaches a barrier
            if (threadIdx.x == 0) {
                logprobs[row] = 0.f;
                entropy[row] = 0.f;
                m_out[row] = 0.f;
                log_sum_out[row] = 0.f;
                mean_rel_out[row] = 0.f;
            }
            continue;
        }
        const float inv_t = row_inv_temperature(temperature_rows, row, inv_temperature);
        const int64_t b = row / T, t = row - b * T;
        const scalar_t* x = logits + b * stride_b + t * stride_t;
        const int phase = phase_of(x);
        const int64_t packs = num_packs<scalar_t>(V, phase);

        // The target logit, issued first so its latency hides behind the sweep. Scaled by the
        // same multiply as in the sweep, so z_y - m is exactly 0 when y is the argmax.
        float z_y = CUDART_NAN_F;
        if (threadIdx.x == 0) {
            const int64_t col = target_column(ids[row], vocab_start, V);
            if (col >= 0) z_y = to_float(x[col]) * inv_t;
        }

        Stats st = Stats::empty();
        for (int64_t k0 = threadIdx.x; k0 < packs; k0 += kUnroll * kThreads) {
            float z[kUnroll][kVec];
#pragma unroll
            for (int r = 0; r < kUnroll; ++r) {  // all loads first, then the math
                const int64_t k = k0 + r * kThreads;
                if (k < packs) {
                    load_pack(x, k, phase, V, -CUDART_INF_F, z[r]);
                } else {
#pragma unroll
                    for (int j = 0; j < kVec; ++j) z[r][j] = -CUDART_INF_F;
                }
            }
#pragma unroll
            for (int r = 0; r < kUnroll; ++r) {
#pragma unroll
                for (int j = 0; j < kVec; ++j) z[r][j] *= inv_t;
                st.add(z[r]);
            }
        }

        st = block_reduce<kThreads>(st);
        if (threadIdx.x == 0) {
            // s >= 1 for a finite row (its max adds exp(0) = 1), so log_sum >= 0 and
            // mean_rel <= 0. All -inf: m = -inf, s = 0, so log_sum = -inf and the rest NaN.
            const float log_sum = logf(st.s), mean_rel = st.u / st.s;
            logprobs[row] = (z_y - st.m) - log_sum;
            entropy[row] = log_sum - mean_rel;
            m_out[row] = st.m;
            log_sum_out[row] = log_sum;
            mean_rel_out[row] = mean_rel;
        }
    }
}

/// Backward sweep.
/// Reads:  active[row] (NULL: all active); for an active row only: logits[b, t, :], ids[row],
///         temperature_rows[row] (NULL: inv_temperature), m[row], log_sum[row],
///         grad_logprobs[row] (NULL: 0) and, when kHasEntropy, mean_rel[row] and grad_entropy[row].
/// Writes: every element of grad[b, t, :]:
///         (c (onehot(y) - p) + e p (mean_rel - (z - m))) * inv_t, p = exp((z - m) - log_sum),
///         in scalar_t, with onehot(y) at column ids[row] - vocab_start (absent when the id is
///         outside this shard); 0 on an inactive row, whose logits are not read.
/// grad may alias logits: no __restrict__ on either, and each element is loaded by the
/// thread that later stores it, before it stores it.
template <typename scalar_t, bool kHasEntropy>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
grpo_backward_kernel(const scalar_t* logits, int64_t stride_b, int64_t stride_t, scalar_t* grad,
                     int64_t grad_stride_b, int64_t grad_stride_t, const int64_t* __restrict__ ids,
                     const uint8_t* __restrict__ active, const float* __restrict__ temperature_rows,
                     float inv_temperature, int64_t vocab_start, const float* __restrict__ m_in,
                     const float* __restrict__ log_sum_in, const float* __restrict__ mean_rel_in,
                     const float* __restrict__ grad_logprobs, const float* __restrict__ grad_entropy,
                     int64_t n_rows, int64_t T, int64_t V) {
    constexpr int kVec = Pack<scalar_t>::kVec;
    for (int64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const int64_t b = row / T, t = row - b * T;
        scalar_t* g = grad + b * grad_stride_b + t * grad_stride_t;

        if (!row_is_active(active, row)) {
            // Zeros in the gradient row's own packs (its phase, not the logits'): 16-byte stores.
            const int g_phase = phase_of(g);
            const int64_t g_packs = num_packs<scalar_t>(V, g_phase);
            float zeros[kVec];
#pragma unroll
            for (int j = 0; j < kVec; ++j) zeros[j] = 0.f;
            for (int64_t k = threadIdx.x; k < g_packs; k += kThreads) store_pack(g, k, g_phase, V, true, zeros);
            continue;
        }

        const scalar_t* x = logits + b * stride_b + t * stride_t;
        const int phase = phase_of(x);
        const bool packed_store = phase_of(g) == phase;
        const int64_t packs = num_packs<scalar_t>(V, phase);

        const float inv_t = row_inv_temperature(temperature_rows, row, inv_temperature);
        const int64_t col = target_column(ids[row], vocab_start, V);
        const float m = m_in[row], log_sum = log_sum_in[row];
        // The inv_t of dz/dlogits folds into the per-row coefficients.
        const float c = grad_logprobs != nullptr ? grad_logprobs[row] * inv_t : 0.f;
        float e = 0.f, mean_rel = 0.f;
        if (kHasEntropy) {
            e = grad_entropy[row] * inv_t;
            mean_rel = mean_rel_in[row];
        }
        // The target's c (1 - p_y) as -c expm1(log p_y), once per row: for a confident token p_y
        // rounds to 1 and 1 - p_y as a difference would lose all of it.
        float target = 0.f;
        if (col >= 0) target = -c * expm1f((to_float(x[col]) * inv_t - m) - log_sum);

        for (int64_t k0 = threadIdx.x; k0 < packs; k0 += kUnroll * kThreads) {
            // All loads first, kept in the logits' type (half the registers of fp32 for
            // 16-bit logits), then the math pack by pack.
            Pack<scalar_t> raw[kUnroll];
#pragma unroll
            for (int r = 0; r < kUnroll; ++r) {
                const int64_t k = k0 + r * kThreads;
                if (k < packs) raw[r] = load_pack_raw(x, k, phase, V, from_float<scalar_t>(0.f));
            }
#pragma unroll
            for (int r = 0; r < kUnroll; ++r) {
                const int64_t k = k0 + r * kThreads;
                if (k >= packs) continue;
                // The target's lane in this pack (meaningful only when col >= 0).
                const int64_t y_lane = col - (k * kVec - phase);
                float out[kVec];
#pragma unroll
                for (int j = 0; j < kVec; ++j) {
                    // (z - m) first, exact for the large entries; then the log-sum.
                    const float d = to_float(raw[r].v[j]) * inv_t - m;
                    const float p = exp_nonpositive(d - log_sum);
                    float gv = (col >= 0 && y_lane == j) ? target : -c * p;
                    if (kHasEntropy) {
                        // dH/dz = p (mean_rel - (z - m)); a -inf logit has p = 0 and adds 0,
                        // not 0 * inf, while a NaN p still poisons the row.
                        gv += p * e * (p > 0.f ? mean_rel - d : 0.f);
                    }
                    out[j] = gv;
                }
                store_pack(g, k, phase, V, packed_store, out);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Launchers.

constexpr int64_t kMaxGrid = 0x7fffffff;  // gridDim.x limit; more rows loop in the kernel

unsigned grid_for(int64_t n_rows) { return static_cast<unsigned>(n_rows < kMaxGrid ? n_rows : kMaxGrid); }

// The argument checks both entry points share: sizes, and a vocab_start whose shard
// [vocab_start, vocab_start + V) fits in int64 (so target_column cannot overflow).
bool valid_sizes(int64_t B, int64_t T, int64_t V, int64_t vocab_start) {
    return B >= 0 && T >= 0 && V >= 1 && vocab_start >= 0 && vocab_start <= INT64_MAX - V &&
           (T == 0 || B <= INT64_MAX / T);
}

template <typename scalar_t>
cudaError_t launch_forward(const void* logits, int64_t stride_b, int64_t stride_t, const int64_t* ids,
                           const uint8_t* active, const float* temperature_rows, float inv_temperature,
                           int64_t vocab_start, float* logprobs, float* entropy, float* m, float* log_sum,
                           float* mean_rel, int64_t n_rows, int64_t T, int64_t V, cudaStream_t stream) {
    grpo_forward_kernel<scalar_t><<<grid_for(n_rows), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(logits), stride_b, stride_t, ids, active, temperature_rows, inv_temperature,
        vocab_start, logprobs, entropy, m, log_sum, mean_rel, n_rows, T, V);
    return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_backward(const void* logits, int64_t stride_b, int64_t stride_t, void* grad,
                            int64_t grad_stride_b, int64_t grad_stride_t, const int64_t* ids, const uint8_t* active,
                            const float* temperature_rows, float inv_temperature, int64_t vocab_start,
                            const float* m, const float* log_sum, const float* mean_rel,
                            const float* grad_logprobs, const float* grad_entropy, int64_t n_rows, int64_t T,
                            int64_t V, cudaStream_t stream) {
    const scalar_t* x = static_cast<const scalar_t*>(logits);
    scalar_t* g = static_cast<scalar_t*>(grad);
    if (grad_entropy != nullptr) {
        grpo_backward_kernel<scalar_t, true><<<grid_for(n_rows), kThreads, 0, stream>>>(
            x, stride_b, stride_t, g, grad_stride_b, grad_stride_t, ids, active, temperature_rows, inv_temperature,
            vocab_start, m, log_sum, mean_rel, grad_logprobs, grad_entropy, n_rows, T, V);
    } else {
        grpo_backward_kernel<scalar_t, false><<<grid_for(n_rows), kThreads, 0, stream>>>(
            x, stride_b, stride_t, g, grad_stride_b, grad_stride_t, ids, active, temperature_rows, inv_temperature,
            vocab_start, m, log_sum, nullptr, grad_logprobs, nullptr, n_rows, T, V);
    }
    return cudaGetLastError();
}

}  // namespace

extern "C" cudaError_t grpo_sweep_forward(grpo_dtype dtype, const void* logits, int64_t stride_b,
                                          int64_t stride_t, const int64_t* ids, const uint8_t* active,
                                          const float* temperature_rows, float inv_temperature,
                                          int64_t vocab_start, float* logprobs, float* entropy, float* m,
                                          float* log_sum, float* mean_rel, int64_t B, int64_t T, int64_t V,
                                          cudaStream_t stream) {
    if (!valid_sizes(B, T, V, vocab_start)) return cudaErrorInvalidValue;
    const int64_t n_rows = B * T;
    if (n_rows == 0) return cudaSuccess;
    if (logits == nullptr || ids == nullptr || logprobs == nullptr || entropy == nullptr || m == nullptr ||
        log_sum == nullptr || mean_rel == nullptr) {
        return cudaErrorInvalidValue;
    }
    switch (dtype) {
        case GRPO_FLOAT32:
            return launch_forward<float>(logits, stride_b, stride_t, ids, active, temperature_rows, inv_temperature,
                                         vocab_start, logprobs, entropy, m, log_sum, mean_rel, n_rows, T, V, stream);
        case GRPO_FLOAT16:
            return launch_forward<__half>(logits, stride_b, stride_t, ids, active, temperature_rows,
                                          inv_temperature, vocab_start, logprobs, entropy, m, log_sum, mean_rel,
                                          n_rows, T, V, stream);
        case GRPO_BFLOAT16:
            return launch_forward<__nv_bfloat16>(logits, stride_b, stride_t, ids, active, temperature_rows,
                                                 inv_temperature, vocab_start, logprobs, entropy, m, log_sum,
                                                 mean_rel, n_rows, T, V, stream);
    }
    return cudaErrorInvalidValue;
}

extern "C" cudaError_t grpo_sweep_backward(grpo_dtype dtype, const void* logits, int64_t stride_b,
                                           int64_t stride_t, void* grad_out, int64_t grad_stride_b,
                                           int64_t grad_stride_t, const int64_t* ids, const uint8_t* active,
                                           const float* temperature_rows, float inv_temperature,
                                           int64_t vocab_start, const float* m, const float* log_sum,
                                           const float* mean_rel, const float* grad_logprobs,
                                           const float* grad_entropy, int64_t B, int64_t T, int64_t V,
                                           cudaStream_t stream) {
    if (!valid_sizes(B, T, V, vocab_start)) return cudaErrorInvalidValue;
    const int64_t n_rows = B * T;
    if (n_rows == 0) return cudaSuccess;
    if (logits == nullptr || grad_out == nullptr || ids == nullptr || m == nullptr || log_sum == nullptr ||
        (grad_entropy != nullptr && mean_rel == nullptr)) {
        return cudaErrorInvalidValue;
    }
    switch (dtype) {
        case GRPO_FLOAT32:
            return launch_backward<float>(logits, stride_b, stride_t, grad_out, grad_stride_b, grad_stride_t, ids,
                                          active, temperature_rows, inv_temperature, vocab_start, m, log_sum,
                                          mean_rel, grad_logprobs, grad_entropy, n_rows, T, V, stream);
        case GRPO_FLOAT16:
            return launch_backward<__half>(logits, stride_b, stride_t, grad_out, grad_stride_b, grad_stride_t, ids,
                                           active, temperature_rows, inv_temperature, vocab_start, m, log_sum,
                                           mean_rel, grad_logprobs, grad_entropy, n_rows, T, V, stream);
        case GRPO_BFLOAT16:
            return launch_backward<__nv_bfloat16>(logits, stride_b, stride_t, grad_out, grad_stride_b,
                                                  grad_stride_t, ids, active, temperature_rows, inv_temperature,
                                                  vocab_start, m, log_sum, mean_rel, grad_logprobs, grad_entropy,
                                                  n_rows, T, V, stream);
    }
    return cudaErrorInvalidValue;
}
