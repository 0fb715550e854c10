// The two-pass token-local loss (SPEC section 14) in CUDA C++: each active row of the logits
// is read from DRAM once and held on chip until its gradient is written, once.
//
// A row is split over a thread-block cluster of C blocks (sm_90; C = 1, a single block and
// no cluster, where the row fits one block's shared memory, the only case on sm_80). Each
// block copies its slice of the row into its shared memory with 16-byte asynchronous copies
// (cp.async: the whole slice in flight at once, no registers held), computes the slice's
// softmax statistics (m, s = sum exp(z - m), u = sum exp(z - m)(z - m)), publishes them in
// its shared memory, and after a cluster barrier reads every block's through distributed
// shared memory and merges them in a fixed order (every block the same, bitwise). Each block
// then evaluates the token's loss (a port of loss_triton.py) and writes its slice of the
// gradient from shared memory. The C ABI, with the full contract, is two_pass.h.
//
// Why shared memory and not registers: the slice length is a run-time value (V, the row's
// alignment, C), and a register array needs compile-time indices. Why cp.async and not the
// bulk copy engine: the slices start wherever the strides put the row (any 2-byte alignment),
// which cp.async.bulk (16-byte aligned sizes and addresses) would need split by hand; the
// aligned body of a slice is 16-byte cp.async, its first and last packs element-wise.

#include "two_pass.h"
#include "grpo_device.cuh"

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>
#include <stdint.h>
#include <stdio.h>

namespace {

namespace cg = cooperative_groups;

// 256 threads per block; one block per SM per ~76 KB of slice (the cluster size keeps a slice
// at or below kSliceBudget, so two or three blocks share an SM and one block's loads overlap
// another's gradient writes).
constexpr int kThreads = 256;
constexpr int kMaxCluster = 16;
constexpr size_t kSliceBudget = 80 * 1024;
constexpr int kNumSums = 7;

// ---------------------------------------------------------------------------------------
// Copies and the cluster, in PTX.

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}

// 2^x as one MUFU.EX2, flushing results below 2^-126 to 0 (exp2f adds three instructions per
// call to keep them; a probability under 1e-38 is 0 to every output here). exp2(-inf) = 0.
__device__ __forceinline__ float exp2_ftz(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ void cp_async_wait_all() {
    asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
}

// ---------------------------------------------------------------------------------------
// The per-token loss. A port of grpo_kernels/loss_triton.py (_d_min, _surrogate, _kl and the
// per-token part of _loss_kernel), the Triton source of these formulas: keep them in step.

// d min(a, b) / da as torch.minimum's backward: 1 where a < b, 1/2 at a tie (loss_triton._d_min).
__device__ __forceinline__ float d_min(float a, float b) { return a < b ? 1.f : (a == b ? 0.5f : 0.f); }

struct Surrogate {
    float loss, dloss;
};

// -min(u A, c A), u = min(ratio, delta), c = clamp(ratio, 1 - eps_low, 1 + eps_high), capped
// at -dual_clip A for A < 0, and its derivative in the ratio (loss_triton._surrogate). Its
// inputs are finite here (the caller poisons a row with a non-finite one).
__device__ __forceinline__ Surrogate surrogate(float ratio, float A, float eps_low, float eps_high, bool has_delta,
                                               float delta, bool has_dual_clip, float dual_clip) {
    float u = ratio, du = 1.f;
    if (has_delta) {
        u = fminf(ratio, delta);
        du = ratio <= delta ? 1.f : 0.f;
    }
    const float c = fminf(fmaxf(ratio, 1.f - eps_low), 1.f + eps_high);
    const float dc = (ratio >= 1.f - eps_low && ratio <= 1.f + eps_high) ? 1.f : 0.f;
    const float uA = u * A, cA = c * A;
    Surrogate out{-fminf(uA, cA), -(d_min(uA, cA) * A * du + d_min(cA, uA) * A * dc)};
    if (has_dual_clip && A < 0.f) {
        const float cap = -dual_clip * A;
        out.dloss *= d_min(out.loss, cap);
        out.loss = fminf(out.loss, cap);
    }
    return out;
}

struct Kl {
    float kl, dkl;
};

// The k1 / k2 / k3 estimate of d = l - ref and its derivative in l; with ratio_weight, times
// the token ratio r (dr/dl = r) (loss_triton._kl).
__device__ __forceinline__ Kl kl_estimate(float l, float ref, float r, int estimator, bool ratio_weight) {
    const float d = l - ref;
    Kl out;
    if (estimator == 1) {
        out = {d, 1.f};
    } else if (estimator == 2) {
        out = {0.5f * d * d, d};
    } else {
        const float rho = expf(-d);
        out = {rho - 1.f + d, 1.f - rho};
    }
    if (ratio_weight) {
        out.dkl = r * (out.kl + out.dkl);
        out.kl = r * out.kl;
    }
    return out;
}

// What every thread of a block needs for the gradient, from the merged row statistics.
struct RowResult {
    float m, log_s, mean_rel;  // max z, log s, u / s
    float c, e;                // the coefficients, times inv_t
    float target;              // -c expm1(l), the target's c (1 - p_y), times inv_t
};

// This block's statistics for the cluster: (m, s, u) of its slice and, from the block that
// holds it, the target's z.
struct Partial {
    float m, s, u, z_y;
};

// Reads the per-token inputs of row r (thread 0 only: issued before the slice arrives, so their
// latency hides behind the copies), then, with the merged statistics and z_y, computes the
// token's loss, writes logprobs / entropy / sums (when `write`) and returns the coefficients.
struct TokenInputs {
    int64_t id;
    float w, mask, A, old, ref, rollout, scale_c, scale_e;
};

__device__ __forceinline__ TokenInputs load_token(const grpo_two_pass_args& p, int64_t r) {
    TokenInputs in;
    in.id = p.ids[r];
    in.w = p.w[r];
    in.mask = p.mask[r];
    in.A = p.advantages[r];
    in.old = p.old_logprobs != nullptr ? p.old_logprobs[r] : 0.f;
    in.ref = p.ref_logprobs != nullptr ? p.ref_logprobs[r] : 0.f;
    in.rollout = p.rollout != nullptr ? p.rollout[r] : 1.f;
    in.scale_c = p.scalars[0];
    in.scale_e = p.scalars[1];
    return in;
}

__device__ __forceinline__ RowResult token_loss(const grpo_two_pass_args& p, const TokenInputs& in, Stats st,
                                                float z_y, float inv_t, int64_t r, bool write) {
    const float log_s = logf(st.s), mean_rel = st.u / st.s;
    const float l = (z_y - st.m) - log_s;
    const float H = log_s - mean_rel;

    const float old = p.old_logprobs != nullptr ? in.old : l;
    const float ratio = expf(l - old);
    Surrogate sur = surrogate(ratio, in.A, p.eps_low, p.eps_high, p.has_delta != 0, p.delta, p.has_dual_clip != 0,
                              p.dual_clip);
    sur.loss *= in.rollout;
    sur.dloss *= in.rollout;
    float loss = sur.loss, dloss_dl = sur.dloss * ratio, kl = 0.f;
    if (p.ref_logprobs != nullptr) {
        const Kl k = kl_estimate(l, in.ref, ratio, p.kl_estimator, p.kl_ratio_weight != 0);
        kl = k.kl;
        loss += p.beta * k.kl;
        dloss_dl += p.beta * k.dkl;
    }
    float c = in.w * dloss_dl * in.scale_c;
    float e = p.has_entropy_grad ? in.mask * in.scale_e : 0.f;
    const float low = (ratio < 1.f - p.eps_low && in.A < 0.f) ? 1.f : 0.f;
    const float high = (ratio > 1.f + p.eps_high && in.A > 0.f) ? 1.f : 0.f;
    float sums[kNumSums] = {in.w * loss, in.mask, in.mask * kl, in.mask * H, in.mask * low, in.mask * high,
                            in.mask * fmaxf(low, high)};

    // fminf / fmaxf and the comparisons above would turn a NaN into a finite number: a row with a
    // non-finite input is poisoned explicitly instead.
    const bool finite = isfinite(l) && isfinite(H) && isfinite(in.w) && isfinite(in.mask) && isfinite(in.A) &&
                        isfinite(old) && isfinite(in.ref) && isfinite(in.rollout);
    if (!finite) {
        c = CUDART_NAN_F;
        e = p.has_entropy_grad ? CUDART_NAN_F : 0.f;
#pragma unroll
        for (int k = 0; k < kNumSums; ++k) sums[k] = CUDART_NAN_F;
    }
    if (write) {
        const int64_t N = p.B * p.T;
        p.logprobs[r] = l;
        p.entropy[r] = H;
#pragma unroll
        for (int k = 0; k < kNumSums; ++k) p.sums[k * N + r] = sums[k];
    }
    c *= inv_t;
    e *= inv_t;
    return RowResult{st.m, log_s, mean_rel, c, e, -c * expm1f(l)};
}

// ---------------------------------------------------------------------------------------
// The kernel.

__device__ __forceinline__ float checked_inv_temperature(float t) {
    return (t > 0.f && t < CUDART_INF_F) ? 1.f / t : CUDART_NAN_F;
}

// This block's packs [begin, end) of a row of `packs` packs split over `blocks` blocks.
struct Span {
    int64_t begin, end;
};

__device__ __forceinline__ Span span_of(int64_t packs, int blocks, int rank) {
    const int64_t per = (packs + blocks - 1) / blocks;
    const int64_t begin = min(packs, per * rank);
    return {begin, min(packs, begin + per)};
}

/// The two-pass loss (two_pass.h). Grid: one cluster of `blocks` blocks per (b, position) of
/// the (B, L, V) logits, B * L clusters, block rank = this block's slice of the row.
/// Reads:  for a scored, active row only: its slice of logits[b, pos, :] (once, into shared
///         memory), active / ids / temperature_rows / w / mask / A / old / ref / rollout [r],
///         scalars[0..1]; for other rows, at most active[r].
/// Writes: its slice of grad[b, pos, :] (every element: zeros for rows outside the window and
///         inactive rows); block rank 0 of a scored row writes logprobs[r], entropy[r],
///         sums[:, r].
/// grad may alias logits: a block reads its whole slice before it writes any of it.
template <typename scalar_t, bool kCluster, bool kEntropy>
__global__ void __launch_bounds__(kThreads)
two_pass_kernel(const grpo_two_pass_args p, int blocks) {
    constexpr int kVec = Pack<scalar_t>::kVec;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    Pack<scalar_t>* slice = reinterpret_cast<Pack<scalar_t>*>(smem_raw);
    __shared__ Partial partial;
    __shared__ RowResult result;
    __shared__ int64_t result_y_pack;
    __shared__ int result_y_lane;

    int rank = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (kCluster) rank = static_cast<int>(cg::this_cluster().block_rank());
#else
    if (kCluster) __trap();  // the launcher never runs the cluster kernel below sm_90
#endif
    const int64_t q = blockIdx.x / blocks;  // (b, pos) of the row
    const int64_t b = q / p.L, pos = q - b * p.L;
    const int64_t t = pos - p.row_start;
    const int64_t r = b * p.T + t;
    const bool scored = t >= 0 && t < p.T;
    const bool active = scored && (p.active == nullptr || p.active[r] != 0);
    const int64_t V = p.V;
    scalar_t* g = static_cast<scalar_t*>(p.grad) + b * p.grad_stride_b + pos * p.grad_stride_l;

    if (!active) {  // uniform over the cluster: nobody reaches a barrier
        const int g_phase = phase_of(g);
        const Span sp = span_of(num_packs<scalar_t>(V, g_phase), blocks, rank);
        float zeros[kVec];
#pragma unroll
        for (int j = 0; j < kVec; ++j) zeros[j] = 0.f;
        for (int64_t k = sp.begin + threadIdx.x; k < sp.end; k += kThreads) store_pack(g, k, g_phase, V, true, zeros);
        if (scored && rank == 0 && threadIdx.x == 0) {
            const int64_t N = p.B * p.T;
            p.logprobs[r] = 0.f;
            p.entropy[r] = 0.f;
            for (int k = 0; k < kNumSums; ++k) p.sums[k * N + r] = 0.f;
        }
        return;
    }

    // Pass 1: the slice into shared memory, every aligned pack in flight at once.
    const scalar_t* x = static_cast<const scalar_t*>(p.logits) + b * p.stride_b + pos * p.stride_l;
    const int phase = phase_of(x);
    const int64_t packs = num_packs<scalar_t>(V, phase);
    const Span sp = span_of(packs, blocks, rank);
    const int n = static_cast<int>(sp.end - sp.begin);
    const scalar_t neg_inf = from_float<scalar_t>(-CUDART_INF_F);
    for (int i = threadIdx.x; i < n; i += kThreads) {
        const int64_t k = sp.begin + i;
        const int64_t first = k * kVec - phase;
        if (first >= 0 && first + kVec <= V) {
            cp_async_16(&slice[i], x + first);
        } else {
            slice[i] = load_pack_raw(x, k, phase, V, neg_inf);  // the row's partial first / last pack
        }
    }
    TokenInputs in{};
    if (threadIdx.x == 0) in = load_token(p, r);
    const float inv_t = p.temperature_rows != nullptr ? checked_inv_temperature(p.temperature_rows[r])
                                                      : p.inv_temperature;
    cp_async_wait_all();
    __syncthreads();

    // The slice's statistics: each thread's max first (on the stored values: inv_t > 0 keeps the
    // order), then its sums relative to it, then the block's merge.
    float x_max = -CUDART_INF_F;
    for (int i = threadIdx.x; i < n; i += kThreads) {
        const Pack<scalar_t> pk = slice[i];
#pragma unroll
        for (int j = 0; j < kVec; ++j) x_max = fmaxf(x_max, to_float(pk.v[j]));
    }
    Stats st{x_max == -CUDART_INF_F ? -CUDART_INF_F : x_max * inv_t, 0.f, 0.f};
    {
        const float shift = st.m == -CUDART_INF_F ? 0.f : st.m;
        float s = 0.f, u = 0.f;
        for (int i = threadIdx.x; i < n; i += kThreads) {
            const Pack<scalar_t> pk = slice[i];
            float e[kVec], ed[kVec];
#pragma unroll
            for (int j = 0; j < kVec; ++j) {
                const float d = to_float(pk.v[j]) * inv_t - shift;
                e[j] = exp2_ftz(d * kLog2e);
                // A -inf logit adds 0 to u, not 0 * -inf; a NaN one is already in e.
                ed[j] = e[j] * fmaxf(d, -CUDART_MAX_NORMAL_F);
            }
            s += pairwise_sum(e);
            u += pairwise_sum(ed);
        }
        st.s = s;
        st.u = u;
    }
    st = block_reduce<kThreads>(st);

    // The target's column and which block holds it (-1: no column, l is NaN).
    const int64_t col = threadIdx.x == 0 ? target_column(in.id, 0, V) : -1;
    int64_t y_pack = -1;
    int y_lane = 0;
    if (threadIdx.x == 0 && col >= 0) {
        y_pack = (col + phase) / kVec;
        y_lane = static_cast<int>((col + phase) % kVec);
    }
    if (threadIdx.x == 0) {
        float z_y = CUDART_NAN_F;
        if (y_pack >= sp.begin && y_pack < sp.end) {
            z_y = to_float(reinterpret_cast<const scalar_t*>(slice)[(y_pack - sp.begin) * kVec + y_lane]) * inv_t;
        }
        partial = Partial{st.m, st.s, st.u, z_y};
    }

    Stats row_st = st;
    float z_y = CUDART_NAN_F;
    if (kCluster) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        cg::cluster_group cluster = cg::this_cluster();
        cluster.sync();  // every block's partial is written and visible
        if (threadIdx.x < 32) {
            // Lane i reads block i's partial; lane 0 merges them in rank order, as every block does.
            Partial mine{-CUDART_INF_F, 0.f, 0.f, CUDART_NAN_F};
            if (static_cast<int>(threadIdx.x) < blocks) mine = *cluster.map_shared_rank(&partial, threadIdx.x);
            Stats merged = Stats::empty();
            const int owner = y_pack >= 0 ? static_cast<int>(y_pack / ((packs + blocks - 1) / blocks)) : -1;
            const int owner_all = __shfl_sync(0xffffffffu, owner, 0);
            for (int i = 0; i < blocks; ++i) {
                const Stats other{__shfl_sync(0xffffffffu, mine.m, i), __shfl_sync(0xffffffffu, mine.s, i),
                                  __shfl_sync(0xffffffffu, mine.u, i)};
                merged = Stats::merge(merged, other);
            }
            const float zy = __shfl_sync(0xffffffffu, mine.z_y, owner_all < 0 ? 0 : owner_all);
            row_st = merged;
            z_y = owner_all < 0 ? CUDART_NAN_F : zy;
        }
#endif
    } else {
        if (threadIdx.x == 0) z_y = partial.z_y;
    }

    if (threadIdx.x == 0) {
        result = token_loss(p, in, row_st, z_y, inv_t, r, rank == 0);
        result_y_pack = y_pack;
        result_y_lane = y_lane;
    }
    __syncthreads();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // This block has read the others' partials; they may exit once the gradient is written.
    // Relaxed: the remote reads were complete when their values were merged.
    if (kCluster) asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
#endif

    // Pass 2: the gradient of the slice, from shared memory, written once.
    const RowResult res = result;
    const int64_t yk = result_y_pack;
    const int yl = result_y_lane;
    const bool packed_store = phase_of(g) == phase;
    const float log_s_log2e = res.log_s * kLog2e;
    for (int i = threadIdx.x; i < n; i += kThreads) {
        const int64_t k = sp.begin + i;
        const Pack<scalar_t> pk = slice[i];
        float out[kVec], ent[kVec];
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
            // (z - m) first, exact for the large entries; then the log-sum.
            const float d = to_float(pk.v[j]) * inv_t - res.m;
            const float pj = exp2_ftz(d * kLog2e - log_s_log2e);
            // dH/dz = p (u / s - (z - m)); a -inf logit has p = 0 and adds 0, not 0 * inf.
            ent[j] = kEntropy ? pj * res.e * (res.mean_rel - fmaxf(d, -CUDART_MAX_NORMAL_F)) : 0.f;
            out[j] = ent[j] - res.c * pj;
        }
        if (k == yk) {  // the target: c (1 - p_y) as -c expm1(l), exact for a confident token
#pragma unroll
            for (int j = 0; j < kVec; ++j) {
                if (j == yl) out[j] = res.target + ent[j];
            }
        }
        if (packed_store && k > 0 && k + 1 < packs) {  // an interior pack: whole, and aligned as the logits'
            Pack<scalar_t> o;
#pragma unroll
            for (int j = 0; j < kVec; ++j) o.v[j] = from_float<scalar_t>(out[j]);
            reinterpret_cast<Pack<scalar_t>*>(g - phase)[k] = o;
        } else {
            store_pack(g, k, phase, V, packed_store, out);
        }
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (kCluster) asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
}

// ---------------------------------------------------------------------------------------
// Launchers.

// The dynamic shared memory of one block holding 1/blocks of a row of V elements, at the
// worst alignment phase (one more partial pack).
template <typename scalar_t>
size_t slice_bytes(int64_t V, int blocks) {
    constexpr int kVec = Pack<scalar_t>::kVec;
    const int64_t packs = (V + 2 * kVec - 2) / kVec;
    return static_cast<size_t>((packs + blocks - 1) / blocks) * 16;
}

template <typename scalar_t, bool kCluster, bool kEntropy>
cudaError_t configure(int blocks, size_t smem) {
    const auto kernel = two_pass_kernel<scalar_t, kCluster, kEntropy>;
    cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(smem));
    if (status == cudaSuccess && kCluster && blocks > 8) {
        status = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    }
    return status;
}

template <typename scalar_t, bool kCluster, bool kEntropy>
cudaLaunchConfig_t launch_config(unsigned grid, int blocks, size_t smem, cudaStream_t stream,
                                 cudaLaunchAttribute* attribute) {
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(grid);
    config.blockDim = dim3(kThreads);
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    attribute->id = cudaLaunchAttributeClusterDimension;
    attribute->val.clusterDim.x = static_cast<unsigned>(blocks);
    attribute->val.clusterDim.y = 1;
    attribute->val.clusterDim.z = 1;
    config.attrs = attribute;
    config.numAttrs = kCluster ? 1 : 0;
    return config;
}

void say(char* why, size_t len, const char* text) {
    if (why != nullptr && len > 0) snprintf(why, len, "%s", text);
}

template <typename scalar_t>
cudaError_t plan(int64_t V, int device, int requested, int* cluster_size, size_t* smem_bytes, char* why,
                 size_t why_len) {
    int major = 0, optin = 0;
    cudaError_t status = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    if (status == cudaSuccess) status = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (status != cudaSuccess) return status;
    // Whether this build holds sm_90 code for the cluster kernel (a build for sm_80 alone, or
    // PTX JIT-compiled for a newer device from compute_80, has none).
    cudaFuncAttributes attributes;
    status = cudaFuncGetAttributes(&attributes, two_pass_kernel<scalar_t, true, true>);
    if (status != cudaSuccess) return status;
    // ptxVersion is the virtual architecture the code was compiled from: 80 for sm_90 code
    // JIT-compiled from compute_80 PTX, whose cluster kernel is only a trap.
    const bool clusters = major >= 9 && attributes.binaryVersion >= 90 &&
                          (attributes.ptxVersion >= 90 || attributes.ptxVersion == 0);
    const size_t reserve = attributes.sharedSizeBytes + 64;  // the static shared memory, with room
    const size_t limit = static_cast<size_t>(optin) > reserve ? static_cast<size_t>(optin) - reserve : 0;

    int chosen = 0;
    for (int pass = 0; pass < 2 && chosen == 0; ++pass) {
        for (int blocks = 1; blocks <= kMaxCluster; blocks *= 2) {
            if (requested != 0 && blocks != requested) continue;
            if (blocks > 1 && !clusters) break;
            const size_t bytes = slice_bytes<scalar_t>(V, blocks);
            // First pass: within the budget that lets blocks share an SM; second: what fits at all.
            if (bytes > (pass == 0 && requested == 0 ? kSliceBudget : limit)) continue;
            if (blocks > 1) {  // can a cluster of this size, with this memory, be scheduled at all?
                status = configure<scalar_t, true, true>(blocks, bytes);
                if (status != cudaSuccess) return status;
                cudaLaunchAttribute attribute;
                const cudaLaunchConfig_t config =
                    launch_config<scalar_t, true, true>(static_cast<unsigned>(blocks), blocks, bytes, nullptr, &attribute);
                int active_clusters = 0;
                status = cudaOccupancyMaxActiveClusters(&active_clusters, two_pass_kernel<scalar_t, true, true>, &config);
                if (status != cudaSuccess) {
                    (void)cudaGetLastError();  // not sticky: clear it and try the next size
                    continue;
                }
                if (active_clusters < 1) continue;
            }
            chosen = blocks;
            *smem_bytes = bytes;
            break;
        }
    }
    if (chosen == 0) {
        char text[320];
        snprintf(text, sizeof text,
                 "two_pass: a row of %lld elements of %d bytes does not fit on chip here (%s%s; %d bytes of shared "
                 "memory per block): use the three-pass sweeps",
                 static_cast<long long>(V), static_cast<int>(sizeof(scalar_t)),
                 clusters ? "thread-block clusters of up to 16 blocks" : "one block per row, no thread-block clusters",
                 clusters ? "" : (major < 9 ? " below sm_90" : " in this build (no sm_90 code)"), optin);
        if (requested != 0) {
            snprintf(text, sizeof text, "two_pass: cluster_size %d cannot run rows of %lld elements here%s", requested,
                     static_cast<long long>(V), clusters || requested == 1 ? "" : " (no thread-block clusters)");
        }
        say(why, why_len, text);
        return cudaErrorNotSupported;
    }
    *cluster_size = chosen;
    return cudaSuccess;
}

template <typename scalar_t, bool kCluster, bool kEntropy>
cudaError_t launch(const grpo_two_pass_args& args, int blocks, size_t smem, cudaStream_t stream) {
    cudaError_t status = configure<scalar_t, kCluster, kEntropy>(blocks, smem);
    if (status != cudaSuccess) return status;
    const int64_t grid = args.B * args.L * blocks;
    cudaLaunchAttribute attribute;
    const cudaLaunchConfig_t config =
        launch_config<scalar_t, kCluster, kEntropy>(static_cast<unsigned>(grid), blocks, smem, stream, &attribute);
    return cudaLaunchKernelEx(&config, two_pass_kernel<scalar_t, kCluster, kEntropy>, args, blocks);
}

template <typename scalar_t>
cudaError_t run(const grpo_two_pass_args& args, cudaStream_t stream) {
    int device = 0;
    cudaError_t status = cudaGetDevice(&device);
    if (status != cudaSuccess) return status;
    int blocks = args.cluster_size;
    size_t smem = args.smem_bytes;
    if (blocks == 0 || smem == 0) {  // not planned by the caller
        status = plan<scalar_t>(args.V, device, args.cluster_size, &blocks, &smem, nullptr, 0);
        if (status != cudaSuccess) return status;
    }
    if (args.B * args.L * blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
    const bool entropy = args.has_entropy_grad != 0;
    if (blocks > 1) {
        return entropy ? launch<scalar_t, true, true>(args, blocks, smem, stream)
                       : launch<scalar_t, true, false>(args, blocks, smem, stream);
    }
    return entropy ? launch<scalar_t, false, true>(args, blocks, smem, stream)
                   : launch<scalar_t, false, false>(args, blocks, smem, stream);
}

}  // namespace

extern "C" cudaError_t grpo_two_pass_plan(grpo_dtype dtype, int64_t V, int device, int requested_cluster,
                                          int* cluster_size, size_t* smem_bytes, char* why, size_t why_len) {
    if (V < 1 || cluster_size == nullptr || smem_bytes == nullptr || requested_cluster < 0 ||
        requested_cluster > kMaxCluster || (requested_cluster & (requested_cluster - 1)) != 0) {
        say(why, why_len, "two_pass: V must be >= 1 and cluster_size 0 (choose), 1, 2, 4, 8 or 16");
        return cudaErrorInvalidValue;
    }
    switch (dtype) {
        case GRPO_FLOAT32: return plan<float>(V, device, requested_cluster, cluster_size, smem_bytes, why, why_len);
        case GRPO_FLOAT16: return plan<__half>(V, device, requested_cluster, cluster_size, smem_bytes, why, why_len);
        case GRPO_BFLOAT16:
            return plan<__nv_bfloat16>(V, device, requested_cluster, cluster_size, smem_bytes, why, why_len);
    }
    return cudaErrorInvalidValue;
}

extern "C" cudaError_t grpo_two_pass(const grpo_two_pass_args* args, cudaStream_t stream) {
    if (args == nullptr) return cudaErrorInvalidValue;
    const grpo_two_pass_args& a = *args;
    if (a.B < 0 || a.L < 0 || a.T < 0 || a.V < 1 || a.row_start < 0 || a.row_start > a.L - a.T ||
        (a.L != 0 && a.B > INT64_MAX / a.L) || a.kl_estimator < 1 || a.kl_estimator > 3 ||
        a.cluster_size < 0 || a.cluster_size > kMaxCluster || (a.cluster_size & (a.cluster_size - 1)) != 0) {
        return cudaErrorInvalidValue;
    }
    if (a.B * a.L == 0) return cudaSuccess;
    if (a.logits == nullptr || a.grad == nullptr) return cudaErrorInvalidValue;
    if (a.B * a.T > 0 && (a.ids == nullptr || a.w == nullptr || a.mask == nullptr || a.advantages == nullptr ||
                          a.scalars == nullptr || a.logprobs == nullptr || a.entropy == nullptr || a.sums == nullptr)) {
        return cudaErrorInvalidValue;
    }
    switch (a.dtype) {
        case GRPO_FLOAT32: return run<float>(a, stream);
        case GRPO_FLOAT16: return run<__half>(a, stream);
        case GRPO_BFLOAT16: return run<__nv_bfloat16>(a, stream);
    }
    return cudaErrorInvalidValue;
}
