// Device helpers shared by the dgg kernels: dtype tags, element decoding and
// deterministic block reductions.  Plain CUDA (no torch headers) so that
// .ci/compile_csrc.sh can compile every kernel with nvcc alone.
#pragma once

#include <cstdint>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/dgg_types.h"

namespace dgg {

// The threads per block of every dgg kernel.  Fixed at compile time: the
// reduction trees below are sized by it, and a fixed tree is what makes the
// energy bit-reproducible run to run on one device.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
static_assert(kThreads % 32 == 0 && kThreads <= 1024, "kThreads must be a multiple of the warp size");

__device__ __forceinline__ float bf16_bits_to_float(uint16_t bits) {
  // bfloat16 is the upper half of a float32, so widening is a shift and is
  // exact for every value, NaN payloads included.
  return __uint_as_float(static_cast<uint32_t>(bits) << 16);
}

__device__ __forceinline__ float f16_bits_to_float(uint16_t bits) {
  return __half2float(__ushort_as_half(bits));
}

__device__ __forceinline__ float to_float(const void* base, int64_t i, int32_t dtype) {
  if (dtype == kF32) return static_cast<const float*>(base)[i];
  const uint16_t bits = static_cast<const uint16_t*>(base)[i];
  return dtype == kBF16 ? bf16_bits_to_float(bits) : f16_bits_to_float(bits);
}

// Squares of the 16 bytes in v, summed in float32, for each dtype.
__device__ __forceinline__ float sumsq16(uint4 v, int32_t dtype) {
  if (dtype == kF32) {
    const float a = __uint_as_float(v.x), b = __uint_as_float(v.y);
    const float c = __uint_as_float(v.z), d = __uint_as_float(v.w);
    return a * a + b * b + c * c + d * d;
  }
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const uint16_t lo = static_cast<uint16_t>(w[k] & 0xffffu);
    const uint16_t hi = static_cast<uint16_t>(w[k] >> 16);
    const float x = dtype == kBF16 ? bf16_bits_to_float(lo) : f16_bits_to_float(lo);
    const float y = dtype == kBF16 ? bf16_bits_to_float(hi) : f16_bits_to_float(hi);
    s += x * x + y * y;
  }
  return s;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Sum of v over the block, valid in thread 0.  The tree (shuffle within each
// warp, then warp 0 over the warp sums) has a fixed shape, so the result does
// not depend on scheduling.  Every thread of the block must call it.
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T warp_sums[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  T total = T(0);
  if (warp == 0) {
    total = lane < kWarps ? warp_sums[lane] : T(0);
    total = warp_sum(total);
  }
  __syncthreads();  // warp_sums may be reused by a second call
  return total;
}

// Bytes from addr up to the next 16-byte boundary (0 when already aligned).
__device__ __forceinline__ int64_t bytes_to_align16(uintptr_t addr) {
  return static_cast<int64_t>((16u - (addr & 15u)) & 15u);
}

}  // namespace dgg
