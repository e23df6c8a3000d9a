//! Loading a PyTorch `state_dict` into a `VarStore`, strictly, like PyTorch's `load_state_dict`:
//! every missing key, unexpected key and shape mismatch is reported at once, and nothing is copied
//! unless everything matches. (`VarStore::load` ignores extra keys and stops at the first problem.)
//!
//! Files: `.safetensors`, and `torch.save` archives (`.pt`, `.pth`, `.bin`) read natively, with no
//! Python and without running pickled code: a state dict (`OrderedDict` or dict), or a training
//! checkpoint whose nested dicts flatten to dotted keys (`model.layer1.0.conv2.SRU.gn.gamma`). Any
//! floating dtype converts to the model's, as PyTorch's `copy_` does. `load_with` takes a part of a
//! file (`select` a prefix: `module.` of DataParallel, or one layer of a larger network) and can
//! tolerate unused keys (`strict: false`).
mod allowlist;
mod checkpoint;
mod flatten;
mod index;
mod pickle;

use index::{Entry, Index};

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
    /// What the keys suggest, when they do not match: a prefix to select, another version.
    pub hint: Option<String>,
    /// The keys copied into the model (after a successful load).
    pub loaded: Vec<String>,
    /// The file the tensors came from (`load_with`, `load`), shown in the error; `None` for tensors
    /// given in memory (`load_tensors`, `check`).
    pub file: Option<String>,
}

impl LoadReport {
    /// Nothing stands in the way of loading: no missing key, no mismatched shape or dtype, and no
    /// unexpected key unless they are tolerated (`strict: false`).
    pub fn loads(&self, strict: bool) -> bool {
        self.missing.is_empty()
            && self.mismatched.is_empty()
            && self.wrong_dtype.is_empty()
            && (self.unexpected.is_empty() || !strict)
    }

    /// Nothing differs: the file loads.
    pub fn is_clean(&self) -> bool {
        self.loads(true)
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.missing.is_empty() {
            writeln!(f, "  missing keys: {}", abridged(&self.missing))?;
        }
        if !self.unexpected.is_empty() {
            writeln!(f, "  unexpected keys: {}", abridged(&self.unexpected))?;
        }
        const SHOWN_ONE_BY_ONE: usize = 8; // every mismatch of one ScConv block (it has 8 tensors)
        for m in self.mismatched.iter().take(SHOWN_ONE_BY_ONE) {
            writeln!(
                f,
                "  size mismatch for {}: the model has {:?}, the state dict {:?}",
                shown(&m.key),
                m.expected,
                m.found
            )?;
        }
        for (key, kind) in self.wrong_dtype.iter().take(SHOWN_ONE_BY_ONE) {
            writeln!(
                f,
                "  wrong dtype for {}: {kind} in the state dict, a floating-point tensor is needed",
                shown(key)
            )?;
        }
        let more = |n: usize| n.saturating_sub(SHOWN_ONE_BY_ONE);
        if more(self.mismatched.len()) + more(self.wrong_dtype.len()) > 0 {
            let (sizes, dtypes) = (more(self.mismatched.len()), more(self.wrong_dtype.len()));
            writeln!(f, "  and {sizes} more size mismatches, {dtypes} more wrong dtypes")?;
        }
        if let Some(hint) = &self.hint {
            writeln!(f, "  hint: {hint}")?;
        }
        Ok(())
    }
}

/// Up to 8 keys, then how many more: a whole network's list would bury the hint.
fn abridged(keys: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut text = keys.iter().take(SHOWN).map(|k| shown(k)).collect::<Vec<_>>().join(", ");
    if keys.len() > SHOWN {
        text += &format!(" and {} more", keys.len() - SHOWN);
    }
    text
}

/// A key (or any text from a file) as an error shows it: characters that could mislead a terminal
/// escaped: controls as Rust writes them (`\n`, `\u{1b}`), bidirectional overrides and invisible
/// formatting as `\u{202e}`;
/// and a long key cut to its first 60 characters with how many more there are.
pub(crate) fn shown(key: &str) -> String {
    const LONGEST: usize = 60;
    let misleading = |c: char| {
        c.is_control()
            || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}')
            || matches!(c, '\u{061c}' | '\u{00ad}' | '\u{feff}')
    };
    let mut text = String::new();
    for c in key.chars().take(LONGEST) {
        if c.is_control() {
            text += &c.escape_debug().to_string(); // `\n`, `\r`, `\u{1b}`
        } else if misleading(c) {
            text += &c.escape_unicode().to_string();
        } else {
            text.push(c);
        }
    }
    let rest = key.chars().count().saturating_sub(LONGEST);
    if rest > 0 {
        text += &format!("...({rest} more characters)");
    }
    text
}

/// Reads a flat `name -> tensor` file: `.safetensors`, or a `torch.save` pickle (`.pt`, `.pth`, `.bin`).
pub fn read(path: impl AsRef<Path>) -> Result<Vec<(String, Tensor)>, ScConvError> {
    let path = path.as_ref();
    let file_error = |reason: String| ScConvError::WeightsFile { path: path.display().to_string(), reason };
    let index = open_index(path)?;
    let entries = index.entries();
    index.fetch(&entries.keys().collect::<Vec<_>>()).map_err(file_error)
}

/// The index of the file at `path` (names, shapes, dtypes), its data not read yet.
fn open_index(path: &Path) -> Result<Index, ScConvError> {
    let file_error = |reason: String| ScConvError::WeightsFile { path: path.display().to_string(), reason };
    if path.is_dir() {
        return Err(file_error("is a folder, not a weights file".into()));
    }
    if !path.exists() {
        return Err(file_error("no such file".into()));
    }
    if !path.is_file() {
        return Err(file_error("is not a regular file (a FIFO or a device?)".into()));
    }
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    match extension {
        "safetensors" => Index::safetensors(path).map_err(file_error),
        "pt" | "pth" | "bin" => Index::torch(path).map_err(file_error),
        other => {
            Err(file_error(format!("unknown weights format `.{other}`; use .safetensors, .pt, .pth or .bin")))
        }
    }
}

/// State-dict entries with no Rust counterpart, skipped on load: BatchNorm's `num_batches_tracked`
/// counts training steps and matters only to a BatchNorm built with `momentum=None`, which tch has not.
pub fn is_ignored(key: &str) -> bool {
    key.ends_with("num_batches_tracked")
}

/// Compares `tensors` with the store's variables without changing anything.
pub fn check(vs: &VarStore, tensors: &BTreeMap<String, Tensor>) -> LoadReport {
    check_entries(vs, &entries_of(tensors))
}

fn floating(kind: &Result<tch::Kind, String>) -> bool {
    use tch::Kind::*;
    matches!(kind, Ok(Half | Float | Double | BFloat16)) // as libtorch's is_floating_point
}

fn entries_of(tensors: &BTreeMap<String, Tensor>) -> BTreeMap<String, Entry> {
    tensors.iter().map(|(k, t)| (k.clone(), Entry { shape: t.size(), kind: Ok(t.kind()) })).collect()
}

fn variables_of(vs: &VarStore) -> BTreeMap<String, Entry> {
    vs.variables().into_iter().map(|(k, v)| (k, Entry { shape: v.size(), kind: Ok(v.kind()) })).collect()
}

/// `check` on what a file declares (names, shapes, dtypes), before its data is read.
fn check_entries(vs: &VarStore, tensors: &BTreeMap<String, Entry>) -> LoadReport {
    let variables = variables_of(vs);
    let mut report = LoadReport::default();
    for (key, var) in &variables {
        match tensors.get(key) {
            None => report.missing.push(key.clone()),
            Some(t) if t.shape != var.shape => report.mismatched.push(ShapeMismatch {
                key: key.clone(),
                expected: var.shape.clone(),
                found: t.shape.clone(),
            }),
            Some(t) if floating(&var.kind) && !floating(&t.kind) => {
                let kind = match &t.kind {
                    Ok(kind) => format!("{kind:?}"),
                    Err(what) => what.clone(),
                };
                report.wrong_dtype.push((key.clone(), kind))
            }
            Some(_) => {}
        }
    }
    report.unexpected =
        tensors.keys().filter(|k| !variables.contains_key(*k) && !is_ignored(k)).cloned().collect();
    if !report.is_clean() {
        report.hint = prefix_hint(&variables, tensors).or_else(|| version_hint(&variables, tensors));
    }
    report
}

/// When every variable's key is in the file under one common prefix (`module.` of DataParallel, or
/// the ScConv's path in a larger network), a hint naming it.
fn prefix_hint(variables: &BTreeMap<String, Entry>, tensors: &BTreeMap<String, Entry>) -> Option<String> {
    let first = variables.keys().next()?;
    tensors
        .keys()
        .filter_map(|key| key.strip_suffix(first.as_str()))
        .filter(|prefix| !prefix.is_empty())
        .find(|prefix| variables.keys().all(|k| tensors.contains_key(&format!("{prefix}{k}"))))
        .map(|prefix| {
            let prefix = shown(prefix);
            format!(
                "every key of the model is in the file under the prefix `{prefix}`: load that part with \
                 LoadOptions {{ select: Some(\"{prefix}\"), .. }} (CLI: --select {prefix})"
            )
        })
}

/// Which version of the reference an SRU's GroupNorm keys belong to: `gamma`/`beta` (2023-07-27),
/// `weight`/`bias` of shape `(C, 1, 1)` (the reference's own GroupBatchnorm2d, 2023-09-12 on) or `[C]`
/// (`nn.GroupNorm`: `torch_gn`, 2023-10-19's default).
fn norm_version(key: &str, tensor: &Entry) -> Option<&'static str> {
    match key.rsplit_once("SRU.gn.")?.1 {
        "gamma" => Some("2023-07-27 (SRU.gn.gamma/beta)"),
        "weight" if tensor.shape.len() == 1 => Some("2023-09-12 or later with torch_gn (SRU.gn.weight of shape [C]; 2023-10-19's default)"),
        "weight" => Some("2023-09-12 or later without torch_gn (SRU.gn.weight of shape [C, 1, 1]; the default before 2023-10-19)"),
        _ => None,
    }
}

/// A hint when the file's ScConv keys belong to another version than the model's.
fn version_hint(variables: &BTreeMap<String, Entry>, tensors: &BTreeMap<String, Entry>) -> Option<String> {
    let first = |map: &BTreeMap<String, Entry>| map.iter().find_map(|(k, t)| norm_version(k, t));
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
    let report = check_entries(vs, &entries_of(&tensors));
    copy_checked(vs, report, true, |keys| {
        Ok(keys.iter().map(|k| ((*k).clone(), tensors[*k].shallow_clone())).collect())
    })
    .map(drop)
}

/// With the report of a check: refuses (every problem in the error) or copies the variables' tensors,
/// which `fetch` provides by key.
fn copy_checked(
    vs: &mut VarStore,
    mut report: LoadReport,
    strict: bool,
    fetch: impl FnOnce(&[&String]) -> Result<Vec<(String, Tensor)>, ScConvError>,
) -> Result<LoadReport, ScConvError> {
    if !report.loads(strict) {
        return Err(ScConvError::StateDict(Box::new(report)));
    }
    let variables = vs.variables();
    let keys: Vec<&String> = variables.keys().collect();
    let tensors: BTreeMap<String, Tensor> = fetch(&keys)?.into_iter().collect();
    tch::no_grad(|| {
        for (key, var) in &variables {
            var.shallow_clone().f_copy_(&tensors[key])?;
            report.loaded.push(key.clone());
        }
        Ok::<_, ScConvError>(())
    })?;
    report.loaded.sort();
    report.hint = None;
    Ok(report)
}

/// The path a user takes to load PyTorch weights: the whole file, strictly (`load_with` with the
/// default options), its keys checked before any tensor is read.
pub fn load(vs: &mut VarStore, path: impl AsRef<Path>) -> Result<(), ScConvError> {
    load_with(vs, path, &LoadOptions::default()).map(drop)
}

/// How `load_with` takes a file's tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOptions {
    /// Use only the keys that start with this prefix, the prefix removed: `"module."` for a
    /// DataParallel checkpoint, `"model.2.m.0.cv2."` for one ScConv of a larger network, `"model."`
    /// for a training checkpoint's `{"model": state_dict, ...}`. `None`: every key.
    pub select: Option<String>,
    /// Every (selected) key must belong to the model (default). When false, unused keys are
    /// reported in `LoadReport::unexpected` and skipped. Missing keys are an error either way.
    pub strict: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { select: None, strict: true }
    }
}

/// The part of the file `options` selects, checked key by key against the store before any tensor
/// is read, then loaded like `load_tensors` (unused keys tolerated when not strict): only the tensors
/// the model takes are read. Returns what was loaded and what was skipped.
pub fn load_with(
    vs: &mut VarStore,
    path: impl AsRef<Path>,
    options: &LoadOptions,
) -> Result<LoadReport, ScConvError> {
    let path = path.as_ref();
    let file_error = |reason: String| ScConvError::WeightsFile { path: path.display().to_string(), reason };
    let index = open_index(path)?;
    let all = index.entries();
    // Selected name -> the file's name.
    let names: BTreeMap<String, String> = match &options.select {
        Some(prefix) => {
            select(all.keys().cloned().collect(), prefix).map_err(file_error)?.into_iter().collect()
        }
        None => all.keys().map(|k| (k.clone(), k.clone())).collect(),
    };
    let entries: BTreeMap<String, Entry> =
        names.iter().map(|(new, old)| (new.clone(), all[old].clone())).collect();
    let mut report = check_entries(vs, &entries);
    report.file = Some(path.display().to_string());
    // A hint from the file's own keys names the whole prefix that would match (`module.module.` when
    // `module.` was selected; `model.module.` for a prefix that cuts a name or lacks its dot).
    if let Some(prefix) = options.select.as_deref().filter(|_| !report.is_clean()) {
        let whole = prefix_hint(&variables_of(vs), &all);
        if whole.as_ref().is_some_and(|h| !h.contains(&format!("`{}`", shown(prefix)))) {
            report.hint = whole;
        }
    }
    copy_checked(vs, report, options.strict, |keys| {
        let in_file: Vec<&String> = keys.iter().map(|k| &names[*k]).collect();
        let tensors = index.fetch(&in_file).map_err(file_error)?;
        Ok(keys.iter().map(|k| (*k).clone()).zip(tensors.into_iter().map(|(_, t)| t)).collect())
    })
}

/// The names under `prefix` (name without it, name in the file); an error listing what is there when
/// none is.
fn select(names: Vec<String>, prefix: &str) -> Result<Vec<(String, String)>, String> {
    let top_level: std::collections::BTreeSet<String> =
        names.iter().map(|k| k.split('.').next().unwrap_or("").to_string() + ".").collect();
    let selected: Vec<(String, String)> = names
        .into_iter()
        .filter_map(|key| key.strip_prefix(prefix).map(|rest| (rest.to_string(), key.clone())))
        .collect();
    if selected.is_empty() {
        let shown: Vec<String> = top_level.iter().take(8).map(|k| self::shown(k)).collect();
        return Err(format!(
            "no key starts with `{}` (--select); the file's keys start with: {}",
            self::shown(prefix),
            shown.join(", ")
        ));
    }
    Ok(selected)
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
    fn keys_in_errors_are_escaped_and_cut() {
        assert_eq!(shown("CRU.GWC.weight"), "CRU.GWC.weight");
        assert_eq!(shown("evil\u{202e}key\nerror: x\u{1b}[31m"), "evil\\u{202e}key\\nerror: x\\u{1b}[31m");
        let long = shown(&"k".repeat(1000));
        assert_eq!(long, format!("{}...(940 more characters)", "k".repeat(60)));
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
