//! Half-precision parity: a block whose VarStore is converted to fp16 or bf16 (as PyTorch's `.half()` /
//! `.bfloat16()` converts the module a user deploys) against that converted reference on the same device,
//! and the layered check against the fp32 module (`parity/generate_half_fixtures.py` writes both).
//!
//! Against the converted reference (same kernels, same dtype) the gate must flip nothing and the output
//! must match within `dtype_tolerance`. Against fp32: decisions flipped only where fp32's `z` lies
//! within the dtype's error of `z` of the threshold, or in the band where the dtype's sigmoid rounds to
//! the threshold (its calibrated `z_t` is farther from `logit(t)` than fp32's), and the
//! output, given fp32's decisions, within the dtype's rounding of the fp32 output. How far the dtype's
//! `z` is from fp32's is reported, not bounded: `w_gamma = gamma / sum(gamma)` sums C values of either
//! sign one by one in the dtype, so its error grows with C and with the cancellation in the sum (with
//! the seed's `randn` gammas, bf16 measured up to 17% of the largest `z` at C = 64). That is the
//! reference's own arithmetic in that dtype, which the Rust side reproduces bit for bit.
use super::parity::{compare, fixture, read_tensors, Comparison, Manifest, Tolerance};
use crate::error::ScConvError;
use crate::sru::GateDecisions;
use crate::{scconv, weights, Execution, ScConvConfig};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{nn::VarStore, Device, Kind, Tensor};

/// One case of a half-precision fixture folder.
#[derive(Debug, Clone, Deserialize)]
pub struct HalfCaseSpec {
    pub name: String,
    pub config: ScConvConfig,
    /// `float16` or `bfloat16`.
    pub dtype: String,
    pub state_dict: String,
    pub tensors: String,
}

/// The unit roundoff of a dtype's significand: 2^-11 for fp16, 2^-8 for bf16.
pub fn unit_roundoff(kind: Kind) -> f64 {
    match kind {
        Kind::BFloat16 => 2f64.powi(-8),
        Kind::Half => 2f64.powi(-11),
        _ => 2f64.powi(-24),
    }
}

/// Rust against PyTorch in the same dtype on the same device. The reference mode runs PyTorch's
/// operations in its order (bit-identical in practice); the fast path rounds the CRU's fuse
/// differently: each branch pooled on its own (another summation order, so the pooled value and
/// hence its softmax weight can differ by one rounding), and one rounding fewer in the weighted sum
/// (`addcmul`). Four unit roundoffs of each value, plus four of the largest (the softmax weights
/// scale all outputs alike), bound those few roundings with room.
pub fn dtype_tolerance(kind: Kind) -> Tolerance {
    let u = unit_roundoff(kind);
    Tolerance { rtol: 4.0 * u, atol: 4.0 * u }
}

/// The dtype's output against fp32's, given the same decisions: the input rounds to the dtype, and so
/// does every operation downstream of the gate (the masks, the cross-reconstruction's add, the CRU's
/// convolutions, which accumulate in fp32 and round once, pooling, softmax and the weighted sum).
/// Sixteen unit roundoffs of each value and of the largest bound those with room (measured: up to 3).
pub fn against_fp32_tolerance(kind: Kind) -> Tolerance {
    let u = unit_roundoff(kind);
    Tolerance { rtol: 16.0 * u, atol: 16.0 * u }
}

fn kind_of(dtype: &str) -> Result<Kind, ScConvError> {
    match dtype {
        "float16" => Ok(Kind::Half),
        "bfloat16" => Ok(Kind::BFloat16),
        other => Err(ScConvError::InvalidInput(format!("unknown dtype {other:?} (float16 or bfloat16)"))),
    }
}

/// One case run in one execution mode.
#[derive(Debug, Clone, Serialize)]
pub struct HalfCaseReport {
    pub name: String,
    pub execution: String,
    /// Decisions differing from PyTorch's converted module (same kernels: must be 0).
    pub flips: i64,
    /// The output against PyTorch's converted module (`dtype_tolerance`).
    pub output: Comparison,
    /// The dtype's `z` against PyTorch's converted module's: equal (`Tolerance::EXACT`), the same
    /// operations on the same kernels. The same for every execution of a case (the reference's gate).
    pub z_vs_converted: Comparison,
    /// The dtype's `z` against the fp32 module's (reported; see the module docs). The same for every
    /// execution of a case (the reference's gate).
    pub z_vs_fp32: Comparison,
    /// Decisions differing from fp32's although neither the dtype's error of `z` nor its sigmoid's
    /// rounding band reaches fp32's `z`: must be 0.
    pub fp32_flips_outside_band: i64,
    /// Decisions differing from fp32's, explained by either (allowed).
    pub fp32_flips_in_band: i64,
    /// With fp32's decisions fed in, the output against the fp32 module's (`against_fp32_tolerance`);
    /// the same for every execution of a case (the reference's path downstream of the gate).
    pub with_fp32_decisions: Comparison,
}

impl HalfCaseReport {
    pub fn passed(&self) -> bool {
        self.flips == 0
            && self.z_vs_converted.passed()
            && self.output.passed()
            && self.fp32_flips_outside_band == 0
            && self.with_fp32_decisions.passed()
    }
}

/// Every case of `dir` on `device`, in the reference mode and both fast executions.
pub fn run_all(dir: &Path, device: Device) -> Result<Vec<HalfCaseReport>, ScConvError> {
    let manifest: Manifest<HalfCaseSpec> = Manifest::read(dir)?;
    let mut reports = Vec::new();
    for case in &manifest.cases {
        reports.extend(run_case(dir, case, device)?);
    }
    Ok(reports)
}

/// One case: its fixtures read and the fp32 layers checked once, then a report per execution mode.
pub fn run_case(dir: &Path, case: &HalfCaseSpec, device: Device) -> Result<Vec<HalfCaseReport>, ScConvError> {
    let kind = kind_of(&case.dtype)?;
    let mut vs = VarStore::new(device);
    let mut block = scconv(vs.root(), &case.config)?;
    weights::load(&mut vs, dir.join(&case.state_dict))?;
    vs.set_kind(kind);
    let tensors = read_tensors(&dir.join(&case.tensors))?;
    let get = |key: &str| fixture(&tensors, key, &case.name).map(|t| t.to_device(device));
    let x = get("input")?.to_kind(kind);
    let (info, output) = (get("gate.info_mask")?.to_kind(Kind::Bool), get("output")?);
    let (z32, output32, decisions32) =
        (get("gate.z.fp32")?, get("output.fp32")?, get("gate.info_mask.fp32")?.to_kind(Kind::Bool));
    tch::no_grad(|| {
        let gate = block.try_gate(&x)?;
        let z = gate.z.to_kind(Kind::Float);
        // PyTorch's own z in the dtype: the band below is widened by its error, never by the error of
        // the result under test (Rust's z, held to PyTorch's bit for bit here).
        let z_pytorch = get("gate.z")?.to_kind(Kind::Float);
        let z_vs_converted = compare(&z, &z_pytorch, Tolerance::EXACT)?;
        let tol = against_fp32_tolerance(kind);
        let z_vs_fp32 = compare(&z, &z32, tol)?;
        // Explained: fp32's z is within PyTorch's dtype error of z of the threshold, or inside the band
        // where the dtype's sigmoid rounds to t although fp32's does not (between logit(t) and the
        // dtype's edge of the gate: for the hard gate its calibrated z_t, about -4.9e-4 for fp16 at
        // t = 0.5 and -3.9e-3 for bf16; for the soft gate's `r > t` the smallest z whose sigmoid
        // passes, on the other side and twice as far, as the dtype's spacing above t is twice that below).
        let t = case.config.gate_treshold;
        let logit = (t / (1.0 - t)).ln();
        let z_t = match case.config.variant {
            crate::Variant::V20231019 => soft_gate_edge(t, device, kind),
            _ => crate::fast::threshold::calibrate_for(t, device, kind)? as f64,
        };
        let slack = (z_t - logit).abs() + unit_roundoff(kind) * logit.abs();
        let crossed = (&z32 - logit).abs().le_tensor(&((&z_pytorch - &z32).abs() + slack));
        let fed = block.forward_with_decisions(&x, &GateDecisions::from_info_mask(&decisions32))?;
        let with_fp32_decisions = compare(&fed, &output32, tol)?;
        let mut reports = Vec::new();
        for execution in [Execution::Reference, Execution::Fast, Execution::FastTensorOps] {
            block.set_execution(execution)?;
            let y = block.try_forward(&x)?;
            let decided = match execution {
                Execution::Reference => gate.decisions.info_mask.shallow_clone(),
                _ => block
                    .try_fast_info_mask(&x)?
                    .ok_or_else(|| ScConvError::InvalidInput("no fast mask".into()))?,
            };
            let flipped = decided.logical_xor(&decisions32);
            reports.push(HalfCaseReport {
                name: case.name.clone(),
                execution: format!("{execution:?}"),
                flips: count(&decided.logical_xor(&info)),
                output: compare(&y, &output, dtype_tolerance(kind))?,
                z_vs_converted: z_vs_converted.clone(),
                z_vs_fp32: z_vs_fp32.clone(),
                fp32_flips_outside_band: count(&flipped.logical_and(&crossed.logical_not())),
                fp32_flips_in_band: count(&flipped.logical_and(&crossed)),
                with_fp32_decisions: with_fp32_decisions.clone(),
            });
        }
        Ok(reports)
    })
}

/// The smallest value of the 16-bit dtype whose sigmoid (libtorch's, on `device`) is `> t`.
fn soft_gate_edge(t: f64, device: Device, kind: Kind) -> f64 {
    let z = crate::fast::threshold::every_16_bit_value(kind).to_device(device);
    let passing = z.masked_select(&z.sigmoid().gt(t));
    passing.min().to_kind(Kind::Float).double_value(&[])
}

fn count(t: &Tensor) -> i64 {
    t.sum(Kind::Int64).int64_value(&[])
}

/// The reports as a table.
pub fn table(reports: &[HalfCaseReport]) -> String {
    let mut out = format!(
        "{:<28} {:<14} {:>6} {:>9} {:>12} {:>12} {:>14} {:>12} {:>6}\n",
        "case",
        "execution",
        "flips",
        "z = torch",
        "out rel err",
        "z vs fp32",
        "fp32 flips",
        "fed vs fp32",
        ""
    );
    for r in reports {
        out += &format!(
            "{:<28} {:<14} {:>6} {:>9} {:>12.2e} {:>12.2e} {:>7} ({:>3} ok) {:>12.2e} {:>6}\n",
            r.name,
            r.execution,
            r.flips,
            if r.z_vs_converted.passed() { "yes" } else { "NO" },
            r.output.relative(),
            r.z_vs_fp32.relative(),
            r.fp32_flips_outside_band,
            r.fp32_flips_in_band,
            r.with_fp32_decisions.relative(),
            super::parity::verdict(r.passed())
        );
    }
    out
}
