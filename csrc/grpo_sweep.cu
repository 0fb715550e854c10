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
constexpr int kWarps = kThreads / 32;
// Packs loaded per thread before any is used: independent loads in flight per thread.
constexpr int kUnroll = 4;
constexpr float kLog2e = 1.4426950408889634f;

// ---------------------------------------------------------------------------------------
// Element types: loads widen to fp32, stores round to nearest.

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename scalar_t> __device__ __forceinline__ scalar_t from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// exp(x) as a multiply and exp2f, which lowers to one ex2.approx.f32 (MUFU.EX2, ~2 ulp) where
// expf would add a range reduction. Arguments are <= 0 (z - m, (z - m) - log_sum): the rounding of
// x * log2(e) costs |x| * 6e-8 in the exponent, below the fp32 error of a 10^5-term sum.
__device__ __forceinline__ float exp_nonpositive(float x) { return exp2f(x * kLog2e); }

// ---------------------------------------------------------------------------------------
// A row as 16-byte packs. Rows start wherever the strides put them (a logits[:, :-1] view
// with odd V, say), so the packs are aligned to memory, not to the row: pack k holds row
// elements [k * kVec - phase, (k + 1) * kVec - phase), where `phase` is how many elements
// the row start lies past a 16-byte boundary. Only the first and last pack can be partial;
// those two go element by element, every other pack is one 16-byte access.

template <typename scalar_t>
struct alignas(16) Pack {
    static constexpr int kVec = 16 / sizeof(scalar_t);
    scalar_t v[kVec];
};

template <typename scalar_t>
__device__ __forceinline__ int phase_of(const scalar_t* row) {
    return static_cast<int>((reinterpret_cast<uintptr_t>(row) & 15) / sizeof(scalar_t));
}

template <typename scalar_t>
__device__ __forceinline__ int64_t num_packs(int64_t V, int phase) {
    constexpr int kVec = Pack<scalar_t>::kVec;
    return (V + phase + kVec - 1) / kVec;
}

// Loads pack k of `row` in the row's own type (16-bit packs stay 4 registers until widened);
// lanes outside [0, V) read as `fill`.
template <typename scalar_t>
__device__ __forceinline__ Pack<scalar_t> load_pack_raw(const scalar_t* row, int64_t k, int phase, int64_t V,
                                                        scalar_t fill) {
    constexpr int kVec = Pack<scalar_t>::kVec;
    const int64_t first = k * kVec - phase;
    if (first >= 0 && first + kVec <= V) return *reinterpret_cast<const Pack<scalar_t>*>(row + first);
    Pack<scalar_t> pack;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
        const int64_t i = first + j;
        pack.v[j] = (i >= 0 && i < V) ? row[i] : fill;
    }
    return pack;
}

// Loads pack k of `row` as fp32; lanes outside [0, V) read as `fill` (exact in every type).
template <typename scalar_t>
__device__ __forceinline__ void load_pack(const scalar_t* row, int64_t k, int phase, int64_t V, float fill,
                                          float (&out)[Pack<scalar_t>::kVec]) {
    const Pack<scalar_t> pack = load_pack_raw(row, k, phase, V, from_float<scalar_t>(fill));
#pragma unroll
    for (int j = 0; j < Pack<scalar_t>::kVec; ++j) out[j] = to_float(pack.v[j]);
}

// Stores the lanes of pack k (row-relative, as load_pack) that lie in [0, V). `packed` says
// whether this row has the same phase as the row the pack was loaded from; if not (a
// gradient buffer laid out differently from a strided logits view) the stores go element
// by element, still coalesced across the warp.
template <typename scalar_t>
__device__ __forceinline__ void store_pack(scalar_t* row, int64_t k, int phase, int64_t V, bool packed,
                                           const float (&in)[Pack<scalar_t>::kVec]) {
    constexpr int kVec = Pack<scalar_t>::kVec;
    const int64_t first = k * kVec - phase;
    if (packed && first >= 0 && first + kVec <= V) {
        Pack<scalar_t> pack;
#pragma unroll
        for (int j = 0; j < kVec; ++j) pack.v[j] = from_float<scalar_t>(in[j]);
        *reinterpret_cast<Pack<scalar_t>*>(row + first) = pack;
    } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
            const int64_t i = first + j;
            if (i >= 0 && i < V) row[i] = from_float<scalar_t>(in[j]);
        }
    }
}

template <int N>
__device__ __forceinline__ float pairwise_sum(const float (&x)[N]) {
    // A tree, not a chain: independent adds and a smaller rounding error per pack.
    float part[N];
#pragma unroll
    for (int j = 0; j < N; ++j) part[j] = x[j];
#pragma unroll
    for (int width = N / 2; width > 0; width /= 2) {
#pragma unroll
        for (int j = 0; j < width; ++j) part[j] += part[j + width];
    }
    return part[0];
}

// ---------------------------------------------------------------------------------------
// Online softmax statistics of a set of z values, relative to their running max m:
//   s = sum exp(z - m),   u = sum exp(z - m) * (z - m),
// so log_sum = log s, mean_rel = E_p[z] - m = u / s and the entropy is log s - u / s.
// Keeping u relative to m makes every term of u <= 0 (no cancellation) and the entropy a
// difference of two non-negative numbers.
//
// Non-finite rows: fmaxf skips NaN, so m stays finite or -inf, while exp(NaN) = NaN reaches
// s; a +inf logit gives exp(inf - inf) = NaN; an all -inf row gives s = 0, log s = -inf.
// Each of these ends as a non-finite output, never a trap. While m is -inf the shift is 0,
// which avoids exp(-inf - -inf) = NaN for rows that merely start with -inf.
struct Stats {
    float m, s, u;

    __device__ __forceinline__ static Stats empty() { return {-CUDART_INF_F, 0.f, 0.f}; }

    // Rebases (s, u) from max m to a larger max; a select, not 0 * -inf, when s is empty.
    __device__ __forceinline__ void rebase(float new_m) {
        const float alpha = exp_nonpositive(m - new_m);
        u = alpha * (u + (s > 0.f ? (m - new_m) * s : 0.f));
        s *= alpha;
        m = new_m;
    }

    template <int N>
    __device__ __forceinline__ void add(const float (&z)[N]) {
        float z_max = z[0];
#pragma unroll
        for (int j = 1; j < N; ++j) z_max = fmaxf(z_max, z[j]);
        if (z_max > m) rebase(z_max);  // rare after the first packs of a row
        const float shift = m == -CUDART_INF_F ? 0.f : m;
        float e[N], ed[N];
#pragma unroll
        for (int j = 0; j < N; ++j) {
            const float d = z[j] - shift;
            e[j] = exp_nonpositive(d);
            ed[j] = e[j] > 0.f ? e[j] * d : 0.f;  // a -inf logit adds 0, not 0 * -inf
        }
        s += pairwise_sum(e);
        u += pairwise_sum(ed);
    }

    __device__ __forceinline__ static Stats merge(const Stats& a, const Stats& b) {
        Stats r{fmaxf(a.m, b.m), 0.f, 0.f};
        const float shift = r.m == -CUDART_INF_F ? 0.f : r.m;
        const float ra = exp_nonpositive(a.m - shift), rb = exp_nonpositive(b.m - shift);
        r.s = a.s * ra + b.s * rb;
        r.u = ra * (a.u + (a.s > 0.f ? (a.m - shift) * a.s : 0.f)) +
              rb * (b.u + (b.s > 0.f ? (b.m - shift) * b.s : 0.f));
        return r;
    }
};

// The statistics of all threads of the block, valid in thread 0. A fixed shuffle tree and
// a fixed order over warps: bitwise reproducible. Safe to call once per row in a loop.
__device__ __forceinline__ Stats block_reduce(Stats st) {
    __shared__ Stats warp_stats[kWarps];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
        const Stats other{__shfl_down_sync(0xffffffffu, st.m, offset),
                          __shfl_down_sync(0xffffffffu, st.s, offset),
                          __shfl_down_sync(0xffffffffu, st.u, offset)};
        st = Stats::merge(st, other);
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // warp 0 has finished reading the previous row's partials
    if (lane == 0) warp_stats[warp] = st;
    __syncthreads();
    if (warp == 0) {
        st = lane < kWarps ? warp_stats[lane] : Stats::empty();
#pragma unroll
        for (int offset = kWarps / 2; offset > 0; offset /= 2) {
            const Stats other{__shfl_down_sync(0xffffffffu, st.m, offset),
                              __shfl_down_sync(0xffffffffu, st.s, offset),
                              __shfl_down_sync(0xffffffffu, st.u, offset)};
            st = Stats::merge(st, other);
        }
    }
    return st;
}

// ---------------------------------------------------------------------------------------
// Per-row inputs shared by both kernels.

// Whether row `row` is active (active == NULL: all are). Read by every thread of the block
// (one broadcast load), so the branch on it is uniform across the block.
__device__ __forceinline__ bool row_is_active(const uint8_t* __restrict__ active, int64_t row) {
    return active == nullptr || active[row] != 0;
}

// 1 / temperature of the row: per row when given, else the scalar.
__device__ __forceinline__ float row_inv_temperature(const float* __restrict__ temperature_rows, int64_t row,
                                                     float inv_temperature) {
    return temperature_rows != nullptr ? 1.0f / temperature_rows[row] : inv_temperature;
}

// The column of global id y in a shard whose column 0 is id vocab_start (>= 0, and
// vocab_start + V does not overflow: the launchers check), or -1 when another shard (or no
// shard: a negative or too-large id) owns it. No subtraction before the comparisons, so no
// overflow for any int64 id.
__device__ __forceinline__ int64_t target_column(int64_t y, int64_t vocab_start, int64_t V) {
    return (y >= vocab_start && y - vocab_start < V) ? y - vocab_start : -1;
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

        st = block_reduce(st);
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
