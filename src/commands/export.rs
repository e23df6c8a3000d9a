//! `scconv-tch export`: TorchScript.
use anyhow::{Context, Result};
use scconv_tch::harness::infer::Classifier;
use scconv_tch::weights::LoadOptions;
use scconv_tch::{export, scconv, ScConvConfig};
use std::path::Path;
use std::process::ExitCode;
use tch::nn::{Module, ModuleT, VarStore};
use tch::Device;
use tch::{Kind, Tensor};

pub fn run_export(
    model: Option<&Path>,
    block: Option<&Path>,
    weights: Option<(&Path, &LoadOptions)>,
    out: &Path,
    force: bool,
) -> Result<ExitCode> {
    let (module, example) = if let Some(record) = model {
        let mut classifier =
            Classifier::load(record, Device::Cpu).with_context(|| format!("loading {}", record.display()))?;
        let config = classifier.model.config();
        let side = if config.small_input { 28 } else { 224 };
        let example = Tensor::zeros([1, config.in_channels, side, side], (Kind::Float, Device::Cpu));
        let network = &classifier.model;
        (export::trace(&mut classifier.vs, &example, |x| network.forward_t(x, false))?, example)
    } else {
        let path = block.context("give --model or --scconv")?;
        let config: ScConvConfig = scconv_tch::harness::json::read(path)?;
        let mut vs = VarStore::new(Device::Cpu);
        let block = scconv(vs.root(), &config)?;
        if let Some((weights, options)) = weights {
            let report = scconv_tch::weights::load_with(&mut vs, weights, options)?;
            if !report.unexpected.is_empty() {
                let skipped = report.unexpected.len();
                eprintln!(
                    "skipped {skipped} weights the block does not use: {}",
                    report.unexpected.join(", ")
                );
            }
        }
        let example = Tensor::zeros([1, config.op_channel, 16, 16], (Kind::Float, Device::Cpu));
        (export::trace(&mut vs, &example, |x| block.forward(x))?, example)
    };
    export::save(&module, out, force)?;
    println!(
        "wrote {} (traced at {:?}; runs at any batch and size the module accepts)",
        out.display(),
        example.size()
    );
    Ok(ExitCode::SUCCESS)
}
