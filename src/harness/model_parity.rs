//! Parity for whole networks (fixtures of `parity/generate_model_fixtures.py`): eval-mode logits within
//! the tolerance and, for every ScConv, the gate decisions against PyTorch's. On the same kernels no
//! decision may flip; across devices flips are reported per layer, the first flipping layer may flip only
//! inside the fp32 band, and the predicted classes must agree.
use crate::error::ScConvError;
use crate::harness::parity::{
    compare, compare_gate, fixture, read_tensors, verdict, Comparison, GateReport, Manifest, Policy,
    Tolerance,
};
use crate::models::{resnet, ResNetConfig};
use crate::weights;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{nn::VarStore, Device, Kind};

#[derive(Debug, Clone, Deserialize)]
pub struct ModelCaseSpec {
    pub name: String,
    pub config: ResNetConfig,
    /// The PyTorch `state_dict()` file, relative to the manifest.
    pub state_dict: String,
    /// `input`, `logits`, `gate.<layer>.z` and `gate.<layer>.info_mask`, relative to the manifest.
    pub tensors: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerGate {
    pub layer: String,
    pub gate: GateReport,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelCaseReport {
    pub name: String,
    pub logits: Comparison,
    /// Images whose predicted class differs from PyTorch's.
    pub class_disagreements: i64,
    pub layers: Vec<LayerGate>,
}

impl ModelCaseReport {
    pub fn flips(&self) -> i64 {
        self.layers.iter().map(|l| l.gate.flips()).sum()
    }

    pub fn in_band(&self) -> i64 {
        self.layers.iter().map(|l| l.gate.in_band).sum()
    }

    pub fn passed(&self, policy: &Policy) -> bool {
        if policy.same_kernels {
            return self.flips() == 0 && self.logits.passed() && self.class_disagreements == 0;
        }
        // With TF32 the convolutions before the first ScConv already change its input by ~1e-3, far more
        // than the band: its decisions may then differ anywhere (seen on an H200), and only the classes
        // and, without flips, the logits can be held to the reference.
        let gates_ok = policy.tolerance == Tolerance::TF32 || self.first_flips_in_band();
        gates_ok && self.class_disagreements == 0 && (self.flips() > 0 || self.logits.passed())
    }

    /// Across devices, the first layer (in forward order) whose decisions differ may differ only inside
    /// the fp32 band. Its flips move values between channel halves, so every later layer sees other
    /// inputs and may then decide differently anywhere (seen on an H200: 4 in-band flips in
    /// `layer1.0.conv2`, then flips outside the band further down, same classes).
    pub fn first_flips_in_band(&self) -> bool {
        self.layers.iter().find(|l| l.gate.flips() > 0).is_none_or(|l| l.gate.flips_outside_band == 0)
    }
}

/// Runs one network case on `device`: builds it from the config, loads the PyTorch state dict, and
/// compares logits, predicted classes and every ScConv's gate decisions.
pub fn run_case(
    dir: &Path,
    case: &ModelCaseSpec,
    device: Device,
    policy: &Policy,
) -> Result<ModelCaseReport, ScConvError> {
    let expected = read_tensors(&dir.join(&case.tensors))?;
    let mut vs = VarStore::new(device);
    let model = resnet(vs.root(), &case.config)?;
    weights::load(&mut vs, dir.join(&case.state_dict))?;
    let input = fixture(&expected, "input", &case.name)?.to_device(device);
    let (logits, gates) = tch::no_grad(|| model.forward_recording_gates(&input))?;
    let reference_logits = fixture(&expected, "logits", &case.name)?;
    let classes = |t: &tch::Tensor| t.to_device(Device::Cpu).argmax(1, false);
    let class_disagreements =
        classes(&logits).ne_tensor(&classes(reference_logits)).sum(Kind::Int64).int64_value(&[]);
    let mut layers = Vec::new();
    for (layer, gate) in &gates {
        let z = fixture(&expected, &format!("gate.{layer}.z"), &case.name)?;
        let info = fixture(&expected, &format!("gate.{layer}.info_mask"), &case.name)?;
        layers
            .push(LayerGate { layer: layer.clone(), gate: compare_gate(z, info, &gate.decisions.info_mask) });
    }
    let gate_keys = expected.keys().filter(|k| k.ends_with(".info_mask")).count();
    if gate_keys != gates.len() {
        return Err(ScConvError::InvalidModel(format!(
            "{}: the reference has {gate_keys} ScConv gates, the Rust network {}",
            case.name,
            gates.len()
        )));
    }
    let logits = compare(&logits, reference_logits, policy.tolerance)?;
    Ok(ModelCaseReport { name: case.name.clone(), logits, class_disagreements, layers })
}

pub fn run_all(dir: &Path, device: Device, policy: &Policy) -> Result<Vec<ModelCaseReport>, ScConvError> {
    let manifest: Manifest<ModelCaseSpec> = Manifest::read(dir)?;
    manifest.cases.iter().map(|case| run_case(dir, case, device, policy)).collect()
}

/// One line per network, then its layers with positions in the band or flips.
pub fn table(reports: &[ModelCaseReport], policy: &Policy) -> String {
    let mut out = format!(
        "{:<22} {:>12} {:>12} {:>9} {:>8} {:>6} {:>8}  verdict\n",
        "network", "max|Δlogit|", "max|Δ|/max", "tol used", "in band", "flips", "classes"
    );
    for r in reports {
        out += &format!(
            "{:<22} {:>12.3e} {:>12.3e} {:>9.3} {:>8} {:>6} {:>8}  {}\n",
            r.name,
            r.logits.max_abs_err,
            r.logits.relative(),
            r.logits.tolerance_used,
            r.in_band(),
            r.flips(),
            if r.class_disagreements == 0 {
                "same".to_string()
            } else {
                format!("{} differ", r.class_disagreements)
            },
            verdict(r.passed(policy))
        );
        for l in r.layers.iter().filter(|l| l.gate.flips() > 0) {
            out += &format!("    {:<24} {} in band, {} flipped\n", l.layer, l.gate.in_band, l.gate.flips());
        }
    }
    out
}
