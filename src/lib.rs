//! SCConv (Spatial and Channel Reconstruction Convolution, CVPR 2023) on `tch`, mirroring the PyTorch
//! reference line for line so that its `state_dict` loads unchanged.
//!
//! For inference: `Execution::Fast` (the same gate decisions; on CUDA fused kernels of our own, bit for
//! bit the reference), fp16 / bf16 modules (convert the `VarStore`), and CUDA graphs
//! ([`cuda::CudaGraph`], `ScConv::cuda_graph`, `models::ResNet::cuda_graph`).
//!
//! ```no_run
//! use scconv_tch::{scconv, weights, Execution, ScConvConfig};
//! use tch::{nn::VarStore, Device, Kind, Tensor};
//!
//! # fn main() -> Result<(), scconv_tch::ScConvError> {
//! let mut vs = VarStore::new(Device::Cpu);
//! let mut block = scconv(vs.root(), &ScConvConfig::new(64))?;
//! weights::load(&mut vs, "scconv.safetensors")?; // a PyTorch state_dict, keys as saved
//! block.set_execution(Execution::Fast)?; // optional: the fast path, same gate decisions
//! let x = Tensor::randn([1, 64, 56, 56], (Kind::Float, Device::Cpu));
//! let y = tch::no_grad(|| block.try_forward(&x))?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod config;
pub mod cru;
pub mod cuda;
pub mod error;
pub mod export;
pub mod fast;
pub mod group_batchnorm;
pub mod inference;
pub mod info;
pub mod models;
pub mod output;
#[doc(hidden)]
pub mod profile;
pub mod scconv;
pub mod sru;
pub mod weights;

#[doc(hidden)]
pub mod harness;
mod input;

pub use config::{Fuse, ScConvConfig, ScConvSettings, Variant};
pub use error::{ConfigError, ScConvError};
pub use fast::Execution;
pub use scconv::{scconv, ScConv};
pub use sru::{Gate, GateDecisions};
