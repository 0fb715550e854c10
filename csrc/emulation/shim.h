// Host stand-ins for the CUDA features two_pass.cu uses, so that its kernel runs on a CPU
// (emulate.py): one std::thread per CUDA thread; condition-variable barriers (no spinning) for
// __syncthreads, the warp shuffles and the thread-block cluster; per-block arenas for
// __shared__ variables (emulate.py rewrites their declarations), which map_shared_rank maps
// between the blocks of a cluster as distributed shared memory does.
#pragma once
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>
#include <condition_variable>
#include <thread>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <memory>
#include <vector>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#undef __device__
#undef __global__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#undef __align__
#undef __host__
#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __CUDA_ARCH__ 900
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
using std::isfinite;

struct CvBarrier {
    std::mutex m;
    std::condition_variable cv;
    int n, count = 0;
    long phase = 0;
    explicit CvBarrier(int n_) : n(n_) {}
    long arrive() {
        std::unique_lock<std::mutex> l(m);
        long p = phase;
        if (++count == n) { count = 0; ++phase; cv.notify_all(); }
        return p;
    }
    void wait(long p) {
        std::unique_lock<std::mutex> l(m);
        cv.wait(l, [&] { return phase != p; });
    }
    void arrive_and_wait() { wait(arrive()); }
};
struct Warp {
    CvBarrier bar{32};
    uint64_t vals[32];
};
struct Cluster;
struct Block {
    CvBarrier bar;
    std::vector<Warp> warps;
    std::mutex mutex;
    std::map<int, std::pair<void*, size_t>> shared;  // key -> (arena, bytes)
    std::vector<unsigned char> dyn;
    Cluster* cluster;
    int rank;
    Block(int threads, size_t dyn_bytes) : bar(threads), warps(threads / 32), dyn(dyn_bytes) {}
    ~Block() { for (auto& kv : shared) free(kv.second.first); }
};
struct Cluster {
    CvBarrier bar;
    std::vector<Block*> blocks;
    explicit Cluster(int threads) : bar(threads) {}
};
struct Ctx {
    dim3 threadIdx_, blockIdx_;
    Block* block;
    long token = 0;
};
inline thread_local Ctx* tctx;
#define threadIdx (tctx->threadIdx_)
#define blockIdx (tctx->blockIdx_)

template <typename T>
T& block_shared(int key) {
    Block* b = tctx->block;
    std::lock_guard<std::mutex> lock(b->mutex);
    auto it = b->shared.find(key);
    if (it == b->shared.end()) {
        void* p = aligned_alloc(16, (sizeof(T) + 15) / 16 * 16);
        memset(p, 0xcd, sizeof(T));  // garbage, as uninitialised shared memory
        it = b->shared.emplace(key, std::make_pair(p, sizeof(T))).first;
    }
    return *reinterpret_cast<T*>(it->second.first);
}
#define SHARED_VAR(T, name) T& name = block_shared<T>(__LINE__ * 1000 + __COUNTER__)

inline void __syncthreads() { tctx->block->bar.arrive_and_wait(); }
inline void __trap() { fprintf(stderr, "trap\n"); abort(); }

template <typename T>
T shfl_impl(T v, int src_lane_fn_kind, int arg) {
    const int lane = threadIdx.x % 32;
    Warp& w = tctx->block->warps[threadIdx.x / 32];
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof(T));
    w.vals[lane] = bits;
    w.bar.arrive_and_wait();
    int src = src_lane_fn_kind == 0 ? lane + arg : arg;
    if (src_lane_fn_kind == 0 && src >= 32) src = lane;  // shfl_down beyond the warp: own value
    uint64_t got = w.vals[src];
    w.bar.arrive_and_wait();
    T out;
    memcpy(&out, &got, sizeof(T));
    return out;
}
template <typename T> T __shfl_down_sync(unsigned, T v, unsigned off) { return shfl_impl(v, 0, (int)off); }
template <typename T> T __shfl_sync(unsigned, T v, int lane) { return shfl_impl(v, 1, lane); }

template <typename T> T min(T a, T b) { return a < b ? a : b; }
template <typename T> T max(T a, T b) { return a > b ? a : b; }

namespace cooperative_groups {
struct cluster_group {
    unsigned block_rank() const { return tctx->block->rank; }
    void sync() const { tctx->block->cluster->bar.arrive_and_wait(); }
    template <typename T>
    T* map_shared_rank(T* p, unsigned rank) const {
        Block* me = tctx->block;
        Block* other = me->cluster->blocks[rank];
        for (auto& kv : me->shared) {
            auto* base = static_cast<unsigned char*>(kv.second.first);
            auto* q = reinterpret_cast<unsigned char*>(p);
            if (q >= base && q < base + kv.second.second) {
                std::lock_guard<std::mutex> lock(other->mutex);
                return reinterpret_cast<T*>(static_cast<unsigned char*>(other->shared.at(kv.first).first) + (q - base));
            }
        }
        fprintf(stderr, "map_shared_rank: not a shared variable\n");
        abort();
    }
};
inline cluster_group this_cluster() { return {}; }
}  // namespace cooperative_groups

inline void emu_cluster_arrive() {
    tctx->token = tctx->block->cluster->bar.arrive();
}
inline void emu_cluster_wait() {
    tctx->block->cluster->bar.wait(tctx->token);
}
