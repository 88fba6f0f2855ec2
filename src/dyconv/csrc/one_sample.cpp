// dyconv's batch-1 layer in one call from Python (built with cpu_kernel.cpp by dyconv/_cpu_kernel.py, as the
// Python module whose OneSamplePlan dyconv/_one_sample.py uses).
//
// At batch 1 a small layer's convolution takes 0.1-0.3 ms on the CPU, and the Python run around it (finding the layer's
// plan, checking that its members are still the ones the plan's views were made from, choosing the route, calling three
// or four operators) cost DY-MobileNetV2 about 3 ms an image on this machine, a seventh of its time (a paired A/B of
// this change: README, "Where it stands"). A OneSamplePlan holds what dyconv/_one_sample.py's _Plan built for a layer
// whose attention and mixing the compiled kernel does, and its run() does, in C++, what _one_sample.infer then does:
// the same checks of the members (the (dict, key, member) triples the Python plan checks too, so the two cannot drift
// apart), then the route: the attention and the dense kernel (dense_forward), the attention and the depthwise kernel in
// one call (one_sample_depthwise), or the attention and the mixing (one_sample_mix) followed by one matrix product
// (ungrouped unpadded stride-1 1x1 layers) or the convolution. run() returns None where a check fails or the dense
// kernel's rule is not known for the input's shape: Python then checks again, builds a new plan where needed, evaluates
// the rule, and calls run() with it. pointwise() below is _one_sample._pointwise's rule in C++; the Python one stays
// for the layers the compiled kernel does not take (no compiler), and the layer tests run both.

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/extension.h>

#include <tuple>
#include <vector>

namespace py = pybind11;

namespace dyconv_cpu {
bool channels_innermost(const at::Tensor& t);  // cpu_kernel.cpp: the depthwise kernel's own test of its input
}  // namespace dyconv_cpu

namespace {

using dyconv_cpu::channels_innermost;

// The compiled kernel's operators (cpu_kernel.cpp), called through the dispatcher as Python would call them
const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, double, const at::Tensor&, at::Tensor&,
                                          const c10::optional<at::Tensor>&)>&
mix_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dyconv_cpu::one_sample_mix", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, double, const at::Tensor&, at::Tensor&,
                                         const c10::optional<at::Tensor>&)>();
  return op;
}

const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, double)>&
attention_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dyconv_cpu::one_sample_attention", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, double)>();
  return op;
}

const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const c10::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef,
                                          c10::string_view)>&
dense_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dyconv_cpu::dense_forward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const c10::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef,
                                         c10::string_view)>();
  return op;
}

const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, double, const at::Tensor&,
                                          const c10::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef,
                                          at::IntArrayRef)>&
depthwise_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dyconv_cpu::one_sample_depthwise", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, double, const at::Tensor&,
                                         const c10::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef,
                                         at::IntArrayRef)>();
  return op;
}

// _one_sample._pointwise: an ungrouped unpadded stride-1 1x1 convolution of x as one matrix product, into an output
// laid out as the convolution's; undefined where it does not apply
at::Tensor pointwise(const at::Tensor& x, const at::Tensor& matrix, const c10::optional<at::Tensor>& bias,
                     at::IntArrayRef stride, at::IntArrayRef padding, int64_t groups, int64_t max_positions) {
  if (groups != 1) return {};
  for (auto s : stride) {
    if (s != 1) return {};
  }
  for (auto p : padding) {
    if (p != 0) return {};
  }
  const int64_t c_in = x.size(1), c_out = matrix.size(0), positions = x.numel() / c_in;
  if (c_out > c_in && positions <= max_positions) return {};
  if (x.is_contiguous()) {
    std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
    sizes[1] = c_out;
    auto y = at::empty(sizes, x.options());
    auto columns = x.view({c_in, positions});
    auto out = y.view({c_out, positions});
    if (bias.has_value()) {
      at::addmm_out(out, bias->unsqueeze(1), matrix, columns);
    } else {
      at::mm_out(out, matrix, columns);
    }
    return y;
  }
  if (!x.is_contiguous(at::MemoryFormat::ChannelsLast)) return {};
  const int64_t h = x.size(2), w = x.size(3);
  auto y = at::empty_strided({1, c_out, h, w}, {positions * c_out, 1, w * c_out, c_out}, x.options());
  auto rows = x.as_strided({positions, c_in}, {c_in, 1});
  auto out = y.as_strided({positions, c_out}, {c_out, 1});
  if (bias.has_value()) {
    at::addmm_out(out, *bias, rows, matrix.t());
  } else {
    at::mm_out(out, rows, matrix.t());
  }
  return y;
}

at::Tensor convolution(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  if (x.dim() == 3) return at::conv1d(x, w, b, stride, padding, dilation, groups);
  if (x.dim() == 4) return at::conv2d(x, w, b, stride, padding, dilation, groups);
  return at::conv3d(x, w, b, stride, padding, dilation, groups);
}

struct OneSamplePlan {
  // each (dict, key, member): dict.get(key) must be member (the layer's, its attention's and its linear layers'
  // parameters, buffers and modules, the workspace, the module-level limits the route reads)
  std::vector<std::tuple<py::object, py::object, py::object>> members;
  std::vector<py::object> empty;  // dicts that must stay empty (the attention's hooks)
  at::Tensor weight, temperature;
  c10::optional<at::Tensor> bias;
  const void* weight_ptr;
  std::vector<int64_t> weight_sizes, weight_strides;
  const void *bias_ptr, *temperature_ptr;
  int64_t temperature_version;  // -1: an inference tensor (no version): the temperature is read on every call
  double inverse_temperature;
  at::Tensor w1, b1, w2, b2, experts, flat, out, kernel, matrix;
  c10::optional<at::Tensor> bias_d;
  bool depthwise;
  int64_t pointwise_max_positions;
  // the dense kernel's rule: its last answer and what it was for (x's sizes, stride, padding, dilation)
  std::vector<int64_t> dense_key;
  bool dense = false;

  bool matches() const {
    for (const auto& m : members) {
      PyObject* got = PyDict_GetItemWithError(std::get<0>(m).ptr(), std::get<1>(m).ptr());
      if (got == nullptr) {
        if (PyErr_Occurred()) throw py::error_already_set();
        got = Py_None;
      }
      if (got != std::get<2>(m).ptr()) return false;
    }
    for (const auto& d : empty) {
      if (PyDict_Size(d.ptr()) != 0) return false;
    }
    if (weight.data_ptr() != weight_ptr || weight.sizes() != at::IntArrayRef(weight_sizes) ||
        weight.strides() != at::IntArrayRef(weight_strides)) {
      return false;
    }
    if (bias.has_value() && bias->data_ptr() != bias_ptr) return false;
    if (temperature.data_ptr() != temperature_ptr) return false;
    return temperature_version < 0 || temperature._version() == static_cast<uint32_t>(temperature_version);
  }

  // The layer's output for the one-sample batch x, or None (see the file's comment). dense: the dense kernel's rule
  // for this call (0 or 1), or -1 to use the one remembered for x's shape and these arguments.
  py::object run(const at::Tensor& x, std::vector<int64_t> stride, std::vector<int64_t> padding,
                 std::vector<int64_t> dilation, int64_t groups, int dense_rule) {
    if (!matches() || x.scalar_type() != weight.scalar_type() || x.device() != weight.device() ||
        c10::impl::TorchDispatchModeTLS::stack_len() > 0 || at::autocast::is_autocast_enabled(at::kCPU)) {
      return py::none();
    }
    double scale = inverse_temperature;
    if (temperature_version < 0) scale = 1.0 / temperature.item<double>();
    if (groups == 1) {
      std::vector<int64_t> key(x.sizes().begin(), x.sizes().end());
      for (const auto* v : {&stride, &padding, &dilation}) key.insert(key.end(), v->begin(), v->end());
      if (dense_rule >= 0) {
        dense = dense_rule == 1;
        dense_key = key;
      } else if (key != dense_key) {
        return py::none();
      }
    }
    at::Tensor y;
    {
      py::gil_scoped_release no_gil;
      if (groups == 1 && dense) {
        auto attention = attention_op().call(x, w1, b1, w2, b2, scale);
        y = dense_op().call(x, experts, attention, bias_d, padding, dilation, "auto");
      } else if (depthwise && groups == x.size(1) && groups == experts.size(1) && channels_innermost(x)) {
        y = depthwise_op().call(x, w1, b1, w2, b2, scale, experts, bias_d, stride, padding, dilation);
      } else {
        auto mixed = mix_op().call(x, w1, b1, w2, b2, scale, flat, out, bias_d);
        c10::optional<at::Tensor> mixed_bias;
        if (bias_d.has_value()) mixed_bias = mixed;
        if (matrix.defined()) y = pointwise(x, matrix, mixed_bias, stride, padding, groups, pointwise_max_positions);
        if (!y.defined()) y = convolution(x, kernel, mixed_bias, stride, padding, dilation, groups);
      }
    }
    return py::cast(y);
  }
};

c10::optional<at::Tensor> maybe(const py::object& t) {
  if (t.is_none()) return c10::nullopt;
  return t.cast<at::Tensor>();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<OneSamplePlan>(m, "OneSamplePlan")
      .def(py::init([](py::list members, py::list empty, const at::Tensor& weight, py::object bias,
                       const at::Tensor& temperature, py::object inverse_temperature, const at::Tensor& w1,
                       const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& experts,
                       const at::Tensor& flat, const at::Tensor& out, const at::Tensor& kernel, py::object matrix,
                       py::object bias_d, bool depthwise, int64_t pointwise_max_positions) {
             auto p = std::make_unique<OneSamplePlan>();
             for (auto item : members) {
               auto t = item.cast<py::tuple>();
               TORCH_CHECK(t.size() == 3 && PyDict_Check(t[0].ptr()),
                           "dyconv OneSamplePlan: members must be (dict, key, member) triples");
               p->members.emplace_back(t[0], t[1], t[2]);
             }
             for (auto item : empty) {
               TORCH_CHECK(PyDict_Check(item.ptr()), "dyconv OneSamplePlan: empty must hold dicts");
               p->empty.push_back(py::reinterpret_borrow<py::object>(item));
             }
             p->weight = weight;
             p->weight_ptr = weight.data_ptr();
             p->weight_sizes.assign(weight.sizes().begin(), weight.sizes().end());
             p->weight_strides.assign(weight.strides().begin(), weight.strides().end());
             p->bias = maybe(bias);
             p->bias_ptr = p->bias.has_value() ? p->bias->data_ptr() : nullptr;
             p->temperature = temperature;
             p->temperature_ptr = temperature.data_ptr();
             p->temperature_version = inverse_temperature.is_none() ? -1 : temperature._version();
             p->inverse_temperature = inverse_temperature.is_none() ? 0.0 : inverse_temperature.cast<double>();
             p->w1 = w1, p->b1 = b1, p->w2 = w2, p->b2 = b2;
             p->experts = experts, p->flat = flat, p->out = out, p->kernel = kernel;
             if (!matrix.is_none()) p->matrix = matrix.cast<at::Tensor>();
             p->bias_d = maybe(bias_d);
             p->depthwise = depthwise;
             p->pointwise_max_positions = pointwise_max_positions;
             return p;
           }))
      .def("matches", &OneSamplePlan::matches)
      .def("run", &OneSamplePlan::run);
}
