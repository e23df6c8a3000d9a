//! The `scconv-tch` binary as a user runs it.
mod common;

use common::scratch_dir;
use scconv_tch::harness::parity::committed_fixtures;
use scconv_tch::weights;
use std::process::{Command, Output};
use tch::Tensor;

fn scconv_tch(args: &[&str]) -> Output {
    let bin = common::bin();
    Command::new(bin).args(args).output().expect("cannot run scconv-tch")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn parity_passes_on_the_committed_fixtures_and_prints_the_table() {
    let out = scconv_tch(&["parity"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    assert!(
        text.contains("case")
            && text.contains("max|Δout|")
            && text.contains("flips")
            && text.contains("verdict"),
        "{text}"
    );
    assert!(text.contains("c512_7x7_b4") && text.contains("non_square_12x20"), "{text}");
    assert!(text.contains("14 of 14 cases pass"), "{text}");
    assert!(!text.contains("FAIL"), "{text}");
}

#[test]
fn parity_json_is_machine_readable() {
    let out = scconv_tch(&["parity", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(json["passed"], true);
    assert_eq!(json["cases"].as_array().unwrap().len(), 14);
    assert_eq!(json["cases"][0]["gate"]["flips_outside_band"], 0);
}

#[test]
fn parity_on_a_missing_folder_is_a_clear_error() {
    let out = scconv_tch(&["parity", "/nonexistent/fixtures"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("reading fixtures in /nonexistent/fixtures"), "{err}");
    assert!(err.contains("manifest.json"), "{err}");
}

#[test]
fn parity_fails_with_a_non_zero_exit_when_an_output_is_off() {
    // One committed case whose reference output is moved by 1e-4 of its largest value.
    let source = committed_fixtures();
    let dir = scratch_dir("tampered");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("manifest.json")).unwrap()).unwrap();
    let case =
        manifest["cases"].as_array().unwrap().iter().find(|c| c["name"] == "group_num_4").unwrap().clone();
    std::fs::copy(source.join("group_num_4.safetensors"), dir.join("group_num_4.safetensors")).unwrap();
    let mut tensors = weights::read(source.join("group_num_4.tensors.safetensors")).unwrap();
    let output = tensors.iter_mut().find(|(k, _)| k == "output").map(|(_, t)| t).unwrap();
    let shift = output.abs().max().double_value(&[]) * 1e-4;
    *output = &*output + shift;
    Tensor::write_safetensors(&tensors, dir.join("group_num_4.tensors.safetensors")).unwrap();
    let tampered = serde_json::json!({ "torch_version": manifest["torch_version"], "device": "cpu", "seed": 0, "cases": [case] });
    std::fs::write(dir.join("manifest.json"), tampered.to_string()).unwrap();

    let out = scconv_tch(&["parity", dir.to_str().unwrap()]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}{}", stderr(&out));
    assert!(text.contains("group_num_4") && text.contains("FAIL"), "{text}");
    assert!(text.contains("0 of 1 cases pass"), "{text}");
}

#[test]
fn parity_on_cuda_runs_there_or_says_there_is_no_gpu() {
    let out = scconv_tch(&["parity", "--device", "cuda"]);
    if tch::Cuda::is_available() {
        assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
        assert!(stdout(&out).contains("Rust on Cuda(0)"));
    } else {
        assert!(!out.status.success());
        assert!(stderr(&out).contains("libtorch sees no CUDA device"), "{}", stderr(&out));
    }
}

#[test]
fn help_lists_the_parity_subcommand() {
    let out = scconv_tch(&["--help"]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("parity"), "{}", stdout(&out));
}

#[test]
fn export_writes_torchscript_and_refuses_to_overwrite_without_force() {
    let out = common::scratch_dir("cli-export").join("fmnist_sc.pt");
    let record = common::crate_dir().join("weights/fmnist_sc.json");
    let args = ["export", "--model", record.to_str().unwrap(), "--out", out.to_str().unwrap()];
    let first = scconv_tch(&args);
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(stdout(&first).contains("traced at [1, 1, 28, 28]"), "{}", stdout(&first));
    assert!(tch::CModule::load(&out).is_ok());
    let second = scconv_tch(&args);
    assert!(!second.status.success());
    assert!(stderr(&second).contains("the file exists; pass --force"), "{}", stderr(&second));
    let forced = scconv_tch(&[&args[..], &["--force"]].concat());
    assert!(forced.status.success(), "{}", stderr(&forced));
}

#[test]
fn errors_are_one_line_without_stack_frames_and_exit_2() {
    let dir = common::scratch_dir("cli-errors");
    let config = dir.join("c128.json");
    std::fs::write(&config, r#"{"op_channel": 128}"#).unwrap();
    let weights = committed_fixtures().join("c64_56x56_b1.safetensors");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "export".into(),
                "--model".into(),
                "weights/fmnist_sc.json".into(),
                "--out".into(),
                "/nonexistent/dir/x.pt".into(),
            ],
            "the folder /nonexistent/dir does not exist",
        ),
        (
            vec![
                "export".into(),
                "--scconv".into(),
                config.display().to_string(),
                "--weights".into(),
                weights.display().to_string(),
                "--out".into(),
                dir.join("b.pt").display().to_string(),
            ],
            "size mismatch for CRU.GWC.weight: the model has [128, 16, 3, 3], the state dict [64, 8, 3, 3]",
        ),
    ];
    for (args, expected) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = Command::new(common::bin())
            .current_dir(common::crate_dir())
            .args(&args)
            .env_remove("RUST_BACKTRACE")
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert!(err.starts_with("error: ") && err.contains(expected), "{err}");
        assert!(!err.contains("frame #"), "{err}");
    }
    assert!(!dir.join("b.pt").exists() && !dir.join(".b.pt.partial").exists(), "nothing half-written");
}

#[test]
fn bad_config_and_weights_files_name_the_problem() {
    let dir = common::scratch_dir("cli-bad-files");
    let write = |name: &str, text: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let missing = write("missing.json", br#"{"alpha": 0.5}"#);
    let unknown = write("unknown.json", br#"{"op_channel": 64, "squeeze_ratio": 2}"#);
    let ill_typed = write("ill_typed.json", br#"{"op_channel": "64"}"#);
    let good = write("good.json", br#"{"op_channel": 64}"#);
    let full = std::fs::read(committed_fixtures().join("c64_56x56_b1.safetensors")).unwrap();
    let truncated = write("truncated.safetensors", &full[..full.len() / 2]);
    let out_file = dir.join("x.pt").display().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["info", "--scconv", &missing], "missing field `op_channel`"),
        (vec!["info", "--scconv", &unknown], "unknown field `squeeze_ratio`"),
        (vec!["info", "--scconv", &ill_typed], "invalid type: string \"64\", expected i64"),
        (
            vec!["export", "--scconv", &good, "--weights", &truncated, "--out", &out_file],
            "truncated.safetensors",
        ),
    ];
    for (args, expected) in cases {
        let out = scconv_tch(&args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
    assert!(!dir.join("x.pt").exists());
}
