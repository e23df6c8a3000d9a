//! The trained Fashion-MNIST networks' fixtures and the checks the inference forms' tests share.
use super::crate_dir;
use scconv_tch::models::{resnet, ResNet, ResNetConfig};
use scconv_tch::GateDecisions;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// The reference's decisions on `x` (fp32), by path.
pub fn reference_decisions(model: &ResNet, x: &Tensor) -> Vec<(String, GateDecisions)> {
    let (_, gates) = tch::no_grad(|| model.forward_recording_gates(x)).unwrap();
    gates.into_iter().map(|(path, gate)| (path, gate.decisions)).collect()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

/// The fixture batch `weights/parity-models` holds for a trained network: PyTorch's input, logits and
/// each ScConv's decisions (`gate.<path>.info_mask`), in forward order.
pub struct PytorchBatch {
    pub input: Tensor,
    pub logits: Tensor,
    pub decisions: Vec<(String, GateDecisions)>,
    /// The same batch under PyTorch's CPU bf16 autocast with `decisions` injected.
    pub logits_bf16_autocast: Tensor,
}

pub fn pytorch_batch(name: &str, model: &ResNet) -> PytorchBatch {
    let path = crate_dir().join(format!("weights/parity-models/{name}.tensors.safetensors"));
    pytorch_batch_from(&path, name, model)
}

/// As [`pytorch_batch`], from the fixture file at `path` (of a network `name`d so in messages).
pub fn pytorch_batch_from(path: &std::path::Path, name: &str, model: &ResNet) -> PytorchBatch {
    let tensors: std::collections::BTreeMap<String, Tensor> =
        scconv_tch::weights::read(path).unwrap().into_iter().collect();
    let input = tensors["input"].shallow_clone();
    // The model's own ScConv paths, in forward order, each with PyTorch's recorded decisions.
    let (_, gates) = tch::no_grad(|| model.forward_recording_gates(&input)).unwrap();
    let recorded = tensors.keys().filter(|k| k.ends_with(".info_mask")).count();
    assert_eq!(
        recorded,
        gates.len(),
        "{name}: PyTorch recorded {recorded} gates, the network has {}",
        gates.len()
    );
    let decisions = gates
        .iter()
        .map(|(path, _)| {
            let mask = &tensors[&format!("gate.{path}.info_mask")];
            (path.clone(), GateDecisions::from_info_mask(mask))
        })
        .collect();
    PytorchBatch {
        input,
        logits: tensors["logits"].shallow_clone(),
        decisions,
        logits_bf16_autocast: tensors["logits_bf16_autocast"].shallow_clone(),
    }
}

/// Decisions the form made that differ from `expected`, summed over layers, and the positions decided;
/// the two lists must name the same layers in the same order.
pub fn differing_decisions(made: &[(String, Tensor)], expected: &[(String, GateDecisions)]) -> (i64, i64) {
    assert_eq!(
        made.len(),
        expected.len(),
        "the form recorded {} gates, expected {}",
        made.len(),
        expected.len()
    );
    let (mut differing, mut positions) = (0, 0);
    for ((path, mask), (expected_path, decisions)) in made.iter().zip(expected) {
        assert_eq!(path, expected_path);
        differing += mask.ne_tensor(&decisions.info_mask).sum(Kind::Int64).int64_value(&[]);
        positions += mask.numel() as i64;
    }
    (differing, positions)
}

/// An fp64 copy of the network whose weights `vs` holds.
pub fn f64_twin(vs: &VarStore, config: &ResNetConfig) -> (VarStore, ResNet) {
    let mut twin_vs = VarStore::new(Device::Cpu);
    let twin = resnet(twin_vs.root(), config).unwrap();
    twin_vs.copy(vs).unwrap();
    twin_vs.double();
    (twin_vs, twin)
}
