// Plain structs shared by the kernels (.cu) and the torch binding (.cpp).
// No CUDA device code and no torch headers here: both compilers include it.
#pragma once

#include <cstdint>

namespace dgg {

// dtype tags of the gradients the kernels read (what the binding maps torch dtypes to).
constexpr int32_t kF32 = 0;
constexpr int32_t kBF16 = 1;
constexpr int32_t kF16 = 2;

inline int32_t dtype_size(int32_t dtype) { return dtype == kF32 ? 4 : 2; }

// Monitor gradients handed to one reduce launch by value (as a kernel
// argument), so the fused step needs no host-to-device copy of a pointer
// table: nothing to synchronize, and a CUDA graph captures the table with the
// launch.  More tensors than this are split over several launches (see
// gate_step.cuh).  8 * 20 bytes keeps the argument block far below 4 KiB.
constexpr int kMaxStepTensors = 8;

struct StepTensorTable {
  const void* ptr[kMaxStepTensors];
  int64_t numel[kMaxStepTensors];
  int32_t dtype[kMaxStepTensors];
  int32_t count;
};

// Which entry of ints/stats/hyper means what.  The values come from
// dgg_kernels/state.py at run time (the single source of truth), never from
// constants compiled in here.
struct StateSlots {
  int32_t pos, count, accepted, closed_total, reuse, stop, has_prev;       // ints (int64)
  int32_t energy, norm, statistic, mean, std, z, closed;                   // stats (float32)
  int32_t threshold, eps;                                                  // hyper (float64)
};
constexpr int kNumSlots = 16;

// The statistic, as GateConfig.statistic_id numbers it.
constexpr int32_t kStatNorm = 0;
constexpr int32_t kStatEnergy = 1;
constexpr int32_t kStatIncrement = 2;

// Device pointers of one gate's state (dgg_kernels/state.py GateState) plus
// the settings the finalize needs.  Shapes: ring float64[window],
// prev float64[1], ints int64[7], stats float32[7], decision bool[],
// hyper float64[2], acc float64[1].
struct GateStateView {
  double* ring;
  double* prev;
  int64_t* ints;
  float* stats;
  bool* decision;
  const double* hyper;
  double* acc;
  int64_t window;
  int64_t max_reuse;
  int32_t statistic;
  StateSlots slots;
};

}  // namespace dgg
