// Shared helpers of the zoe-llm CUDA kernels (see README.md for the ABI of every kernel).
//
// The kernels are compiled at build/run time by NVRTC (12.x), which has no C library headers:
// fixed-width types are declared here, and the only include is cuda_fp16.h, which NVRTC 12.6 does
// NOT have built in: the caller passes `-I <cuda include dir>` (or hands cuda_fp16.h/.hpp to
// nvrtcCreateProgram as named headers).
//
// Conventions shared by every file: activations f32 row-major, weights/KV fp16 or AWQ int4,
// indices uint32_t, sizes int; every offset that can pass 2^31 elements (caches, embedding table,
// weight rows of large N*K) is computed in size_t. All accumulation is fp32.
#pragma once

#include <cuda_fp16.h>

// NVRTC has no <cstdint>; nvcc does, and its (glibc) uint64_t is `unsigned long`, so declare the
// types only where nothing else can (a second, different typedef would not compile).
#if defined(__CUDACC_RTC__) && !defined(ZOE_HAVE_STDINT)
typedef unsigned int uint32_t;
typedef unsigned short uint16_t;
typedef unsigned long long uint64_t;
#elif !defined(ZOE_HAVE_STDINT)
#include <cstdint>
#endif

#define ZOE_FULL_MASK 0xffffffffu

// NVRTC has no math.h.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

namespace zoe {

// Read-only loads through the non-coherent (texture) path: every input of these kernels is
// immutable for the kernel's lifetime.
template <typename T>
__device__ __forceinline__ T ldg(const T* p) {
    return __ldg(p);
}

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<size_t>(p) & 15) == 0;
}

// --- warp and block reductions (xor butterflies: every lane ends with the same value, and the
// summation order is fixed, so results are deterministic run to run) ---

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(ZOE_FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(ZOE_FULL_MASK, v, o));
    return v;
}

// Sum over the whole block of N values per thread at once (one pair of barriers for all N).
// `scratch` must hold 32 * N floats. Every thread gets the totals. The trailing barrier lets the
// caller reuse `scratch` right away. NT = blockDim.x, a multiple of 32.
template <int NT, int N>
__device__ __forceinline__ void block_sum_n(float (&v)[N], float* scratch) {
    constexpr int NW = NT / 32;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = warp_sum(v[i]);
    if (lane == 0) {
#pragma unroll
        for (int i = 0; i < N; ++i) scratch[i * 32 + warp] = v[i];
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < N; ++i) {
        // Every warp reduces the NW partials the same way, so all threads agree bit for bit.
        float s = lane < NW ? scratch[i * 32 + lane] : 0.0f;
        v[i] = warp_sum(s);
    }
    __syncthreads();
}

template <int NT>
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    float a[1] = {v};
    block_sum_n<NT, 1>(a, scratch);
    return a[0];
}

// --- fp16 bit helpers ---

__device__ __forceinline__ __half2 h2_from_bits(uint32_t u) {
    __half2 h;
    *reinterpret_cast<uint32_t*>(&h) = u;
    return h;
}

__device__ __forceinline__ __half2 h2_splat_bits(uint16_t u) {
    return h2_from_bits((uint32_t)u | ((uint32_t)u << 16));
}

// Two fp16 values packed in a 32-bit word (low half first, as in memory) to two floats.
__device__ __forceinline__ float2 h2_bits_to_float2(uint32_t u) {
    return __half22float2(h2_from_bits(u));
}

}  // namespace zoe
