//! The precision of an inference form, decided in one place and carried by its steps
//! ([`Arithmetic`]): fp32, or bf16 convolutions (oneDNN's on CPUs with bf16 instructions, emulated
//! elsewhere) with every other step computed in fp32.
//!
//! In the bf16 form every convolution reads and writes bf16: its weight rounded to bf16 once (after
//! the BatchNorm is folded in fp64), products summed in fp32 as oneDNN's bf16 kernels do, the
//! epilogue (bias, residual add, ReLU) in fp32 and the result rounded to bf16 once. The bias stays
//! fp32, but for the call with the residual add (a ResNet block's last convolution, the CRU's GWC),
//! whose libtorch operator takes every operand in one type (there it is rounded to bf16 once too).
//! The ScConv's SRU (GroupNorm statistics, `w_gamma`, the gate), the CRU's fuse (pooling, softmax,
//! weighted sum), its pool, BatchNorm shift, residual add and ReLU run in fp32 on the bf16 values and
//! store their result in bf16 once; the logits are computed in fp32 from the last bf16 activation.
//!
//! Emulated, the same values are held in fp32 tensors: each bf16 store is a rounding to the nearest
//! bf16 (`x.to(bf16).to(f32)`, round-to-nearest-even, as oneDNN converts), so the form computes the
//! native form's numbers up to the order of the fp32 sums, at fp32 speed or slower.
use tch::{Kind, Tensor};

/// What an inference form computes in (see [`InferenceResNet::compiled_with`](super::InferenceResNet)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    /// fp32 throughout: PyTorch's own fp32 accuracy.
    Fp32,
    /// bf16 convolutions on the CPU's bf16 units where it has them ([`bf16_support`]); emulated, with
    /// the same numbers and no speed-up, where it has not.
    Bf16,
    /// The bf16 form's numbers computed in fp32 tensors on any CPU (to check its accuracy on a
    /// machine without bf16 units, or against the native form on one with them).
    Bf16Emulated,
    /// The bf16 form on oneDNN's bf16 kernels wherever libtorch's oneDNN takes bf16
    /// ([`onednn_bf16_support`]), bf16 units or not: on AVX-512 CPUs without them oneDNN emulates bf16
    /// (its `jit_bf16:avx512_core` kernels, 3.5-4x slower than fp32: docs/speed.md), which runs the
    /// native form's code and numbers on such a machine. Emulated in fp32, saying why, where refused.
    #[serde(rename = "bf16-onednn")]
    Bf16OneDnn,
}

/// How a form's convolutions run, as decided for its precision on this CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arithmetic {
    /// fp32 tensors, fp32 arithmetic.
    Fp32,
    /// bf16 tensors through oneDNN's bf16 kernels.
    Bf16Native,
    /// bf16 values in fp32 tensors; `why` says why not native.
    Bf16Emulated {
        /// What this CPU or build lacks, or that emulation was asked for.
        why: String,
    },
}

impl Arithmetic {
    /// The arithmetic for `precision` on this machine.
    pub fn for_precision(precision: Precision) -> Arithmetic {
        match precision {
            Precision::Fp32 => Arithmetic::Fp32,
            Precision::Bf16Emulated => Arithmetic::Bf16Emulated { why: "emulation was asked for".into() },
            Precision::Bf16 => Arithmetic::native_where(bf16_support()),
            Precision::Bf16OneDnn => Arithmetic::native_where(onednn_bf16_support()),
        }
    }

    /// Native bf16 where `support` holds, else emulated saying why.
    fn native_where(support: Result<(), String>) -> Arithmetic {
        match support {
            Ok(()) => Arithmetic::Bf16Native,
            Err(why) => Arithmetic::Bf16Emulated { why },
        }
    }

    /// Whether values are bf16 (stored natively or emulated).
    pub fn is_bf16(&self) -> bool {
        !matches!(self, Arithmetic::Fp32)
    }

    /// A short name for tables: `fp32`, `bf16`, `bf16 emulated`.
    pub fn name(&self) -> &'static str {
        match self {
            Arithmetic::Fp32 => "fp32",
            Arithmetic::Bf16Native => "bf16",
            Arithmetic::Bf16Emulated { .. } => "bf16 emulated",
        }
    }

    /// A one-line description for reports: `fp32`, `bf16 (oneDNN)`, `bf16 emulated (...)`.
    pub fn describe(&self) -> String {
        match self {
            Arithmetic::Fp32 => "fp32".into(),
            Arithmetic::Bf16Native => "bf16 (oneDNN's bf16 kernels)".into(),
            Arithmetic::Bf16Emulated { why } => format!("bf16 emulated in fp32, no speed-up ({why})"),
        }
    }

    /// `t` as this arithmetic stores an activation or weight: unchanged in fp32, cast to bf16 natively,
    /// rounded to bf16 values in fp32 tensors emulated. Idempotent.
    pub(crate) fn store(&self, t: &Tensor) -> Tensor {
        match self {
            Arithmetic::Fp32 => t.shallow_clone(),
            Arithmetic::Bf16Native if t.kind() == Kind::BFloat16 => t.shallow_clone(),
            Arithmetic::Bf16Native => t.to_kind(Kind::BFloat16),
            Arithmetic::Bf16Emulated { .. } => round_to_bf16(t),
        }
    }
}

/// `t`'s values rounded to the nearest bf16 (ties to even), kept in `t`'s kind.
pub fn round_to_bf16(t: &Tensor) -> Tensor {
    t.to_kind(Kind::BFloat16).to_kind(t.kind())
}

/// `t` in fp32 for the steps that compute in fp32 (a copy only where it is not fp32 already).
pub(crate) fn as_fp32(t: &Tensor) -> Tensor {
    match t.kind() {
        Kind::Float => t.shallow_clone(),
        _ => t.to_kind(Kind::Float),
    }
}

/// Whether this machine runs bf16 convolutions natively: the CPU's own bf16 instructions (cpuid's
/// `avx512_bf16` or `amx_bf16`; libtorch's check alone also passes on AVX-512 CPUs that emulate bf16),
/// libtorch's oneDNN bf16 check, and this crate's oneDNN shim. `Err` says what is missing.
pub fn bf16_support() -> Result<(), String> {
    if cpu_bf16_flags().is_empty() {
        return Err("this CPU has neither avx512_bf16 nor amx_bf16".into());
    }
    onednn_bf16_support()
}

/// Whether this build and libtorch's oneDNN run bf16 convolutions here at all, natively or (on AVX-512
/// CPUs without bf16 units) emulated by oneDNN: the shim, and libtorch's oneDNN bf16 check (which
/// refuses AVX2 CPUs without `avx_ne_convert`). `Err` says what is missing.
pub fn onednn_bf16_support() -> Result<(), String> {
    if !super::ffi::shim_built() {
        return Err("this build has no oneDNN shim".into());
    }
    match super::ffi::mkldnn_bf16_supported() {
        Ok(true) => Ok(()),
        Ok(false) => {
            Err("libtorch's oneDNN refuses bf16 on this CPU (it needs avx512bw, avx512vl and avx512dq, or avx_ne_convert)".into())
        }
        Err(e) => Err(format!("libtorch's oneDNN bf16 check failed: {e}")),
    }
}

/// The CPU's bf16 instruction sets among `avx512_bf16` and `amx_bf16`, by cpuid.
pub fn cpu_bf16_flags() -> Vec<&'static str> {
    let mut flags = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512bf16") {
            flags.push("avx512_bf16");
        }
        // Leaf 7, sub-leaf 0, EDX bit 22: AMX-BF16 (not in `is_x86_feature_detected!` on stable).
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        if std::arch::x86_64::__get_cpuid_max(0).0 >= 7 && leaf7.edx & (1 << 22) != 0 {
            flags.push("amx_bf16");
        }
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn rounding_to_bf16_keeps_eight_significant_bits_ties_to_even() {
        let x =
            Tensor::from_slice(&[1.0f32, 1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, 1.0 + 1.0 / 512.0, -3.3e-3]);
        let r = Vec::<f32>::try_from(round_to_bf16(&x)).unwrap();
        // 1 + 2^-8 is a tie between 1 and 1 + 2^-7: even (1); 1 + 3*2^-8 ties up to 1 + 2^-6.
        assert_eq!(&r[..4], &[1.0, 1.0, 1.0 + 1.0 / 64.0, 1.0]);
        assert!((r[4] - -3.3e-3).abs() <= 3.3e-3 / 256.0 && r[4] != -3.3e-3);
        assert!(round_to_bf16(&x).equal(&round_to_bf16(&round_to_bf16(&x))));
    }

    #[test]
    fn each_arithmetic_stores_values_as_it_says() {
        let x = Tensor::randn([64], (Kind::Float, Device::Cpu));
        assert!(Arithmetic::Fp32.store(&x).equal(&x));
        let emulated = Arithmetic::for_precision(Precision::Bf16Emulated).store(&x);
        assert_eq!(emulated.kind(), Kind::Float);
        assert!(emulated.equal(&round_to_bf16(&x)) && !emulated.equal(&x));
        let native = Arithmetic::Bf16Native.store(&x);
        assert_eq!(native.kind(), Kind::BFloat16);
        assert!(native.to_kind(Kind::Float).equal(&emulated));
    }

    /// `Precision::Bf16` is native exactly where [`bf16_support`] finds the CPU's flags, libtorch's
    /// check and the shim; elsewhere emulated, saying why.
    #[test]
    fn bf16_is_native_only_where_the_cpu_has_bf16_instructions() {
        let arithmetic = Arithmetic::for_precision(Precision::Bf16);
        match bf16_support() {
            Ok(()) => assert_eq!(arithmetic, Arithmetic::Bf16Native),
            Err(why) => {
                assert_eq!(arithmetic, Arithmetic::Bf16Emulated { why: why.clone() });
                assert!(arithmetic.describe().contains("emulated") && arithmetic.describe().contains(&why));
            }
        }
        if cpu_bf16_flags().is_empty() {
            assert!(bf16_support().unwrap_err().contains("neither avx512_bf16 nor amx_bf16"));
        }
    }

    /// `Precision::Bf16OneDnn` is native wherever libtorch's oneDNN takes bf16, the CPU's flags aside.
    #[test]
    fn bf16_onednn_is_native_wherever_libtorchs_onednn_takes_bf16() {
        let arithmetic = Arithmetic::for_precision(Precision::Bf16OneDnn);
        match onednn_bf16_support() {
            Ok(()) => assert_eq!(arithmetic, Arithmetic::Bf16Native),
            Err(why) => assert_eq!(arithmetic, Arithmetic::Bf16Emulated { why }),
        }
        if bf16_support().is_ok() {
            assert!(onednn_bf16_support().is_ok());
        }
    }
}
