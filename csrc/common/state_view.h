// The gate state's tensors as the kernels see them (dgg::GateStateView), checked: every backend built from
// csrc (the CUDA binding, the CPU build of the finalize) validates the state with these, once, the same way.
#pragma once

#include <torch/extension.h>

#include <vector>

#include "common/dgg_types.h"

namespace dgg {

inline void check_state_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t numel,
                        const at::Device& device) {
  TORCH_CHECK(t.device() == device, "dgg: state.", name, " is on ", t.device(), ", the gradients on ", device);
  TORCH_CHECK(t.scalar_type() == dtype, "dgg: state.", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.numel() == numel, "dgg: state.", name, " must have ", numel, " elements, got ", t.numel());
  TORCH_CHECK(t.is_contiguous(), "dgg: state.", name, " must be contiguous");
}

inline StateSlots make_slots(c10::IntArrayRef s) {
  TORCH_CHECK(static_cast<int>(s.size()) == dgg::kNumSlots, "dgg: expected ", dgg::kNumSlots,
              " state slot indices, got ", s.size());
  // ints, stats, hyper and acc have kNumIntSlots, kNumStatSlots, kNumHyperSlots
  // and kNumAccSlots entries (checked in make_view); a slot outside them would
  // make the finalize write out of bounds.
  constexpr int kStats0 = dgg::kNumIntSlots, kHyper0 = kStats0 + dgg::kNumStatSlots;
  constexpr int kAcc0 = kHyper0 + dgg::kNumHyperSlots;
  for (int i = 0; i < dgg::kNumSlots; ++i) {
    const int64_t limit = i < kStats0  ? dgg::kNumIntSlots
                          : i < kHyper0 ? dgg::kNumStatSlots
                          : i < kAcc0   ? dgg::kNumHyperSlots
                                        : dgg::kNumAccSlots;
    TORCH_CHECK(s[i] >= 0 && s[i] < limit, "dgg: state slot ", i, " = ", s[i], " is outside [0, ", limit, ")");
  }
  StateSlots sl;
  int32_t* f = &sl.pos;  // the struct is kNumSlots int32 in declaration order
  static_assert(sizeof(dgg::StateSlots) == dgg::kNumSlots * sizeof(int32_t), "StateSlots must be packed int32");
  for (int i = 0; i < dgg::kNumSlots; ++i) f[i] = static_cast<int32_t>(s[i]);
  return sl;
}

inline GateStateView make_view(const at::Tensor& ring, const at::Tensor& prev, const at::Tensor& ints,
                             const at::Tensor& stats, const at::Tensor& decision, const at::Tensor& hyper,
                             const at::Tensor& acc, int64_t window, int64_t max_reuse, int64_t statistic,
                             c10::IntArrayRef slots, at::DeviceType want) {
  const at::Device device = acc.device();
  TORCH_CHECK(device.type() == want, "dgg: the gate state is on ", device, "; this build of the finalize needs ",
              c10::DeviceTypeName(want), " tensors");
  TORCH_CHECK(window >= 2, "dgg: window must be >= 2, got ", window);
  TORCH_CHECK(max_reuse >= 1, "dgg: max_reuse must be >= 1, got ", max_reuse);
  TORCH_CHECK(statistic >= dgg::kStatNorm && statistic <= dgg::kStatEnergyIncrement,
              "dgg: statistic id must be 0, 1, 2 or 3, got ", statistic);
  const int64_t n_rings = statistic == dgg::kStatEnergyIncrement ? 2 : 1;
  check_state_tensor(ring, "ring", at::kDouble, n_rings * window, device);
  check_state_tensor(prev, "prev", at::kDouble, 1, device);
  check_state_tensor(ints, "ints", at::kLong, dgg::kNumIntSlots, device);
  check_state_tensor(stats, "stats", at::kFloat, dgg::kNumStatSlots, device);
  check_state_tensor(decision, "decision", at::kBool, 1, device);
  check_state_tensor(hyper, "hyper", at::kDouble, dgg::kNumHyperSlots, device);
  check_state_tensor(acc, "acc", at::kDouble, dgg::kNumAccSlots, device);
  dgg::GateStateView v{};
  v.ring = ring.data_ptr<double>();
  v.prev = prev.data_ptr<double>();
  v.ints = ints.data_ptr<int64_t>();
  v.stats = stats.data_ptr<float>();
  v.decision = decision.data_ptr<bool>();
  v.hyper = hyper.data_ptr<double>();
  v.acc = acc.data_ptr<double>();
  v.window = window;
  v.max_reuse = max_reuse;
  v.statistic = static_cast<int32_t>(statistic);
  v.slots = make_slots(slots);
  return v;
}

}  // namespace dgg
