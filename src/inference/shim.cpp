// The C++ side of `src/inference`: libtorch's own oneDNN operators that tch does not bind, reached
// through the dispatcher by schema name (boxed calls, so no C++ signature has to match the kernel's):
// - `mkldnn::_convolution_pointwise`: a convolution with a prepacked weight and a fused unary
//   epilogue (`relu`), what torch.compile's freezing emits;
// - `mkldnn::_convolution_pointwise_.binary`: the same with the residual add (and ReLU) fused, written
//   into the residual tensor in place;
// - `mkldnn::_reorder_convolution_weight`: a weight prepacked once for an input size;
// - `mkldnn::_is_mkldnn_bf16_supported`: whether libtorch's oneDNN runs bf16 on this CPU;
// - `at::parallel_for`: libtorch's own thread pool for our kernels (no second pool beside OpenMP's).
//
// Tensors cross as tch's `torch::Tensor*`. Every function returns 0 on success, or non-zero with a
// message in `err` (never throws).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <cstdio>
#include <exception>
#include <string>
#include <vector>

namespace {

void set_err(char* err, size_t len, const char* msg) {
  if (err && len) std::snprintf(err, len, "%s", msg);
}

c10::OperatorHandle op(const char* name, const char* overload) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, overload);
}

std::vector<int64_t> pair(const int64_t* v) { return {v[0], v[1]}; }

c10::IValue optional_tensor(const at::Tensor* t) { return t ? c10::IValue(*t) : c10::IValue(); }

}  // namespace

extern "C" {

int scc_conv_pointwise(const at::Tensor* x, const at::Tensor* w, const at::Tensor* b, const int64_t* padding,
                       const int64_t* stride, const int64_t* dilation, int64_t groups, int relu,
                       at::Tensor** out, char* err, size_t len) {
  try {
    static const c10::OperatorHandle conv = op("mkldnn::_convolution_pointwise", "");
    torch::jit::Stack stack{*x, *w, optional_tensor(b), pair(padding), pair(stride), pair(dilation), groups,
                            std::string(relu ? "relu" : "none"), c10::List<std::optional<c10::Scalar>>(),
                            c10::IValue()};
    conv.callBoxed(stack);
    *out = new at::Tensor(stack.back().toTensor());
    return 0;
  } catch (const std::exception& e) {
    set_err(err, len, e.what());
    return 1;
  }
}

int scc_conv_pointwise_add_(at::Tensor* other, const at::Tensor* x, const at::Tensor* w, const at::Tensor* b,
                            const int64_t* padding, const int64_t* stride, const int64_t* dilation,
                            int64_t groups, int relu, char* err, size_t len) {
  try {
    static const c10::OperatorHandle conv = op("mkldnn::_convolution_pointwise_", "binary");
    torch::jit::Stack stack{*other, *x, *w, optional_tensor(b), pair(padding), pair(stride), pair(dilation),
                            groups, std::string("add"), c10::IValue(),
                            relu ? c10::IValue(std::string("relu")) : c10::IValue(),
                            c10::List<std::optional<c10::Scalar>>(), c10::IValue()};
    conv.callBoxed(stack);
    return 0;
  } catch (const std::exception& e) {
    set_err(err, len, e.what());
    return 1;
  }
}

// The weight `w` reordered into oneDNN's blocked layout for inputs of `input_size` (N, C, H, W): an
// mkldnn tensor that `scc_conv_pointwise` reads without reordering it again.
int scc_reorder_conv_weight(const at::Tensor* w, const int64_t* padding, const int64_t* stride,
                            const int64_t* dilation, int64_t groups, const int64_t* input_size,
                            at::Tensor** out, char* err, size_t len) {
  try {
    static const c10::OperatorHandle reorder = op("mkldnn::_reorder_convolution_weight", "");
    std::vector<int64_t> size(input_size, input_size + 4);
    torch::jit::Stack stack{*w, pair(padding), pair(stride), pair(dilation), groups, size};
    reorder.callBoxed(stack);
    *out = new at::Tensor(stack.back().toTensor());
    return 0;
  } catch (const std::exception& e) {
    set_err(err, len, e.what());
    return 1;
  }
}

// Whether libtorch's oneDNN takes bf16 tensors on this CPU: 1 or 0 in `out`.
int scc_mkldnn_bf16_supported(int* out, char* err, size_t len) {
  try {
    static const c10::OperatorHandle check = op("mkldnn::_is_mkldnn_bf16_supported", "");
    torch::jit::Stack stack;
    check.callBoxed(stack);
    *out = stack.back().toBool() ? 1 : 0;
    return 0;
  } catch (const std::exception& e) {
    set_err(err, len, e.what());
    return 1;
  }
}

// Runs body(ctx, begin, end) over [begin, end) in chunks of at least `grain` on libtorch's pool.
void scc_parallel_for(int64_t begin, int64_t end, int64_t grain, void (*body)(void*, int64_t, int64_t),
                      void* ctx) {
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { body(ctx, b, e); });
}

int scc_get_num_threads() { return at::get_num_threads(); }
}
