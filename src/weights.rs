//! Loading a PyTorch `state_dict` into a `VarStore`, strictly, like PyTorch's `load_state_dict`:
//! every missing key, unexpected key and shape mismatch is reported at once, and nothing is copied
//! unless everything matches. (`VarStore::load` ignores extra keys and stops at the first problem.)
use crate::error::ScConvError;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use tch::{nn::VarStore, Tensor};

/// A key whose tensor has another shape than the model's variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeMismatch {
    /// The state-dict key.
    pub key: String,
    /// The variable's shape.
    pub expected: Vec<i64>,
    /// The file's shape.
    pub found: Vec<i64>,
}

/// What differs between a state dict and a model; empty when they match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// The model's variables the file has no tensor for.
    pub missing: Vec<String>,
    /// The file's tensors the model has no variable for.
    pub unexpected: Vec<String>,
    /// Keys in both, with different shapes.
    pub mismatched: Vec<ShapeMismatch>,
    /// Keys whose tensor is not floating point (its dtype named), for a floating-point variable.
    /// PyTorch's `copy_` would convert integers silently; a state dict with integer weights is almost
    /// surely the wrong file, so it is rejected. Other float dtypes convert, as in PyTorch.
    pub wrong_dtype: Vec<(String, String)>,
    /// What the keys suggest, when they do not match: another version of the reference.
    pub hint: Option<String>,
}

impl LoadReport {
    /// Nothing differs: the file loads.
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty()
            && self.unexpected.is_empty()
            && self.mismatched.is_empty()
            && self.wrong_dtype.is_empty()
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.missing.is_empty() {
            writeln!(f, "  missing keys: {}", self.missing.join(", "))?;
        }
        if !self.unexpected.is_empty() {
            writeln!(f, "  unexpected keys: {}", self.unexpected.join(", "))?;
        }
        for m in &self.mismatched {
            writeln!(
                f,
                "  size mismatch for {}: the model has {:?}, the state dict {:?}",
                m.key, m.expected, m.found
            )?;
        }
        for (key, kind) in &self.wrong_dtype {
            writeln!(
                f,
                "  wrong dtype for {key}: {kind} in the state dict, a floating-point tensor is needed"
            )?;
        }
        if let Some(hint) = &self.hint {
            writeln!(f, "  hint: {hint}")?;
        }
        Ok(())
    }
}

/// Reads a flat `name -> tensor` file: `.safetensors`, or a `torch.save` pickle (`.pt`, `.pth`, `.bin`).
pub fn read(path: impl AsRef<Path>) -> Result<Vec<(String, Tensor)>, ScConvError> {
    let path = path.as_ref();
    let file_error = |reason: String| ScConvError::WeightsFile { path: path.display().to_string(), reason };
    if path.is_dir() {
        return Err(file_error("is a folder, not a weights file".into()));
    }
    if !path.is_file() {
        return Err(file_error("no such file".into()));
    }
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let tensors = match extension {
        "safetensors" => Tensor::read_safetensors(path),
        "pt" | "pth" | "bin" => Tensor::loadz_multi(path),
        other => {
            return Err(file_error(format!(
                "unknown weights format `.{other}`; use .safetensors, .pt, .pth or .bin"
            )))
        }
    };
    tensors.map_err(|e| file_error(e.to_string()))
}

/// State-dict entries with no Rust counterpart, skipped on load: BatchNorm's `num_batches_tracked`
/// counts training steps and matters only to a BatchNorm built with `momentum=None`, which tch has not.
pub fn is_ignored(key: &str) -> bool {
    key.ends_with("num_batches_tracked")
}

/// Compares `tensors` with the store's variables without changing anything.
pub fn check(vs: &VarStore, tensors: &BTreeMap<String, Tensor>) -> LoadReport {
    let variables: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    let mut report = LoadReport::default();
    for (key, var) in &variables {
        match tensors.get(key) {
            None => report.missing.push(key.clone()),
            Some(t) if t.size() != var.size() => report.mismatched.push(ShapeMismatch {
                key: key.clone(),
                expected: var.size(),
                found: t.size(),
            }),
            Some(t) if var.is_floating_point() && !t.is_floating_point() => {
                report.wrong_dtype.push((key.clone(), format!("{:?}", t.kind())))
            }
            Some(_) => {}
        }
    }
    report.unexpected =
        tensors.keys().filter(|k| !variables.contains_key(*k) && !is_ignored(k)).cloned().collect();
    if !report.is_clean() {
        report.hint = version_hint(&variables, tensors);
    }
    report
}

/// Which version of the reference an SRU's GroupNorm keys belong to: `gamma`/`beta` (2023-07-27),
/// `weight`/`bias` of shape `(C, 1, 1)` (the reference's own GroupBatchnorm2d, 2023-09-12 on) or `[C]`
/// (`nn.GroupNorm`: `torch_gn`, 2023-10-19's default).
fn norm_version(key: &str, tensor: &Tensor) -> Option<&'static str> {
    match key.rsplit_once("SRU.gn.")?.1 {
        "gamma" => Some("2023-07-27 (SRU.gn.gamma/beta)"),
        "weight" if tensor.dim() == 1 => Some("2023-09-12 or later with torch_gn (SRU.gn.weight of shape [C]; 2023-10-19's default)"),
        "weight" => Some("2023-09-12 or later without torch_gn (SRU.gn.weight of shape [C, 1, 1]; the default before 2023-10-19)"),
        _ => None,
    }
}

/// A hint when the file's ScConv keys belong to another version than the model's.
fn version_hint(variables: &BTreeMap<String, Tensor>, tensors: &BTreeMap<String, Tensor>) -> Option<String> {
    let first = |map: &BTreeMap<String, Tensor>| map.iter().find_map(|(k, t)| norm_version(k, t));
    let (model, file) = (first(variables)?, first(tensors)?);
    (model != file).then(|| {
        format!(
            "the state dict's keys look like ScConv {file}, the model is {model}: \
             set \"variant\" (and \"torch_gn\") in the ScConv config to the version that saved it"
        )
    })
}

/// Copies `tensors` into the store's variables (converted to each variable's dtype and device, as
/// PyTorch's `copy_` does) if and only if the keys and shapes match exactly.
pub fn load_tensors(vs: &mut VarStore, tensors: Vec<(String, Tensor)>) -> Result<(), ScConvError> {
    let tensors: BTreeMap<String, Tensor> = tensors.into_iter().collect();
    let report = check(vs, &tensors);
    if !report.is_clean() {
        return Err(ScConvError::StateDict(report));
    }
    tch::no_grad(|| {
        for (key, mut var) in vs.variables() {
            var.f_copy_(&tensors[&key])?;
        }
        Ok(())
    })
}

/// `read` then `load_tensors`: the path a user takes to load PyTorch weights.
pub fn load(vs: &mut VarStore, path: impl AsRef<Path>) -> Result<(), ScConvError> {
    load_tensors(vs, read(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn store() -> VarStore {
        let vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        let _ = (&root / "a").zeros("weight", &[2, 3]);
        let _ = (&root / "b").zeros("bias", &[4]);
        let _ = (&root / "c").zeros("weight", &[1]);
        vs
    }

    fn t(shape: &[i64]) -> Tensor {
        Tensor::ones(shape, (Kind::Float, Device::Cpu))
    }

    #[test]
    fn reports_every_problem_at_once_and_copies_nothing() {
        let mut vs = store();
        let tensors = vec![
            ("a.weight".to_string(), t(&[3, 2])),
            ("c.weight".to_string(), t(&[1])),
            ("bn.num_batches_tracked".to_string(), t(&[])),
            ("extra.weight".to_string(), t(&[1])),
            ("typo.wieght".to_string(), t(&[1])),
        ];
        let Err(ScConvError::StateDict(report)) = load_tensors(&mut vs, tensors) else { panic!("must fail") };
        assert_eq!(report.missing, vec!["b.bias"]);
        assert_eq!(report.unexpected, vec!["extra.weight", "typo.wieght"], "num_batches_tracked is skipped");
        assert_eq!(
            report.mismatched,
            vec![ShapeMismatch { key: "a.weight".into(), expected: vec![2, 3], found: vec![3, 2] }]
        );
        let text = ScConvError::StateDict(report).to_string();
        assert!(text.contains("missing keys: b.bias"), "{text}");
        assert!(
            text.contains("size mismatch for a.weight: the model has [2, 3], the state dict [3, 2]"),
            "{text}"
        );
        assert_eq!(
            (vs.root() / "c").get("weight").unwrap().double_value(&[0]),
            0.0,
            "nothing is copied on failure"
        );
    }

    #[test]
    fn copies_and_converts_dtype_when_everything_matches() {
        let mut vs = store();
        let tensors = vec![
            ("a.weight".to_string(), t(&[2, 3]).to_kind(Kind::Double)),
            ("b.bias".to_string(), t(&[4])),
            ("c.weight".to_string(), t(&[1]) * 7.0),
        ];
        load_tensors(&mut vs, tensors).unwrap();
        let c = (vs.root() / "c").get("weight").unwrap();
        assert_eq!((c.kind(), c.double_value(&[0])), (Kind::Float, 7.0));
        assert_eq!((vs.root() / "a").get("weight").unwrap().kind(), Kind::Float);
    }

    #[test]
    fn integer_and_bool_tensors_are_rejected_half_precision_converts() {
        let mut vs = store();
        let tensors = vec![
            ("a.weight".to_string(), t(&[2, 3]).to_kind(Kind::Int64)),
            ("b.bias".to_string(), t(&[4]).to_kind(Kind::Bool)),
            ("c.weight".to_string(), t(&[1]).to_kind(Kind::Half)),
        ];
        let err = load_tensors(&mut vs, tensors).unwrap_err().to_string();
        assert!(err.contains("wrong dtype for a.weight: Int64"), "{err}");
        assert!(err.contains("wrong dtype for b.bias: Bool"), "{err}");
        assert!(!err.contains("c.weight"), "{err}");
        let half = vec![
            ("a.weight".to_string(), t(&[2, 3]).to_kind(Kind::BFloat16)),
            ("b.bias".to_string(), t(&[4]).to_kind(Kind::Half)),
            ("c.weight".to_string(), t(&[1]) * 3.0),
        ];
        load_tensors(&mut vs, half).unwrap();
    }

    #[test]
    fn unknown_extension_and_missing_file_are_errors() {
        let mut vs = store();
        let err = load(&mut vs, "/nonexistent/weights.safetensors").unwrap_err();
        assert!(
            err.to_string().contains("cannot read /nonexistent/weights.safetensors: no such file"),
            "{err}"
        );
        let dir = std::env::temp_dir().join(format!("scconv-weights-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let onnx = dir.join("w.onnx");
        std::fs::write(&onnx, b"not weights").unwrap();
        let err = load(&mut vs, &onnx).unwrap_err();
        assert!(err.to_string().contains("unknown weights format `.onnx`"), "{err}");
        let garbage = dir.join("w.safetensors");
        std::fs::write(&garbage, b"not weights").unwrap();
        let err = load(&mut vs, &garbage).unwrap_err();
        assert!(matches!(err, ScConvError::WeightsFile { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
