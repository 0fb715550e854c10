// Device helpers shared by the sweeps (grpo_sweep.cu) and the two-pass loss (two_pass.cu):
// element types, rows as 16-byte packs aligned to memory, and the online softmax statistics
// (m, s, u). Header-only, inside an anonymous namespace: each .cu file gets its own copy.
#ifndef GRPO_DEVICE_CUH_
#define GRPO_DEVICE_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>
#include <stdint.h>

namespace {

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
template <int kThreads>
__device__ __forceinline__ Stats block_reduce(Stats st) {
    constexpr int kWarps = kThreads / 32;
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
// Per-row inputs.

// Whether row `row` is active (active == NULL: all are). Read by every thread of the block
// (one broadcast load), so the branch on it is uniform across the block.
__device__ __forceinline__ bool row_is_active(const uint8_t* __restrict__ active, int64_t row) {
    return active == nullptr || active[row] != 0;
}

// The column of global id y in a shard whose column 0 is id vocab_start (>= 0, and
// vocab_start + V does not overflow: the launchers check), or -1 when another shard (or no
// shard: a negative or too-large id) owns it. No subtraction before the comparisons, so no
// overflow for any int64 id.
__device__ __forceinline__ int64_t target_column(int64_t y, int64_t vocab_start, int64_t V) {
    return (y >= vocab_start && y - vocab_start < V) ? y - vocab_start : -1;
}

}  // namespace

#endif  // GRPO_DEVICE_CUH_
