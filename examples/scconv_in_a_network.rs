//! An ScConv inside a network of other tch layers, loaded from a checkpoint saved the way a training
//! script saves it (`examples/scconv_in_a_network.py`: DataParallel, `{"model": ..., "optimizer": ...}`,
//! an `OrderedDict` state dict). Two uses of `weights::load_with`'s `select`:
//! 1. the whole network, keys under `model.module.`;
//! 2. only the ScConv, keys under `model.module.features.3.`, into a standalone block.
//!
//! Both outputs are compared with PyTorch's.
//!
//! ```sh
//! .venv/bin/python examples/scconv_in_a_network.py --out target/example
//! cargo run --example scconv_in_a_network -- target/example
//! ```
use scconv_tch::weights::{self, LoadOptions};
use scconv_tch::{scconv, ScConv, ScConvConfig, Variant};
use std::collections::HashMap;
use tch::nn::{self, Module, VarStore};
use tch::{Device, Tensor};

/// The twin of the Python `Net`: the same layers under the same paths (`features.0`, `features.1`,
/// `features.3`, `head`), so the state dict's keys fit after `select`.
struct Net {
    conv: nn::Conv2D,
    bn: nn::BatchNorm,
    scconv: ScConv,
    head: nn::Linear,
}

fn net(p: &nn::Path, config: &ScConvConfig) -> Result<Net, scconv_tch::ScConvError> {
    let features = p / "features";
    let conv_config = nn::ConvConfig { padding: 1, bias: false, ..Default::default() };
    Ok(Net {
        conv: nn::conv2d(&features / 0, 3, 32, 3, conv_config),
        bn: nn::batch_norm2d(&features / 1, 32, Default::default()),
        scconv: scconv(&features / 3, config)?,
        head: nn::linear(p / "head", 32, 10, Default::default()),
    })
}

impl Net {
    fn forward(&self, x: &Tensor) -> Tensor {
        let x = x.apply(&self.conv).apply_t(&self.bn, false).relu();
        let x = self.scconv.forward(&x).relu().adaptive_avg_pool2d([1, 1]).flatten(1, -1);
        x.apply(&self.head)
    }
}

fn worst(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).ok_or("usage: scconv_in_a_network DIR (written by the .py twin)")?;
    let checkpoint = format!("{dir}/checkpoint.pt");
    let expected: HashMap<String, Tensor> =
        Tensor::read_safetensors(format!("{dir}/expected.safetensors"))?.into_iter().collect();
    let config = ScConvConfig::for_variant(32, Variant::V20231019); // upstream's current ScConv(32)

    // 1. The whole network.
    let mut vs = VarStore::new(Device::Cpu);
    let network = net(&vs.root(), &config)?;
    let options = LoadOptions { select: Some("model.module.".into()), strict: true };
    let report = weights::load_with(&mut vs, &checkpoint, &options)?;
    let logits = tch::no_grad(|| network.forward(&expected["input"]));
    let network_error = worst(&logits, &expected["logits"]);
    println!(
        "network: {} tensors loaded, max |Rust - PyTorch| logits = {network_error:e}",
        report.loaded.len()
    );

    // 2. Only the ScConv, from the same file.
    let mut vs = VarStore::new(Device::Cpu);
    let block = scconv(vs.root(), &config)?;
    let options = LoadOptions { select: Some("model.module.features.3.".into()), strict: true };
    let report = weights::load_with(&mut vs, &checkpoint, &options)?;
    let y = tch::no_grad(|| block.try_forward(&expected["scconv_input"]))?;
    let block_error = worst(&y, &expected["scconv_output"]);
    println!("ScConv alone: {} tensors loaded, max |Rust - PyTorch| = {block_error:e}", report.loaded.len());

    // Python wrote them on this machine, with the same libtorch kernels: equal to the bit.
    if network_error > 0.0 || block_error > 0.0 {
        return Err("the outputs differ from PyTorch's".into());
    }
    Ok(())
}
