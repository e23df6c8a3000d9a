//! The proof behind the fast path's cheap gate: for every fp32 value z, libtorch's
//! `sigmoid(z) >= 0.5` and `sigmoid(z) < 0.5` on the CPU equal `z >= z_t` and `z < z_t` with the
//! calibrated `z_t` (NaN: both false on both sides). All 2^32 bit patterns, on libtorch's vectorised
//! path and on its scalar path (a strided view), in chunks.
mod common;

use common::{disagreements, sweep_every_fp32};
use scconv_tch::fast::threshold::calibrate;
use tch::{Device, Tensor};

#[test]
fn the_cheap_gate_equals_the_sigmoid_gate_for_every_fp32_value_on_cpu() {
    sweep_every_fp32(Device::Cpu, 0.5);
}

#[test]
fn a_threshold_one_float_off_is_caught() {
    use scconv_tch::fast::threshold::{from_key, key};
    let z_t = calibrate(0.5, Device::Cpu).unwrap();
    let around: Vec<f32> = (key(z_t) - 1000..key(z_t) + 1000).map(from_key).collect();
    let z = Tensor::from_slice(&around);
    assert_eq!(disagreements(&z, 0.5, z_t as f64), 0);
    for off in [from_key(key(z_t) - 1), from_key(key(z_t) + 1), 0.0] {
        assert!(disagreements(&z, 0.5, off as f64) > 0, "z_t {off:e} instead of {z_t:e} passed");
    }
}
