// The CPU build of the gate's finalize (csrc/common/gate_finalize.h, the same source nvcc compiles into the
// fused kernels), registered as the CPU implementation of the dgg::csrc_finalize op (its schema is declared
// in dgg_kernels/ops.py; the CUDA implementation is csrc/binding.cpp's), so that the C++ finalize runs on
// every CI machine, against the plain-Python model and the golden vectors (tests/test_cpp_finalize.py).
// Built just in time with -ffp-contract=off (dgg_kernels/backends/cpp_finalize.py); not part of the CUDA
// extension.  Its Python module holds no function: importing it runs the registration.
#include <torch/extension.h>

#include <optional>

#include "common/dgg_types.h"
#include "common/gate_finalize.h"
#include "common/state_view.h"

namespace {

// One finalize of the state on its energy: acc[ACC_ENERGY], or the float64 ``sums`` added in index order
// (overlap's per-tensor sums), as the CUDA finalize kernel does.
void finalize(const at::Tensor& ring, const at::Tensor& prev, const at::Tensor& ints, const at::Tensor& stats,
              const at::Tensor& decision, const at::Tensor& hyper, const at::Tensor& acc, int64_t window,
              int64_t max_reuse, int64_t statistic, c10::IntArrayRef slots, const std::optional<at::Tensor>& sums) {
  const dgg::GateStateView v =
      dgg::make_view(ring, prev, ints, stats, decision, hyper, acc, window, max_reuse, statistic, slots, at::kCPU);
  double energy = v.acc[v.slots.acc_energy];
  if (sums.has_value()) {
    const at::Tensor& t = *sums;
    TORCH_CHECK(t.device() == acc.device() && t.scalar_type() == at::kDouble && t.is_contiguous() && t.numel() >= 1,
                "dgg: sums must be a non-empty contiguous float64 tensor on ", acc.device());
    const double* p = t.data_ptr<double>();
    energy = 0.0;
    for (int64_t k = 0; k < t.numel(); ++k) energy = dgg::add_rn(energy, p[k]);
    v.acc[v.slots.acc_energy] = energy;  // as the kernel does: the energy judged is the state's
  }
  dgg::gate_finalize(energy, v);
}

}  // namespace

TORCH_LIBRARY_IMPL(dgg, CPU, m) { m.impl("csrc_finalize", &finalize); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dgg-kernels: importing it registers dgg::csrc_finalize for CPU tensors (the C++ finalize)";
  m.attr("STATE_LAYOUT") =
      py::make_tuple(dgg::kNumIntSlots, dgg::kNumStatSlots, dgg::kNumHyperSlots, dgg::kNumAccSlots);
}
