//! Not part of the API: the parity rig and the command-line plumbing, shared by the `scconv-tch`
//! binary and the tests. Nothing here is stable; it is public only so that those two can reach it.
//!
//! - `parity`, `model_parity`, `fast_parity`: the block, network and fast-path checks against
//!   fixtures written by the PyTorch reference (`parity/`), and their reports;
//! - `json`: reading configs, records and manifests with one error shape;
//! - with the `cli` feature: `data` (IDX and PNG images), `infer` (trained-network records and
//!   classification) and `bench` (timings).
#![allow(missing_docs)]

#[cfg(feature = "cli")]
pub mod bench;
#[cfg(feature = "cli")]
pub mod data;
pub mod fast_parity;
pub mod half_parity;
#[cfg(feature = "cli")]
pub mod infer;
pub mod json;
pub mod model_parity;
pub mod parity;

pub use crate::input::panic_message;
