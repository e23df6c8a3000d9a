//! Classification with a trained network: its JSON record (written by `scripts/train.py`: config,
//! weights file, PyTorch's test predictions), batching, and agreement with PyTorch.
use crate::error::ScConvError;
use crate::harness::data::{normalize, Images};
use crate::inference::InferenceResNet;
use crate::models::{resnet, ResNet, ResNetConfig};
use crate::weights;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tch::{nn::VarStore, Device, Tensor};

/// Fashion-MNIST's class names, by label.
pub const CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// The class name of a label, or "?" for a label outside Fashion-MNIST's ten.
pub fn class_name(label: i64) -> &'static str {
    usize::try_from(label).ok().and_then(|l| CLASSES.get(l)).copied().unwrap_or("?")
}

/// The training record of a network (`weights/fmnist_*.json`).
#[derive(Debug, Clone, Deserialize)]
pub struct ModelRecord {
    pub name: String,
    pub config: ResNetConfig,
    /// The safetensors state dict, relative to the record.
    pub weights: String,
    pub test_accuracy: f64,
    pub parameters: i64,
    pub torch_version: String,
    /// PyTorch's predicted class for each test image, in file order.
    pub test_predictions: Vec<i64>,
}

impl ModelRecord {
    pub fn read(path: &Path) -> Result<ModelRecord, ScConvError> {
        crate::harness::json::read(path)
    }
}

/// A network ready for inference, with its record.
pub struct Classifier {
    pub record: ModelRecord,
    pub model: ResNet,
    pub vs: VarStore,
}

impl Classifier {
    /// Reads the record at `path`, builds its network on `device` and loads its weights strictly.
    pub fn load(path: &Path, device: Device) -> Result<Classifier, ScConvError> {
        let record = ModelRecord::read(path)?;
        let mut vs = VarStore::new(device);
        let model = resnet(vs.root(), &record.config)?;
        let weights_path: PathBuf = path.parent().unwrap_or(Path::new(".")).join(&record.weights);
        weights::load(&mut vs, weights_path)?;
        Ok(Classifier { record, model, vs })
    }

    pub fn parameters(&self) -> i64 {
        self.vs.trainable_variables().iter().map(|t| t.numel() as i64).sum()
    }

    /// Predicted classes of all `images`, `batch` at a time; `progress` is told how many are done.
    /// The duration covers the forward passes only (normalisation and transfer included, not loading).
    pub fn classify(
        &self,
        images: &Images,
        batch: i64,
        progress: impl FnMut(u64),
    ) -> Result<(Vec<i64>, Duration), ScConvError> {
        self.classify_with(images, batch, progress, |x| self.model.try_forward(x))
    }

    /// `classify` with the logits of each batch from `forward` (e.g. an inference form of the model).
    pub fn classify_with(
        &self,
        images: &Images,
        batch: i64,
        mut progress: impl FnMut(u64),
        forward: impl Fn(&Tensor) -> Result<Tensor, ScConvError>,
    ) -> Result<(Vec<i64>, Duration), ScConvError> {
        let n = images.pixels.size()[0];
        let device = self.vs.device();
        let mut predictions = Vec::with_capacity(n as usize);
        let start = Instant::now();
        for begin in (0..n).step_by(batch.max(1) as usize) {
            let end = (begin + batch).min(n);
            let x = normalize(&images.pixels.narrow(0, begin, end - begin)).to_device(device);
            let logits = tch::no_grad(|| forward(&x))?;
            let classes = Vec::<i64>::try_from(logits.argmax(1, false).to_device(Device::Cpu))?;
            predictions.extend(classes);
            progress((end - begin) as u64);
        }
        // Each batch's classes are copied to the host, which waits for the device: the time is real.
        Ok((predictions, start.elapsed()))
    }
}

/// What decides the gates whose decisions are counted against the reference mode's.
#[derive(Clone, Copy)]
pub enum Decider<'a> {
    /// The whole network's inference form.
    Form(&'a InferenceResNet<'a>),
    /// The model itself, each ScConv in its execution mode (`Execution::Fast`: the fast path's own).
    Model,
}

/// How a decider's forward differs from the reference mode's (which is PyTorch's fp32 eager, bit for
/// bit, on the CPUs the parity suite runs on): per ScConv layer, (path, differing gate decisions,
/// decisions made), in forward order; and the largest logit difference with the largest reference
/// logit (its scale).
#[derive(Debug, Clone, Default)]
pub struct Differences {
    /// Per ScConv layer: (path, differing decisions, decisions made).
    pub layers: Vec<(String, i64, i64)>,
    /// max |logits - reference logits| over the images.
    pub max_logit_diff: f64,
    /// max |reference logits| over the images.
    pub max_reference_logit: f64,
}

impl Differences {
    /// `other`'s images added: decisions summed by layer, the maxima kept.
    fn add(&mut self, other: Differences) {
        for (i, (path, differing, made)) in other.layers.into_iter().enumerate() {
            match self.layers.get_mut(i) {
                Some(layer) => (layer.1, layer.2) = (layer.1 + differing, layer.2 + made),
                None => self.layers.push((path, differing, made)),
            }
        }
        self.max_logit_diff = self.max_logit_diff.max(other.max_logit_diff);
        self.max_reference_logit = self.max_reference_logit.max(other.max_reference_logit);
    }
}

/// How `decider` differs from the reference mode on the input `x` (both must name the same layers in
/// order).
pub fn differences_on(model: &ResNet, decider: Decider, x: &Tensor) -> Result<Differences, ScConvError> {
    let (logits, masks) = match decider {
        Decider::Form(form) => form.forward_recording_decisions(x)?,
        Decider::Model => tch::no_grad(|| model.forward_recording_decisions(x))?,
    };
    let (reference, gates) = tch::no_grad(|| model.forward_recording_gates(x))?;
    if masks.len() != gates.len() || masks.iter().zip(&gates).any(|((a, _), (b, _))| a != b) {
        return Err(ScConvError::InvalidModel(format!(
            "{} decided gates against the reference mode's {}: not the same layers",
            masks.len(),
            gates.len()
        )));
    }
    let count =
        |mask: &Tensor, reference: &Tensor| mask.ne_tensor(reference).sum(tch::Kind::Int64).int64_value(&[]);
    let layers = masks
        .iter()
        .zip(&gates)
        .map(|((path, mask), (_, gate))| {
            (path.clone(), count(mask, &gate.decisions.info_mask), mask.numel() as i64)
        })
        .collect();
    let double = |t: &Tensor| t.to_kind(tch::Kind::Double);
    let max_logit_diff = (double(&logits) - double(&reference)).abs().max().double_value(&[]);
    let max_reference_logit = reference.abs().max().double_value(&[]);
    Ok(Differences { layers, max_logit_diff, max_reference_logit })
}

/// `differences_on` over `images`, `batch` at a time.
pub fn differences(
    model: &ResNet,
    decider: Decider,
    images: &Images,
    batch: i64,
) -> Result<Differences, ScConvError> {
    let mut total = Differences::default();
    let n = images.pixels.size()[0];
    for begin in (0..n).step_by(batch.max(1) as usize) {
        let x = normalize(&images.pixels.narrow(0, begin, batch.min(n - begin)));
        total.add(differences_on(model, decider, &x)?);
    }
    Ok(total)
}

/// Accuracy against labels, and agreement with PyTorch's predictions (same image order).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Scores {
    pub images: usize,
    pub correct: Option<usize>,
    pub agreeing: Option<usize>,
    /// (image index, Rust class, PyTorch class) for every disagreement.
    pub disagreements: Vec<(usize, i64, i64)>,
}

/// PyTorch's predictions (and labels) count only when they cover every image classified: a record
/// with fewer (0, or 10 for 1,000 images) gives no agreement figure rather than a wrong one.
pub fn score(predictions: &[i64], labels: Option<&[i64]>, pytorch: Option<&[i64]>) -> Scores {
    let covers = |known: &&[i64]| known.len() >= predictions.len() && !predictions.is_empty();
    let (labels, pytorch) = (labels.filter(covers), pytorch.filter(covers));
    let correct = labels.map(|l| predictions.iter().zip(l).filter(|(p, l)| p == l).count());
    let disagreements: Vec<(usize, i64, i64)> = pytorch
        .map(|t| {
            predictions
                .iter()
                .zip(t)
                .enumerate()
                .filter(|(_, (r, t))| r != t)
                .map(|(i, (&r, &t))| (i, r, t))
                .collect()
        })
        .unwrap_or_default();
    let agreeing = pytorch.map(|_| predictions.len() - disagreements.len());
    Scores { images: predictions.len(), correct, agreeing, disagreements }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_count_accuracy_and_disagreements() {
        let s = score(&[1, 2, 3, 4], Some(&[1, 2, 0, 4]), Some(&[1, 9, 3, 4]));
        assert_eq!((s.correct, s.agreeing), (Some(3), Some(3)));
        assert_eq!(s.disagreements, vec![(1, 2, 9)]);
        let short_record = score(&[1, 2, 3], Some(&[1, 2, 3]), Some(&[1]));
        assert_eq!((short_record.correct, short_record.agreeing), (Some(3), None));
        assert_eq!(score(&[1, 2], None, Some(&[])).agreeing, None);
        let unlabeled = score(&[1], None, None);
        assert_eq!((unlabeled.correct, unlabeled.agreeing), (None, None));
    }
}
