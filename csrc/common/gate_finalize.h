// The gate's finalize (dgg_kernels/backends/finalize.py, the Python form), written once for both
// compilers: nvcc compiles it into the fused kernels (gate_step.cu), the host compiler into the CPU build
// that CI runs against the plain-Python model (csrc/cpu/finalize_cpu.cpp).  No torch headers here.
//
// Rounding: float64 throughout, every sum left to right in slot order, and no fused multiply-add: on the
// device the _rn intrinsics, on the host plain operators compiled with -ffp-contract=off (the CPU build's
// flags), so both round every product and sum once, as Python and torch do.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "common/dgg_types.h"

#if defined(__CUDACC__)
#define DGG_HD __host__ __device__
#else
#define DGG_HD
#endif

namespace dgg {

DGG_HD inline double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// double -> float as torch's .to(float32) and numpy round it: to nearest, and past the largest float
// (from FLT_MAX + half an ulp on, where the tie goes to the even neighbour, 2^128) to inf.  A plain cast of
// a value beyond the float range is undefined behaviour in C++, and a z can lie there.
DGG_HD inline float to_f32(double x) {
  const double limit = 3.4028235677973366e38;  // FLT_MAX + half an ulp
  if (x >= limit) return INFINITY;
  if (x <= -limit) return -INFINITY;
  if (x > static_cast<double>(FLT_MAX)) return FLT_MAX;
  if (x < -static_cast<double>(FLT_MAX)) return -FLT_MAX;
  return static_cast<float>(x);  // NaN stays NaN
}

DGG_HD inline double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// One Z-score test (dgg_kernels/backends/finalize.py _window_test): mean and population std of the
// `count` filled slots of `ring`, z = (stat - mean) / (std + eps) once the
// window is full, else 0.  Float64, in slot order, without fused multiply-adds.
struct WindowTest {
  double mean, stdev, z;
  bool full;
};

DGG_HD inline WindowTest window_test(const double* ring, int64_t count, int64_t window, double stat, double eps) {
  const double n = static_cast<double>(count > 1 ? count : 1);
  double sum = 0.0;  // left to right in slot order: the one order every form of the finalize uses
  for (int64_t k = 0; k < window && k < count; ++k) sum = add_rn(sum, ring[k]);
  WindowTest t;
  t.mean = sum / n;
  double sq = 0.0;
  for (int64_t k = 0; k < window && k < count; ++k) {
    const double d = ring[k] - t.mean;
    sq = add_rn(sq, mul_rn(d, d));  // no fused multiply-add: rounds like the torch reference
  }
  t.stdev = sqrt(sq / n);
  t.full = count == window;
  t.z = t.full ? (stat - t.mean) / (t.stdev + eps) : 0.0;
  return t;
}

// finalize_reference, one thread, all arithmetic in float64 (on the device: the last block's thread 0).
DGG_HD inline void gate_finalize(double energy, const GateStateView& st) {
  const StateSlots& sl = st.slots;
  int64_t* ints = st.ints;
  const double flt_max = static_cast<double>(FLT_MAX);
  // Above the float32 range is +inf (the float32 partials would overflow
  // there anyway); NaN fails both comparisons and stays NaN.
  if (energy > flt_max) energy = INFINITY;
  const bool finite = energy >= 0.0 && energy <= flt_max;  // a negative energy (a damaged acc) closes
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

  st.stats[sl.energy] = to_f32(energy);
  st.stats[sl.norm] = to_f32(norm);
  st.stats[sl.statistic] = to_f32(stat);
  st.stats[sl.mean] = to_f32(mean);
  st.stats[sl.std] = to_f32(stdev);
  st.stats[sl.z] = to_f32(z);
  st.stats[sl.closed] = closed ? 1.0f : 0.0f;
  st.stats[sl.z_energy] = to_f32(z_energy);
  st.stats[sl.z_increment] = to_f32(z_increment);
  st.stats[sl.kl] = to_f32(kl);
  st.acc[sl.acc_kl] = 0.0;  // consumed: a step without observe_kl judges no KL
  *st.decision = closed;
}

}  // namespace dgg
