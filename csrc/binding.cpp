// The dgg CUDA kernels as implementations of the dgg:: ops (their schemas are declared once, in
// dgg_kernels/ops.py), registered for the CUDA dispatch key when this library is loaded.  The Python module
// (dgg_kernels._C, or the just-in-time build's name) holds no function: importing it runs the registrations,
// and its attributes tell the loader which tables it was built for.  Validates tensors, maps torch dtypes to
// the kernels' tags, and launches on the current CUDA stream; never synchronizes the host.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <string>
#include <vector>

#include "common/dgg_types.h"
#include "common/state_view.h"
#include "gate_mask/gate_mask.cuh"
#include "gate_step/gate_step.cuh"

namespace {

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "dgg ", what, " launch failed: ", cudaGetErrorString(err));
}

int32_t dtype_tag(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return dgg::kF32;
    case at::kBFloat16: return dgg::kBF16;
    case at::kHalf: return dgg::kF16;
    default: return -1;
  }
}

// The monitor gradients as kernel tables of up to kMaxStepTensors each.  A
// gradient the kernel cannot read in place (float64, or not one dense span)
// is converted into `keep`, which the caller holds until the launch is queued;
// the caching allocator keeps that memory stream-ordered after that.
std::vector<dgg::StepTensorTable> make_tables(at::TensorList grads, const at::Device& device,
                                              std::vector<at::Tensor>& keep) {
  TORCH_CHECK(!grads.empty(), "dgg: no monitor gradients given");
  std::vector<dgg::StepTensorTable> tables;
  for (size_t i = 0; i < grads.size(); ++i) {
    at::Tensor g = grads[i];
    TORCH_CHECK(g.device() == device, "dgg: monitor gradient ", i, " is on ", g.device(), ", expected ", device);
    if (g.scalar_type() == at::kDouble) {
      g = g.to(at::kFloat);  // the spec widens (here: narrows) every entry to float32 before squaring
    } else {
      TORCH_CHECK(dtype_tag(g.scalar_type()) >= 0, "dgg: monitor gradient ", i, " has dtype ", g.scalar_type(),
                  "; the cuda backend reads float32, bfloat16, float16 (and float64 via a float32 copy)");
    }
    // A sum of squares does not care about element order, so any
    // non-overlapping dense layout (e.g. a transposed weight's grad) is read
    // as its storage span; only gapped or overlapping views are copied.
    if (!g.is_non_overlapping_and_dense()) g = g.contiguous();
    if (!g.is_same(grads[i])) keep.push_back(g);
    if (tables.empty() || tables.back().count == dgg::kMaxStepTensors) {
      dgg::StepTensorTable t{};
      tables.push_back(t);
    }
    dgg::StepTensorTable& t = tables.back();
    const int k = t.count++;
    // data_ptr is the lowest address of a dense tensor: its strides are positive.
    t.ptr[k] = g.data_ptr();
    t.numel[k] = g.numel();
    t.dtype[k] = dtype_tag(g.scalar_type());
  }
  return tables;
}

void reduce_impl(at::TensorList grads, const at::Tensor& partials, const at::Tensor& ticket,
                 const at::Tensor& acc, int64_t max_blocks, const dgg::GateStateView* state) {
  const at::Device device = acc.device();
  TORCH_CHECK(device.is_cuda(), "dgg: acc is on ", device, "; the cuda backend needs a CUDA device");
  // acc: where the energy goes (its first element): the state's acc, or one float64 of per-tensor sums
  TORCH_CHECK(acc.scalar_type() == at::kDouble && acc.is_contiguous() && acc.numel() >= 1,
              "dgg: acc must be a non-empty contiguous float64 tensor on ", device);
  TORCH_CHECK(partials.device() == device && partials.scalar_type() == at::kFloat && partials.is_contiguous(),
              "dgg: partials must be a contiguous float32 tensor on ", device);
  TORCH_CHECK(ticket.device() == device && ticket.scalar_type() == at::kInt && ticket.numel() == 1,
              "dgg: ticket must be one int32 on ", device);
  c10::cuda::CUDAGuard guard(device);
  std::vector<at::Tensor> keep;
  const auto tables = make_tables(grads, device, keep);
  std::vector<int> grids(tables.size());
  int64_t needed = 0;
  for (size_t j = 0; j < tables.size(); ++j) {
    grids[j] = dgg::gate_reduce_grid(tables[j], static_cast<int>(max_blocks));
    needed += grids[j];
  }
  TORCH_CHECK(needed <= partials.numel(), "dgg: partials holds ", partials.numel(), " floats, this reduce needs ",
              needed, " (", grads.size(), " monitor tensors)");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  check_cuda(dgg::launch_gate_reduce(tables.data(), grids.data(), static_cast<int>(tables.size()),
                                     partials.data_ptr<float>(), partials.numel(),
                                     reinterpret_cast<unsigned int*>(ticket.data_ptr<int32_t>()),
                                     acc.data_ptr<double>(), state, stream),
             "reduce");
}

void reduce(at::TensorList grads, const at::Tensor& partials, const at::Tensor& ticket,
            const at::Tensor& acc, int64_t max_blocks) {
  reduce_impl(grads, partials, ticket, acc, max_blocks, nullptr);
}

void step(at::TensorList grads, const at::Tensor& partials, const at::Tensor& ticket,
          int64_t max_blocks, const at::Tensor& ring, const at::Tensor& prev, const at::Tensor& ints,
          const at::Tensor& stats, const at::Tensor& decision, const at::Tensor& hyper, const at::Tensor& acc,
          int64_t window, int64_t max_reuse, int64_t statistic, c10::IntArrayRef slots) {
  const dgg::GateStateView v =
      dgg::make_view(ring, prev, ints, stats, decision, hyper, acc, window, max_reuse, statistic, slots,
                      at::kCUDA);
  reduce_impl(grads, partials, ticket, acc, max_blocks, &v);
}

void finalize(const at::Tensor& ring, const at::Tensor& prev, const at::Tensor& ints, const at::Tensor& stats,
              const at::Tensor& decision, const at::Tensor& hyper, const at::Tensor& acc, int64_t window,
              int64_t max_reuse, int64_t statistic, c10::IntArrayRef slots,
              const std::optional<at::Tensor>& sums) {
  const dgg::GateStateView v =
      dgg::make_view(ring, prev, ints, stats, decision, hyper, acc, window, max_reuse, statistic, slots,
                      at::kCUDA);
  const double* sums_ptr = nullptr;
  int64_t n_sums = 0;
  if (sums.has_value()) {
    const at::Tensor& t = *sums;
    TORCH_CHECK(t.device() == acc.device() && t.scalar_type() == at::kDouble && t.is_contiguous() && t.numel() >= 1,
                "dgg: sums must be a non-empty contiguous float64 tensor on ", acc.device());
    sums_ptr = t.data_ptr<double>();
    n_sums = t.numel();
  }
  c10::cuda::CUDAGuard guard(acc.device());
  check_cuda(dgg::launch_gate_finalize(v, sums_ptr, n_sums,
                                       c10::cuda::getCurrentCUDAStream(acc.device().index()).stream()),
             "finalize");
}

void mask(const at::Tensor& decision, const at::Tensor& table, int64_t blocks) {
  const at::Device device = decision.device();
  TORCH_CHECK(device.is_cuda(), "dgg: decision is on ", device, "; the cuda backend needs a CUDA device");
  TORCH_CHECK(decision.scalar_type() == at::kBool && decision.numel() == 1, "dgg: decision must be one bool");
  TORCH_CHECK(table.device() == device && table.scalar_type() == at::kLong && table.is_contiguous() &&
                  table.dim() == 2 && table.size(1) == 2,
              "dgg: the mask table must be a contiguous int64[n, 2] tensor of (address, nbytes) on ", device);
  if (table.size(0) == 0) return;
  c10::cuda::CUDAGuard guard(device);
  check_cuda(dgg::launch_gate_mask(decision.data_ptr<bool>(), table.data_ptr<int64_t>(), table.size(0),
                                   static_cast<int>(blocks),
                                   c10::cuda::getCurrentCUDAStream(device.index()).stream()),
             "mask");
}

}  // namespace

TORCH_LIBRARY_IMPL(dgg, CUDA, m) {
  m.impl("csrc_reduce", &reduce);
  m.impl("csrc_step", &step);
  m.impl("csrc_finalize", &finalize);
  m.impl("csrc_mask", &mask);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dgg-kernels CUDA backend: importing it registers the dgg::csrc_* ops for CUDA (dgg_kernels/ops.py)";
  m.attr("MAX_STEP_TENSORS") = dgg::kMaxStepTensors;
  m.attr("MASK_THREADS") = dgg::gate_mask_threads();
  // (len(ints), len(stats), len(hyper), len(acc)) this build expects; the loader compares it with state.py
  m.attr("STATE_LAYOUT") =
      py::make_tuple(dgg::kNumIntSlots, dgg::kNumStatSlots, dgg::kNumHyperSlots, dgg::kNumAccSlots);
}
