//! `scconv-tch infer` with the PyTorch-trained Fashion-MNIST networks in weights/.
mod common;

use common::{crate_dir, scratch_dir};
use scconv_tch::harness::data;
use std::process::{Command, Output};

fn scconv_tch(args: &[&str]) -> Output {
    let bin = common::bin();
    Command::new(bin).current_dir(crate_dir()).args(args).output().expect("cannot run scconv-tch")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn both_networks_agree_with_pytorch_on_every_sample_image() {
    let out = scconv_tch(&[
        "infer",
        "--model",
        "weights/fmnist_sc.json",
        "--model",
        "weights/fmnist_plain.json",
        "--data",
        "sample",
    ]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("1000 images"), "{t}");
    assert_eq!(t.matches("1000/1000 (100.00%)").count(), 2, "100% agreement for both networks:\n{t}");
    assert!(!t.contains("Rust says"), "no disagreement may be listed:\n{t}");
}

/// The JSON's scores: images, correct (the accuracy's numerator, counted here from the sample's labels
/// and PyTorch's recorded predictions, which agree with ours on every image), agreement, predictions.
#[test]
fn json_output_carries_accuracy_and_agreement() {
    let out = scconv_tch(&["infer", "--model", "weights/fmnist_sc.json", "--data", "sample", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    let run = &json["runs"][0];
    let record =
        scconv_tch::harness::infer::ModelRecord::read(&crate_dir().join("weights/fmnist_sc.json")).unwrap();
    let labels = data::read_idx_split(&data::sample_dir()).unwrap().labels.expect("the sample has labels");
    let correct = labels.iter().zip(&record.test_predictions).filter(|(l, p)| l == p).count();
    assert!((800..1000).contains(&correct), "a trained network's accuracy on the sample: {correct}");
    assert_eq!(run["scores"]["images"], 1000);
    assert_eq!(run["scores"]["correct"], correct, "{}", run["scores"]);
    assert_eq!(run["scores"]["agreeing"], 1000);
    assert_eq!(run["scores"]["disagreements"].as_array().map(Vec::len), Some(0));
    let predictions: Vec<i64> = serde_json::from_value(run["predictions"].clone()).unwrap();
    assert_eq!(predictions, record.test_predictions[..1000], "PyTorch's classes, image by image");
}

#[test]
fn png_images_get_the_same_classes_as_the_idx_pixels() {
    let sample = data::read_idx_split(&data::sample_dir()).unwrap();
    let dir = scratch_dir("png");
    for i in 0..5i64 {
        let pixels = Vec::<u8>::try_from(sample.pixels.get(i).flatten(0, -1)).unwrap();
        let image = image::GrayImage::from_raw(28, 28, pixels).unwrap();
        image.save(dir.join(format!("img{i}.png"))).unwrap();
    }
    let json_of = |args: &[&str]| -> serde_json::Value {
        let out = scconv_tch(args);
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let png =
        json_of(&["infer", "--model", "weights/fmnist_sc.json", "--png", dir.to_str().unwrap(), "--json"]);
    let idx = json_of(&["infer", "--model", "weights/fmnist_sc.json", "--data", "sample", "--json"]);
    let first5: Vec<_> = idx["runs"][0]["predictions"].as_array().unwrap()[..5].to_vec();
    assert_eq!(png["runs"][0]["predictions"].as_array().unwrap(), &first5);
    let table =
        text(&scconv_tch(&["infer", "--model", "weights/fmnist_sc.json", "--png", dir.to_str().unwrap()]));
    assert!(table.contains("img0.png: ") && table.contains("img4.png: "), "{table}");
}

#[test]
fn a_missing_record_or_image_folder_is_a_clear_error() {
    let out = scconv_tch(&["infer", "--model", "weights/nope.json", "--data", "sample"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("loading weights/nope.json"), "{}", text(&out));
    let out = scconv_tch(&["infer", "--model", "weights/fmnist_sc.json", "--data", "/nonexistent"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("reading images in /nonexistent"), "{}", text(&out));
    let empty = scratch_dir("png-empty");
    let out = scconv_tch(&["infer", "--model", "weights/fmnist_sc.json", "--png", empty.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("no .png files"), "{}", text(&out));
}

/// The README and `make demo` state 10,000/10,000: every image of the full test set gets PyTorch's class.
#[test]
fn the_full_test_set_agrees_with_pytorch_on_every_image() {
    assert!(
        std::path::Path::new(data::DEBIAN_DIR).join("t10k-images-idx3-ubyte.gz").exists(),
        "the full test set needs Debian's dataset-fashion-mnist: run scripts/setup_data.sh (make test does)"
    );
    for model in ["weights/fmnist_sc.json", "weights/fmnist_plain.json"] {
        let out = scconv_tch(&["infer", "--model", model, "--data", "full", "--json", "--batch", "500"]);
        assert!(out.status.success(), "{}", text(&out));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let scores = &json["runs"][0]["scores"];
        println!(
            "{model}: {}/10000 agree with PyTorch; disagreements {}",
            scores["agreeing"], scores["disagreements"]
        );
        assert_eq!(scores["images"], 10000);
        assert_eq!(scores["agreeing"], 10000, "{model}: disagreements {}", scores["disagreements"]);
    }
}

/// `--execution fast --decisions` counts, by layer, the fast mode's gate decisions that differ from
/// the reference mode's on the same images (the fast path keeps the reference's decisions block by
/// block; in a network each block's input differs in its last bits, so a decision at the gate's edge
/// may flip): every ScConv of the network listed, the count bounded, PyTorch's classes kept.
#[test]
fn fast_mode_counts_its_differing_decisions_by_layer() {
    let args = ["infer", "--model", "weights/fmnist_sc.json", "--data", "sample", "--execution", "fast"];
    let out = scconv_tch(&[&args[..], &["--decisions", "--json"]].concat());
    assert!(out.status.success(), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let run = &json["runs"][0];
    assert_eq!(run["scores"]["agreeing"], 1000);
    let layers = run["differing_decisions"].as_array().expect("decisions counted");
    let record =
        scconv_tch::harness::infer::ModelRecord::read(&crate_dir().join("weights/fmnist_sc.json")).unwrap();
    let model =
        scconv_tch::models::resnet(tch::nn::VarStore::new(tch::Device::Cpu).root(), &record.config).unwrap();
    let x = tch::Tensor::zeros([1, 1, 28, 28], (tch::Kind::Float, tch::Device::Cpu));
    let (_, gates) = tch::no_grad(|| model.forward_recording_gates(&x)).unwrap();
    let paths: Vec<&str> = layers.iter().map(|l| l["layer"].as_str().unwrap()).collect();
    assert_eq!(paths, gates.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(), "every ScConv, in order");
    let (differing, made) = layers
        .iter()
        .fold((0, 0), |(d, m), l| (d + l["differing"].as_i64().unwrap(), m + l["made"].as_i64().unwrap()));
    println!("fast mode: {differing} of {made} decisions differ from the reference mode's");
    assert!(made >= 1000 * 28 * 28, "decisions of every image: {made}");
    assert!(differing as f64 <= 1e-6 * made as f64, "{differing} of {made}");
    // The table on fifty images (a folder of its own: `first_images` empties it first): the same code
    // path as the JSON's thousand, a twentieth of the images.
    let fifty = first_images(50);
    let table = text(&scconv_tch(&[
        "infer",
        "--model",
        "weights/fmnist_sc.json",
        "--data",
        &fifty,
        "--execution",
        "fast",
        "--decisions",
    ]));
    assert!(table.contains("gate decisions differ from the reference mode"), "{table}");
    let refused =
        scconv_tch(&["infer", "--model", "weights/fmnist_sc.json", "--data", "sample", "--decisions"]);
    assert!(
        !refused.status.success() && text(&refused).contains("add --execution fast"),
        "{}",
        text(&refused)
    );
}

/// `--execution inference --precision bf16 --decisions`: the bf16 form's arithmetic named (emulated,
/// with a warning on stderr, exactly where the CPU has no bf16 units), its classes within the floor of
/// `tests/bf16_form.rs`, its logit difference and differing decisions reported by layer. `--precision`
/// without the inference form is refused.
#[test]
fn the_bf16_form_reports_its_arithmetic_and_its_differences() {
    let args = ["infer", "--model", "weights/fmnist_sc.json", "--data", "sample", "--execution", "inference"];
    let out = scconv_tch(&[&args[..], &["--precision", "bf16", "--decisions", "--json"]].concat());
    assert!(out.status.success(), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let run = &json["runs"][0];
    let arithmetic = run["arithmetic"].as_str().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    match scconv_tch::inference::bf16_support() {
        Ok(()) => {
            assert!(arithmetic.starts_with("bf16 (oneDNN") && !stderr.contains("warning"), "{arithmetic}")
        }
        Err(why) => {
            assert!(arithmetic.contains("emulated") && arithmetic.contains(&why), "{arithmetic}");
            assert!(
                stderr.contains("warning: the bf16 form runs emulated") && stderr.contains(&why),
                "{stderr}"
            );
        }
    }
    assert!(run["scores"]["agreeing"].as_i64().unwrap() >= 990, "{}", run["scores"]);
    let (diff, largest) =
        (run["max_logit_diff"].as_f64().unwrap(), run["max_reference_logit"].as_f64().unwrap());
    assert!(diff > 1e-4 * largest && diff < 0.1 * largest, "bf16's logits: {diff} of {largest}");
    let layers = run["differing_decisions"].as_array().unwrap();
    assert_eq!(layers.len(), 4, "every ScConv");
    assert!(
        layers.iter().all(|l| l["differing"].as_i64().unwrap() > 0),
        "bf16 flips decisions in every layer"
    );
    let refused = scconv_tch(&[
        "infer",
        "--model",
        "weights/fmnist_sc.json",
        "--data",
        "sample",
        "--precision",
        "bf16",
    ]);
    assert!(
        !refused.status.success() && text(&refused).contains("add --execution inference"),
        "{}",
        text(&refused)
    );
}

/// `--precision bf16-onednn`: oneDNN's bf16 kernels wherever libtorch takes bf16, with a warning where
/// oneDNN only emulates them (no bf16 units) and, where libtorch refuses bf16, the form emulated in fp32
/// with the bf16 form's warning; its classes within the floor of `tests/bf16_form.rs` either way.
#[test]
fn bf16_onednn_says_how_it_runs_on_this_cpu() {
    use scconv_tch::inference::{bf16_support, onednn_bf16_support};
    let args =
        ["infer", "--model", "weights/fmnist_plain.json", "--data", "sample", "--execution", "inference"];
    let out = scconv_tch(&[&args[..], &["--precision", "bf16-onednn", "--json"]].concat());
    assert!(out.status.success(), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let run = &json["runs"][0];
    let arithmetic = run["arithmetic"].as_str().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    match (onednn_bf16_support(), bf16_support()) {
        (Err(why), _) => assert!(
            arithmetic.contains(&why) && stderr.contains("warning: the bf16 form runs emulated"),
            "{arithmetic}: {stderr}"
        ),
        (Ok(()), Err(_)) => assert!(
            arithmetic.starts_with("bf16 (oneDNN") && stderr.contains("warning: this CPU has no bf16 units"),
            "{arithmetic}: {stderr}"
        ),
        (Ok(()), Ok(())) => {
            assert!(arithmetic.starts_with("bf16 (oneDNN") && !stderr.contains("warning"), "{arithmetic}")
        }
    }
    assert!(run["scores"]["agreeing"].as_i64().unwrap() >= 990, "{}", run["scores"]);
}

/// An IDX folder of the sample's first `n` images and labels (not the test set in file order to
/// `infer`: no agreement figure).
fn first_images(n: usize) -> String {
    let dir = scratch_dir(&format!("first-{n}-images"));
    let sample = data::sample_dir();
    for (from, to, header, size) in [
        ("t10k-images-first1000-idx3-ubyte.gz", "t10k-images-idx3-ubyte", 16, 28 * 28),
        ("t10k-labels-first1000-idx1-ubyte.gz", "t10k-labels-idx1-ubyte", 8, 1),
    ] {
        let mut bytes = Vec::new();
        let file = std::fs::File::open(sample.join(from)).unwrap();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(file), &mut bytes).unwrap();
        bytes.truncate(header + n * size);
        bytes[4..8].copy_from_slice(&(n as u32).to_be_bytes());
        std::fs::write(dir.join(to), bytes).unwrap();
    }
    dir.display().to_string()
}

/// `--compare`: every mode side by side for each network, in the table and in the JSON (on 100
/// images: a test's time).
#[test]
fn compare_puts_every_mode_side_by_side() {
    let dir = first_images(100);
    let args = ["infer", "--model", "weights/fmnist_sc.json", "--data", dir.as_str(), "--compare"];
    let out = scconv_tch(&[&args[..], &["--json"]].concat());
    assert!(out.status.success(), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let modes: Vec<&str> =
        json["runs"].as_array().unwrap().iter().map(|r| r["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["reference", "fast", "inference fp32", "inference bf16"]);
    for run in json["runs"].as_array().unwrap() {
        let counted = run["differing_decisions"].as_array().map(Vec::len);
        assert_eq!(counted, (run["mode"] != "reference").then_some(4), "{}", run["mode"]);
    }
    let table = text(&scconv_tch(&args));
    for mode in ["reference", "fast", "inference fp32", "inference bf16"] {
        assert!(table.lines().any(|l| l.starts_with("fmnist_sc") && l.contains(mode)), "{mode}:\n{table}");
    }
    let refused = scconv_tch(&[&args[..], &["--execution", "fast"]].concat());
    assert!(!refused.status.success(), "{}", text(&refused));
}
