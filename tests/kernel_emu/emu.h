// Kernel-semantics emulator for the CUDA kernels in kernels/ (run by tests/kernel_emu/run).
//
// What it is: a minimal, single-OS-thread CUDA emulator, so that the real kernels/*.cu compile as
// plain C++17 (g++/clang++) and run on a machine without a GPU. Every CUDA thread of a block is a
// ucontext fiber; the blocks of a grid run one after another. __syncthreads and the warp
// operations (__shfl*_sync, __ballot_sync) are cooperative barriers: a fiber runs until it reaches
// one, then the next fiber runs; a barrier releases once every live thread of the block (or of
// the warp) waits on it, and a warp op that meets a block barrier, or a barrier nobody can reach,
// aborts ("EMU: ..."). __shared__ is a static (one copy, reused by every block in turn); fp16 is
// _Float16 with round-to-nearest; atomics are plain read-modify-writes. Only what the zoe kernels
// use is provided: a kernel that needs more fails to compile here, which is the cue to add it.
//
// What it does NOT model: timing or performance of any kind; memory coalescing, caches, the
// read-only (__ldg) path; real warp scheduling (lanes do not run in lockstep; divergence is not
// tracked; masks passed to *_sync are ignored); shared-memory bank conflicts; concurrent blocks;
// launch limits (registers, shared-memory size, __launch_bounds__); fast-math/FTZ or the exact
// rounding of GPU intrinsics (the tests compare against double-precision references with
// tolerances). Races are exposed only as far as this one cooperative fiber order exposes them: a
// missing barrier between a write and a read in different threads is caught only when the fiber
// order happens to put the read first.
//
// A pass here says the kernels' indexing, tails, odd shapes, reductions and barrier structure
// compute what the references compute under this model; it is no substitute for
// tests/cuda_parity.rs on a real GPU, which remains the authority on CUDA results.
#pragma once
#include <cstdint>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <functional>
#include <algorithm>
#include <ucontext.h>
#define ZOE_HAVE_STDINT
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static

struct dim3 { unsigned x = 1, y = 1, z = 1; dim3() {} dim3(unsigned a, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
struct uint4 { unsigned x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }

// ---- fp16 ----
struct __half { uint16_t x; };
struct __half2 { __half x, y; };
struct __half2_raw { uint16_t x, y; };
inline float h2f(__half h) { _Float16 f; memcpy(&f, &h.x, 2); return (float)f; }
inline __half f2h(double v) { _Float16 f = (_Float16)v; __half h; memcpy(&h.x, &f, 2); return h; }
inline float __half2float(__half h) { return h2f(h); }
inline __half __float2half_rn(float v) { return f2h((double)v); }
inline __half __ushort_as_half(unsigned short u) { __half h; h.x = u; return h; }
inline __half2 __half2half2(__half h) { return {h, h}; }
inline __half2 __hadd2(__half2 a, __half2 b) { return {f2h((double)h2f(a.x) + h2f(b.x)), f2h((double)h2f(a.y) + h2f(b.y))}; }
inline __half2 __hsub2(__half2 a, __half2 b) { return {f2h((double)h2f(a.x) - h2f(b.x)), f2h((double)h2f(a.y) - h2f(b.y))}; }
inline __half2 __hneg2(__half2 a) { a.x.x ^= 0x8000; a.y.x ^= 0x8000; return a; }
inline __half2 __hmul2_rn(__half2 a, __half2 b) { return {f2h((double)h2f(a.x) * h2f(b.x)), f2h((double)h2f(a.y) * h2f(b.y))}; }
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
    return {f2h((double)h2f(a.x) * h2f(b.x) + h2f(c.x)), f2h((double)h2f(a.y) * h2f(b.y) + h2f(c.y))}; }
inline float2 __half22float2(__half2 a) { return {h2f(a.x), h2f(a.y)}; }
inline __half __low2half(__half2 a) { return a.x; }
inline __half __high2half(__half2 a) { return a.y; }
inline __half2 __lows2half2(__half2 a, __half2 b) { return {a.x, b.x}; }
inline __half2 __highs2half2(__half2 a, __half2 b) { return {a.y, b.y}; }

// ---- fibers ----
struct Fiber { ucontext_t ctx; char* stack; int state; unsigned tid; unsigned par; };  // state 0 run,1 block,2 warp,3 done; par: warp-op buffer parity
struct Emu {
    std::vector<Fiber> f; ucontext_t sched; int cur = -1; int n = 0;
    std::function<void()> body;
    uint64_t wbuf[2][32][32]; int orbuf[2][1024];
    ~Emu() { for (auto& fb : f) free(fb.stack); }  // fiber stacks live as long as the program
};
inline Emu E;
inline dim3 threadIdx, blockIdx, blockDim, gridDim;
inline void emu_set(int i);
// Hand control to the next runnable fiber of this round (same order as a scheduler loop over
// 0..n-1 would give), or back to the scheduler when the round is over. Fiber-to-fiber switching
// halves the number of swapcontext calls (each one is a sigprocmask syscall).
inline void emu_switch(ucontext_t* from) {
    for (int j = E.cur + 1; j < E.n; ++j)
        if (E.f[j].state == 0) { E.cur = j; emu_set(j); swapcontext(from, &E.f[j].ctx); return; }
    swapcontext(from, &E.sched);
}
inline void emu_wait(int st) { Fiber& me = E.f[E.cur]; me.state = st; emu_switch(&me.ctx); }
inline void __syncthreads() { emu_wait(1); }
// Block- and warp-wide exchanges use two buffers alternately (per-fiber parity), so one wait per
// operation suffices: a fiber can write the same buffer again only two operations later, after
// every participant has passed the operation in between, i.e. has read this one.
inline int __syncthreads_or(int p) { Fiber& me = E.f[E.cur]; int* b = E.orbuf[me.par++ & 1]; b[me.tid] = p != 0; emu_wait(1); int r = 0; for (int i = 0; i < E.n; ++i) r |= b[i]; return r; }
template <class T> T emu_xchg(T v, int src) {
    Fiber& me = E.f[E.cur]; unsigned t = me.tid; int w = t >> 5, lane = t & 31; uint64_t* buf = E.wbuf[me.par++ & 1][w];
    uint64_t b = 0; memcpy(&b, &v, sizeof(T)); buf[lane] = b; emu_wait(2);
    T r; uint64_t s = buf[src & 31]; memcpy(&r, &s, sizeof(T)); return r; }
inline unsigned emu_lane() { return E.f[E.cur].tid & 31; }
template <class T> T __shfl_xor_sync(unsigned, T v, int o) { return emu_xchg(v, emu_lane() ^ o); }
template <class T> T __shfl_sync(unsigned, T v, int s) { return emu_xchg(v, s); }
template <class T> T __shfl_up_sync(unsigned, T v, int o) { int l = emu_lane(); T r = emu_xchg(v, l >= o ? l - o : l); return r; }
inline unsigned __ballot_sync(unsigned, int p) {
    Fiber& me = E.f[E.cur]; unsigned t = me.tid; int w = t >> 5; uint64_t* buf = E.wbuf[me.par++ & 1][w]; buf[t & 31] = p != 0; emu_wait(2);
    unsigned m = 0; for (int i = 0; i < 32; ++i) if (w * 32 + i < E.n && buf[i]) m |= 1u << i; return m; }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(unsigned v) { return __builtin_ffs((int)v); }
inline int __clz(unsigned v) { return v ? __builtin_clz(v) : 32; }
template <class T> T __ldg(const T* p) { return *p; }
inline unsigned atomicAdd(unsigned* p, unsigned v) { unsigned o = *p; *p += v; return o; }
inline unsigned atomicMin(unsigned* p, unsigned v) { unsigned o = *p; *p = std::min(o, v); return o; }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
using std::min; using std::max;
inline float fmaxf_(float a, float b) { return std::fmax(a, b); }

inline void emu_tramp() { E.body(); Fiber& me = E.f[E.cur]; me.state = 3; emu_switch(&me.ctx); }
inline void emu_set(int i) { unsigned t = E.f[i].tid; threadIdx = dim3(t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y)); }

inline void emu_launch(dim3 grid, dim3 block, std::function<void()> k) {
    gridDim = grid; blockDim = block; E.n = block.x * block.y * block.z; E.body = k;
    const size_t SS = 64 * 1024;
    if ((int)E.f.size() < E.n) { size_t had = E.f.size(); E.f.resize(E.n); for (size_t i = had; i < E.f.size(); ++i) E.f[i].stack = (char*)malloc(SS); }
    for (unsigned bz = 0; bz < grid.z; ++bz) for (unsigned by = 0; by < grid.y; ++by) for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = dim3(bx, by, bz);
        for (int i = 0; i < E.n; ++i) {
            Fiber& fb = E.f[i]; fb.tid = i; fb.state = 0; fb.par = 0; getcontext(&fb.ctx);
            fb.ctx.uc_stack.ss_sp = fb.stack; fb.ctx.uc_stack.ss_size = SS; fb.ctx.uc_link = nullptr;
            makecontext(&fb.ctx, emu_tramp, 0);
        }
        for (;;) {
            for (int i = 0; i < E.n; ++i) if (E.f[i].state == 0) { E.cur = i; emu_set(i); swapcontext(&E.sched, &E.f[i].ctx); break; }  // the fibers chain the rest of the round
            bool any = false, all_done = true, rel = false;
            // warp releases
            int nw = (E.n + 31) / 32;
            for (int w = 0; w < nw; ++w) {
                int alive = 0, waiting = 0;
                for (int l = w * 32; l < std::min(E.n, w * 32 + 32); ++l) { if (E.f[l].state != 3) ++alive; if (E.f[l].state == 2) ++waiting; }
                if (alive && waiting == alive) { for (int l = w * 32; l < std::min(E.n, w * 32 + 32); ++l) E.f[l].state = 0; rel = true; }
                else if (waiting) {
                    // a warp op needs every live lane of the warp
                    bool block_wait = false; for (int l = w * 32; l < std::min(E.n, w * 32 + 32); ++l) if (E.f[l].state == 1) block_wait = true;
                    if (block_wait) { fprintf(stderr, "EMU: warp %d mixes warp op and barrier\n", w); abort(); }
                }
            }
            if (rel) continue;
            int alive = 0, atbar = 0;
            for (int i = 0; i < E.n; ++i) { if (E.f[i].state != 3) { ++alive; all_done = false; } if (E.f[i].state == 1) ++atbar; }
            if (all_done) break;
            if (atbar == alive) { for (int i = 0; i < E.n; ++i) if (E.f[i].state == 1) E.f[i].state = 0; continue; }
            fprintf(stderr, "EMU: deadlock (alive %d at barrier %d)\n", alive, atbar); abort();
            (void)any;
        }
    }
}
