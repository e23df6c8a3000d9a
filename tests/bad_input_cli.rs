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
        let stored = zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored);
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
            "at least 1".into(),
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
            "--batch must be at least 1".into(),
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
