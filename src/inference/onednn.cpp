// The inference form's convolutions as oneDNN primitives of our own (oneDNN from PyPI's
// `onednn-cpu-gomp`, GNU OpenMP: the same libgomp and so the same threads as libtorch), created once
// per input size with the weight reordered and a scratchpad, then executed on new data pointers. A
// call through libtorch's `mkldnn::_convolution_pointwise` rebuilds oneDNN's descriptors and attributes
// and looks the primitive up in its cache every time: ~18-30 us of fixed cost per call, against ~1-2 us
// here (docs/speed.md, "Batch 1: the per-call cost"). libtorch does not export its own oneDNN, so this
// is a second one; it sees plain fp32 or bf16 pointers only (no ATen headers: their oneDNN headers
// differ).
//
// Every function returns 0 on success, or non-zero with a message in `err` (never throws).
#include <oneapi/dnnl/dnnl.hpp>

#include <cstdio>
#include <exception>
#include <stdexcept>
#include <string>
#include <unordered_map>

// One primitive with the weight in the layout it chose and its scratchpad.
struct scc_dnnl_variant {
  dnnl::convolution_forward primitive;
  dnnl::memory weights, scratchpad;
};

struct scc_dnnl_conv {
  scc_dnnl_variant plain, with_sum;  // dst = conv + bias [+ dst], then ReLU where asked
  dnnl::memory bias, sum_bias;       // fp32; the sum variant's of the primitive's type
  // The source and destination, made once without data and pointed at each call's; each variant's
  // arguments built once around them (a call then allocates nothing).
  dnnl::memory src, dst;
  std::unordered_map<int, dnnl::memory> plain_args, sum_args;
};

namespace {

void set_err(char* err, size_t len, const char* msg) {
  if (err && len) std::snprintf(err, len, "%s", msg);
}

dnnl::engine& cpu() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

using dims = dnnl::memory::dims;
using dt = dnnl::memory::data_type;
using tag = dnnl::memory::format_tag;

dnnl::convolution_forward::primitive_desc describe(const dnnl::memory::desc& src, const dnnl::memory::desc& weights,
                                                   const dnnl::memory::desc* bias, const dnnl::memory::desc& dst,
                                                   const dims& stride, const dims& dilation, const dims& pad_l,
                                                   const dims& pad_r, bool relu, bool sum) {
  dnnl::post_ops ops;
  if (sum) ops.append_sum(1.f);
  if (relu) ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
  dnnl::primitive_attr attr;
  attr.set_post_ops(ops);
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  if (bias)
    return {cpu(), dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct, src, weights, *bias, dst,
            stride, dilation, pad_l, pad_r, attr};
  return {cpu(), dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct, src, weights, dst,
          stride, dilation, pad_l, pad_r, attr};
}

}  // namespace

extern "C" {

// A convolution for channels-last inputs of `input` (N, C, H, W), `w` (O, C / groups, KH, KW), `b` and
// `b_sum` (O each, or both null) contiguous, geometry as PyTorch gives it. Input, weight, output and
// `b_sum` (the bias with the residual add) all fp32, or with `bf16` all bf16 (products summed in fp32,
// the output rounded to bf16 once, as libtorch's bf16 call computes); `b` (the bias without the add)
// fp32 either way, added in the fp32 sums. Writes the output size (N, O, OH, OW) into `output`.
int scc_dnnl_conv_create(const void* w, const int64_t* w_size, const void* b, const void* b_sum,
                         const int64_t* input,
                         const int64_t* stride, const int64_t* padding, const int64_t* dilation, int64_t groups,
                         int relu, int bf16, scc_dnnl_conv** out, int64_t* output, char* err, size_t len) {
  try {
    if ((b == nullptr) != (b_sum == nullptr)) throw std::invalid_argument("both biases or neither");
    const dt type = bf16 ? dt::bf16 : dt::f32;
    const int64_t n = input[0], c = input[1], h = input[2], wd = input[3], o = w_size[0];
    int64_t spatial[2] = {h, wd}, out_spatial[2];
    dims pad_l(2), pad_r(2), dil(2), str(2);
    for (int i = 0; i < 2; i++) {
      const int64_t k = w_size[2 + i], extent = dilation[i] * (k - 1) + 1;
      out_spatial[i] = (spatial[i] + 2 * padding[i] - extent) / stride[i] + 1;
      pad_l[i] = padding[i];
      // What PyTorch's output size leaves of the right padding (ideep computes it the same way).
      pad_r[i] = (out_spatial[i] - 1) * stride[i] + extent - spatial[i] - padding[i];
      dil[i] = dilation[i] - 1;  // oneDNN counts the gaps
      str[i] = stride[i];
    }
    dnnl::memory::desc src({n, c, h, wd}, type, tag::nhwc);
    dnnl::memory::desc dst({n, o, out_spatial[0], out_spatial[1]}, type, tag::nhwc);
    dims w_dims = groups == 1 ? dims{o, c, w_size[2], w_size[3]}
                              : dims{groups, o / groups, c / groups, w_size[2], w_size[3]};
    dnnl::memory::desc w_any(w_dims, type, tag::any);
    dnnl::memory::desc w_user(w_dims, type, groups == 1 ? tag::oihw : tag::goihw);
    dnnl::memory::desc b_md({o}, dt::f32, tag::a), b_sum_md({o}, type, tag::a);
    dnnl::stream stream(cpu());
    dnnl::memory user(w_user, cpu(), const_cast<void*>(w));
    // With and without the residual add oneDNN may choose different kernels, and weight layouts.
    auto variant = [&](bool sum) {
      const dnnl::memory::desc* bias = b ? (sum ? &b_sum_md : &b_md) : nullptr;
      auto pd = describe(src, w_any, bias, dst, str, dil, pad_l, pad_r, relu != 0, sum);
      // oneDNN's reference kernels are for checking, not speed: leave such a convolution to libtorch.
      if (std::string(pd.impl_info_str()).rfind("ref", 0) == 0)
        throw std::runtime_error("oneDNN offers only its reference kernel (" + std::string(pd.impl_info_str()) + ")");
      scc_dnnl_variant v{dnnl::convolution_forward(pd), dnnl::memory(pd.weights_desc(), cpu()),
                         dnnl::memory(pd.scratchpad_desc(), cpu())};
      dnnl::reorder(user, v.weights).execute(stream, user, v.weights);
      return v;
    };
    auto conv = new scc_dnnl_conv{variant(false), variant(true), dnnl::memory(), dnnl::memory(),
                                  dnnl::memory(src, cpu(), nullptr), dnnl::memory(dst, cpu(), nullptr), {}, {}};
    auto copied = [&](const dnnl::memory::desc& md, const void* data) {
      dnnl::memory user_b(md, cpu(), const_cast<void*>(data)), own(md, cpu());
      dnnl::reorder(user_b, own).execute(stream, user_b, own);
      return own;
    };
    if (b) {
      conv->bias = copied(b_md, b);
      conv->sum_bias = copied(b_sum_md, b_sum);
    }
    auto args = [&](const scc_dnnl_variant& v, const dnnl::memory& bias) {
      std::unordered_map<int, dnnl::memory> a{{DNNL_ARG_SRC, conv->src},
                                              {DNNL_ARG_WEIGHTS, v.weights},
                                              {DNNL_ARG_DST, conv->dst},
                                              {DNNL_ARG_SCRATCHPAD, v.scratchpad}};
      if (b) a.emplace(DNNL_ARG_BIAS, bias);
      return a;
    };
    conv->plain_args = args(conv->plain, conv->bias);
    conv->sum_args = args(conv->with_sum, conv->sum_bias);
    stream.wait();
    output[0] = n;
    output[1] = o;
    output[2] = out_spatial[0];
    output[3] = out_spatial[1];
    *out = conv;
    return 0;
  } catch (const std::exception& e) {
    set_err(err, len, e.what());
    return 1;
  }
}

// y = relu?(conv(x) + bias [+ y when `add`]): x and y channels-last, of the sizes and type given at
// creation. Not for two threads at once on one convolution (its scratchpad, source and destination
// memories are its own).
int scc_dnnl_conv_run(scc_dnnl_conv* conv, const void* x, void* y, int add, char* err, size_t len) {
  try {
    thread_local dnnl::stream stream(cpu());
    conv->src.set_data_handle(const_cast<void*>(x));
    conv->dst.set_data_handle(y);
    const scc_dnnl_variant& v = add ? conv->with_sum : conv->plain;
    v.primitive.execute(stream, add ? conv->sum_args : conv->plain_args);
    stream.wait();
    return 0;
  } catch (const std::exception& e) {
    set_err(err, len, e.what());
    return 1;
  }
}

void scc_dnnl_conv_free(scc_dnnl_conv* conv) { delete conv; }

// oneDNN's version, as "3.2.0".
void scc_dnnl_version(char* out, size_t len) {
  const dnnl_version_t* v = dnnl_version();
  std::snprintf(out, len, "%d.%d.%d", v->major, v->minor, v->patch);
}
}
