// Fused gate step: deterministic sum of squares + finalize.  See gate_step.cuh
// for the launch contract and dgg_kernels/backends/torch_ref.py
// (finalize_reference) for the semantics the finalize reproduces.
#include "gate_step/gate_step.cuh"

#include <cfloat>
#include <cmath>

#include "common/dgg_common.cuh"
#include "common/gate_finalize.h"

namespace dgg {
namespace {

// Independent 16-byte loads in flight per thread per loop trip: the reduce is
// bound by memory latency, so a thread keeps several loads outstanding.
constexpr int kUnroll = 4;

// Sum of squares of this thread's share of one tensor.  Elements before the
// first 16-byte boundary (head) and after the last full vector (tail) are
// read one by one; the body is read as 16-byte vectors.  All indices are
// int64 so tensors beyond 2^31 elements are covered.
template <int32_t DT>
__device__ float thread_sumsq(const void* base, int64_t n, int64_t tid, int64_t nthreads) {
  constexpr int64_t es = DT == kF32 ? 4 : 2;
  constexpr int64_t per_vec = 16 / es;
  int64_t head = bytes_to_align16(reinterpret_cast<uintptr_t>(base)) / es;
  if (head > n) head = n;
  const int64_t nvec = (n - head) / per_vec;
  const int64_t tail0 = head + nvec * per_vec;
  float s = 0.f;
  if (tid < head) {
    const float x = to_float(base, tid, DT);
    s += x * x;
  }
  if (tid < n - tail0) {
    const float x = to_float(base, tail0 + tid, DT);
    s += x * x;
  }
  const uint4* v = reinterpret_cast<const uint4*>(static_cast<const char*>(base) + head * es);
  int64_t i = tid;
  for (; i + (kUnroll - 1) * nthreads < nvec; i += kUnroll * nthreads) {
    uint4 r[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) r[k] = __ldg(v + i + k * nthreads);
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) s += sumsq16(r[k], DT);
  }
  for (; i < nvec; i += nthreads) s += sumsq16(__ldg(v + i), DT);
  return s;
}

__global__ void __launch_bounds__(kThreads)
    gate_reduce_kernel(StepTensorTable tab, float* __restrict__ partials, int64_t offset, unsigned int* ticket,
                       int is_last_launch, double* acc, GateStateView st, int do_finalize) {
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  float s = 0.f;
  for (int t = 0; t < tab.count; ++t) {
    const int64_t n = tab.numel[t];
    if (n <= 0) continue;
    switch (tab.dtype[t]) {
      case kF32: s += thread_sumsq<kF32>(tab.ptr[t], n, tid, nthreads); break;
      case kBF16: s += thread_sumsq<kBF16>(tab.ptr[t], n, tid, nthreads); break;
      default: s += thread_sumsq<kF16>(tab.ptr[t], n, tid, nthreads); break;
    }
  }
  const float block_total = block_sum(s);

  __shared__ bool last_block;
  if (threadIdx.x == 0) {
    partials[offset + blockIdx.x] = block_total;
    if (is_last_launch) {
      // Publish the partial before taking a ticket, so whichever block takes
      // the last ticket sees every partial.
      __threadfence();
      const unsigned int done = atomicAdd(ticket, 1u);
      last_block = done == gridDim.x - 1;
    } else {
      last_block = false;
    }
  }
  __syncthreads();
  if (!last_block) return;
  __threadfence();

  // Fixed order: thread k takes partials k, k + kThreads, ..., then a fixed
  // tree.  The grid is a function of the tensor sizes, so the same gradients
  // give the same bits on every run on one device.  __ldcg reads through L2,
  // where the other blocks' partials are, never a stale L1 line.
  const int64_t total = offset + gridDim.x;
  double d = 0.0;
  for (int64_t k = threadIdx.x; k < total; k += kThreads) d += static_cast<double>(__ldcg(partials + k));
  d = block_sum(d);
  if (threadIdx.x == 0) {
    *ticket = 0u;  // ready for the next launch or graph replay, no memset needed
    acc[0] = d;  // the energy's output: the state's acc[ACC_ENERGY], which state.py keeps first
    if (do_finalize) gate_finalize(d, st);
  }
}

__global__ void gate_finalize_kernel(GateStateView st, const double* sums, int64_t n_sums) {
  double energy;
  if (sums == nullptr) {
    energy = st.acc[st.slots.acc_energy];
  } else {
    energy = 0.0;
    for (int64_t k = 0; k < n_sums; ++k) energy += sums[k];
    st.acc[st.slots.acc_energy] = energy;
  }
  gate_finalize(energy, st);
}

}  // namespace

int gate_reduce_grid(const StepTensorTable& table, int max_blocks) {
  int64_t most_vectors = 0;
  for (int t = 0; t < table.count; ++t) {
    const int64_t v = (table.numel[t] * dtype_size(table.dtype[t]) + 15) / 16;
    if (v > most_vectors) most_vectors = v;
  }
  const int64_t want = (most_vectors + kThreads - 1) / kThreads;
  if (max_blocks < 1) max_blocks = 1;
  return static_cast<int>(want < 1 ? 1 : (want < max_blocks ? want : max_blocks));
}

cudaError_t launch_gate_reduce(const StepTensorTable* chunks, const int* grids, int n_chunks, float* partials,
                               int64_t partials_capacity, unsigned int* ticket, double* acc,
                               const GateStateView* state, cudaStream_t stream) {
  if (n_chunks < 1) return cudaErrorInvalidValue;
  int64_t needed = 0;
  for (int j = 0; j < n_chunks; ++j) {
    if (grids[j] < 1 || chunks[j].count < 0 || chunks[j].count > kMaxStepTensors) return cudaErrorInvalidValue;
    needed += grids[j];
  }
  if (needed > partials_capacity) return cudaErrorInvalidValue;
  GateStateView st{};
  if (state != nullptr) st = *state;
  int64_t offset = 0;
  for (int j = 0; j < n_chunks; ++j) {
    const int last = j == n_chunks - 1;
    gate_reduce_kernel<<<grids[j], kThreads, 0, stream>>>(chunks[j], partials, offset, ticket, last, acc, st,
                                                          last && state != nullptr);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    offset += grids[j];
  }
  return cudaSuccess;
}

cudaError_t launch_gate_finalize(const GateStateView& state, const double* sums, int64_t n_sums,
                                 cudaStream_t stream) {
  if (sums != nullptr && n_sums < 1) return cudaErrorInvalidValue;
  gate_finalize_kernel<<<1, 1, 0, stream>>>(state, sums, n_sums);
  return cudaGetLastError();
}

}  // namespace dgg
