//! `scconv-tch infer`: classification with trained networks.
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use scconv_tch::harness::data::{self, Images};
use scconv_tch::harness::infer::{class_name, differences, score, Classifier, Decider, Differences, Scores};
use scconv_tch::inference::{Arithmetic, InferenceResNet, Precision};
use scconv_tch::Execution;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tch::Device;

/// The images to classify and whether they are the test set in file order (then PyTorch's recorded
/// predictions apply).
fn load_images(data: &str, png: Option<&Path>) -> Result<(Images, String, bool)> {
    if let Some(dir) = png {
        return Ok((data::read_png_folder(dir, 28)?, format!("PNG images in {}", dir.display()), false));
    }
    let debian = Path::new(data::DEBIAN_DIR);
    let (dir, test_set) = match data {
        "auto" if debian.is_dir() => (debian.to_path_buf(), true),
        "auto" | "sample" => (data::sample_dir(), true),
        "full" if debian.is_dir() => (debian.to_path_buf(), true),
        "full" => bail!(
            "--data full needs Debian's dataset-fashion-mnist in {} (apt-get install dataset-fashion-mnist)",
            data::DEBIAN_DIR
        ),
        other => (PathBuf::from(other), false),
    };
    let images =
        data::read_idx_split(&dir).with_context(|| format!("reading images in {}", dir.display()))?;
    Ok((images, format!("Fashion-MNIST test images in {}", dir.display()), test_set))
}

/// How `infer` runs each network.
#[derive(Clone, Copy)]
pub enum InferMode {
    /// The model itself, its ScConvs in this execution mode; `decisions` also counts their gate
    /// decisions that differ from the reference mode's.
    Model { execution: Execution, decisions: bool },
    /// The whole network's inference form (`scconv_tch::inference`) in `precision`; `decisions` also
    /// counts its gate decisions that differ from the reference mode's.
    Inference { decisions: bool, precision: Precision },
}

impl InferMode {
    /// Every mode side by side (`infer --compare`): the reference, the fast path (the model's own
    /// decisions counted), the fp32 and the bf16 inference forms (theirs counted).
    pub fn all() -> Vec<InferMode> {
        vec![
            InferMode::Model { execution: Execution::Reference, decisions: false },
            InferMode::Model { execution: Execution::Fast, decisions: true },
            InferMode::Inference { decisions: true, precision: Precision::Fp32 },
            InferMode::Inference { decisions: true, precision: Precision::Bf16 },
        ]
    }

    fn name(self) -> &'static str {
        match self {
            InferMode::Model { execution: Execution::Reference, .. } => "reference",
            InferMode::Model { execution: Execution::Fast, .. } => "fast",
            InferMode::Model { execution: Execution::FastTensorOps, .. } => "fast-tensor-ops",
            InferMode::Inference { precision: Precision::Fp32, .. } => "inference fp32",
            InferMode::Inference { precision: Precision::Bf16, .. } => "inference bf16",
            InferMode::Inference { precision: Precision::Bf16Emulated, .. } => "inference bf16 emulated",
            InferMode::Inference { precision: Precision::Bf16OneDnn, .. } => "inference bf16 oneDNN",
        }
    }
}

struct Run {
    classifier: Classifier,
    mode: InferMode,
    predictions: Vec<i64>,
    scores: Scores,
    images_per_second: f64,
    /// With `--decisions`: how it differs from the reference mode (gate decisions by layer, logits).
    decisions: Option<Differences>,
    /// The inference form's arithmetic, when it ran one.
    arithmetic: Option<Arithmetic>,
}

pub fn run_infer(
    models: &[PathBuf],
    data: &str,
    png: Option<&Path>,
    batch: i64,
    device: Device,
    modes: &[InferMode],
    json: bool,
) -> Result<ExitCode> {
    let (images, source, test_set) = load_images(data, png)?;
    let n = images.pixels.size()[0] as u64;
    let (mut runs, mut warned) = (Vec::new(), false);
    for (path, &mode) in models.iter().flat_map(|path| modes.iter().map(move |mode| (path, mode))) {
        let mut classifier =
            Classifier::load(path, device).with_context(|| format!("loading {}", path.display()))?;
        if let InferMode::Model { execution, .. } = mode {
            classifier.model.set_scconv_execution(execution)?;
        }
        let form = match mode {
            InferMode::Inference { precision, .. } => {
                let size = input_size(&classifier, &images, batch);
                let form = InferenceResNet::compiled_with(&classifier.model, size, precision)?;
                if let Some(warning) = precision_warning(precision, form.arithmetic()) {
                    if !std::mem::replace(&mut warned, true) {
                        eprintln!("warning: {warning}");
                    }
                }
                Some(form)
            }
            InferMode::Model { .. } => None,
        };
        let arithmetic = form.as_ref().map(|f| f.arithmetic().clone());
        let bar = if n >= 2000 && !json { ProgressBar::new(n) } else { ProgressBar::hidden() };
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} {per_sec}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(classifier.record.name.clone());
        let (predictions, elapsed) = match &form {
            Some(form) => {
                classifier.classify_with(&images, batch, |k| bar.inc(k), |x| form.try_forward(x))?
            }
            None => classifier.classify(&images, batch, |k| bar.inc(k))?,
        };
        bar.finish_and_clear();
        let decisions = match (&form, mode) {
            (Some(form), InferMode::Inference { decisions: true, .. }) => {
                Some(differences(&classifier.model, Decider::Form(form), &images, batch)?)
            }
            (None, InferMode::Model { decisions: true, .. }) => {
                Some(differences(&classifier.model, Decider::Model, &images, batch)?)
            }
            _ => None,
        };
        drop(form);
        let pytorch = test_set.then_some(classifier.record.test_predictions.as_slice());
        let scores = score(&predictions, images.labels.as_deref(), pytorch);
        let images_per_second = predictions.len() as f64 / elapsed.as_secs_f64();
        runs.push(Run { classifier, mode, predictions, scores, images_per_second, decisions, arithmetic });
    }
    if json {
        return print_json(&runs, &source, device);
    }
    println!("{} images: {source}, on {device:?}, batch {batch}", images.pixels.size()[0]);
    print!("{}", infer_table(&runs, modes.len() > 1));
    if modes.len() > 1 {
        println!("gates differing: from the reference mode's (fraction of decisions); max logit diff: from the reference mode's logits (PyTorch's fp32), relative to the largest");
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(arithmetic) = runs.iter().find_map(|r| r.arithmetic.as_ref()) {
        println!("inference form: {}", arithmetic.describe());
    }
    for r in &runs {
        if let Some(d) = &r.decisions {
            println!(
                "{}: logits differ from the reference mode's (PyTorch's fp32) by at most {:.3e} ({:.2e} of the largest, {:.3})",
                r.classifier.record.name,
                d.max_logit_diff,
                d.max_logit_diff / d.max_reference_logit,
                d.max_reference_logit
            );
        }
        if let Some(layers) = r.decisions.as_ref().map(|d| &d.layers).filter(|layers| !layers.is_empty()) {
            let total: i64 = layers.iter().map(|(_, differing, _)| differing).sum();
            let made: i64 = layers.iter().map(|(_, _, made)| made).sum();
            println!(
                "{}: {total} of {made} gate decisions differ from the reference mode",
                r.classifier.record.name
            );
            for (layer, differing, made) in layers {
                println!("    {layer:<18} {differing:>8} of {made}");
            }
        }
    }
    for r in runs.iter().filter(|r| test_set && r.scores.agreeing.is_none()) {
        let (known, images) = (r.classifier.record.test_predictions.len(), r.predictions.len());
        println!(
            "{}: its record holds {known} PyTorch predictions for {images} images: no agreement figure",
            r.classifier.record.name
        );
    }
    if png.is_some() {
        for (i, name) in images.names.iter().enumerate() {
            let classes: Vec<&str> = runs.iter().map(|r| class_name(r.predictions[i])).collect();
            println!("{name}: {}", classes.join(" | "));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The size the inference form is prepacked for: a full batch of the images.
fn input_size(classifier: &Classifier, images: &Images, batch: i64) -> [i64; 4] {
    let [n, h, w] = <[i64; 3]>::try_from(images.pixels.size()).unwrap_or([batch, 28, 28]);
    [batch.min(n.max(1)), classifier.record.config.in_channels, h, w]
}

fn print_json(runs: &[Run], source: &str, device: Device) -> Result<ExitCode> {
    let rows: Vec<_> = runs
        .iter()
        .map(|r| {
            serde_json::json!({
                "name": r.classifier.record.name, "mode": r.mode.name(), "parameters": r.classifier.parameters(),
                "pytorch_test_accuracy": r.classifier.record.test_accuracy, "scores": r.scores,
                "images_per_second": r.images_per_second, "predictions": r.predictions,
                "differing_decisions": r.decisions.as_ref().map(|d| d.layers.iter()
                    .map(|(layer, differing, made)| serde_json::json!({"layer": layer, "differing": differing, "made": made}))
                    .collect::<Vec<_>>()),
                "max_logit_diff": r.decisions.as_ref().map(|d| d.max_logit_diff),
                "max_reference_logit": r.decisions.as_ref().map(|d| d.max_reference_logit),
                "arithmetic": r.arithmetic.as_ref().map(Arithmetic::describe),
            })
        })
        .collect();
    let json = serde_json::json!({ "source": source, "device": format!("{device:?}"), "runs": rows });
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(ExitCode::SUCCESS)
}

fn infer_table(runs: &[Run], by_mode: bool) -> String {
    let mode_header = if by_mode {
        format!(" {:<22} {:>18} {:>14}", "mode", "gates differing", "max logit diff")
    } else {
        String::new()
    };
    let mut out = format!(
        "{:<14}{mode_header} {:>11} {:>10} {:>20} {:>10}\n",
        "network", "parameters", "accuracy", "agrees with PyTorch", "images/s"
    );
    for r in runs {
        let s = &r.scores;
        let accuracy =
            s.correct.map_or("-".into(), |c| format!("{:.2}%", 100.0 * c as f64 / s.images as f64));
        let agreement = s
            .agreeing
            .map_or("-".into(), |a| format!("{a}/{} ({:.2}%)", s.images, 100.0 * a as f64 / s.images as f64));
        let mode = match by_mode {
            true => format!(" {:<22} {:>18} {:>14}", mode_label(r), gates_differing(r), logit_diff(r)),
            false => String::new(),
        };
        out += &format!(
            "{:<14}{mode} {:>11} {:>10} {:>20} {:>10.0}\n",
            r.classifier.record.name,
            r.classifier.parameters(),
            accuracy,
            agreement,
            r.images_per_second
        );
        if !by_mode {
            for (index, rust, torch) in &s.disagreements {
                out += &format!(
                    "    image {index}: Rust says {}, PyTorch said {}\n",
                    class_name(*rust),
                    class_name(*torch)
                );
            }
        }
    }
    out
}

/// What a user asking for `precision` should know of the form's `arithmetic`: a bf16 form emulated in
/// fp32 (no bf16 units, or libtorch refuses bf16), or oneDNN's bf16 kernels without bf16 units.
fn precision_warning(precision: Precision, arithmetic: &Arithmetic) -> Option<String> {
    match (precision, arithmetic) {
        (Precision::Bf16 | Precision::Bf16OneDnn, Arithmetic::Bf16Emulated { why }) => {
            Some(format!("the bf16 form runs emulated in fp32, with bf16's numbers and no speed-up: {why}"))
        }
        (Precision::Bf16OneDnn, Arithmetic::Bf16Native) if scconv_tch::inference::bf16_support().is_err() => {
            Some("this CPU has no bf16 units: oneDNN emulates its bf16 kernels, slower than fp32".into())
        }
        _ => None,
    }
}

/// The mode, `(emulated)` where a bf16 form had no bf16 units to run on.
fn mode_label(r: &Run) -> String {
    match (&r.arithmetic, r.mode) {
        (
            Some(Arithmetic::Bf16Emulated { .. }),
            InferMode::Inference { precision: Precision::Bf16 | Precision::Bf16OneDnn, .. },
        ) => {
            format!("{} (emul.)", r.mode.name())
        }
        _ => r.mode.name().to_string(),
    }
}

/// Differing gate decisions against the reference mode, `-` where not counted or no ScConv.
fn gates_differing(r: &Run) -> String {
    let Some(d) = r.decisions.as_ref().filter(|d| !d.layers.is_empty()) else { return "-".into() };
    let differing: i64 = d.layers.iter().map(|(_, differing, _)| differing).sum();
    let made: i64 = d.layers.iter().map(|(_, _, made)| made).sum();
    format!("{differing} ({:.1e})", differing as f64 / made.max(1) as f64)
}

/// The largest logit difference from the reference mode, relative to its largest logit.
fn logit_diff(r: &Run) -> String {
    r.decisions.as_ref().map_or("-".into(), |d| format!("{:.1e}", d.max_logit_diff / d.max_reference_logit))
}
