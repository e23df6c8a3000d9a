//! The inference form of a whole network: a [`ResNet`](crate::models::ResNet), built and loaded
//! exactly as PyTorch's, compiled for inference by named passes ([`Pass`]) the way ONNX Runtime's
//! graph optimizer reads, each a small step tested on its own:
//! - [`Pass::FoldBatchnorm`]: every BatchNorm folded into the convolution before it
//!   ([`fold_batchnorm`]), or, after an ScConv, into its CRU's fuse weights (scale) and a shift;
//! - [`Pass::FuseEpilogues`]: ReLU and residual add in the convolution's epilogue (libtorch's oneDNN
//!   `_convolution_pointwise` post-ops, through this crate's C++ shim), in place after an ScConv;
//! - [`Pass::Bf16`] (forms of [`Precision::Bf16`] only): every convolution's weight stored in bf16
//!   once, after folding, and so its input and output, its bias fp32 but for the call with the
//!   residual add ([`precision`](Precision): what runs in bf16, what in fp32, and how CPUs without
//!   bf16 units emulate it);
//! - [`Pass::TileBatch`]: a large batch run in tiles of a few images, each tile's activations small
//!   enough to stay in the cores' caches (the same numbers an image);
//! - [`Pass::PoolFirst`]: after a stride-2 ScConv, the 2x2 pool moved before the CRU's convolutions
//!   (GWC and the pool as one stride-2 convolution, the rest at a quarter of the positions);
//! - [`Pass::Prepack`]: every convolution's weight reordered once into oneDNN's blocked layout (for
//!   the tiles' sizes);
//! - [`Pass::OwnPrimitives`]: the fused convolutions (fp32, native bf16) as oneDNN primitives of this
//!   crate's own, created once for those sizes (a call's fixed cost ~1-2 us, not libtorch's ~18-30);
//! - [`Pass::ChannelsLast`]: activations in NHWC strides between the plain convolutions.
//! - [`Pass::FuseSqueezes`] (fp32 forms): the CRU's squeeze convolutions computed by the channels-last
//!   SRU on the rows it reconstructs, where they read at most 32 channels.
//! - [`Pass::FuseGwcPwc1`] (fp32 forms, AVX-512 CPUs): the CRU's `GWC + PWC1` as one kernel of ours,
//!   where a group of GWC reads at most 8 channels.
//!
//! The exact model is not changed: the form borrows its tensors, and its ScConvs run their fast path
//! (the reference's gate decisions on the same input). Build the form after loading the weights: the
//! folded and prepacked weights are copies, so a later change to the model's weights (another
//! `weights::load` into its `VarStore`) is not seen until the form is built again. Folding changes rounding (a folded weight is
//! `W * scale` rounded once, and the convolution sums other products), so the form's numbers are held
//! to PyTorch's own fp32 accuracy rather than to its bits: against an fp64 run of the model with the
//! same gate decisions, the form's logits may be off by at most twice what the fp32 reference itself
//! is off, plus one rounding of the largest logit. A gate decision can still flip where the folded
//! arithmetic moves `z` across the threshold; [`InferenceResNet::forward_recording_decisions`]
//! and `crate::models::ResNet::forward_recording_gates` let a caller count them by layer
//! (`scconv-tch infer --execution inference --decisions` does). See docs/speed.md for what each
//! pass measured.
//!
//! The bf16 form ([`InferenceResNet::compiled_with`] and [`Precision::Bf16`]) is held to PyTorch's own
//! bf16 accuracy instead: with the same decisions injected, its logits off the fp64 run by at most twice
//! what PyTorch's CPU bf16 autocast is off, plus one bf16 rounding of the largest logit; it flips about
//! 0.2% of the gate decisions (each counted by the same means).
//!
//! ```no_run
//! use scconv_tch::inference::InferenceResNet;
//! use scconv_tch::models::{resnet, ResNetConfig};
//! use tch::{nn::VarStore, Device, Kind, Tensor};
//!
//! # fn main() -> Result<(), scconv_tch::ScConvError> {
//! let vs = VarStore::new(Device::Cpu);
//! let model = resnet(vs.root(), &ResNetConfig::named("resnet50", true)?)?;
//! let form = InferenceResNet::compiled(&model, [8, 3, 224, 224])?; // every pass
//! let logits = form.try_forward(&Tensor::randn([8, 3, 224, 224], (Kind::Float, Device::Cpu)))?;
//! # Ok(()) }
//! ```
mod batch_tile;
mod branch_means;
mod channel_means;
mod channels_last_sru;
mod conv;
mod elements;
mod f64_conv;
mod ffi;
mod fold;
mod fused_squeeze;
mod grouped_plus_pointwise;
mod head;
mod network;
mod onednn;
mod pool_first;
mod pooled_weighted_sum;
mod precision;
mod scconv_step;
mod weighted_sum;

#[cfg(feature = "cli")] // for `harness::bench`
pub(crate) use channels_last_sru::to_channels_last;
pub use conv::InferenceConv;
pub use ffi::{parallel_for, shim_built, ConvGeometry};
pub use fold::{fold_batchnorm, BatchNormParams};
pub use network::{InferenceResNet, Pass};
pub use onednn::own_onednn_version;
pub use precision::{
    bf16_support, cpu_bf16_flags, onednn_bf16_support, round_to_bf16, Arithmetic, Precision,
};
pub use scconv_step::ScConvStep;
