//! `info`'s counts against the real modules and the closed forms.
mod common;

use scconv_tch::parity::{committed_fixtures, Manifest};
use scconv_tch::{info, scconv};
use std::process::Command;
use tch::{nn::VarStore, Device};

#[test]
fn per_layer_parameters_equal_the_built_modules_for_every_fixture_config() {
    let manifest: Manifest = Manifest::read(&committed_fixtures()).unwrap();
    for case in &manifest.cases {
        let vs = VarStore::new(Device::Cpu);
        scconv(vs.root(), &case.config).unwrap();
        let variables = vs.variables();
        for layer in info::scconv_costs(&case.config) {
            let built: i64 = variables
                .iter()
                .filter(|(k, _)| k.starts_with(&format!("{}.", layer.name)))
                .map(|(_, t)| t.numel() as i64)
                .sum();
            assert_eq!(layer.parameters, built, "{}: {}", case.name, layer.name);
        }
    }
}

#[test]
fn the_cli_prints_the_table_and_json() {
    let bin = std::env::var("SCCONV_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_scconv-tch").to_string());
    let out = Command::new(&bin).args(["info", "--channels", "64"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("total                  7616"), "{text}");
    assert!(text.contains("conv3x3               36864        115605504"), "{text}");
    assert!(text.contains("0.207x the parameters"), "{text}");
    let out = Command::new(&bin)
        .args(["info", "--channels", "128", "--height", "28", "--width", "28", "--json"])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["conv3x3"]["parameters"], 9 * 128 * 128);
    assert_eq!(json["positions"], 784);
    let out = Command::new(&bin).args(["info", "--channels", "40"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("divisible by group_num"));
}
