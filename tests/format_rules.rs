//! What the formats forbid, refused before anything is built (issue 29): JSON files bounded in size,
//! parsed typed (a key given twice is refused by name), and the models they describe bounded in
//! parameters and activations; safetensors files held to the format's layout rules. The inputs that
//! made the process ask for gigabytes before run in a child under a 4 GiB address-space limit, so a
//! regression fails here instead of taking the machine.
mod common;

use common::{bin, scratch_dir};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const ADDRESS_SPACE: u64 = 4 << 30;

/// The CLI with `args`, in a child limited to `ADDRESS_SPACE`.
fn limited(args: &[&str]) -> Output {
    let mut command = Command::new(bin());
    common::limit_address_space(command.args(args), ADDRESS_SPACE).output().expect("cannot run scconv-tch")
}

/// `scconv-tch info FLAG PATH` (`--scconv` or `--model`), limited as above.
fn info(flag: &str, path: &Path) -> Output {
    limited(&["info", flag, path.to_str().unwrap()])
}

/// Exit 2 and one `error:` line that says `expected` (no signal death, no allocation failure).
fn assert_refused(output: &Output, expected: &str, case: &str) {
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{case}: {:?} {err}", output.status);
    assert_eq!(err.trim_end().lines().count(), 1, "{case}: one line:\n{err}");
    assert!(err.starts_with("error: ") && err.contains(expected), "{case}: `{expected}` not in {err}");
}

fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// A training record around `config` (what `infer --model` reads).
fn record(config: &str) -> String {
    format!(
        r#"{{"name": "n", "config": {config}, "weights": "w.safetensors", "test_accuracy": 0.9,
            "parameters": 1, "torch_version": "2.11.0", "test_predictions": []}}"#
    )
}

#[test]
fn a_record_asking_for_ten_million_blocks_is_refused_naming_the_field() {
    let dir = scratch_dir("format-rules-blocks");
    let config = r#"{"block": "basic", "layers": [10000000, 1, 1], "widths": [32, 64, 128], "num_classes": 10,
                     "in_channels": 1, "small_input": true, "sc": true}"#;
    let path = write(&dir, "record.json", record(config));
    let out = limited(&["infer", "--model", path.to_str().unwrap(), "--data", "sample"]);
    assert_refused(&out, "layers: 10000002 residual blocks in all, more than the 1000", "10^7 blocks");
}

#[test]
fn networks_past_the_parameter_and_activation_bounds_are_refused_before_building() {
    let dir = scratch_dir("format-rules-size");
    for (config, says) in [
        (r#"{"block": "basic", "layers": [2, 2], "widths": [8192, 16384], "sc": false}"#, "parameters"),
        (
            r#"{"block": "basic", "layers": [2], "widths": [64], "num_classes": 2000000}"#,
            "num_classes: 2000000",
        ),
        (r#"{"block": "basic", "layers": [2], "widths": [100000]}"#, "widths: a stage 100000 channels wide"),
        (
            r#"{"block": "bottleneck", "layers": [900], "widths": [64], "small_input": false}"#,
            "activation values",
        ),
    ] {
        let path = write(&dir, "record.json", record(config));
        let out = limited(&["infer", "--model", path.to_str().unwrap(), "--data", "sample"]);
        assert_refused(&out, says, config);
    }
    // The bounds leave the real networks alone: ResNet-101 and SC-ResNet-101 are described.
    for args in [&["info", "--arch", "resnet101"][..], &["info", "--arch", "resnet101", "--sc"]] {
        let out = Command::new(bin()).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn a_block_config_with_a_huge_array_is_refused_without_allocating() {
    let dir = scratch_dir("format-rules-array");
    // 40 MB: past the size bound, refused unread.
    let numbers = "1,".repeat(20_000_000);
    let big = write(&dir, "big.json", format!(r#"{{"op_channel": [{numbers}1]}}"#));
    assert_refused(&info("--scconv", &big), "larger than 1048576 bytes", "40 MB");
    // 600 kB: within it, refused at the array's first bracket.
    let numbers = "1,".repeat(300_000);
    let small = write(&dir, "small.json", format!(r#"{{"op_channel": [{numbers}1]}}"#));
    assert_refused(&info("--scconv", &small), "invalid type: sequence, expected i64", "600 kB");
}

#[test]
fn a_key_given_twice_is_refused_by_name() {
    let dir = scratch_dir("format-rules-duplicates");
    let block = write(&dir, "block.json", r#"{"op_channel": 32, "group_num": 4, "op_channel": 64}"#);
    assert_refused(&info("--scconv", &block), "duplicate field `op_channel`", "block");
    let setting = write(&dir, "setting.json", r#"{"op_channel": 32, "alpha": 0.5, "alpha": 0.25}"#);
    assert_refused(&info("--scconv", &setting), "duplicate field `alpha`", "setting");
    let network = r#"{"block": "basic", "layers": [1], "widths": [32], "widths": [64]}"#;
    let path = write(&dir, "record.json", record(network));
    assert_refused(&info("--model", &path), "duplicate field `widths`", "network");
    let twice = record(r#"{"block": "basic", "layers": [1], "widths": [32]}"#).replacen(
        r#""name": "n","#,
        r#""name": "n", "name": "m","#,
        1,
    );
    let path = write(&dir, "twice.json", twice);
    assert_refused(&info("--model", &path), "duplicate field `name`", "record");
}

#[test]
fn a_block_past_the_parameter_bound_is_refused_before_building() {
    let dir = scratch_dir("format-rules-block-size");
    let config = write(&dir, "c.json", r#"{"op_channel": 65536}"#);
    let out = dir.join("block.pt");
    let output = limited(&["export", "--scconv", config.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_refused(&output, "op_channel 65536: the block would hold", "C = 65536");
    assert!(!out.exists());
}

/// A safetensors file: `header` (JSON) then `data`.
fn safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

#[test]
fn safetensors_files_the_format_forbids_are_refused() {
    let dir = scratch_dir("format-rules-safetensors");
    let a = r#""a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}"#;
    let data = [0u8; 16];
    let cases = [
        (
            "one name twice, the second pointing elsewhere",
            format!(
                r#"{{{a}, "b": {{"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, "a": {{"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}}}"#
            ),
            &data[..],
            "the tensor name a appears twice",
        ),
        (
            "overlapping offsets",
            format!(r#"{{{a}, "b": {{"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}}}"#),
            &data[..12],
            "invalid offset for tensor b: its data (4, 12) overlaps the tensor before it",
        ),
        (
            "a gap",
            format!(r#"{{{a}, "b": {{"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}}}}"#),
            &data[..],
            "invalid offset for tensor b: its data (12, 16) leaves a gap",
        ),
        ("bytes after the last tensor", format!("{{{a}}}"), &data[..], "the tensors cover 8 of the 16 bytes"),
    ];
    for (case, header, data, says) in cases {
        let path = write(&dir, "w.safetensors", safetensors(&header, data));
        let err = scconv_tch::weights::read(&path).map(|t| format!("read {} tensors", t.len()));
        let err = err.expect_err(case).to_string();
        assert!(err.contains(says), "{case}: {err}");
    }
    // What the format allows still reads: end to end, in any order in the header, with metadata.
    let header = format!(
        r#"{{"__metadata__": {{"format": "pt"}}, "b": {{"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, {a}}}"#
    );
    let path = write(&dir, "ok.safetensors", safetensors(&header, &data));
    assert_eq!(scconv_tch::weights::read(&path).unwrap().len(), 2);
}
