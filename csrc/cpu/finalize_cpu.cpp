// The CPU build of the gate's finalize (csrc/common/gate_finalize.h, the same source nvcc compiles into the
// fused kernels), so that the C++ finalize runs on every CI machine, against the plain-Python model and the
// golden vectors (tests/test_cpp_finalize.py).  Built just in time with -ffp-contract=off
// (dgg_kernels/backends/cpp_finalize.py); not part of the CUDA extension.
#include <torch/extension.h>

#include <vector>

#include "common/dgg_types.h"
#include "common/gate_finalize.h"
#include "common/state_view.h"

namespace {

// One finalize of the state on its energy (acc[ACC_ENERGY]), as the CUDA backend's finalize launch without
// per-tensor sums does it.
void finalize(const at::Tensor& ring, const at::Tensor& prev, const at::Tensor& ints, const at::Tensor& stats,
              const at::Tensor& decision, const at::Tensor& hyper, const at::Tensor& acc, int64_t window,
              int64_t max_reuse, int64_t statistic, const std::vector<int64_t>& slots) {
  const dgg::GateStateView v =
      dgg::make_view(ring, prev, ints, stats, decision, hyper, acc, window, max_reuse, statistic, slots, at::kCPU);
  dgg::gate_finalize(v.acc[v.slots.acc_energy], v);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dgg-kernels: the C++ finalize on CPU tensors (the source the CUDA kernels compile)";
  m.def("finalize", &finalize, "one finalize of the state on acc[ACC_ENERGY] (host, float64)", py::arg("ring"),
        py::arg("prev"), py::arg("ints"), py::arg("stats"), py::arg("decision"), py::arg("hyper"), py::arg("acc"),
        py::arg("window"), py::arg("max_reuse"), py::arg("statistic"), py::arg("slots"));
  m.attr("STATE_LAYOUT") =
      py::make_tuple(dgg::kNumIntSlots, dgg::kNumStatSlots, dgg::kNumHyperSlots, dgg::kNumAccSlots);
}
