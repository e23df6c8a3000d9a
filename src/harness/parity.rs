//! The parity check against fixtures written by `parity/generate_fixtures.py`: load each case's
//! PyTorch state dict through `weights::load`, run forward and backward, and compare in three layers:
//! (a) gate decisions, (b) everything downstream of the gate with the reference's decisions fed in,
//! (c) outputs and gradients end to end.
use crate::error::ScConvError;
use crate::sru::GateDecisions;
use crate::{scconv, weights, ScConvConfig};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{nn::VarStore, Device, Kind, Tensor};

/// `|actual - reference| <= rtol * |reference| + atol * max|reference|`, position by position. The atol
/// scales with the tensor's largest value because the reference's outputs are ~2C times smaller than
/// its inputs (one softmax over 2C channels).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Tolerance {
    pub rtol: f64,
    pub atol: f64,
}

impl Tolerance {
    /// The same operations on the same kernels (the reference mode against CPU fixtures made on this
    /// kind of CPU): every value equal (`==`; a NaN never is), gradients and decisions included.
    pub const EXACT: Tolerance = Tolerance { rtol: 0.0, atol: 0.0 };
    /// fp32 against fp32 with other arithmetic (the fast paths; CUDA against CUDA fixtures): a few
    /// ulps at most, plus slack for reductions.
    pub const FP32: Tolerance = Tolerance { rtol: 1e-5, atol: 1e-6 };
    /// CUDA with TF32 convolutions (cuDNN's default on Ampere and later) against fp32: TF32 rounds conv
    /// inputs to 10 mantissa bits (relative 2^-11 = 4.9e-4). PyTorch itself, CUDA TF32 vs CPU, measured
    /// up to 3.8e-4 of the largest output; the bound is about four TF32 rounding units.
    pub const TF32: Tolerance = Tolerance { rtol: 1e-3, atol: 2e-3 };
    /// fp32 on the GPU (TF32 off) against fp32 CPU fixtures. Two fp32 results are each some distance
    /// from the exact value, and the GPU's distance is PyTorch's own there: measured on an H200 against an
    /// fp64 evaluation of the reference (same decisions), PyTorch CUDA's `grad.CRU.GWC.weight` is off by
    /// up to 1.1e-5 of its largest value (cuDNN's weight-gradient accumulation; PyTorch CPU: 2.6e-6),
    /// everything else by <= 8e-7. Two such results may differ by their sum, hence 2e-5. Also for CPU
    /// fixtures checked on another kind of CPU (`Policy::for_fixtures`).
    pub const FP32_ACROSS_DEVICES: Tolerance = Tolerance { rtol: 1e-5, atol: 2e-5 };
}

/// The gate band: |z| at or below 2^-22. For such z, `1 + exp(-z)` lies within one fp32 ulp (2^-22)
/// of 2, so whether an fp32 sigmoid returns exactly 0.5 depends on how it rounds exp, the add and the
/// division: two correct implementations may decide differently there, and nowhere else.
pub const GATE_BAND: f64 = 2.384185791015625e-7; // 2^-22

/// How strict a run is. Same kernels (Rust CPU vs CPU fixtures, Rust CUDA vs fixtures made on the same
/// GPU) must flip no gate decision; across devices, decisions may flip inside the band only. The
/// reference mode on the CPU against fixtures of this kind of CPU is held to `Tolerance::EXACT`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Policy {
    /// For the reference mode (the PyTorch twin's operations in its order).
    pub tolerance: Tolerance,
    pub same_kernels: bool,
}

impl Policy {
    /// The policy for running on `device` against fixtures made on `fixture_device` ("cpu" or "cuda").
    /// `tf32` says whether CUDA convolutions may use TF32 (libtorch's default on the GPU).
    pub fn for_run(fixture_device: &str, device: Device, tf32: bool) -> Policy {
        let on_cuda = device.is_cuda();
        let same_kernels = fixture_device.starts_with("cuda") == on_cuda;
        let tolerance = match (on_cuda, same_kernels, tf32) {
            (false, true, _) => Tolerance::EXACT,
            (true, false, true) => Tolerance::TF32,
            (true, false, false) => Tolerance::FP32_ACROSS_DEVICES,
            // CUDA against CUDA fixtures (cuDNN may pick other algorithms run to run), CPU against CUDA's.
            _ => Tolerance::FP32,
        };
        Policy { tolerance, same_kernels }
    }

    /// The policy the fast paths are held to, whose arithmetic is their own (another summation order,
    /// fused operations): this one, its tolerance never tighter than `Tolerance::FP32`.
    pub fn fast(&self) -> Policy {
        let tolerance = if self.tolerance == Tolerance::EXACT { Tolerance::FP32 } else { self.tolerance };
        Policy { tolerance, ..*self }
    }

    /// The header line's description of the policy.
    pub fn describe(&self) -> String {
        let values = if self.tolerance == Tolerance::EXACT {
            "exact (==)".to_string()
        } else {
            format!("rtol {} atol {} x max|ref|", self.tolerance.rtol, self.tolerance.atol)
        };
        let gates = if self.same_kernels {
            "same kernels: no gate flips allowed"
        } else {
            "across devices: flips allowed in the gate band only"
        };
        format!("{values}, {gates}")
    }
}

impl Policy {
    /// For fixtures made on `made_on` ("cpu" or "cuda"), on a CPU whose kernels `cpu_kernels` names
    /// (`cpu_kernels()` of the generating machine; `None` for older manifests: taken as this machine's).
    /// CPU fixtures from another kind of CPU (measured: an H200 host's 16-thread CPU against fixtures
    /// from a 2-thread AVX2 machine) differ in reduction order, so they get the across-devices policy.
    pub fn for_fixtures(made_on: &str, cpu_kernels: Option<&str>, device: Device, tf32: bool) -> Policy {
        let policy = Policy::for_run(made_on, device, tf32);
        let other_cpu = cpu_kernels.is_some_and(|k| k != self::cpu_kernels());
        if device == Device::Cpu && policy.same_kernels && other_cpu {
            return Policy { tolerance: Tolerance::FP32_ACROSS_DEVICES, same_kernels: false };
        }
        policy
    }
}

/// Which CPU kernels libtorch runs here, as the fixture generators record it: the instruction set it
/// dispatches to (`torch.backends.cpu.get_cpu_capability()`) and its thread count.
pub fn cpu_kernels() -> String {
    format!("{}/{} threads", cpu_capability(), tch::get_num_threads())
}

fn cpu_capability() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512dq") {
            return "AVX512";
        }
        if has!("avx2") && has!("fma") {
            return "AVX2";
        }
    }
    "DEFAULT"
}

/// Whether CUDA convolutions may use TF32: libtorch's default, unless `NVIDIA_TF32_OVERRIDE=0` switches
/// it off in NVIDIA's libraries (tch has no binding for cuDNN's allow_tf32).
pub fn tf32_enabled() -> bool {
    std::env::var("NVIDIA_TF32_OVERRIDE").map_or(true, |v| v != "0")
}

/// One tensor's comparison. `tolerance_used` is the largest |error| / allowed error over all positions:
/// at most 1 passes.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub max_abs_err: f64,
    pub max_abs_ref: f64,
    pub tolerance_used: f64,
}

impl Comparison {
    pub fn passed(&self) -> bool {
        self.tolerance_used <= 1.0
    }

    /// The largest error relative to the reference's largest value.
    pub fn relative(&self) -> f64 {
        self.max_abs_err / self.max_abs_ref
    }
}

/// A table's verdict column.
pub fn verdict(passed: bool) -> &'static str {
    if passed {
        "pass"
    } else {
        "FAIL"
    }
}

pub fn compare(actual: &Tensor, reference: &Tensor, tol: Tolerance) -> Result<Comparison, ScConvError> {
    if actual.size() != reference.size() {
        let (a, r) = (actual.size(), reference.size());
        return Err(ScConvError::InvalidInput(format!("shape {a:?} compared with reference shape {r:?}")));
    }
    let to_cpu = |t: &Tensor| t.detach().to_device(Device::Cpu).to_kind(Kind::Double);
    let (actual, reference) = (to_cpu(actual), to_cpu(reference));
    let err = (&actual - &reference).abs();
    let max_abs_ref = reference.abs().max().double_value(&[]);
    let max_abs_err = err.max().double_value(&[]);
    let allowed = reference.abs() * tol.rtol + tol.atol * max_abs_ref;
    // A zero allowance (`EXACT`, an all-zero reference) tolerates only an exact match; NaN anywhere fails.
    let exact_only = max_abs_ref == 0.0 || tol == Tolerance::EXACT;
    let tolerance_used = if max_abs_err.is_nan() || (exact_only && max_abs_err > 0.0) {
        f64::INFINITY
    } else if max_abs_err == 0.0 {
        0.0
    } else {
        (err / allowed).max().double_value(&[])
    };
    Ok(Comparison { max_abs_err, max_abs_ref, tolerance_used })
}

/// Layer (a): the Rust gate's decisions against the reference's.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GateReport {
    pub positions: i64,
    pub in_band: i64,
    pub flips_in_band: i64,
    pub flips_outside_band: i64,
}

impl GateReport {
    pub fn flips(&self) -> i64 {
        self.flips_in_band + self.flips_outside_band
    }
}

pub fn compare_gate(reference_z: &Tensor, reference_info: &Tensor, actual_info: &Tensor) -> GateReport {
    let cpu = |t: &Tensor| t.to_device(Device::Cpu);
    let in_band = cpu(reference_z).abs().le(GATE_BAND);
    let flipped = cpu(reference_info).to_kind(Kind::Bool).logical_xor(&cpu(actual_info).to_kind(Kind::Bool));
    let count = |t: &Tensor| t.sum(Kind::Int64).int64_value(&[]);
    GateReport {
        positions: reference_z.numel() as i64,
        in_band: count(&in_band),
        flips_in_band: count(&flipped.logical_and(&in_band)),
        flips_outside_band: count(&flipped.logical_and(&in_band.logical_not())),
    }
}

/// `manifest.json` of a fixture folder; `C` is the case type (`CaseSpec` for single blocks,
/// `model_parity::ModelCaseSpec` for whole networks).
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest<C = CaseSpec> {
    /// The script that wrote the folder (`parity/generate_model_fixtures.py` for networks).
    #[serde(default)]
    pub generator: Option<String>,
    pub torch_version: String,
    pub device: String,
    /// `cpu_kernels()` of the machine that made CPU fixtures.
    #[serde(default)]
    pub cpu_kernels: Option<String>,
    pub seed: u64,
    pub cases: Vec<C>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CaseSpec {
    pub name: String,
    pub config: ScConvConfig,
    pub input_shape: Vec<i64>,
    /// The PyTorch `state_dict()` file, relative to the manifest.
    pub state_dict: String,
    /// Input, output, gradients and gate, relative to the manifest.
    pub tensors: String,
    /// Parameters whose `.grad` the reference leaves `None` (the SRU's gamma and beta).
    pub params_without_grad: Vec<String>,
}

impl<C: serde::de::DeserializeOwned> Manifest<C> {
    pub fn read(dir: &Path) -> Result<Manifest<C>, ScConvError> {
        crate::harness::json::read(&dir.join("manifest.json"))
    }

    /// The policy for checking these fixtures on `device` (`Policy::for_fixtures`).
    pub fn policy(&self, device: Device, tf32: bool) -> Policy {
        Policy::for_fixtures(&self.device, self.cpu_kernels.as_deref(), device, tf32)
    }
}

/// The loss weight the generator uses: `cos(0.7 * k)` at flat position k, reshaped to `shape`.
pub fn loss_weight(shape: &[i64], device: Device) -> Tensor {
    let numel: i64 = shape.iter().product();
    (Tensor::arange(numel, (Kind::Float, device)) * 0.7).cos().reshape(shape)
}

/// Everything one forward and backward pass produced.
struct Pass {
    output: Tensor,
    /// `grad.input` and `grad.<param>`, keyed as in the fixtures.
    grads: BTreeMap<String, Tensor>,
    params_without_grad: Vec<String>,
    /// The gate decisions the pass used (computed, or the ones fed in).
    info_mask: Tensor,
}

/// Builds the model from the case's config, loads the PyTorch state dict, and runs forward and
/// backward of `sum(output * loss_weight)`; with `reference_decisions` the gate's decisions are fed in.
fn forward_backward(
    dir: &Path,
    case: &CaseSpec,
    input: &Tensor,
    device: Device,
    reference_decisions: Option<&GateDecisions>,
) -> Result<Pass, ScConvError> {
    let mut vs = VarStore::new(device);
    let model = scconv(vs.root(), &case.config)?;
    weights::load(&mut vs, dir.join(&case.state_dict))?;
    // A fresh leaf: `to_device` to the same device returns the fixture tensor itself, whose grad would
    // accumulate across passes.
    let x = input.to_device(device).detach().set_requires_grad(true);
    let (output, info_mask) = match reference_decisions {
        Some(fed) => (model.forward_with_decisions(&x, fed)?, fed.info_mask.shallow_clone()),
        None => {
            let gate = tch::no_grad(|| model.try_gate(&x))?;
            (model.try_forward(&x)?, gate.decisions.info_mask)
        }
    };
    (&output * loss_weight(&output.size(), device)).sum(Kind::Float).backward();
    let mut grads = BTreeMap::from([("grad.input".to_string(), x.grad())]);
    let mut params_without_grad = Vec::new();
    for (name, var) in vs.variables() {
        match var.grad() {
            g if g.defined() => drop(grads.insert(format!("grad.{name}"), g)),
            _ => params_without_grad.push(name),
        }
    }
    params_without_grad.sort();
    Ok(Pass { output, grads, params_without_grad, info_mask })
}

/// The outcome of one case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseReport {
    pub name: String,
    pub gate: GateReport,
    /// Layer (c): `output` and every `grad.*`, end to end.
    pub end_to_end: BTreeMap<String, Comparison>,
    /// Layer (b): the same with the reference's gate decisions fed in.
    pub with_reference_gate: BTreeMap<String, Comparison>,
    /// Structural differences: gradients present on one side only.
    pub problems: Vec<String>,
}

impl CaseReport {
    pub fn passed(&self, policy: &Policy) -> bool {
        let all_pass = |m: &BTreeMap<String, Comparison>| m.values().all(Comparison::passed);
        let gate_ok = self.gate.flips_outside_band == 0 && (!policy.same_kernels || self.gate.flips() == 0);
        // End to end is required whenever no decision flipped; a flip moves values between channel halves.
        let end_to_end_ok = self.gate.flips() > 0 || all_pass(&self.end_to_end);
        self.problems.is_empty() && gate_ok && all_pass(&self.with_reference_gate) && end_to_end_ok
    }

    /// The largest `tolerance_used` over both layers (b) and (c).
    pub fn worst_tolerance_used(&self) -> f64 {
        let values = self.end_to_end.values().chain(self.with_reference_gate.values());
        values.map(|c| c.tolerance_used).fold(0.0, f64::max)
    }
}

/// The tensors of a fixture file (safetensors or `torch.save`), by name.
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>, ScConvError> {
    Ok(weights::read(path)?.into_iter().collect())
}

/// A block case's tensors, those of the input's shape (input, output, `grad.input`, the gate) checked
/// against the manifest's `input_shape`: a wrong-shaped fixture is an error naming the case and the
/// tensor, not a libtorch failure halfway through a comparison.
pub(crate) fn case_tensors(dir: &Path, case: &CaseSpec) -> Result<BTreeMap<String, Tensor>, ScConvError> {
    let path = dir.join(&case.tensors);
    let tensors = read_tensors(&path)?;
    for key in ["input", "output", "grad.input", "gate.z", "gate.info_mask"] {
        match tensors.get(key) {
            Some(t) if t.size() != case.input_shape => {
                return Err(ScConvError::WeightsFile {
                    path: path.display().to_string(),
                    reason: format!(
                        "case {}: tensor `{key}` has shape {:?}, the manifest's input_shape is {:?}",
                        case.name,
                        t.size(),
                        case.input_shape
                    ),
                })
            }
            _ => {}
        }
    }
    Ok(tensors)
}

pub(crate) fn fixture<'a>(
    tensors: &'a BTreeMap<String, Tensor>,
    key: &str,
    case: &str,
) -> Result<&'a Tensor, ScConvError> {
    tensors.get(key).ok_or_else(|| ScConvError::WeightsFile {
        path: format!("fixture {case}"),
        reason: format!("has no `{key}`"),
    })
}

/// Compares `output` and every gradient of `pass` with the fixture; records grads on one side only.
fn compare_pass(
    pass: &Pass,
    expected: &BTreeMap<String, Tensor>,
    tol: Tolerance,
    problems: &mut Vec<String>,
    case: &str,
) -> Result<BTreeMap<String, Comparison>, ScConvError> {
    let mut out = BTreeMap::from([(
        "output".to_string(),
        compare(&pass.output, fixture(expected, "output", case)?, tol)?,
    )]);
    for (key, reference) in expected.iter().filter(|(k, _)| k.starts_with("grad.")) {
        match pass.grads.get(key) {
            Some(actual) => {
                let comparison = compare(actual, reference, tol).map_err(|e| {
                    ScConvError::InvalidInput(format!("case {case}: tensor `{key}` of the fixture: {e}"))
                })?;
                out.insert(key.clone(), comparison);
            }
            None => problems.push(format!("the reference has {key}, Rust computed none")),
        }
    }
    for key in pass.grads.keys().filter(|k| !expected.contains_key(*k)) {
        problems.push(format!("Rust computed {key}, the reference has none"));
    }
    Ok(out)
}

/// Runs one case on `device`: layers (a), (b) and (c).
pub fn run_case(
    dir: &Path,
    case: &CaseSpec,
    device: Device,
    tol: Tolerance,
) -> Result<CaseReport, ScConvError> {
    let expected = case_tensors(dir, case)?;
    let input = fixture(&expected, "input", &case.name)?;
    let mut problems = Vec::new();

    let pass = forward_backward(dir, case, input, device, None)?;
    let mut reference_without_grad = case.params_without_grad.clone();
    reference_without_grad.sort();
    if pass.params_without_grad != reference_without_grad {
        problems.push(format!(
            "parameters without gradient: Rust {:?}, reference {reference_without_grad:?}",
            pass.params_without_grad
        ));
    }
    let reference_info = fixture(&expected, "gate.info_mask", &case.name)?;
    let gate = compare_gate(fixture(&expected, "gate.z", &case.name)?, reference_info, &pass.info_mask);
    let end_to_end = compare_pass(&pass, &expected, tol, &mut problems, &case.name)?;

    let reference_decisions = GateDecisions::from_info_mask(reference_info);
    let fed = forward_backward(dir, case, input, device, Some(&reference_decisions))?;
    let with_reference_gate = compare_pass(&fed, &expected, tol, &mut problems, &case.name)?;
    Ok(CaseReport { name: case.name.clone(), gate, end_to_end, with_reference_gate, problems })
}

/// Every case of the fixture folder `dir`.
pub fn run_all(dir: &Path, device: Device, policy: &Policy) -> Result<Vec<CaseReport>, ScConvError> {
    let manifest: Manifest = Manifest::read(dir)?;
    manifest.cases.iter().map(|case| run_case(dir, case, device, policy.tolerance)).collect()
}

/// The table `scconv-tch parity` prints and the tests record.
pub fn table(reports: &[CaseReport], policy: &Policy) -> String {
    let mut out = format!(
        "{:<22} {:>12} {:>12} {:>9} {:>8} {:>6}  verdict\n",
        "case", "max|Δout|", "max|Δ|/max", "tol used", "in band", "flips"
    );
    for r in reports {
        let output = &r.end_to_end["output"];
        out += &format!(
            "{:<22} {:>12.3e} {:>12.3e} {:>9.3} {:>8} {:>6}  {}\n",
            r.name,
            output.max_abs_err,
            output.relative(),
            r.worst_tolerance_used(),
            r.gate.in_band,
            r.gate.flips(),
            verdict(r.passed(policy))
        );
        if r.gate.flips() > 0 {
            out += &format!(
                "    end to end not held to the tolerance: {} decisions flipped (inside the band: {}); \
                 downstream checked with the reference's decisions (tol used {:.3})\n",
                r.gate.flips(),
                r.gate.flips_in_band,
                r.with_reference_gate.values().map(|c| c.tolerance_used).fold(0.0, f64::max)
            );
        }
        for p in &r.problems {
            out += &format!("    problem: {p}\n");
        }
    }
    out
}

/// The committed fixtures: `$SCCONV_FIXTURES` if set, else `weights/parity` of this crate.
pub fn committed_fixtures() -> PathBuf {
    std::env::var_os("SCCONV_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("weights").join("parity"))
}

/// The committed fixtures of the later reference versions and the paper's fuse
/// (`parity/generate_fixtures.py --set versions`).
pub fn committed_version_fixtures() -> PathBuf {
    crate_root().join("weights").join("parity-versions")
}

/// This crate's folder: `$SCCONV_ROOT` when the binary runs from a copy elsewhere (the GPU machine),
/// else where it was built.
fn crate_root() -> PathBuf {
    std::env::var_os("SCCONV_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The committed fixtures whose inputs carry large channel offsets, up to 768 channels
/// (`parity/generate_fixtures.py --set offset`).
pub fn committed_offset_fixtures() -> PathBuf {
    crate_root().join("weights").join("parity-offset")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(values: &[f32]) -> Tensor {
        Tensor::from_slice(values)
    }

    #[test]
    fn tolerance_is_relative_plus_scaled_absolute() {
        let reference = t(&[100.0, 1.0, 0.0]);
        // allowed: 1e-5*|r| + 1e-6*100 = [1.1e-3, 1.1e-4, 1e-4]
        let ok = compare(&t(&[100.001, 1.0001, 0.00009]), &reference, Tolerance::FP32).unwrap();
        assert!(ok.passed(), "{ok:?}");
        let bad = compare(&t(&[100.0, 1.0, 0.00011]), &reference, Tolerance::FP32).unwrap();
        assert!(!bad.passed(), "{bad:?}");
        approx::assert_abs_diff_eq!(bad.max_abs_err, 0.00011, epsilon = 1e-9);
    }

    #[test]
    fn exact_tolerates_no_difference_at_all() {
        let reference = t(&[100.0, 1.0, 0.0, -0.0]);
        let same = compare(&t(&[100.0, 1.0, -0.0, 0.0]), &reference, Tolerance::EXACT).unwrap();
        assert!(same.passed() && same.tolerance_used == 0.0, "{same:?}");
        // One ulp of 100 (a summation order changed) fails.
        let ulp = compare(&t(&[100.0f32.next_up(), 1.0, 0.0, 0.0]), &reference, Tolerance::EXACT).unwrap();
        assert!(!ulp.passed(), "{ulp:?}");
        let nan = compare(&t(&[f32::NAN]), &t(&[f32::NAN]), Tolerance::EXACT).unwrap();
        assert!(!nan.passed(), "a NaN is equal to nothing");
    }

    #[test]
    fn nan_and_shape_mismatch_fail() {
        let nan = compare(&t(&[f32::NAN, 1.0]), &t(&[1.0, 1.0]), Tolerance::FP32).unwrap();
        assert_eq!(nan.tolerance_used, f64::INFINITY, "NaN must not hide in a max");
        assert!(compare(&t(&[1.0]), &t(&[1.0, 1.0]), Tolerance::FP32).is_err());
        let zeros = compare(&t(&[0.0, 1e-30]), &t(&[0.0, 0.0]), Tolerance::FP32).unwrap();
        assert!(!zeros.passed(), "an all-zero reference tolerates only an exact match");
    }

    #[test]
    fn gate_flips_are_split_by_the_band() {
        let z = t(&[1e-8, -1e-7, 1e-3, -1e-3, 3e-7]);
        let reference = Tensor::from_slice(&[true, true, true, false, true]);
        let actual = Tensor::from_slice(&[true, false, false, false, true]);
        let report = compare_gate(&z, &reference, &actual);
        assert_eq!((report.positions, report.in_band), (5, 2));
        assert_eq!((report.flips_in_band, report.flips_outside_band), (1, 1));
    }

    #[test]
    fn cross_device_tf32_policy_is_the_looser_one() {
        assert_eq!(Policy::for_run("cpu", Device::Cpu, true).tolerance, Tolerance::EXACT);
        assert_eq!(Policy::for_run("cpu", Device::Cpu, true).fast().tolerance, Tolerance::FP32);
        assert!(Policy::for_run("cpu", Device::Cpu, true).same_kernels);
        let cross = Policy::for_run("cpu", Device::Cuda(0), true);
        assert_eq!((cross.tolerance, cross.same_kernels), (Tolerance::TF32, false));
        assert_eq!(Policy::for_run("cpu", Device::Cuda(0), false).tolerance, Tolerance::FP32_ACROSS_DEVICES);
        assert!(Policy::for_run("cuda", Device::Cuda(0), true).same_kernels);
        assert_eq!(Policy::for_run("cuda", Device::Cuda(0), true).tolerance, Tolerance::FP32);
    }

    #[test]
    fn cpu_fixtures_from_another_kind_of_cpu_are_checked_across_devices() {
        let here = cpu_kernels();
        assert!(here.ends_with(" threads") && here.contains('/'), "{here}");
        let same = Policy::for_fixtures("cpu", Some(&here), Device::Cpu, false);
        assert_eq!((same.tolerance, same.same_kernels), (Tolerance::EXACT, true));
        assert!(Policy::for_fixtures("cpu", None, Device::Cpu, false).same_kernels);
        let other = Policy::for_fixtures("cpu", Some("AVX512/16 threads x"), Device::Cpu, false);
        assert_eq!((other.tolerance, other.same_kernels), (Tolerance::FP32_ACROSS_DEVICES, false));
    }
}
