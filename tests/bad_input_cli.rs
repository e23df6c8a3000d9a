//! The bad-input corpus through every subcommand: each case is a broken file or argument, and each must
//! give exit status 2 and one line on stderr that starts with `error: ` and names the problem (and the
//! file, field or tensor), with no panic message, no libtorch stack frames, and nothing written.
//! (Library-level cases are in tests/bad_input.rs, fuzzing in tests/fuzz_readers.rs.)
mod common;

use scconv_tch::harness::parity::committed_fixtures;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Kind, Tensor};

struct Corpus {
    dir: PathBuf,
}

impl Corpus {
    fn new(name: &str) -> Corpus {
        Corpus { dir: common::scratch_dir(name) }
    }

    fn file(&self, name: &str, bytes: &[u8]) -> String {
        let path = self.dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&path, bytes).unwrap();
        path.display().to_string()
    }

    fn folder(&self, name: &str) -> String {
        let path = self.dir.join(name);
        std::fs::create_dir_all(&path).unwrap();
        path.display().to_string()
    }

    /// The group_num_4 fixture's state dict, edited, saved as safetensors.
    fn state_dict(&self, name: &str, edit: impl FnOnce(&mut BTreeMap<String, Tensor>)) -> String {
        let fixture = committed_fixtures().join("group_num_4.safetensors");
        let mut tensors: BTreeMap<String, Tensor> =
            scconv_tch::weights::read(fixture).unwrap().into_iter().collect();
        edit(&mut tensors);
        let path = self.dir.join(name);
        let list: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        Tensor::write_safetensors(&list, &path).unwrap();
        path.display().to_string()
    }

    /// A `torch.save`-style zip archive whose `data.pkl` is `pickle`.
    fn pt_with_pickle(&self, name: &str, pickle: &[u8]) -> String {
        use std::io::Write;
        let path = self.dir.join(name);
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        let stored =
            zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        zip.start_file("archive/data.pkl", stored).unwrap();
        zip.write_all(pickle).unwrap();
        zip.finish().unwrap();
        path.display().to_string()
    }

    /// An IDX split folder with these image-file bytes and 3 valid labels.
    fn idx_folder(&self, name: &str, images: &[u8]) -> String {
        let dir = self.folder(name);
        std::fs::write(Path::new(&dir).join("t10k-images-idx3-ubyte"), images).unwrap();
        std::fs::write(Path::new(&dir).join("t10k-labels-idx1-ubyte"), [0, 0, 8, 1, 0, 0, 0, 3, 1, 2, 3])
            .unwrap();
        dir
    }
}

fn png_bytes(width: u32, height: u32, rgb: bool) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    if rgb {
        image::RgbImage::from_pixel(width, height, image::Rgb([200, 10, 10]))
            .write_to(&mut out, image::ImageFormat::Png)
            .unwrap();
    } else {
        image::GrayImage::from_pixel(width, height, image::Luma([128]))
            .write_to(&mut out, image::ImageFormat::Png)
            .unwrap();
    }
    out.into_inner()
}

#[test]
fn every_subcommand_rejects_bad_input_on_one_line() {
    let c = Corpus::new("bad-input-cli");
    let good_config = c.file("good.json", br#"{"op_channel": 32, "group_num": 4}"#);
    let out = c.dir.join("out.pt").display().to_string();
    let existing = c.file("existing.pt", b"keep me");
    let sc_record = common::crate_dir().join("weights/fmnist_sc.json").display().to_string();
    let record_text = std::fs::read_to_string(&sc_record).unwrap();
    let idx_ok_header = [0u8, 0, 8, 3, 0, 0, 0, 3, 0, 0, 0, 28, 0, 0, 0, 28];

    let cases: Vec<(&str, Vec<String>, String)> = vec![
        // parity
        ("parity: folder without fixtures", vec!["parity".into(), c.folder("empty")], "manifest.json".into()),
        (
            "parity: manifest is not JSON",
            vec![
                "parity".into(),
                Path::new(&c.file("badman/manifest.json", b"{ not json"))
                    .parent()
                    .unwrap()
                    .display()
                    .to_string(),
            ],
            "manifest.json".into(),
        ),
        // info
        (
            "info: config file missing",
            vec!["info".into(), "--scconv".into(), c.dir.join("nope.json").display().to_string()],
            "nope.json".into(),
        ),
        (
            "info: config with an odd channel count",
            vec![
                "info".into(),
                "--scconv".into(),
                c.file("odd.json", br#"{"op_channel": 33, "group_num": 3}"#),
            ],
            "must be even".into(),
        ),
        (
            "info: config is not an object",
            vec!["info".into(), "--scconv".into(), c.file("string.json", br#""op_channel: 64""#)],
            "string.json".into(),
        ),
        (
            "info: unknown architecture",
            vec!["info".into(), "--arch".into(), "resnet51".into()],
            "resnet51".into(),
        ),
        (
            "info: truncated model record",
            vec!["info".into(), "--model".into(), c.file("record.json", &record_text.as_bytes()[..100])],
            "record.json".into(),
        ),
        // export
        (
            "export: output exists",
            vec!["export".into(), "--scconv".into(), good_config.clone(), "--out".into(), existing.clone()],
            "exists".into(),
        ),
        (
            "export: output is a folder",
            vec!["export".into(), "--scconv".into(), good_config.clone(), "--out".into(), c.folder("outdir")],
            "outdir: is a folder".into(),
        ),
        (
            "export: weights not safetensors at all",
            vec![
                "export".into(),
                "--scconv".into(),
                good_config.clone(),
                "--weights".into(),
                c.file("text.safetensors", b"hello, not tensors"),
                "--out".into(),
                out.clone(),
            ],
            "text.safetensors".into(),
        ),
        (
            "export: weights with an unknown extension",
            vec![
                "export".into(),
                "--scconv".into(),
                good_config.clone(),
                "--weights".into(),
                c.file("w.npz", b"x"),
                "--out".into(),
                out.clone(),
            ],
            "unknown weights format".into(),
        ),
        (
            "export: weights file missing",
            vec![
                "export".into(),
                "--scconv".into(),
                good_config.clone(),
                "--weights".into(),
                c.dir.join("gone.safetensors").display().to_string(),
                "--out".into(),
                out.clone(),
            ],
            "no such file".into(),
        ),
        (
            "export: weights path is a folder",
            vec![
                "export".into(),
                "--scconv".into(),
                good_config.clone(),
                "--weights".into(),
                c.folder("w.safetensors"),
                "--out".into(),
                out.clone(),
            ],
            "is a folder".into(),
        ),
        (
            "export: a tensor of an integer dtype",
            vec![
                "export".into(),
                "--scconv".into(),
                good_config.clone(),
                "--weights".into(),
                c.state_dict("int.safetensors", |t| {
                    let gamma = t["SRU.gn.gamma"].to_kind(Kind::Int64);
                    t.insert("SRU.gn.gamma".into(), gamma);
                }),
                "--out".into(),
                out.clone(),
            ],
            "wrong dtype for SRU.gn.gamma: Int64".into(),
        ),
        (
            "export: a tensor of the wrong shape",
            vec![
                "export".into(),
                "--scconv".into(),
                good_config.clone(),
                "--weights".into(),
                c.state_dict("shape.safetensors", |t| {
                    let bias = Tensor::zeros([31], (Kind::Float, tch::Device::Cpu));
                    t.insert("CRU.GWC.bias".into(), bias);
                }),
                "--out".into(),
                out.clone(),
            ],
            "size mismatch for CRU.GWC.bias".into(),
        ),
        (
            "export: a key missing and an extra one",
            vec![
                "export".into(),
                "--scconv".into(),
                good_config.clone(),
                "--weights".into(),
                c.state_dict("keys.safetensors", |t| {
                    let w = t.remove("CRU.PWC1.weight").unwrap();
                    t.insert("CRU.PWC3.weight".into(), w);
                }),
                "--out".into(),
                out.clone(),
            ],
            "does not match the model: missing keys: CRU.PWC1.weight; unexpected keys: CRU.PWC3.weight"
                .into(),
        ),
        // bench
        (
            "bench: a zero batch size",
            vec!["bench".into(), "--batches".into(), "0".into(), "--no-models".into()],
            "0 is not in 1..=4096".into(),
        ),
        // infer
        (
            "infer: record missing",
            vec!["infer".into(), "--model".into(), c.dir.join("none.json").display().to_string()],
            "none.json".into(),
        ),
        (
            "infer: zero batch",
            vec!["infer".into(), "--model".into(), sc_record.clone(), "--batch".into(), "0".into()],
            "0 is not in 1..=65536".into(),
        ),
        (
            "infer: IDX with a wrong magic number",
            vec![
                "infer".into(),
                "--model".into(),
                sc_record.clone(),
                "--data".into(),
                c.idx_folder("magic", &[1, 2, 3, 4, 5, 6, 7, 8]),
            ],
            "magic number".into(),
        ),
        (
            "infer: IDX with a short payload",
            vec![
                "infer".into(),
                "--model".into(),
                sc_record.clone(),
                "--data".into(),
                c.idx_folder("short", &[&idx_ok_header[..], &[0u8; 100][..]].concat()),
            ],
            "need 2352 bytes of data, the file has 100".into(),
        ),
        (
            "infer: folder without IDX files",
            vec!["infer".into(), "--model".into(), sc_record.clone(), "--data".into(), c.folder("noidx")],
            "no test images IDX file".into(),
        ),
        (
            "infer: a PNG that is not a PNG",
            vec![
                "infer".into(),
                "--model".into(),
                sc_record.clone(),
                "--png".into(),
                Path::new(&c.file("pngs/broken.png", b"\x89PNG but not really"))
                    .parent()
                    .unwrap()
                    .display()
                    .to_string(),
            ],
            "broken.png".into(),
        ),
        (
            "infer: PNG folder without PNGs",
            vec!["infer".into(), "--model".into(), sc_record.clone(), "--png".into(), c.folder("nopngs")],
            "no .png files".into(),
        ),
        (
            "infer: --png names a file",
            vec![
                "infer".into(),
                "--model".into(),
                sc_record.clone(),
                "--png".into(),
                c.file("single.png", &png_bytes(28, 28, false)),
            ],
            "single.png".into(),
        ),
        (
            "infer: record whose weights file is missing",
            vec![
                "infer".into(),
                "--model".into(),
                c.file("orphan/fmnist_sc.json", record_text.as_bytes()),
                "--data".into(),
                "sample".into(),
            ],
            "fmnist_sc.safetensors".into(),
        ),
    ];
    let mut cases = cases;
    let export_weights = |weights: String, extra: &[&str]| {
        let mut args: Vec<String> = vec!["export".into(), "--scconv".into(), good_config.clone()];
        args.extend(["--weights".into(), weights, "--out".into(), out.clone()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let pt_fixture = std::fs::read(committed_fixtures().join("group_num_4.pt")).unwrap();
    let later_version =
        scconv_tch::harness::parity::committed_version_fixtures().join("v2023_10_19.safetensors");
    cases.extend([
        (
            "export: weights of another ScConv version",
            export_weights(later_version.display().to_string(), &[]),
            "look like ScConv 2023-09-12 or later with torch_gn".to_string(),
        ),
        (
            "export: a pickle asking for a function",
            export_weights(
                c.pt_with_pickle("shell.pt", b"\x80\x02cposix\nsystem\nX\x02\x00\x00\x00ls\x85R."),
                &[],
            ),
            "asks for `posix.system`".into(),
        ),
        (
            "export: a whole pickled model",
            export_weights(
                c.pt_with_pickle("model.pt", b"\x80\x02cmodels.yolo\nDetectionModel\n)\x81."),
                &[],
            ),
            "pickled Python object of class `models.yolo.DetectionModel`".into(),
        ),
        (
            "export: --select matches no key",
            export_weights(
                committed_fixtures().join("group_num_4.safetensors").display().to_string(),
                &["--select", "backbone."],
            ),
            "no key starts with `backbone.`".into(),
        ),
        (
            "export: a DataParallel state dict without --select",
            export_weights(
                c.state_dict("dataparallel.safetensors", |t| {
                    *t = std::mem::take(t).into_iter().map(|(k, v)| (format!("module.{k}"), v)).collect();
                }),
                &[],
            ),
            "--select module.".into(),
        ),
        (
            "export: a truncated .pt file",
            export_weights(c.file("truncated.pt", &pt_fixture[..pt_fixture.len() / 2]), &[]),
            "truncated.pt".into(),
        ),
        (
            "export: a .pt holding a list, not a dict",
            export_weights(c.pt_with_pickle("list.pt", b"\x80\x02]q\x00(K\x01K\x02e."), &[]),
            "holds no dict at the top".into(),
        ),
    ]);
    assert!(cases.len() >= 32, "{} cases", cases.len());
    for (name, args, expected) in &cases {
        let output = Command::new(common::bin())
            .current_dir(common::crate_dir())
            .args(args)
            .env_remove("RUST_BACKTRACE")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{name}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{name}: one line expected:\n{err}");
        assert!(
            err.starts_with("error: ") && err.contains(expected.as_str()),
            "{name}: `{expected}` not in {err}"
        );
        assert!(!err.contains("panicked") && !err.contains("frame #"), "{name}: {err}");
        println!("{name}: {}", err.trim_end());
    }
    assert!(!Path::new(&out).exists(), "nothing written to the output path");
    assert_eq!(std::fs::read(&existing).unwrap(), b"keep me", "an existing output is left alone");
    let leftovers: Vec<_> = std::fs::read_dir(&c.dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    println!("{} bad inputs rejected on one line", cases.len());
}

/// A PNG that is not 28x28 grayscale is converted (to luma) and resized, as documented, not rejected.
#[test]
fn a_colour_png_of_another_size_is_converted_and_classified() {
    let c = Corpus::new("png-conversion");
    let dir = c.folder("colour");
    std::fs::write(Path::new(&dir).join("a.png"), png_bytes(40, 30, true)).unwrap();
    std::fs::write(Path::new(&dir).join("b.png"), png_bytes(28, 28, false)).unwrap();
    let record = common::crate_dir().join("weights/fmnist_sc.json");
    let output = Command::new(common::bin())
        .args(["infer", "--model", record.to_str().unwrap(), "--png", &dir])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}{}", String::from_utf8_lossy(&output.stderr));
    assert!(text.contains("a.png") && text.contains("b.png"), "{text}");
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(common::bin()).current_dir(common::crate_dir()).args(args).output().unwrap()
}

fn assert_one_error_line(output: &std::process::Output, expected: &str, case: &str) {
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{case}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{case}: one line expected:\n{err}");
    assert!(err.starts_with("error: ") && err.contains(expected), "{case}: `{expected}` not in {err}");
    assert!(!err.contains("panicked") && !err.contains("frame #"), "{case}: {err}");
}

/// clap's errors, numbers out of range, models past the bounds, and libtorch failures outside
/// `try_forward` all end as one `error:` line with exit 2; `--help` is not an error.
#[test]
fn argument_errors_and_libtorch_failures_are_one_line() {
    let c = Corpus::new("deaths");
    let huge = c.file("huge.json", br#"{"op_channel": 1099511627776}"#);
    let record_path = common::crate_dir().join("weights/fmnist_sc.json");
    let mut record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&record_path).unwrap()).unwrap();
    record["config"]["num_classes"] = serde_json::json!(1u64 << 34);
    record["weights"] = serde_json::json!(common::crate_dir().join("weights/fmnist_sc.safetensors"));
    let terabytes = c.file("terabytes.json", record.to_string().as_bytes());
    let out = c.dir.join("huge.pt").display().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec![], "a subcommand is needed"),
        (vec!["info", "--bogus"], "--bogus"),
        (vec!["info", "--channels", "64", "--arch", "resnet50"], "cannot be used with"),
        (vec!["bench", "--runs", "9223372036854775807"], "9223372036854775807"),
        (vec!["bench", "--batches", "100000"], "100000"),
        (vec!["info", "--size", "-56"], "-56"),
        (vec!["info", "--channels", "64", "--size", "0"], "0"),
        (vec!["info", "--channels", "1099511627776"], "1099511627776"),
        (vec!["infer", "--model", "weights/fmnist_sc.json", "--batch", "0"], "0"),
        (vec!["info", "--scconv", &huge], "more than any block can hold"),
        // Terabytes of `fc` weights: refused from the config, naming the field, before libtorch is asked.
        (vec!["export", "--model", &terabytes, "--out", &out], "num_classes: 17179869184 classes, more than"),
    ];
    for (args, expected) in &cases {
        assert_one_error_line(&run(args), expected, &format!("{args:?}"));
    }
    assert!(!Path::new(&out).exists());
    // Within the bounds but past the memory there is (a block of 4.9e8 parameters, 1.9 GB, under a
    // 4 GiB address-space limit that libtorch's own libraries take most of): libtorch's allocation
    // failure is one line too.
    let big_block = c.file("big_block.json", br#"{"op_channel": 16384}"#);
    let mut export = Command::new(common::bin());
    common::limit_address_space(export.args(["export", "--scconv", &big_block, "--out", &out]), 4 << 30);
    assert_one_error_line(
        &export.output().unwrap(),
        "libtorch failed",
        "an allocation past the address space",
    );
    assert!(!Path::new(&out).exists());
    let help = run(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("Usage"));
    let array = c.file("array.json", b"[64]");
    assert_one_error_line(
        &run(&["info", "--scconv", &array]),
        "expected a JSON object",
        "a JSON array config",
    );
}

/// A closed pipe ends the program quietly; a full device is an error line.
#[test]
fn closed_pipes_end_quietly_and_a_full_device_is_an_error() {
    let bin = common::bin();
    for command in ["info --arch resnet50 --sc", "parity", "info --channels 64 --json"] {
        let script =
            format!("'{bin}' {command} | head -c 1 >/dev/null; echo \"status=${{PIPESTATUS[0]}}\" >&2");
        let output =
            Command::new("bash").arg("-c").arg(&script).current_dir(common::crate_dir()).output().unwrap();
        let err = String::from_utf8_lossy(&output.stderr);
        let status_line = err.lines().last().unwrap_or("");
        assert!(status_line == "status=0" || status_line == "status=141", "{command}: {err}");
        assert_eq!(err.lines().count(), 1, "{command}: nothing but the status on stderr: {err}");
    }
    // A reader that closes the pipe before anything is written: the first write gets SIGPIPE.
    let script = format!(
        "'{bin}' info --arch resnet101 --sc | (exec 0<&-; sleep 1); echo \"status=${{PIPESTATUS[0]}}\" >&2"
    );
    let output = Command::new("bash").arg("-c").arg(&script).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.stderr).trim(),
        "status=141",
        "ended by SIGPIPE, nothing printed"
    );
    let script = format!("'{bin}' info --channels 64 > /dev/full");
    let output = Command::new("bash").arg("-c").arg(&script).output().unwrap();
    assert_one_error_line(&output, "No space left on device", "stdout to /dev/full");
}

/// The output writer through `export`: links, special files, long names, two writers (SIGINT and a
/// full disk have tests of their own below).
#[test]
fn export_writes_safely() {
    let c = Corpus::new("writer");
    let config = c.file("c.json", br#"{"op_channel": 32, "group_num": 4}"#);
    let export = |out: &Path, force: bool| {
        let mut args = vec!["export", "--scconv", &config, "--out", out.to_str().unwrap()];
        if force {
            args.push("--force");
        }
        run(&args)
    };
    let dangling = c.dir.join("dangling.pt");
    std::os::unix::fs::symlink(c.dir.join("nowhere"), &dangling).unwrap();
    assert_one_error_line(&export(&dangling, false), "a symlink is there", "dangling symlink");
    let fifo = c.dir.join("fifo.pt");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    assert_one_error_line(&export(&fifo, true), "not a regular file", "a FIFO with --force");
    assert_one_error_line(
        &export(Path::new("/dev/null"), true),
        "not a regular file",
        "a device with --force",
    );
    let long = c.dir.join(format!("{}.pt", "n".repeat(250)));
    assert!(export(&long, false).status.success(), "a 253-byte file name");

    for round in 0..3 {
        let target = c.dir.join(format!("race-{round}.pt"));
        let children: Vec<_> = (0..2)
            .map(|_| {
                Command::new(common::bin())
                    .args(["export", "--scconv", &config, "--out", target.to_str().unwrap()])
                    .stderr(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let outcomes: Vec<_> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
        let successes = outcomes.iter().filter(|o| o.status.success()).count();
        assert_eq!(successes, 1, "round {round}: exactly one of two writers succeeds");
        let loser = outcomes.iter().find(|o| !o.status.success()).unwrap();
        assert!(String::from_utf8_lossy(&loser.stderr).contains("exists"), "round {round}");
        tch::CModule::load(&target).expect("the file holds a whole module");
    }

    let partial = partial_files(&c.dir);
    assert!(partial.is_empty(), "temporary files left: {partial:?}");
}

/// The `.partial` files in `dir`.
fn partial_files(dir: &Path) -> Vec<PathBuf> {
    let entries =
        std::fs::read_dir(dir).map(|d| d.filter_map(|e| e.ok()).collect::<Vec<_>>()).unwrap_or_default();
    entries.into_iter().map(|e| e.path()).filter(|p| p.to_string_lossy().ends_with(".partial")).collect()
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: signals our own child, which has not been reaped yet.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, sig) }, 0, "kill({pid}, {sig})");
}

/// SIGINT while the export writes: sent once its temporary file exists (the child stopped with
/// SIGSTOP, the file checked to be still there, then SIGINT and SIGCONT), so the interruption lands
/// mid-write every time. It must exit with 130, say so on one line, and leave no file behind: no
/// target, no temporary file beside it, no staged module in its temporary folder.
#[test]
fn sigint_during_a_write_exits_130_and_leaves_nothing() {
    let c = Corpus::new("sigint");
    // ~16M parameters: a 64 MB module, long enough to write that the stop lands while it is written.
    let big = c.file("big.json", br#"{"op_channel": 4096}"#);
    let tmp = c.folder("tmp");
    let mut interrupted = 0;
    for attempt in 0..5 {
        let target = c.dir.join(format!("interrupted-{attempt}.pt"));
        let child = Command::new(common::bin())
            .args(["export", "--scconv", &big, "--out", target.to_str().unwrap()])
            .env("TMPDIR", &tmp)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while partial_files(&c.dir).is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        // Past the temporary file's creation and its registration for removal (a few instructions).
        std::thread::sleep(std::time::Duration::from_millis(2));
        signal(pid, libc::SIGSTOP);
        let mid_write = !partial_files(&c.dir).is_empty();
        if mid_write {
            signal(pid, libc::SIGINT);
        }
        signal(pid, libc::SIGCONT);
        let output = child.wait_with_output().unwrap();
        if !mid_write {
            assert!(output.status.success(), "attempt {attempt}: {output:?}");
            println!("attempt {attempt}: the write had finished before the stop; again");
            std::fs::remove_file(&target).unwrap();
            continue;
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(130), "attempt {attempt}: {output:?}");
        assert_eq!(stderr.trim_end(), "error: interrupted", "attempt {attempt}");
        assert!(!target.exists(), "an interrupted export leaves no target");
        assert_eq!(partial_files(&c.dir), Vec::<PathBuf>::new(), "temporary files left beside the target");
        let staged: Vec<_> =
            std::fs::read_dir(&tmp).unwrap().filter_map(|e| e.ok()).map(|e| e.path()).collect();
        assert!(staged.is_empty(), "staged files left in TMPDIR: {staged:?}");
        interrupted += 1;
        break;
    }
    assert_eq!(interrupted, 1, "no attempt caught the export mid-write");
}

/// An export to a full disk: one error line, nothing left there. The disk is a 256 KiB tmpfs mounted in
/// a mount namespace of the child's own (`unshare`: as root directly, else through a user namespace),
/// so the case runs wherever `make test` runs; where neither is allowed it fails saying so.
#[test]
fn an_export_to_a_full_disk_is_an_error_and_leaves_nothing() {
    let c = Corpus::new("full-disk");
    let config = c.file("big.json", br#"{"op_channel": 1024}"#);
    let mount = c.folder("small-tmpfs");
    let listing = c.dir.join("listing.txt");
    let script = r#"mount -t tmpfs -o size=256k tmpfs "$1" || exit 97
"$2" export --scconv "$3" --out "$1/block.pt"; code=$?
ls -A "$1" > "$4"; exit $code"#;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let namespaces: &[&str] = if root { &["--mount"] } else { &["--user", "--map-root-user", "--mount"] };
    let output = Command::new("unshare")
        .args(namespaces)
        .args(["sh", "-c", script, "sh", &mount, &common::bin(), &config, listing.to_str().unwrap()])
        .output()
        .expect("cannot run unshare (util-linux)");
    assert_ne!(
        output.status.code(),
        Some(97),
        "cannot mount a tmpfs in a private mount namespace here: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_one_error_line(&output, "No space left on device", "export to a full disk");
    let left = std::fs::read_to_string(&listing).expect("the listing of the full disk");
    assert_eq!(left.trim(), "", "nothing left on the full disk");
}

/// Results that say what they are, bounded work before validation, and messages that name what is
/// wrong (reliability classes 3 to 5).
#[test]
fn honest_results_bounded_reads_and_named_problems() {
    use flate2::{write::GzEncoder, Compression};
    use std::io::Write;
    let c = Corpus::new("honest");
    let sc_record = common::crate_dir().join("weights/fmnist_sc.json").display().to_string();
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&sc_record).unwrap()).unwrap();
    let weights = common::crate_dir().join("weights/fmnist_sc.safetensors");

    // A record holding 10 PyTorch predictions, for 1,000 sample images: no agreement figure.
    let mut short = record.clone();
    short["test_predictions"] = serde_json::json!(record["test_predictions"].as_array().unwrap()[..10]);
    short["weights"] = serde_json::json!(weights.display().to_string());
    let short_record = c.file("short.json", short.to_string().as_bytes());
    let output = run(&["infer", "--model", &short_record, "--data", "sample"]);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}");
    assert!(
        !text.contains("1000/1000") && text.contains("holds 10 PyTorch predictions for 1000 images"),
        "{text}"
    );

    let header =
        |n: u32| [&[0u8, 0, 8, 3][..], &n.to_be_bytes(), &28u32.to_be_bytes(), &28u32.to_be_bytes()].concat();
    let empty = c.idx_folder("no-images", &header(0));
    assert_one_error_line(
        &run(&["infer", "--model", &sc_record, "--data", &empty]),
        "hold no images",
        "0 images",
    );

    // A gzip bomb: a valid header for 3 images, then 64 MB more of zeros (64 KB compressed).
    let mut bomb = GzEncoder::new(Vec::new(), Compression::best());
    bomb.write_all(&header(3)).unwrap();
    bomb.write_all(&vec![0u8; 64 << 20]).unwrap();
    let bomb_dir = c.folder("bomb");
    std::fs::write(Path::new(&bomb_dir).join("t10k-images-idx3-ubyte.gz"), bomb.finish().unwrap()).unwrap();
    std::fs::write(Path::new(&bomb_dir).join("t10k-labels-idx1-ubyte"), [0, 0, 8, 1, 0, 0, 0, 3, 1, 2, 3])
        .unwrap();
    let output = run(&["infer", "--model", &sc_record, "--data", &bomb_dir]);
    assert_one_error_line(&output, "need 2352 bytes of data, the file has more", "an IDX gzip bomb");

    // A file named like the images next to the real IDX pair: the IDX-named one is read.
    let real = c.idx_folder("decoy", &[header(3), vec![7u8; 3 * 28 * 28]].concat());
    std::fs::write(Path::new(&real).join("images-notes.txt"), b"not an IDX file").unwrap();
    let output = run(&["infer", "--model", &sc_record, "--data", &real]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    let pngs = c.folder("fifo-png");
    assert!(Command::new("mkfifo").arg(Path::new(&pngs).join("blocks.png")).status().unwrap().success());
    let output = run(&["infer", "--model", &sc_record, "--png", &pngs]);
    assert_one_error_line(&output, "blocks.png: is not a regular file", "a FIFO named *.png");

    let config = c.file("c.json", br#"{"op_channel": 32, "group_num": 4}"#);
    let output =
        run(&["export", "--model", &sc_record, "--weights", weights.to_str().unwrap(), "--out", "/tmp/x.pt"]);
    assert_one_error_line(&output, "cannot be used with", "--weights with --model does nothing");

    // A fixture tensor of the wrong shape: the case and the tensor are named.
    let fixtures = c.folder("wrong-shape");
    let source = committed_fixtures();
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("manifest.json")).unwrap()).unwrap();
    let mut case =
        manifest["cases"].as_array().unwrap().iter().find(|c| c["name"] == "group_num_4").unwrap().clone();
    let mut tensors: BTreeMap<String, Tensor> =
        scconv_tch::weights::read(source.join("group_num_4.tensors.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let output_tensor = tensors["output"].narrow(3, 0, 5).contiguous();
    tensors.insert("output".into(), output_tensor);
    let list: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    Tensor::write_safetensors(&list, Path::new(&fixtures).join("t.safetensors")).unwrap();
    std::fs::copy(
        source.join("group_num_4.safetensors"),
        Path::new(&fixtures).join("group_num_4.safetensors"),
    )
    .unwrap();
    case["tensors"] = serde_json::json!("t.safetensors");
    let mut manifest = manifest.clone();
    manifest["cases"] = serde_json::json!([case]);
    std::fs::write(Path::new(&fixtures).join("manifest.json"), manifest.to_string()).unwrap();
    let output = run(&["parity", &fixtures]);
    assert_one_error_line(
        &output,
        "case group_num_4: tensor `output` has shape [2, 32, 12, 5]",
        "a wrong-shaped fixture",
    );

    // Control characters in a tensor name are shown escaped, not sent to the terminal.
    let ansi = c.state_dict("ansi.safetensors", |t| {
        let gamma = t.remove("SRU.gn.gamma").unwrap();
        t.insert("SRU.gn.gamma\u{1b}[31m\r".into(), gamma);
    });
    let output = run(&["export", "--scconv", &config, "--weights", &ansi, "--out", "/tmp/never.pt"]);
    assert_one_error_line(&output, "SRU.gn.gamma\\u{1b}[31m\\r", "escape codes in a key");
    assert!(!output.stderr.contains(&0x1b));
}
