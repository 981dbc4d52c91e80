// Generated from dgg_kernels/state.py (SLOT_GROUPS) by `python -m dgg_kernels.csrc_header --write`:
// do not edit.  CI regenerates it and fails on a difference.
#pragma once

#include <cstdint>

namespace dgg {

// Which entry of ints/stats/hyper/acc means what.  The values come from dgg_kernels/state.py at run
// time (cuda_ext passes state.slot_order()), never from constants compiled in here.
struct StateSlots {
  int32_t pos, count, accepted, closed_total, reuse, stop, has_prev, pos2, count2, pass_mode, pass_new, batch_closed, batches;  // ints (int64)
  int32_t energy, norm, statistic, mean, std, z, closed, z_energy, z_increment, kl;  // stats (float32)
  int32_t threshold, eps, window_mode, kl_limit;  // hyper (float64)
  int32_t acc_energy, acc_kl;  // acc (float64)
};

// Slots per group, in StateSlots order: the lengths of ints, stats, hyper and acc.
constexpr int kNumIntSlots = 13;
constexpr int kNumStatSlots = 10;
constexpr int kNumHyperSlots = 4;
constexpr int kNumAccSlots = 2;
constexpr int kNumSlots = kNumIntSlots + kNumStatSlots + kNumHyperSlots + kNumAccSlots;

}  // namespace dgg
