// Masking kernel: writes zeros over every params gradient when decision is true.
// Written, never multiplied: 0 * NaN would keep the NaN.
#include "gate_mask/gate_mask.cuh"

#include "common/dgg_common.cuh"

namespace dgg {
namespace {

__global__ void __launch_bounds__(kThreads)
    gate_mask_kernel(const bool* __restrict__ decision, const int64_t* __restrict__ table, int64_t n_entries) {
  // Every thread reads the flag itself (one cached byte) instead of a block
  // broadcast: the open case, the common one, then costs no barrier.
  if (!*decision) return;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  for (int64_t e = 0; e < n_entries; ++e) {
    const uintptr_t addr = static_cast<uintptr_t>(__ldg(table + 2 * e));
    const int64_t nbytes = __ldg(table + 2 * e + 1);
    if (nbytes <= 0) continue;
    char* base = reinterpret_cast<char*>(addr);
    int64_t head = bytes_to_align16(addr);
    if (head > nbytes) head = nbytes;
    const int64_t nvec = (nbytes - head) / 16;
    const int64_t tail0 = head + nvec * 16;
    // Unaligned head and tail (under 16 bytes each) one byte per thread.
    if (tid < head) base[tid] = 0;
    if (tid < nbytes - tail0) base[tail0 + tid] = 0;
    uint4* v = reinterpret_cast<uint4*>(base + head);
    for (int64_t i = tid; i < nvec; i += nthreads) v[i] = zero;
  }
}

}  // namespace

int gate_mask_threads() { return kThreads; }

cudaError_t launch_gate_mask(const bool* decision, const int64_t* table, int64_t n_entries, int blocks,
                             cudaStream_t stream) {
  if (n_entries <= 0) return cudaSuccess;
  if (blocks < 1) blocks = 1;
  gate_mask_kernel<<<blocks, kThreads, 0, stream>>>(decision, table, n_entries);
  return cudaGetLastError();
}

}  // namespace dgg
