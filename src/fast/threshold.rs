//! The gate's cheap form. The reference decides `sigmoid(z) >= t`; the fast path decides `z >= z_t`,
//! where `z_t` is the smallest fp32 value whose sigmoid, computed by libtorch on the same device,
//! passes. The two agree for every fp32 `z` exactly when that sigmoid is monotone, which
//! `tests/gate_threshold.rs` checks over every fp32 value; here `z_t` is found by bisection and its
//! neighbourhood checked on both of libtorch's CPU code paths (vectorised and scalar). For fp16 and
//! bf16 (`calibrate_for`) there are only 65,536 values: every one is checked, on both code paths.
use crate::error::ScConvError;
use tch::{Device, Kind, Tensor};

/// A position on the fp32 number line: consecutive floats get consecutive keys, -0 just below +0.
pub fn key(f: f32) -> i64 {
    let bits = f.to_bits();
    if bits >> 31 == 0 {
        bits as i64
    } else {
        -((bits & 0x7fff_ffff) as i64) - 1
    }
}

/// The float at a key (`key`'s inverse).
pub fn from_key(k: i64) -> f32 {
    if k >= 0 {
        f32::from_bits(k as u32)
    } else {
        f32::from_bits((-(k + 1)) as u32 | 0x8000_0000)
    }
}

/// The reference's decision `sigmoid(z) >= t` for each of `z`, as libtorch computes it on `device`.
pub fn reference_decisions(z: &[f32], t: f64, device: Device) -> Vec<bool> {
    let z = Tensor::from_slice(z).to_device(device);
    Vec::<bool>::try_from(z.sigmoid().ge(t).to_device(Device::Cpu)).unwrap_or_default()
}

/// As `reference_decisions`, through libtorch's scalar code path (a strided, non-contiguous view).
fn reference_decisions_strided(z: &[f32], t: f64, device: Device) -> Vec<bool> {
    let z = Tensor::from_slice(z).to_device(device);
    let strided = Tensor::stack(&[&z, &z], 1).select(1, 0);
    Vec::<bool>::try_from(strided.sigmoid().ge(t).to_device(Device::Cpu)).unwrap_or_default()
}

/// Candidates per bisection step: 4 steps cover the 2^32 floats.
const STEP: i64 = 511;
/// Floats either side of `z_t` on which both code paths must agree with `z >= z_t`.
const NEIGHBOURHOOD: i64 = 4096;

/// `z_t` for threshold `t` on `device`: `sigmoid(z) >= t` exactly when `z >= z_t`.
pub fn calibrate(t: f64, device: Device) -> Result<f32, ScConvError> {
    let fails = |why: String| ScConvError::GateThreshold { threshold: t, why };
    let (mut below, mut at) = (key(f32::NEG_INFINITY), key(f32::INFINITY));
    while at - below > 1 {
        let span = at - below;
        let keys: Vec<i64> = (1..=STEP).map(|i| below + span * i / (STEP + 1)).collect();
        let keys: Vec<i64> = keys.into_iter().filter(|&k| k > below && k < at).collect();
        let z: Vec<f32> = keys.iter().map(|&k| from_key(k)).collect();
        let pass = reference_decisions(&z, t, device);
        if pass.len() != z.len() {
            return Err(fails("libtorch returned no decisions".into()));
        }
        match pass.iter().position(|&p| p) {
            Some(0) => at = keys[0],
            Some(i) => (below, at) = (keys[i - 1], keys[i]),
            // `span >= 2` puts at least `below + 1` among the keys.
            None => below = keys[keys.len() - 1],
        }
    }
    let z_t = from_key(at);
    check_neighbourhood(z_t, t, device).map_err(fails)?;
    Ok(z_t)
}

/// Both code paths agree with `z >= z_t` on the `NEIGHBOURHOOD` floats either side of `z_t`.
fn check_neighbourhood(z_t: f32, t: f64, device: Device) -> Result<(), String> {
    let around = key(z_t);
    let lo = (around - NEIGHBOURHOOD).max(key(f32::NEG_INFINITY));
    let hi = (around + NEIGHBOURHOOD).min(key(f32::INFINITY));
    let z: Vec<f32> = (lo..=hi).map(from_key).collect();
    let expected: Vec<bool> = z.iter().map(|&v| v >= z_t).collect();
    let (vectorised, scalar) =
        (reference_decisions(&z, t, device), reference_decisions_strided(&z, t, device));
    if let Some(i) = (0..z.len()).find(|&i| vectorised.get(i) != scalar.get(i)) {
        return Err(format!(
            "libtorch's vectorised and scalar sigmoids decide differently at z = {:e} (they cross the \
             threshold one float apart), so the reference itself decides by where a value sits in the \
             tensor; no single cut-off reproduces that. Thresholds whose crossing both paths share \
             (0.5, 0.1, 0.3, 0.7, 0.9, ...) run fast; use Execution::Reference for this one",
            z[i]
        ));
    }
    for (path, got) in [("vectorised", vectorised), ("scalar", scalar)] {
        if let Some(i) = (0..z.len()).find(|&i| got.get(i) != Some(&expected[i])) {
            return Err(format!(
                "the {path} sigmoid is not monotone near {z_t:e}: sigmoid({:e}) >= t is {:?}",
                z[i],
                got.get(i)
            ));
        }
    }
    Ok(())
}

/// `z_t` for threshold `t` and a module of dtype `kind` on `device` (fp32, fp16 or bf16), as an fp32
/// value (exactly representable in `kind`): `sigmoid(z) >= t`, computed by libtorch in `kind`, exactly
/// when `z >= z_t`.
pub fn calibrate_for(t: f64, device: Device, kind: Kind) -> Result<f32, ScConvError> {
    match kind {
        Kind::Float => calibrate(t, device),
        Kind::Half | Kind::BFloat16 => calibrate_16_bit(t, device, kind),
        other => Err(ScConvError::GateThreshold {
            threshold: t,
            why: format!("the cheap gate is calibrated for fp32, fp16 and bf16 sigmoids, not {other:?}"),
        }),
    }
}

/// Every value of a 16-bit float dtype, as that dtype (NaNs included).
pub fn every_16_bit_value(kind: Kind) -> Tensor {
    let bits: Vec<i16> = (0..=u16::MAX).map(|b| b as i16).collect();
    Tensor::from_slice(&bits).view_dtype(kind)
}

fn calibrate_16_bit(t: f64, device: Device, kind: Kind) -> Result<f32, ScConvError> {
    let fails = |why: String| ScConvError::GateThreshold { threshold: t, why };
    let z = every_16_bit_value(kind).to_device(device);
    let values = Vec::<f32>::try_from(z.to_kind(Kind::Float).to_device(Device::Cpu))?;
    let strided = Tensor::stack(&[&z, &z], 1).select(1, 0);
    let mut paths = Vec::new();
    for (name, input) in [("vectorised", &z), ("scalar", &strided)] {
        paths.push((name, Vec::<bool>::try_from(input.sigmoid().ge(t).to_device(Device::Cpu))?));
    }
    let passing = |decisions: &[bool]| {
        values.iter().zip(decisions).filter(|(_, &d)| d).map(|(&v, _)| v).fold(f32::INFINITY, f32::min)
    };
    let z_t = passing(&paths[0].1);
    for (name, decisions) in &paths {
        let wrong = values.iter().zip(decisions).find(|(&v, &d)| !v.is_nan() && d != (v >= z_t));
        if let Some((v, d)) = wrong {
            return Err(fails(format!(
                "libtorch's {name} {kind:?} sigmoid is not a threshold at {z_t:e}: sigmoid({v:e}) >= t is {d}"
            )));
        }
        if let Some((v, _)) = values.iter().zip(decisions).find(|(v, &d)| v.is_nan() && d) {
            return Err(fails(format!("a NaN ({v}) passes the {name} {kind:?} gate")));
        }
    }
    Ok(z_t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_consecutive_and_ordered() {
        for f in [f32::NEG_INFINITY, -1.5, -1e-45, -0.0, 0.0, 1e-45, 2.0, f32::INFINITY] {
            assert_eq!(from_key(key(f)).to_bits(), f.to_bits());
        }
        assert_eq!(key(0.0) - key(-0.0), 1);
        assert_eq!(key(1e-45) - key(0.0), 1);
        assert_eq!(key(-1e-45) - key(-0.0), -1);
        assert!(key(-2.0) < key(-1.0) && key(1.0) < key(2.0));
        assert_eq!(key(f32::from_bits(0x3f80_0001)) - key(1.0), 1);
    }

    #[test]
    fn half_threshold_on_cpu_is_where_the_sigmoid_leaves_one_half() {
        // fp32's sigmoid(z) rounds to exactly 0.5 down to z = -0x1.7ffffcp-23 = -1.7881390e-7, two floats
        // above -1.5 * 2^-23 (libtorch 2.11, CPU; the same value a Python sweep found).
        let z_t = calibrate(0.5, Device::Cpu).unwrap();
        assert_eq!(z_t.to_bits(), 0xb43f_fffe, "{z_t:e}");
        assert_eq!(reference_decisions(&[z_t, from_key(key(z_t) - 1)], 0.5, Device::Cpu), [true, false]);
    }

    /// The smallest float of the `2 * 65,536` around `logit(t)` whose sigmoid passes `t` on each of
    /// libtorch's CPU paths (vectorised, scalar), found by scanning every one of them: independent of
    /// `calibrate`'s bisection.
    fn crossings(t: f64) -> (f32, f32) {
        let centre = key((t / (1.0 - t)).ln() as f32);
        let z: Vec<f32> = (centre - 65_536..=centre + 65_536).map(from_key).collect();
        let first = |passing: Vec<bool>| {
            assert!(!passing[0] && passing[passing.len() - 1], "t {t}: the window holds the crossing");
            z[passing.iter().position(|&p| p).unwrap()]
        };
        (
            first(reference_decisions(&z, t, Device::Cpu)),
            first(reference_decisions_strided(&z, t, Device::Cpu)),
        )
    }

    /// Where the two paths cross `t` at different floats, calibration is refused saying why (measured
    /// on AVX-512 CPUs with libtorch 2.11 for 0.45 and 0.55); where they cross at the same float, it
    /// returns that float. (0.5, the default, calibrates everywhere: its `z_t` is pinned above.)
    #[test]
    fn thresholds_the_two_sigmoid_paths_cross_apart_are_refused_saying_so() {
        for t in [0.45, 0.55, 0.3, 0.7] {
            let (vectorised, scalar) = crossings(t);
            match calibrate(t, Device::Cpu) {
                Ok(z_t) => assert!(
                    vectorised == scalar && z_t == vectorised,
                    "t {t}: calibrated {z_t:e}, the paths cross at {vectorised:e} and {scalar:e}"
                ),
                Err(err) => {
                    assert_ne!(
                        vectorised, scalar,
                        "t {t}: refused although both paths cross at {scalar:e}: {err}"
                    );
                    let err = err.to_string();
                    assert!(
                        err.contains("vectorised and scalar sigmoids decide differently"),
                        "t {t}: {err}"
                    );
                    assert!(err.contains("use Execution::Reference"), "{err}");
                }
            }
        }
        assert!(calibrate(0.5, Device::Cpu).is_ok(), "the default threshold always runs fast");
    }

    /// The 16-bit gates are proven over all 65,536 values as they are calibrated; here their place.
    #[test]
    fn half_precision_thresholds_sit_at_the_dtype_value_below_zero() {
        for kind in [Kind::Half, Kind::BFloat16] {
            let z_t = calibrate_for(0.5, Device::Cpu, kind).unwrap();
            assert!(z_t < 0.0 && z_t > -0.01, "{kind:?}: {z_t:e}");
            let sigmoid = |v: f32| {
                Tensor::from_slice(&[v]).to_kind(kind).sigmoid().to_kind(Kind::Float).double_value(&[0])
            };
            assert!(sigmoid(z_t) >= 0.5, "{kind:?}");
            let below = Tensor::from_slice(&[z_t])
                .to_kind(kind)
                .nextafter(&Tensor::from_slice(&[-1.0f32]).to_kind(kind));
            assert!(below.sigmoid().to_kind(Kind::Float).double_value(&[0]) < 0.5, "{kind:?}");
            for t in [0.1, 0.9] {
                let z_t = calibrate_for(t, Device::Cpu, kind).unwrap();
                let logit = (t / (1.0 - t)).ln();
                assert!((z_t as f64 - logit).abs() < 0.05, "{kind:?} t {t}: {z_t} vs {logit}");
            }
        }
        let err = calibrate_for(0.5, Device::Cpu, Kind::Double).unwrap_err().to_string();
        assert!(err.contains("not Double"), "{err}");
    }

    #[test]
    fn other_thresholds_calibrate_near_the_logit() {
        for t in [0.1, 0.3, 0.7, 0.9] {
            let z_t = calibrate(t, Device::Cpu).unwrap();
            let logit = (t / (1.0 - t)).ln();
            assert!((z_t as f64 - logit).abs() < 1e-6, "t {t}: z_t {z_t} vs logit {logit}");
        }
    }
}
