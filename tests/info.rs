//! `info`'s counts against the real modules and the closed forms.
mod common;

use scconv_tch::harness::parity::{committed_fixtures, Manifest};
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
    let bin = common::bin();
    let out = Command::new(&bin).args(["info", "--channels", "64"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("total                  7616"), "{text}");
    assert!(text.contains("conv3x3               36864        115605504"), "{text}");
    assert!(text.contains("0.207x the parameters"), "{text}");
    let out =
        Command::new(&bin).args(["info", "--channels", "128", "--size", "28", "--json"]).output().unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["conv3x3"]["parameters"], 9 * 128 * 128);
    assert_eq!(json["positions"], 784);
    let out = Command::new(&bin).args(["info", "--channels", "40"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("divisible by group_num"));
}

fn totals(rows: &[info::NetworkRow]) -> (i64, i64, i64, i64) {
    rows.iter().fold((0, 0, 0, 0), |t, r| {
        (t.0 + r.parameters, t.1 + r.macs, t.2 + r.plain_parameters, t.3 + r.plain_macs)
    })
}

#[test]
fn network_counts_match_pytorch_and_the_built_networks() {
    use scconv_tch::models::{resnet, ResNetConfig};
    // Multiply-adds from parity/../scripts/count_macs.py (hooks on PyTorch's conv and linear layers).
    let cases = [
        ("resnet50", 16_530_280, 2_821_537_792, 25_557_032, 4_089_184_256),
        ("resnet18", 4_161_704, 613_863_424, 11_689_512, 1_814_073_344),
    ];
    for (arch, params, macs, plain_params, plain_macs) in cases {
        let config = ResNetConfig::named(arch, true).unwrap();
        let rows = info::network_costs(&config, 224, 224);
        assert_eq!(totals(&rows), (params, macs, plain_params, plain_macs), "{arch}");
        let vs = VarStore::new(Device::Cpu);
        resnet(vs.root(), &config).unwrap();
        let built: i64 = vs.trainable_variables().iter().map(|t| t.numel() as i64).sum();
        assert_eq!(built, params, "{arch}: info and the built network agree");
    }
}

#[test]
fn the_cli_prints_a_network_table_against_its_plain_twin() {
    let bin = common::bin();
    let out = Command::new(&bin).args(["info", "--arch", "resnet50", "--sc"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("layer4.0.conv2"), "{text}");
    let total = text.lines().find(|l| l.starts_with("total")).unwrap();
    let numbers: Vec<&str> = total.split_whitespace().skip(1).collect();
    assert_eq!(numbers, ["16530280", "2821537792", "25557032", "4089184256"]);
    assert!(text.contains("0.647x the parameters"), "{text}");
}

#[test]
fn bench_reports_every_resnet50_shape_as_json() {
    // Structure only: timings are measurements, never assertions.
    let bin = common::bin();
    let args = ["bench", "--runs", "1", "--warmup", "0", "--batches", "1", "--no-models", "--json"];
    let out = Command::new(&bin).args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let shapes: Vec<(i64, i64)> = json["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["channels"].as_i64().unwrap(), b["size"].as_i64().unwrap()))
        .collect();
    assert_eq!(shapes, [(64, 56), (128, 28), (256, 14), (512, 7)]);
    assert!(json["blocks"][0]["scconv"]["median_ms"].as_f64().is_some());
    // The CLI's malloc is mimalloc for libtorch's allocations too (checked on a live tensor), so the
    // figures are those of the allocator the CLI runs with.
    let allocator = json["allocator"].as_str().unwrap();
    assert!(
        allocator.starts_with("mimalloc") && allocator.contains("libtorch's allocations included"),
        "{allocator}"
    );
    // ... and keeps freed memory for the next forward (mimalloc's default purges it after 10 ms).
    assert!(allocator.contains("freed memory kept"), "{allocator}");
    // On the CPU in fp32, each shape also times the inference form's ScConv step against the form's
    // own 3x3 conv, in fp32 and bf16 (native or emulated, as the arithmetic says).
    for block in json["blocks"].as_array().unwrap() {
        let form = block["form"].as_array().expect("form rows");
        let arithmetic: Vec<&str> = form.iter().map(|f| f["arithmetic"].as_str().unwrap()).collect();
        assert_eq!(arithmetic.len(), 2, "{arithmetic:?}");
        assert!(arithmetic[0] == "fp32" && arithmetic[1].starts_with("bf16"), "{arithmetic:?}");
        assert!(form.iter().all(|f| f["scconv_step"]["median_ms"].as_f64().is_some()
            && f["conv3x3"]["median_ms"].as_f64().is_some()));
        // The seed's version runs the channels-last step, as the form runs it.
        assert!(form.iter().all(|f| f["channels_last"] == true), "{form:?}");
    }
}

#[test]
fn bench_times_the_networks_at_the_batches_given() {
    // Structure only: one timed run of each network and mode at batch 1.
    let bin = common::bin();
    let args = ["bench", "--runs", "1", "--warmup", "0", "--batches", "1", "--json"];
    let out = Command::new(&bin).args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let networks = json["networks"].as_array().unwrap();
    let names: std::collections::BTreeSet<&str> =
        networks.iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert!(names.contains("resnet50") && names.contains("sc_resnet50 (inference)"), "{names:?}");
    for n in networks {
        assert_eq!(n["batch"], 1, "{n}");
    }
}

#[test]
fn bench_times_the_scconv_version_it_is_given() {
    let dir = common::scratch_dir("bench-scconv");
    let settings = dir.join("v2023_10_19.json");
    std::fs::write(&settings, r#"{"variant": "2023-10-19", "fuse": "paper"}"#).unwrap();
    let bin = common::bin();
    let args =
        ["bench", "--runs", "1", "--warmup", "0", "--batches", "1", "--no-models", "--json", "--scconv"];
    let out = Command::new(&bin).args(args).arg(&settings).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let variants: Vec<&str> =
        json["blocks"].as_array().unwrap().iter().map(|b| b["variant"].as_str().unwrap()).collect();
    assert_eq!(variants, ["2023-10-19"; 4]);
    // A block config (with its channel count) is not a network's settings: said, exit 2.
    std::fs::write(&settings, r#"{"op_channel": 64, "variant": "2023-10-19"}"#).unwrap();
    let out = Command::new(&bin).args(args).arg(&settings).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("unknown field `op_channel`"), "{stderr}");
}

#[test]
fn a_users_mimalloc_purge_delay_wins_over_the_clis() {
    // Also proves that the option the CLI sets and reads is the one MIMALLOC_PURGE_DELAY names.
    let bin = common::bin();
    let args = ["bench", "--runs", "1", "--warmup", "0", "--batches", "1", "--no-models", "--json"];
    let out = Command::new(&bin).args(args).env("MIMALLOC_PURGE_DELAY", "250").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let allocator = json["allocator"].as_str().unwrap();
    assert!(allocator.contains("freed memory purged after 250 ms"), "{allocator}");
}
