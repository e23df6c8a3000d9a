//! Parity of the fast path: on each fixture case the fast forward pass is compared with the PyTorch
//! reference's output and decisions (the fixture), and with the Rust reference mode on the same
//! device, whose decisions it must reproduce exactly. Forward only: the fast path is for inference.
use crate::error::ScConvError;
use crate::fast::Execution;
use crate::harness::parity::{
    case_tensors, compare, compare_gate, fixture, CaseSpec, Comparison, GateReport, Manifest,
};
use crate::harness::parity::{verdict, Policy, Tolerance};
use crate::{scconv, weights};
use serde::Serialize;
use std::path::Path;
use tch::{nn::VarStore, Device, Kind};

#[derive(Debug, Clone, Serialize)]
pub struct FastCaseReport {
    pub name: String,
    pub execution: String,
    /// Fast decisions against the PyTorch reference's (the fixture), band and flips as for the reference.
    pub gate: GateReport,
    /// Positions where the fast decisions differ from the Rust reference mode's on the same device.
    pub differing_from_same_device: i64,
    /// The fast output against the fixture's.
    pub output: Comparison,
    /// The fast output against the Rust reference mode's on the same device.
    pub output_vs_same_device: Comparison,
}

impl FastCaseReport {
    pub fn passed(&self, policy: &Policy) -> bool {
        let gate_ok = self.gate.flips_outside_band == 0 && (!policy.same_kernels || self.gate.flips() == 0);
        let output_ok = self.gate.flips() > 0 || self.output.passed();
        self.differing_from_same_device == 0 && gate_ok && output_ok && self.output_vs_same_device.passed()
    }
}

/// One case through the fast path `execution` on `device`.
pub fn run_case(
    dir: &Path,
    case: &CaseSpec,
    device: Device,
    execution: Execution,
    tol: Tolerance,
) -> Result<FastCaseReport, ScConvError> {
    let expected = case_tensors(dir, case)?;
    let x = fixture(&expected, "input", &case.name)?.to_device(device);
    let mut vs = VarStore::new(device);
    let mut model = scconv(vs.root(), &case.config)?;
    weights::load(&mut vs, dir.join(&case.state_dict))?;
    let (same_device_out, same_device_info) = tch::no_grad(|| -> Result<_, ScConvError> {
        Ok((model.try_forward(&x)?, model.try_gate(&x)?.decisions.info_mask))
    })?;
    model.set_execution(execution)?;
    let (out, info) = tch::no_grad(|| -> Result<_, ScConvError> {
        let info = model.try_fast_info_mask(&x)?.ok_or_else(|| {
            ScConvError::InvalidInput(format!("{execution:?} gave no fast gate for case {}", case.name))
        })?;
        Ok((model.try_forward(&x)?, info))
    })?;
    let reference_info = fixture(&expected, "gate.info_mask", &case.name)?;
    let gate = compare_gate(fixture(&expected, "gate.z", &case.name)?, reference_info, &info);
    let differing = info.logical_xor(&same_device_info).sum(Kind::Int64).int64_value(&[]);
    Ok(FastCaseReport {
        name: case.name.clone(),
        execution: format!("{execution:?}"),
        gate,
        differing_from_same_device: differing,
        output: compare(&out, fixture(&expected, "output", &case.name)?, tol)?,
        output_vs_same_device: compare(&out, &same_device_out, tol)?,
    })
}

/// Every case of `dir` (every version and fuse) through `execution`.
pub fn run_all(
    dir: &Path,
    device: Device,
    execution: Execution,
    policy: &Policy,
) -> Result<Vec<FastCaseReport>, ScConvError> {
    let manifest: Manifest = Manifest::read(dir)?;
    manifest
        .cases
        .iter()
        .map(|case| run_case(dir, case, device, execution, policy.fast().tolerance))
        .collect()
}

/// The table `scconv-tch parity --execution ...` prints.
pub fn table(reports: &[FastCaseReport], policy: &Policy) -> String {
    let mut out = format!(
        "{:<22} {:>12} {:>12} {:>12} {:>8} {:>6} {:>9}  verdict\n",
        "case", "max|Δout|", "max|Δ|/max", "vs Rust ref", "in band", "flips", "≠ same dev"
    );
    for r in reports {
        out += &format!(
            "{:<22} {:>12.3e} {:>12.3e} {:>12.3e} {:>8} {:>6} {:>9}  {}\n",
            r.name,
            r.output.max_abs_err,
            r.output.relative(),
            r.output_vs_same_device.relative(),
            r.gate.in_band,
            r.gate.flips(),
            r.differing_from_same_device,
            verdict(r.passed(policy))
        );
    }
    out
}
