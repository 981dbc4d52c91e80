// Plain structs shared by the kernels (.cu) and the torch binding (.cpp).
// No CUDA device code and no torch headers here: both compilers include it.
#pragma once

#include <cstdint>

#include "common/dgg_slots.h"

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

// StateSlots and the group sizes kNum*Slots: generated from dgg_kernels/state.py.

// The statistic, as GateConfig.statistic_id numbers it.
constexpr int32_t kStatNorm = 0;
constexpr int32_t kStatEnergy = 1;
constexpr int32_t kStatIncrement = 2;
constexpr int32_t kStatEnergyIncrement = 3;  // the paper's rule: two tests, two rings

// hyper[window_mode], as GateConfig.window_mode_id numbers it (stored as a float64).
constexpr int32_t kWindowStep = 0;
constexpr int32_t kWindowBatch = 1;

// Device pointers of one gate's state (dgg_kernels/state.py GateState) plus
// the settings the finalize needs.  Shapes: ring float64[n_rings * window]
// (n_rings 2 for kStatEnergyIncrement, else 1), prev float64[1],
// ints int64[kNumIntSlots], stats float32[kNumStatSlots], decision bool[],
// hyper float64[kNumHyperSlots], acc float64[kNumAccSlots] (the step's energy and observed KL).
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
