use scconv_tch::{scconv, weights, ScConvConfig};
use std::collections::HashMap;
use tch::{nn::VarStore, Device, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fixture = "../scconv-tch/weights/parity/c64_56x56_b1";
    let mut vs = VarStore::new(Device::Cpu);
    let block = scconv(vs.root(), &ScConvConfig::new(64))?; // PyTorch: ScConv(64)
    weights::load(&mut vs, format!("{fixture}.safetensors"))?; // its state_dict
    let recorded: HashMap<String, Tensor> =
        Tensor::read_safetensors(format!("{fixture}.tensors.safetensors"))?.into_iter().collect();
    let (x, expected) = (&recorded["input"], &recorded["output"]); // PyTorch's input and output
    let y = tch::no_grad(|| block.try_forward(x))?;
    let worst = (&y - expected).abs().max().double_value(&[]);
    println!("{:?} -> {:?}, max |Rust - PyTorch| = {worst:e}", x.size(), y.size());
    let largest = expected.abs().max().double_value(&[]);
    assert!(y.allclose(expected, 1e-5, 1e-6 * largest, false), "differs from PyTorch");
    println!("CUDA available: {}", tch::Cuda::is_available());
    Ok(())
}
