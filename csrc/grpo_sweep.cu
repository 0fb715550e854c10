// The vocabulary sweeps of docs/design.md in CUDA C++: log pi(y), entropy, and their gradient.
//
// Per token (a "row" of the (B, T, V) logits), z = logits * inv_temperature, p = softmax(z):
//   forward   reads the row once, each thread keeping an online triple (max m, sum exp(z - m),
//             sum exp(z - m) * (z - m)) that the block then merges, and writes four fp32
//             numbers: logprob = z_y - lse, entropy = lse - E_p[z], lse, mean_z = E_p[z].
//   backward  reads the row once more and writes the gradient once:
//             grad = (c * (onehot(y) - p) + e * p * (mean_z - z)) * inv_temperature,
//             c = dL/dlogprob and e = dL/dentropy from the loss layer.
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
// expf would add a range reduction. Arguments are <= 0 (z - max, z - lse): the rounding of
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

// Loads pack k of `row` as fp32; lanes outside [0, V) read as `fill`.
template <typename scalar_t>
__device__ __forceinline__ void load_pack(const scalar_t* row, int64_t k, int phase, int64_t V, float fill,
                                          float (&out)[Pack<scalar_t>::kVec]) {
    constexpr int kVec = Pack<scalar_t>::kVec;
    const int64_t first = k * kVec - phase;
    if (first >= 0 && first + kVec <= V) {
        const Pack<scalar_t> pack = *reinterpret_cast<const Pack<scalar_t>*>(row + first);
#pragma unroll
        for (int j = 0; j < kVec; ++j) out[j] = to_float(pack.v[j]);
    } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
            const int64_t i = first + j;
            out[j] = (i >= 0 && i < V) ? to_float(row[i]) : fill;
        }
    }
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
// so lse = m + log s, E_p[z] = m + u / s and the entropy is log s - u / s. Keeping u
// relative to m makes every term of u <= 0 (no cancellation) and the entropy a difference
// of two non-negative numbers.
//
// Non-finite rows: fmaxf skips NaN, so m stays finite or -inf, while exp(NaN) = NaN reaches
// s; a +inf logit gives exp(inf - inf) = NaN; an all -inf row gives s = 0 and lse = -inf.
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
// Kernels. Grid: min(rows, 2^31 - 1) blocks of kThreads, each block looping over rows
// blockIdx.x, blockIdx.x + gridDim.x, ... (one row per block whenever rows < 2^31).

/// Forward sweep.
/// Reads:  logits[b, t, :] (row = b * T + t, element offset b * stride_b + t * stride_t),
///         ids[row] (contiguous (B, T), int64).
/// Writes: logprobs[row], entropy[row], lse[row], mean_z[row], fp32, contiguous (B, T).
/// An id outside [0, V) is never dereferenced: its row's logprob is NaN.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
grpo_forward_kernel(const scalar_t* __restrict__ logits, int64_t stride_b, int64_t stride_t,
                    const int64_t* __restrict__ ids, float* __restrict__ logprobs,
                    float* __restrict__ entropy, float* __restrict__ lse_out,
                    float* __restrict__ mean_z_out, int64_t n_rows, int64_t T, int64_t V,
                    float inv_temperature) {
    constexpr int kVec = Pack<scalar_t>::kVec;
    for (int64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const int64_t b = row / T, t = row - b * T;
        const scalar_t* x = logits + b * stride_b + t * stride_t;
        const int phase = phase_of(x);
        const int64_t packs = num_packs<scalar_t>(V, phase);

        // The target logit, issued first so its latency hides behind the sweep.
        float z_y = CUDART_NAN_F;
        if (threadIdx.x == 0) {
            const int64_t y = ids[row];
            if (y >= 0 && y < V) z_y = to_float(x[y]) * inv_temperature;
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
                for (int j = 0; j < kVec; ++j) z[r][j] *= inv_temperature;
                st.add(z[r]);
            }
        }

        st = block_reduce(st);
        if (threadIdx.x == 0) {
            const float log_s = logf(st.s), u_over_s = st.u / st.s;
            const float lse = st.m + log_s;
            logprobs[row] = z_y - lse;
            entropy[row] = log_s - u_over_s;
            lse_out[row] = lse;
            mean_z_out[row] = st.m + u_over_s;
        }
    }
}

/// Backward sweep.
/// Reads:  logits[b, t, :], ids[row], lse[row], grad_logprobs[row] (NULL: 0) and, when
///         kHasEntropy, mean_z[row] and grad_entropy[row]; per-row arrays contiguous (B, T).
/// Writes: grad[b, t, :] = (c (onehot(y) - p) + e p (mean_z - z)) * inv_temperature, in scalar_t.
/// grad may alias logits: no __restrict__ on either, and each element is loaded by the
/// thread that later stores it, before it stores it. An id outside [0, V) makes the row NaN.
template <typename scalar_t, bool kHasEntropy>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
grpo_backward_kernel(const scalar_t* logits, int64_t stride_b, int64_t stride_t, scalar_t* grad,
                     int64_t grad_stride_b, int64_t grad_stride_t, const int64_t* __restrict__ ids,
                     const float* __restrict__ lse_in, const float* __restrict__ mean_z_in,
                     const float* __restrict__ grad_logprobs, const float* __restrict__ grad_entropy,
                     int64_t n_rows, int64_t T, int64_t V, float inv_temperature) {
    constexpr int kVec = Pack<scalar_t>::kVec;
    for (int64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const int64_t b = row / T, t = row - b * T;
        const scalar_t* x = logits + b * stride_b + t * stride_t;
        scalar_t* g = grad + b * grad_stride_b + t * grad_stride_t;
        const int phase = phase_of(x);
        const bool packed_store = phase_of(g) == phase;
        const int64_t packs = num_packs<scalar_t>(V, phase);

        const int64_t y = ids[row];
        const float lse = lse_in[row];
        // The inv_temperature of dz/dlogits folds into the per-row coefficients.
        float c = grad_logprobs != nullptr ? grad_logprobs[row] * inv_temperature : 0.f;
        if (y < 0 || y >= V) c = CUDART_NAN_F;
        float e = 0.f, mean_z = 0.f;
        if (kHasEntropy) {
            e = grad_entropy[row] * inv_temperature;
            mean_z = mean_z_in[row];
        }

        for (int64_t k0 = threadIdx.x; k0 < packs; k0 += kUnroll * kThreads) {
            float v[kUnroll][kVec];
#pragma unroll
            for (int r = 0; r < kUnroll; ++r) {
                const int64_t k = k0 + r * kThreads;
                if (k < packs) load_pack(x, k, phase, V, 0.f, v[r]);
            }
#pragma unroll
            for (int r = 0; r < kUnroll; ++r) {
                const int64_t k = k0 + r * kThreads;
                if (k >= packs) continue;
                const int64_t y_lane = y - (k * kVec - phase);  // y's lane in this pack, if any
#pragma unroll
                for (int j = 0; j < kVec; ++j) {
                    const float z = v[r][j] * inv_temperature;
                    // (z - lse) before scaling to base 2: exact when z is close to lse.
                    const float p = exp_nonpositive(z - lse);
                    float gv;
                    if (kHasEntropy) {
                        // dH/dz = p (E_p[z] - z); a -inf logit has p = 0 and adds 0, not
                        // 0 * inf, while a NaN p still poisons the row.
                        gv = p * (e * (p > 0.f ? mean_z - z : 0.f) - c);
                    } else {
                        gv = -c * p;
                    }
                    if (y_lane == j) gv += c;
                    v[r][j] = gv;
                }
                store_pack(g, k, phase, V, packed_store, v[r]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Launchers.

constexpr int64_t kMaxGrid = 0x7fffffff;  // gridDim.x limit; more rows loop in the kernel

unsigned grid_for(int64_t n_rows) { return static_cast<unsigned>(n_rows < kMaxGrid ? n_rows : kMaxGrid); }

template <typename scalar_t>
cudaError_t launch_forward(const void* logits, int64_t stride_b, int64_t stride_t, const int64_t* ids,
                           float* logprobs, float* entropy, float* lse, float* mean_z, int64_t n_rows,
                           int64_t T, int64_t V, float inv_temperature, cudaStream_t stream) {
    grpo_forward_kernel<scalar_t><<<grid_for(n_rows), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(logits), stride_b, stride_t, ids, logprobs, entropy, lse, mean_z, n_rows, T, V,
        inv_temperature);
    return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_backward(const void* logits, int64_t stride_b, int64_t stride_t, void* grad,
                            int64_t grad_stride_b, int64_t grad_stride_t, const int64_t* ids, const float* lse,
                            const float* mean_z, const float* grad_logprobs, const float* grad_entropy,
                            int64_t n_rows, int64_t T, int64_t V, float inv_temperature, cudaStream_t stream) {
    const scalar_t* x = static_cast<const scalar_t*>(logits);
    scalar_t* g = static_cast<scalar_t*>(grad);
    if (grad_entropy != nullptr) {
        grpo_backward_kernel<scalar_t, true><<<grid_for(n_rows), kThreads, 0, stream>>>(
            x, stride_b, stride_t, g, grad_stride_b, grad_stride_t, ids, lse, mean_z, grad_logprobs, grad_entropy,
            n_rows, T, V, inv_temperature);
    } else {
        grpo_backward_kernel<scalar_t, false><<<grid_for(n_rows), kThreads, 0, stream>>>(
            x, stride_b, stride_t, g, grad_stride_b, grad_stride_t, ids, lse, mean_z, grad_logprobs, nullptr,
            n_rows, T, V, inv_temperature);
    }
    return cudaGetLastError();
}

}  // namespace

extern "C" cudaError_t grpo_sweep_forward(grpo_dtype dtype, const void* logits, int64_t stride_b,
                                          int64_t stride_t, const int64_t* ids, float* logprobs, float* entropy,
                                          float* lse, float* mean_z, int64_t B, int64_t T, int64_t V,
                                          float inv_temperature, cudaStream_t stream) {
    if (B < 0 || T < 0 || V < 1) return cudaErrorInvalidValue;
    const int64_t n_rows = B * T;
    if (n_rows == 0) return cudaSuccess;
    switch (dtype) {
        case GRPO_FLOAT32:
            return launch_forward<float>(logits, stride_b, stride_t, ids, logprobs, entropy, lse, mean_z, n_rows,
                                         T, V, inv_temperature, stream);
        case GRPO_FLOAT16:
            return launch_forward<__half>(logits, stride_b, stride_t, ids, logprobs, entropy, lse, mean_z, n_rows,
                                          T, V, inv_temperature, stream);
        case GRPO_BFLOAT16:
            return launch_forward<__nv_bfloat16>(logits, stride_b, stride_t, ids, logprobs, entropy, lse, mean_z,
                                                 n_rows, T, V, inv_temperature, stream);
    }
    return cudaErrorInvalidValue;
}

extern "C" cudaError_t grpo_sweep_backward(grpo_dtype dtype, const void* logits, int64_t stride_b,
                                           int64_t stride_t, void* grad_out, int64_t grad_stride_b,
                                           int64_t grad_stride_t, const int64_t* ids, const float* lse,
                                           const float* mean_z, const float* grad_logprobs,
                                           const float* grad_entropy, int64_t B, int64_t T, int64_t V,
                                           float inv_temperature, cudaStream_t stream) {
    if (B < 0 || T < 0 || V < 1) return cudaErrorInvalidValue;
    if (grad_entropy != nullptr && mean_z == nullptr) return cudaErrorInvalidValue;
    const int64_t n_rows = B * T;
    if (n_rows == 0) return cudaSuccess;
    switch (dtype) {
        case GRPO_FLOAT32:
            return launch_backward<float>(logits, stride_b, stride_t, grad_out, grad_stride_b, grad_stride_t, ids,
                                          lse, mean_z, grad_logprobs, grad_entropy, n_rows, T, V, inv_temperature,
                                          stream);
        case GRPO_FLOAT16:
            return launch_backward<__half>(logits, stride_b, stride_t, grad_out, grad_stride_b, grad_stride_t, ids,
                                           lse, mean_z, grad_logprobs, grad_entropy, n_rows, T, V, inv_temperature,
                                           stream);
        case GRPO_BFLOAT16:
            return launch_backward<__nv_bfloat16>(logits, stride_b, stride_t, grad_out, grad_stride_b,
                                                  grad_stride_t, ids, lse, mean_z, grad_logprobs, grad_entropy,
                                                  n_rows, T, V, inv_temperature, stream);
    }
    return cudaErrorInvalidValue;
}
