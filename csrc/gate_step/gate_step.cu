// Fused gate step: deterministic sum of squares + finalize.  See gate_step.cuh
// for the launch contract and dgg_kernels/backends/torch_ref.py
// (finalize_reference) for the semantics the finalize reproduces.
#include "gate_step/gate_step.cuh"

#include <cfloat>
#include <cmath>

#include "common/dgg_common.cuh"

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

// One Z-score test (torch_ref._window_test): mean and population std of the
// `count` filled slots of `ring`, z = (stat - mean) / (std + eps) once the
// window is full, else 0.  Float64, in slot order, without fused multiply-adds.
struct WindowTest {
  double mean, stdev, z;
  bool full;
};

__device__ WindowTest window_test(const double* ring, int64_t count, int64_t window, double stat, double eps) {
  const double n = static_cast<double>(count > 1 ? count : 1);
  double sum = 0.0;  // left to right in slot order: the one order every form of the finalize uses
  for (int64_t k = 0; k < window && k < count; ++k) sum = __dadd_rn(sum, ring[k]);
  WindowTest t;
  t.mean = sum / n;
  double sq = 0.0;
  for (int64_t k = 0; k < window && k < count; ++k) {
    const double d = ring[k] - t.mean;
    sq = __dadd_rn(sq, __dmul_rn(d, d));  // no fused multiply-add: rounds like the torch reference
  }
  t.stdev = sqrt(sq / n);
  t.full = count == window;
  t.z = t.full ? (stat - t.mean) / (t.stdev + eps) : 0.0;
  return t;
}

// finalize_reference, one thread, all arithmetic in float64.
__device__ void gate_finalize(double energy, const GateStateView& st) {
  const StateSlots& sl = st.slots;
  int64_t* ints = st.ints;
  const double flt_max = static_cast<double>(FLT_MAX);
  // Above the float32 range is +inf (the float32 partials would overflow
  // there anyway); NaN fails both comparisons and stays NaN.
  if (energy > flt_max) energy = INFINITY;
  const bool finite = energy <= flt_max;
  // the KL stop: the KL observe_kl gave (0 when none); one not finite in float32 closes at any reuse index
  const double kl = st.acc[sl.acc_kl];
  const bool kl_finite = fabs(kl) <= flt_max;
  const bool kl_over = kl > st.hyper[sl.kl_limit];
  const double norm = sqrt(energy);
  const bool has_prev = ints[sl.has_prev] > 0;
  // the first accepted step has nothing to subtract: increment 0, enters no increment window
  const double increment = has_prev ? energy - st.prev[0] : 0.0;
  // passes of several steps (new_pass() called since new_batch()): only a pass's first step advances the
  // reuse index, and once a step of the batch closed every later step closes too
  const bool pass_mode = ints[sl.pass_mode] > 0;
  const int64_t reuse = ints[sl.reuse] + (pass_mode ? ints[sl.pass_new] : 1);
  const bool latched = pass_mode && ints[sl.batch_closed] > 0;
  const double threshold = st.hyper[sl.threshold];
  const double eps = st.hyper[sl.eps];
  // window mode "batch": only the first step after new_batch() (reuse index 0 before it) enters a window:
  // one statistic per rollout batch, also with passes of several mini-batches
  const bool enters = st.hyper[sl.window_mode] == static_cast<double>(kWindowStep) || ints[sl.reuse] == 0;
  const int64_t window = st.window;
  const int64_t count = ints[sl.count];
  const int64_t pos = ints[sl.pos];

  double stat, mean, stdev, z, z_energy, z_increment;
  bool closed, push;
  if (st.statistic == kStatEnergyIncrement) {
    // two tests: the energies in ring[0, window), the increments in ring[window, 2 * window)
    const int64_t count2 = ints[sl.count2];
    const int64_t pos2 = ints[sl.pos2];
    const WindowTest e = window_test(st.ring, count, window, energy, eps);
    const WindowTest i = window_test(st.ring + window, count2, window, increment, eps);
    const bool fires = (e.full && e.z > threshold) || (i.full && i.z > threshold) || kl_over;
    closed = !finite || !kl_finite || (reuse > 1 && fires) || latched;
    push = !closed && enters;
    const bool push2 = push && has_prev;
    if (push) st.ring[pos] = energy;
    if (push2) st.ring[window + pos2] = increment;
    ints[sl.pos2] = push2 ? (pos2 + 1) % window : pos2;
    ints[sl.count2] = push2 ? (count2 + 1 < window ? count2 + 1 : window) : count2;
    // report the test with the larger z (the increment test only when strictly larger: NaN -> energy)
    const bool pick_i = i.z > e.z;
    stat = pick_i ? increment : energy;
    mean = pick_i ? i.mean : e.mean;
    stdev = pick_i ? i.stdev : e.stdev;
    z = pick_i ? i.z : e.z;
    z_energy = e.z;
    z_increment = i.z;
  } else {
    bool pushable = true;
    if (st.statistic == kStatNorm) {
      stat = norm;
    } else if (st.statistic == kStatEnergy) {
      stat = energy;
    } else {  // increment
      stat = increment;
      pushable = has_prev;
    }
    const WindowTest t = window_test(st.ring, count, window, stat, eps);
    mean = t.mean;
    stdev = t.stdev;
    z = t.z;
    closed = !finite || !kl_finite || (reuse > 1 && ((t.full && z > threshold) || kl_over)) || latched;
    push = !closed && enters && pushable;
    if (push) st.ring[pos] = stat;
    // the test this statistic does not run reports 0
    z_energy = st.statistic == kStatIncrement ? 0.0 : z;
    z_increment = st.statistic == kStatIncrement ? z : 0.0;
  }
  const bool accept = !closed;

  if (accept) st.prev[0] = energy;
  ints[sl.pos] = push ? (pos + 1) % window : pos;
  ints[sl.count] = push ? (count + 1 < window ? count + 1 : window) : count;
  ints[sl.accepted] += accept ? 1 : 0;
  ints[sl.closed_total] += closed ? 1 : 0;
  ints[sl.reuse] = reuse;
  if (closed || reuse >= st.max_reuse) ints[sl.stop] = 1;
  if (accept) ints[sl.has_prev] = 1;
  ints[sl.pass_new] = 0;
  if (closed) ints[sl.batch_closed] = 1;

  // double -> float rounds to nearest and overflows to inf, as torch's .to(float32) does.
  st.stats[sl.energy] = static_cast<float>(energy);
  st.stats[sl.norm] = static_cast<float>(norm);
  st.stats[sl.statistic] = static_cast<float>(stat);
  st.stats[sl.mean] = static_cast<float>(mean);
  st.stats[sl.std] = static_cast<float>(stdev);
  st.stats[sl.z] = static_cast<float>(z);
  st.stats[sl.closed] = closed ? 1.0f : 0.0f;
  st.stats[sl.z_energy] = static_cast<float>(z_energy);
  st.stats[sl.z_increment] = static_cast<float>(z_increment);
  st.stats[sl.kl] = static_cast<float>(kl);
  st.acc[sl.acc_kl] = 0.0;  // consumed: a step without observe_kl judges no KL
  *st.decision = closed;
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
