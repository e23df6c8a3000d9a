//! TorchScript export: the traced file, loaded back in Rust (`CModule::load`) and in Python
//! (`torch.jit.load`), reproduces the Rust module at a batch and size other than the traced ones.
mod common;

use common::{crate_dir, python, scratch_dir};
use scconv_tch::harness::infer::Classifier;
use scconv_tch::harness::parity::{committed_fixtures, compare, Tolerance};
use scconv_tch::{export, scconv, weights, ScConvConfig};
use std::path::Path;
use std::process::Command;
use tch::{nn::Module, nn::ModuleT, nn::VarStore, CModule, Device, Kind, Tensor};

fn run_in_python(module: &Path, x: &Tensor) -> Tensor {
    let dir = module.parent().unwrap();
    let (input, output) = (dir.join("input.safetensors"), dir.join("output.safetensors"));
    Tensor::write_safetensors(&[("input", x)], &input).unwrap();
    let status = Command::new(python())
        .arg(crate_dir().join("parity/run_torchscript.py"))
        .args([module, input.as_path(), output.as_path()])
        .status()
        .expect("cannot start Python");
    assert!(status.success(), "parity/run_torchscript.py failed ({status})");
    weights::read(output).unwrap().into_iter().find(|(k, _)| k == "output").unwrap().1
}

fn assert_close(label: &str, actual: &Tensor, expected: &Tensor) {
    let c = compare(actual, expected, Tolerance::FP32).unwrap();
    println!("{label}: max abs error {:.3e} (of max {:.3e})", c.max_abs_err, c.max_abs_ref);
    assert!(c.passed(), "{label}: {c:?}");
}

#[test]
fn an_exported_block_runs_another_batch_and_size_in_rust_and_python() {
    let config = ScConvConfig { group_num: 4, ..ScConvConfig::new(32) };
    let mut vs = VarStore::new(Device::Cpu);
    let block = scconv(vs.root(), &config).unwrap();
    weights::load(&mut vs, committed_fixtures().join("group_num_4.safetensors")).unwrap();
    let example = Tensor::randn([1, 32, 12, 12], (Kind::Float, Device::Cpu));
    let module = export::trace(&mut vs, &example, |x| block.forward(x)).unwrap();
    let path = scratch_dir("export-block").join("scconv.pt");
    export::save(&module, &path, false).unwrap();

    let x = Tensor::randn([3, 32, 10, 14], (Kind::Float, Device::Cpu));
    let expected = tch::no_grad(|| block.forward(&x));
    let loaded = CModule::load(&path).unwrap();
    assert_close("block, Rust CModule", &tch::no_grad(|| loaded.forward_ts(&[&x])).unwrap(), &expected);
    assert_close("block, Python torch.jit.load", &run_in_python(&path, &x), &expected);
}

#[test]
fn an_exported_trained_network_runs_another_batch_and_size_in_rust_and_python() {
    let mut classifier = Classifier::load(&crate_dir().join("weights/fmnist_sc.json"), Device::Cpu).unwrap();
    let example = Tensor::randn([1, 1, 28, 28], (Kind::Float, Device::Cpu));
    let model = &classifier.model;
    let module = export::trace(&mut classifier.vs, &example, |x| model.forward_t(x, false)).unwrap();
    let path = scratch_dir("export-model").join("fmnist_sc.pt");
    export::save(&module, &path, false).unwrap();

    let x = Tensor::randn([5, 1, 36, 32], (Kind::Float, Device::Cpu));
    let expected = tch::no_grad(|| model.try_forward(&x)).unwrap();
    let loaded = CModule::load(&path).unwrap();
    assert_close("network, Rust CModule", &tch::no_grad(|| loaded.forward_ts(&[&x])).unwrap(), &expected);
    assert_close("network, Python torch.jit.load", &run_in_python(&path, &x), &expected);
}

#[test]
fn export_refuses_to_overwrite_unless_asked() {
    let mut vs = VarStore::new(Device::Cpu);
    let block = scconv(vs.root(), &ScConvConfig::new(16)).unwrap();
    let module = export::trace(&mut vs, &Tensor::randn([1, 16, 4, 4], (Kind::Float, Device::Cpu)), |x| {
        block.forward(x)
    })
    .unwrap();
    let path = scratch_dir("export-overwrite").join("block.pt");
    std::fs::write(&path, b"precious").unwrap();
    let err = export::save(&module, &path, false).unwrap_err().to_string();
    assert!(err.contains("the file exists"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    export::save(&module, &path, true).unwrap();
    assert!(CModule::load(&path).is_ok());
}

/// A network of a later version through the CLI: `info --model` counts its ScConvs and `export --model`
/// writes TorchScript that gives PyTorch's logits (the 2023-10-19 network of
/// weights/parity-models/versions, as a record a user would write).
#[test]
fn the_cli_exports_and_describes_a_2023_10_19_network() {
    let fixtures = crate_dir().join("weights/parity-models/versions");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("manifest.json")).unwrap()).unwrap();
    let case =
        manifest["cases"].as_array().unwrap().iter().find(|c| c["name"] == "sc_small_v2023_10_19").unwrap();
    let dir = scratch_dir("export-v2023-10-19");
    let record = serde_json::json!({
        "name": "sc_small_v2023_10_19", "config": case["config"], "test_accuracy": 0.0, "parameters": 0,
        "weights": fixtures.join(case["state_dict"].as_str().unwrap()), "torch_version": "2.11.0",
        "test_predictions": [],
    });
    let record_file = dir.join("record.json");
    std::fs::write(&record_file, record.to_string()).unwrap();
    let info =
        Command::new(common::bin()).args(["info", "--json", "--model"]).arg(&record_file).output().unwrap();
    assert!(info.status.success(), "{}", String::from_utf8_lossy(&info.stderr));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    // The ScConv rows: fewer parameters than the plain 3x3 conv they replace.
    let counted: std::collections::BTreeSet<String> = info["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["parameters"].as_i64() < r["plain_parameters"].as_i64())
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    let tensors = weights::read(fixtures.join(case["tensors"].as_str().unwrap())).unwrap();
    // PyTorch's ScConvs: one recorded gate each (`gate.<path>.info_mask`).
    let recorded: std::collections::BTreeSet<String> = tensors
        .iter()
        .filter_map(|(k, _)| k.strip_prefix("gate.")?.strip_suffix(".info_mask").map(str::to_string))
        .collect();
    assert!(recorded.len() >= 2, "the fixture records its ScConvs: {recorded:?}");
    assert_eq!(counted, recorded, "info's ScConv rows are PyTorch's ScConvs");
    let out = dir.join("network.pt");
    let export = Command::new(common::bin())
        .args(["export", "--model"])
        .arg(&record_file)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(export.status.success(), "{}", String::from_utf8_lossy(&export.stderr));
    let get = |name: &str| tensors.iter().find(|(k, _)| k == name).unwrap().1.shallow_clone();
    let logits = tch::no_grad(|| CModule::load(&out).unwrap().forward(&get("input")));
    assert_close("exported 2023-10-19 network vs PyTorch", &logits, &get("logits"));
}
