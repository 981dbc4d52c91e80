// The gate's per-step read of its params' gradients on the host, in C++: every .grad once, and the
// metadata the step-path caches are keyed on (dgg_kernels/inputs.py ParamGrads, backends/base.py MaskPlan),
// packed into bytes objects that Python compares with ==.  The Python form (GradFields) reads the same
// fields one attribute at a time, 0.1-0.15 us each per gradient; this is that loop without the interpreter.
// Built ahead of time by setup.py as dgg_kernels._host (CPU; no CUDA needed); where it is missing the
// Python form runs.  Reads metadata only, never a tensor's data.
#include <torch/extension.h>

#include <cstdint>
#include <string>
#include <vector>

namespace {

// Two keys, as the Python form has them (dgg_kernels/inputs.py ParamGrads.check_key, backends/base.py
// MaskPlan.key_for):
//   check key: per param whether it has a gradient; per gradient its dtype, device (type, index), layout
//              and contiguity, and for a non-contiguous one its dim, sizes and strides: everything the input
//              check reads (not the address: the verdict does not depend on where a tensor lives);
//   plan key:  the number of gradients; per gradient its address, byte size and contiguity, and for a
//              non-contiguous one its dim, sizes and strides: everything the mask plan depends on.
// ``plain`` is false when a gradient is not a plain strided tensor (a sparse layout, or a Python tensor
// subclass such as a DTensor: the Python dispatch key); the caller then takes the Python form, which handles
// those, and the keys are not used.
void push_geometry(std::vector<int64_t>& key, const at::Tensor& g) {
  key.push_back(g.dim());
  for (int64_t s : g.sizes()) key.push_back(s);
  for (int64_t s : g.strides()) key.push_back(s);
}

py::bytes pack(const std::vector<int64_t>& key) {
  return py::bytes(reinterpret_cast<const char*>(key.data()), key.size() * sizeof(int64_t));
}

py::tuple read_grads(const std::vector<at::Tensor>& params) {
  std::vector<int64_t> check, plan;
  check.reserve(params.size() * 6);
  plan.reserve(params.size() * 4 + 1);
  py::list grads;
  bool plain = true;
  for (const at::Tensor& p : params) {
    const at::Tensor& g = p.grad();
    if (!g.defined()) {
      check.push_back(0);
      continue;
    }
    grads.append(py::cast(g));
    if (!plain) continue;
    if (g.layout() != at::kStrided || g.key_set().has(c10::DispatchKey::Python)) {
      plain = false;
      continue;
    }
    const bool contiguous = g.is_contiguous();
    check.push_back(1);
    check.push_back(static_cast<int64_t>(g.scalar_type()));
    check.push_back(static_cast<int64_t>(g.device().type()));
    check.push_back(static_cast<int64_t>(g.device().index()));
    check.push_back(contiguous ? 1 : 0);
    plan.push_back(reinterpret_cast<int64_t>(g.data_ptr()));
    plan.push_back(static_cast<int64_t>(g.nbytes()));
    plan.push_back(contiguous ? 1 : 0);
    if (!contiguous) {
      push_geometry(check, g);
      push_geometry(plan, g);
    }
  }
  plan.push_back(static_cast<int64_t>(py::len(grads)));
  return py::make_tuple(grads, pack(check), pack(plan), plain);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dgg-kernels host helpers: one C++ pass over the params' gradients for the step-path cache keys";
  m.def("read", &read_grads, "(grads present, check key, plan key, plain) of the params' gradients",
        py::arg("params"));
  // the key's layout; dgg_kernels/inputs.py (HOST_KEY_FORMAT) does not use a build of another format
  m.attr("KEY_FORMAT") = 2;
}
