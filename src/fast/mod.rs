//! The fast execution path: the same function as the line-for-line reference, in fewer kernels and
//! fewer passes over memory, for inference. Enabled per module with
//! `ScConv::set_execution(Execution::Fast)`; `Execution::Reference` (the default) stays the spec.
//!
//! What it changes, and why the gate's decisions stay the reference's bit for bit:
//! - `w_gamma = gamma / sum(gamma)` is computed once, with the reference's left-to-right sum;
//! - the statistics are libtorch's `mean` and its unbiased `std`, the latter on the CPU reproduced bit
//!   for bit by a faster replica of libtorch's own recurrence (`welford`);
//! - on the CPU one Rust pass computes `z` with the reference's five fp32 operations in its order
//!   (`sru_kernel`), gates with `z >= z_t` (`threshold`: the exact fp32 point where the sigmoid
//!   passes the threshold, calibrated on the device) and writes the cross-reconstruction; elsewhere
//!   the same steps run as libtorch operations (`z` by the reference's operations, one roll instead of
//!   the splits and the cat);
//! - on CUDA, when this build has the CUDA shim (`crate::cuda`), one fused kernel computes `z` with the
//!   reference's operations in its order (no fused multiply-add), gates and cross-reconstructs, and the
//!   CRU's fuse is libtorch's pooling and softmax and a weighted-sum kernel;
//! - the CRU pools its branches separately instead of concatenating 2C channels (`cru`).
//!
//! Every published version runs fast (`sru_kernel::Rule`): the masks multiply `x` (2023-07-27) or
//! `gn_x` (2023-09-12/14); `nn.GroupNorm` (`torch_gn`) is libtorch's `group_norm`, read by the kernel;
//! the soft gate of 2023-10-19 weighs `x` with `r = sigmoid(z)` itself, so `r` is libtorch's own sigmoid
//! of the reference's `z` (same bits, same tensor shape, hence the same code path per element) and the
//! kernel fuses the rest; the paper's fuse shares the CRU's weighted sum. On CUDA the fused SRU kernel
//! runs for the hard gate on the custom norm, libtorch operations for the rest.
//!
//! fp32, fp16 and bf16 modules run fast; the cheap gate's threshold is calibrated for the module's dtype.
mod cru;
pub(crate) use cru::{CruConvs, FuseParts};
pub(crate) mod sru_kernel;
pub mod threshold;
pub(crate) mod welford;

use crate::config::Variant;
use crate::error::ScConvError;
use crate::sru::Sru;
use sru_kernel::{GateConstants, Normalisation, Rule};
use std::borrow::Cow;
use tch::{nn::Module, Device, Kind, Tensor};

/// How an `ScConv` runs its forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Execution {
    /// The reference's operations, one for one (the default; the only mode with gradients).
    #[default]
    Reference,
    /// The fast path: the fused Rust kernel for fp32 on the CPU, the fused CUDA kernels on a GPU (when
    /// this build has them, `crate::cuda::kernels_built`), libtorch operations otherwise.
    Fast,
    /// The fast path through libtorch operations only (no kernels of our own: what runs on CUDA in a
    /// build without the CUDA shim; selectable anywhere to compare with the fused kernels).
    FastTensorOps,
}

/// The fast path's constants, taken from the SRU's parameters when it was enabled.
#[derive(Debug)]
pub struct FastPath {
    use_cpu_kernel: bool,
    /// The fused CUDA kernels (`crate::cuda`) run: a CUDA module with `Execution::Fast` in a build
    /// that has them, for the hard gate on the custom GroupBatchnorm2d (the soft gate's sigmoid and
    /// `nn.GroupNorm` run as libtorch operations there).
    use_cuda_kernels: bool,
    /// The CRU fuse's weighted-sum kernel runs (every version: it needs only the fuse's weights).
    use_cuda_fuse_kernel: bool,
    device: Device,
    /// The version's element rule (what the gate reads and its masks multiply).
    rule: Rule,
    /// `gn_x` from libtorch's `group_norm` (`torch_gn`) rather than from the statistics.
    torch_gn: bool,
    /// The hard gate's calibrated `z_t`, or the soft gate's threshold as fp32 (see `GateConstants`).
    threshold: f32,
    channels: ChannelConstants,
    /// The CPU kernel's output of the last forward pass, written over by the next.
    buffer: std::cell::RefCell<Option<Tensor>>,
}

/// `gamma`, `beta` (kept to notice a later weight change) and the reference's `w_gamma`.
#[derive(Debug)]
struct ChannelConstants {
    gamma: Tensor,
    beta: Tensor,
    w_gamma: Tensor,
}

/// Needed by `Cow`; shares the tensors (they are never modified).
impl Clone for ChannelConstants {
    fn clone(&self) -> Self {
        ChannelConstants {
            gamma: self.gamma.shallow_clone(),
            beta: self.beta.shallow_clone(),
            w_gamma: self.w_gamma.shallow_clone(),
        }
    }
}

impl ChannelConstants {
    fn of(sru: &Sru) -> Self {
        tch::no_grad(|| ChannelConstants {
            gamma: sru.gn.gamma.detach().copy(),
            beta: sru.gn.beta.detach().copy(),
            w_gamma: sru.w_gamma().detach(),
        })
    }

    fn still_match(&self, sru: &Sru) -> bool {
        self.gamma.device() == sru.gn.gamma.device()
            && self.gamma.equal(&sru.gn.gamma)
            && self.beta.equal(&sru.gn.beta)
    }
}

/// The element rule of `sru`'s version.
pub(crate) fn rule_of(sru: &Sru) -> Rule {
    match sru.variant {
        Variant::V20230727 => Rule::MasksOnX,
        Variant::V20230912 | Variant::V20230914 => Rule::MasksOnGnX,
        Variant::V20231019 => Rule::SoftOnX,
    }
}

impl FastPath {
    /// For an fp32, fp16 or bf16 module of any version (the hard gate's threshold is calibrated for
    /// that dtype's sigmoid on the module's device); other dtypes are refused and keep the reference mode.
    pub fn new(sru: &Sru, execution: Execution) -> Result<FastPath, ScConvError> {
        let kind = sru.gn.gamma.kind();
        if !matches!(kind, Kind::Float | Kind::Half | Kind::BFloat16) {
            return Err(ScConvError::InvalidInput(format!(
                "the fast path runs fp32, fp16 and bf16 modules; this one is {kind:?} (use Execution::Reference)"
            )));
        }
        let device = sru.gn.gamma.device();
        let fast = execution == Execution::Fast;
        let (rule, torch_gn) = (rule_of(sru), sru.gn.torch_gn);
        let threshold = match rule {
            // libtorch compares an fp32 tensor with a Python float in fp32 (the CPU kernel's case; the
            // libtorch-operations path passes the threshold itself, rounded to the tensor's dtype).
            Rule::SoftOnX => sru.gate_treshold as f32,
            _ => threshold::calibrate_for(sru.gate_treshold, device, kind)?,
        };
        let kernels_cover = rule != Rule::SoftOnX && !torch_gn;
        let cuda_kernels = fast && device.is_cuda() && crate::cuda::kernels_available(device, kind).is_ok();
        Ok(FastPath {
            use_cpu_kernel: fast && device == Device::Cpu && kind == Kind::Float,
            use_cuda_kernels: cuda_kernels && kernels_cover,
            use_cuda_fuse_kernel: cuda_kernels,
            device,
            rule,
            torch_gn,
            threshold,
            channels: ChannelConstants::of(sru),
            buffer: Default::default(),
        })
    }

    /// Whether the CRU's squeeze convolutions read contiguous copies of their channel slices (CPU,
    /// fp32, `Execution::Fast`; see `Cru::forward_fused`).
    pub(crate) fn copies_squeeze_inputs(&self) -> bool {
        self.use_cpu_kernel
    }

    /// Whether the fused CUDA SRU kernel runs (else, on CUDA, libtorch operations): for the hard gate
    /// on the custom GroupBatchnorm2d (2023-07-27, 2023-09-12/14 without `torch_gn`).
    pub fn uses_cuda_kernels(&self) -> bool {
        self.use_cuda_kernels
    }

    /// Whether the CRU fuse's CUDA weighted-sum kernel runs (every version, on CUDA with the kernels).
    pub fn uses_cuda_fuse_kernel(&self) -> bool {
        self.use_cuda_fuse_kernel
    }

    /// The fast SRU on `x` (already checked like the reference's input), or `None` when the module
    /// moved to another device since the path was enabled (the caller then runs the reference).
    pub fn sru(&self, sru: &Sru, x: &Tensor) -> Option<Tensor> {
        self.run_sru(sru, x, false)
    }

    /// As `sru`, but the CPU kernel writes into the buffer of the previous call (kept here): a large
    /// fresh allocation costs a page fault per 4 KiB on first touch (measured: about 6 ms for the 6.4 MB
    /// of batch 8 at 64@56 on this 2-core VM). Only for `ScConv::forward`, which drops the result
    /// (consumed by the CRU) before the next call can write into it again.
    pub(crate) fn sru_into_kept_buffer(&self, sru: &Sru, x: &Tensor) -> Option<Tensor> {
        self.run_sru(sru, x, true)
    }

    fn run_sru(&self, sru: &Sru, x: &Tensor, keep_buffer: bool) -> Option<Tensor> {
        let (channels, cpu_kernel) = self.prepare(sru, x)?;
        if self.use_cuda_kernels {
            if let Ok(out) =
                self.with_cuda_inputs(sru, &channels, x, |k| crate::cuda::sru_gate_reconstruct(x, k))
            {
                return Some(out);
            }
        }
        if !cpu_kernel {
            return Some(self.sru_tensor_ops(&channels, sru, x));
        }
        let (constants, aux) = self.kernel_inputs(sru, &channels, x);
        let reuse = if keep_buffer { self.buffer.take() } else { None };
        let out = sru_kernel::fused_gate_reconstruct(x, aux.as_ref(), &constants, self.rule, reuse);
        if keep_buffer {
            self.buffer.replace(Some(out.shallow_clone()));
        }
        Some(out)
    }

    /// The constants to use (re-derived if `gamma` or `beta` changed since) and whether the CPU kernel
    /// runs; `None` when the module or `x` is on another device than the one calibrated for.
    fn prepare<'a>(&'a self, sru: &Sru, x: &Tensor) -> Option<(Cow<'a, ChannelConstants>, bool)> {
        if x.device() != self.device || sru.gn.gamma.device() != self.device {
            return None;
        }
        // Comparing the weights reads them back to the host, which a CUDA graph capture forbids: a
        // captured graph uses the constants as they are (see `CudaGraph::capture`).
        let unchanged = crate::cuda::capturing(self.device) || self.channels.still_match(sru);
        let channels = match unchanged {
            true => Cow::Borrowed(&self.channels),
            false => Cow::Owned(ChannelConstants::of(sru)),
        };
        let cpu_float =
            self.device == Device::Cpu && x.kind() == Kind::Float && sru.gn.gamma.kind() == Kind::Float;
        Some((channels, self.use_cpu_kernel && cpu_float))
    }

    /// The fast path's informative mask on `x` (bool, `x`'s shape): the decisions `sru` makes.
    pub fn info_mask(&self, sru: &Sru, x: &Tensor) -> Option<Tensor> {
        let (channels, cpu_kernel) = self.prepare(sru, x)?;
        if self.use_cuda_kernels {
            let mask = tch::no_grad(|| {
                self.with_cuda_inputs(sru, &channels, x, |k| crate::cuda::sru_info_mask(x, k))
            });
            if let Ok(mask) = mask {
                return Some(mask);
            }
        }
        Some(tch::no_grad(|| match cpu_kernel {
            true => {
                let (constants, aux) = self.kernel_inputs(sru, &channels, x);
                sru_kernel::info_mask(x, aux.as_ref(), &constants, self.rule)
            }
            false => self.decide_tensor_ops(&channels, sru, x),
        }))
    }

    /// The reference's GroupNorm and `z = gn_x * w_gamma` by libtorch operations.
    fn gn_x_and_z(&self, channels: &ChannelConstants, sru: &Sru, x: &Tensor) -> (Tensor, Tensor) {
        let gn_x = sru.gn.forward(x);
        let z = &gn_x * &channels.w_gamma;
        (gn_x, z)
    }

    /// The informative mask by libtorch operations: the cheap gate `z >= z_t`, or the soft gate's
    /// sigmoid `> t`.
    fn decide_tensor_ops(&self, channels: &ChannelConstants, sru: &Sru, x: &Tensor) -> Tensor {
        let (_, z) = self.gn_x_and_z(channels, sru, x);
        match self.rule {
            // The threshold as the reference gives it: libtorch rounds it to the tensor's dtype.
            Rule::SoftOnX => z.sigmoid().gt(sru.gate_treshold),
            _ => z.ge(self.threshold as f64),
        }
    }

    /// The SRU by libtorch operations: the masks (`>=` and `<`, so a NaN `z` is neither) or the soft
    /// gate's weights, and one roll for the cross-reconstruction: `x_1 + roll(x_2)` is
    /// `[x_11 + x_22, x_12 + x_21]`.
    fn sru_tensor_ops(&self, channels: &ChannelConstants, sru: &Sru, x: &Tensor) -> Tensor {
        let (gn_x, z) = self.gn_x_and_z(channels, sru, x);
        let t = self.threshold as f64;
        let (x_1, x_2) = match self.rule {
            Rule::SoftOnX => {
                let r = z.sigmoid();
                let info = r.gt(sru.gate_treshold);
                (r.masked_fill(&info, 1.0) * x, r.masked_fill(&info, 0.0) * x)
            }
            Rule::MasksOnX => (z.ge(t) * x, z.lt(t) * x),
            Rule::MasksOnGnX => (z.ge(t) * &gn_x, z.lt(t) * &gn_x),
        };
        x_1 + x_2.roll([x.size()[1] / 2], [1])
    }

    /// The statistics by libtorch's own kernels, as the reference computes them (`x.view(N, G, -1)`,
    /// `mean` and unbiased `std` over the last dimension, `std + eps`): the fused kernel reads them.
    /// Reproducing libtorch's CUDA reductions bit for bit would mean porting its launch heuristics
    /// (the split of a row across threads and blocks decides the rounding); they are three of the
    /// SRU's kernels (`mean`, `std`, `+ eps`), and the fused kernel replaces the other eleven.
    fn with_cuda_inputs<T>(
        &self,
        sru: &Sru,
        channels: &ChannelConstants,
        x: &Tensor,
        f: impl FnOnce(&crate::cuda::SruInputs) -> T,
    ) -> T {
        let grouped = x.unflatten(1, [sru.gn.group_num, -1]).flatten(2, -1);
        let mean = grouped.mean_dim(2, true, None);
        let denom = grouped.std_dim(2, true, true) + sru.gn.eps;
        f(&crate::cuda::SruInputs {
            mean: &mean,
            denom: &denom,
            gamma: &channels.gamma,
            beta: &channels.beta,
            w_gamma: &channels.w_gamma,
            groups: sru.gn.group_num,
            z_t: self.threshold,
            masks_gn_x: self.rule == Rule::MasksOnGnX,
        })
    }

    /// libtorch's unbiased std of each group, computed faster (`welford`), or `None` where only
    /// libtorch itself reproduces it.
    fn std_rows(&self, grouped: &Tensor) -> Option<Vec<f32>> {
        let grouped = grouped.contiguous();
        let [rows, len] = [grouped.size()[0] * grouped.size()[1], grouped.size()[2]].map(|v| v as usize);
        // SAFETY: a contiguous fp32 CPU tensor of rows * len elements, alive for this call.
        let data = unsafe { std::slice::from_raw_parts(grouped.data_ptr() as *const f32, rows * len) };
        welford::rows_std(data, rows, len)
    }

    /// What the CPU kernel reads besides `x`: the per-channel constants with the custom norm's
    /// statistics (by libtorch's `mean` and the reference's `std`), and the per-element input
    /// libtorch computes: `gn_x` of `nn.GroupNorm` (`torch_gn`), or the soft gate's `r = sigmoid(z)`.
    fn kernel_inputs(
        &self,
        sru: &Sru,
        channels: &ChannelConstants,
        x: &Tensor,
    ) -> (GateConstants, Option<Tensor>) {
        let values = |t: &Tensor| {
            Vec::<f32>::try_from(t.flatten(0, -1)).expect("fp32 CPU tensors convert to Vec<f32>")
        };
        let mut constants = GateConstants {
            w_gamma: values(&channels.w_gamma),
            threshold: self.threshold,
            norm: (!self.torch_gn).then(|| self.normalisation(sru, channels, x, &values)),
        };
        let aux = match (self.rule, self.torch_gn) {
            (Rule::SoftOnX, false) => Some(sru_kernel::gate_input(x, &constants).sigmoid()),
            (Rule::SoftOnX, true) => Some((sru.gn.forward(x) * &channels.w_gamma).sigmoid()),
            (_, true) => Some(sru.gn.forward(x)),
            (_, false) => None,
        };
        if self.rule == Rule::SoftOnX {
            constants.norm = None; // the soft gate reads only `r`
        }
        (constants, aux)
    }

    /// The custom GroupBatchnorm2d's statistics (libtorch's `mean`, the reference's unbiased `std`
    /// plus `eps`) and affine, as plain values.
    fn normalisation(
        &self,
        sru: &Sru,
        channels: &ChannelConstants,
        x: &Tensor,
        values: &dyn Fn(&Tensor) -> Vec<f32>,
    ) -> Normalisation {
        let grouped = x.unflatten(1, [sru.gn.group_num, -1]).flatten(2, -1);
        let mean = grouped.mean_dim(2, true, None);
        let eps = sru.gn.eps as f32; // libtorch adds a Python float to an fp32 tensor in fp32
        let denom = match self.std_rows(&grouped) {
            Some(std) => std.into_iter().map(|s| s + eps).collect(),
            None => values(&(grouped.std_dim(2, true, true) + sru.gn.eps)),
        };
        Normalisation {
            mean: values(&mean),
            denom,
            gamma: values(&channels.gamma),
            beta: values(&channels.beta),
            group_num: sru.gn.group_num as usize,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{scconv, ScConvConfig};
    use tch::nn::VarStore;

    /// Inputs with the values that test rounding and propagation: exact zeros of both signs, NaN,
    /// infinities, huge and tiny magnitudes, and many values at a group's mean (z near 0).
    fn awkward_input(shape: [i64; 4]) -> Tensor {
        let x = Tensor::randn(shape, (Kind::Float, Device::Cpu));
        let flat = x.view([-1]);
        for (i, v) in
            [0.0f32, -0.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 3e38, 1e-40].iter().enumerate()
        {
            let _ = flat.narrow(0, 7 * i as i64 + 3, 1).fill_(*v as f64);
        }
        x
    }

    #[test]
    fn fast_sru_is_the_reference_sru_bit_for_bit() {
        let later =
            |variant, torch_gn, c: i64| ScConvConfig { torch_gn, ..ScConvConfig::for_variant(c, variant) };
        let configs = [
            ScConvConfig::new(64),
            ScConvConfig { group_num: 4, ..ScConvConfig::new(32) },
            ScConvConfig { group_num: 1, gate_treshold: 0.3, ..ScConvConfig::new(8) },
            later(Variant::V20230912, false, 64),
            later(Variant::V20230912, true, 64),
            later(Variant::V20230914, false, 32),
            later(Variant::V20231019, true, 64),
            later(Variant::V20231019, false, 64),
            ScConvConfig { gate_treshold: 0.3, ..later(Variant::V20231019, true, 16) },
        ];
        for (i, config) in configs.iter().enumerate() {
            let vs = VarStore::new(Device::Cpu);
            let mut model = scconv(vs.root(), config).unwrap();
            tch::no_grad(|| {
                model.SRU.gn.beta.copy_(&(Tensor::randn_like(&model.SRU.gn.beta) * 0.1));
                model.SRU.gn.gamma.copy_(&Tensor::randn_like(&model.SRU.gn.gamma));
            });
            for shape in [[2, config.op_channel, 9, 7], [1, config.op_channel, 5, 5]] {
                let x = if i == 0 || i >= 3 {
                    awkward_input(shape)
                } else {
                    Tensor::randn(shape, (Kind::Float, Device::Cpu))
                };
                let reference = tch::no_grad(|| model.SRU.forward(&x));
                let reference_info = tch::no_grad(|| model.SRU.gate(&x).decisions.info_mask);
                for execution in [Execution::Fast, Execution::FastTensorOps] {
                    let fast = FastPath::new(&model.SRU, execution).unwrap();
                    let out = tch::no_grad(|| fast.sru(&model.SRU, &x)).unwrap();
                    let same =
                        out.isnan().logical_and(&reference.isnan()).logical_or(&out.eq_tensor(&reference));
                    assert!(same.all().int64_value(&[]) == 1, "{config:?} {shape:?} {execution:?}");
                    let info = fast.info_mask(&model.SRU, &x).unwrap();
                    assert!(
                        info.equal(&reference_info),
                        "{config:?} {shape:?} {execution:?}: decisions differ"
                    );
                }
            }
        }
    }

    #[test]
    fn a_double_precision_module_is_refused() {
        let mut vs = VarStore::new(Device::Cpu);
        let mut model = scconv(vs.root(), &ScConvConfig::new(32)).unwrap();
        vs.double();
        let err = model.set_execution(Execution::Fast).unwrap_err().to_string();
        assert!(err.contains("fp32, fp16 and bf16 modules; this one is Double"), "{err}");
        assert_eq!(model.execution(), Execution::Reference);
    }

    #[test]
    fn a_weight_change_after_enabling_is_picked_up() {
        let vs = VarStore::new(Device::Cpu);
        let mut model = scconv(vs.root(), &ScConvConfig::new(32)).unwrap();
        let fast = FastPath::new(&model.SRU, Execution::Fast).unwrap();
        tch::no_grad(|| {
            model.SRU.gn.gamma.copy_(&Tensor::randn_like(&model.SRU.gn.gamma));
        });
        let x = Tensor::randn([2, 32, 6, 6], (Kind::Float, Device::Cpu));
        let reference = tch::no_grad(|| model.SRU.forward(&x));
        assert!(tch::no_grad(|| fast.sru(&model.SRU, &x)).unwrap().equal(&reference));
    }
}
