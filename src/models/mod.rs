//! Whole networks: torchvision-layout ResNets, plain or with ScConv (SC-ResNet), whose PyTorch twins
//! are in `parity/models.py`.
pub(crate) mod blocks;
pub mod config;
pub mod resnet;

pub use config::{BlockKind, ResNetConfig};
pub use resnet::{resnet, ResNet};
