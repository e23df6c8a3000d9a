// The fast path's CUDA kernels, compiled at run time by NVRTC (src/cuda/mod.rs) with --fmad=false, so
// that no multiply and add are contracted into one rounding: each operation rounds as libtorch's own
// separate kernels round it, and `z` (hence every gate decision) has the reference's bits.
//
// SCALAR_KIND selects the tensor dtype: 0 fp32, 1 fp16, 2 bf16. Arithmetic is in fp32 (libtorch's
// "opmath" for all three) and `R(...)` rounds a result to the dtype, as libtorch stores every
// operation's result; for fp32 it is the identity. No headers: fp16 and bf16 are raw 16-bit values.
typedef unsigned short u16;
typedef long long i64;

#if SCALAR_KIND == 0
typedef float scalar_t;
__device__ __forceinline__ float load(scalar_t v) { return v; }
__device__ __forceinline__ scalar_t store(float v) { return v; }
#elif SCALAR_KIND == 1
typedef u16 scalar_t;
__device__ __forceinline__ float load(u16 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
__device__ __forceinline__ u16 store(float f) {
  u16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}
#else
typedef u16 scalar_t;
__device__ __forceinline__ float load(u16 b) { return __uint_as_float(((unsigned)b) << 16); }
// c10::BFloat16's conversion: round to nearest even, NaN to the canonical quiet NaN.
__device__ __forceinline__ u16 store(float f) {
  if (f != f) return 0x7fc0;
  unsigned u = __float_as_uint(f);
  return (u16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
#endif

#define R(e) load(store(e))

// The SRU after its statistics, one thread per (sample, channel pair, position): channel c of the
// first half and its partner c + C/2. Per element the reference's operations in its order,
//   z = ((((x - mean) / denom) * gamma) + beta) * w_gamma      (denom = std + eps, from libtorch)
// the cheap gate (informative exactly when z >= z_t, calibrated on this device's sigmoid), and the
// cross-reconstruction [x_11 + x_22, x_12 + x_21], each part a 1.0 / 0.0 mask times x as the
// reference multiplies it (so NaN and infinities propagate as there). A NaN z is neither. With
// masks_gn_x (2023-09-12/14) the masks multiply gn_x, the value before `* w_gamma`, instead of x.
extern "C" __global__ void sru_gate_reconstruct(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                                                const scalar_t* __restrict__ mean,
                                                const scalar_t* __restrict__ denom,
                                                const scalar_t* __restrict__ gamma,
                                                const scalar_t* __restrict__ beta,
                                                const scalar_t* __restrict__ w_gamma, float z_t, i64 samples,
                                                int channels, int groups, i64 plane, int masks_gn_x) {
  const int half = channels / 2, per_group = channels / groups;
  const i64 total = samples * half * plane;
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
    const i64 p = i % plane, rest = i / plane;
    const int c = (int)(rest % half);
    const i64 s = rest / half;
    const int cs[2] = {c, c + half};
    float v[2], info[2], noninfo[2];
    for (int k = 0; k < 2; ++k) {
      const int ch = cs[k];
      const i64 g = s * groups + ch / per_group;
      v[k] = load(x[(s * channels + ch) * plane + p]);
      float z = R(v[k] - load(mean[g]));
      z = R(z / load(denom[g]));
      z = R(z * load(gamma[ch]));
      z = R(z + load(beta[ch]));
      const float gn_x = z;
      z = R(z * load(w_gamma[ch]));
      if (masks_gn_x) v[k] = gn_x;
      info[k] = z >= z_t ? 1.0f : 0.0f;
      noninfo[k] = z < z_t ? 1.0f : 0.0f;
    }
    out[(s * channels + c) * plane + p] = store(R(info[0] * v[0]) + R(noninfo[1] * v[1]));
    out[(s * channels + c + half) * plane + p] = store(R(info[1] * v[1]) + R(noninfo[0] * v[0]));
  }
}

// The gate's informative mask alone (what the parity suite compares with the reference's decisions).
extern "C" __global__ void sru_info_mask(const scalar_t* __restrict__ x, unsigned char* __restrict__ mask,
                                         const scalar_t* __restrict__ mean, const scalar_t* __restrict__ denom,
                                         const scalar_t* __restrict__ gamma, const scalar_t* __restrict__ beta,
                                         const scalar_t* __restrict__ w_gamma, float z_t, i64 samples,
                                         int channels, int groups, i64 plane, int masks_gn_x) {
  (void)masks_gn_x;  // the decisions do not depend on what the masks multiply
  const int per_group = channels / groups;
  const i64 total = samples * channels * plane;
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
    const i64 rest = i / plane;
    const int ch = (int)(rest % channels);
    const i64 g = (rest / channels) * groups + ch / per_group;
    float z = R(load(x[i]) - load(mean[g]));
    z = R(z / load(denom[g]));
    z = R(z * load(gamma[ch]));
    z = R(z + load(beta[ch]));
    z = R(z * load(w_gamma[ch]));
    mask[i] = z >= z_t ? 1 : 0;
  }
}

// The CRU fuse's weighted sum, in place in Y1: out = w[:C] * Y1 + w[C:] * Y2, with Y2 = cat(PWC2(low),
// low) read from its two parts. Two products and a sum, each rounded, as the reference's
// `softmax(...) * out` and `out1 + out2` round them (bit for bit, given the same weights).
extern "C" __global__ void cru_weighted_sum(scalar_t* __restrict__ y1, const scalar_t* __restrict__ y2_head,
                                            const scalar_t* __restrict__ low,
                                            const scalar_t* __restrict__ weights, i64 samples, int channels,
                                            int head_channels, i64 plane) {
  const i64 total = samples * channels * plane;
  const int low_channels = channels - head_channels;
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
    const i64 p = i % plane, rest = i / plane;
    const int ch = (int)(rest % channels);
    const i64 s = rest / channels;
    const float y2 = ch < head_channels ? load(y2_head[(s * head_channels + ch) * plane + p])
                                        : load(low[(s * low_channels + (ch - head_channels)) * plane + p]);
    const float w1 = load(weights[s * 2 * channels + ch]), w2 = load(weights[s * 2 * channels + channels + ch]);
    y1[i] = store(R(w1 * load(y1[i])) + R(w2 * y2));
  }
}
