//! `torch.save` files, read natively: the zip archive, its `data.pkl` through the restricted pickle
//! reader (`pickle.rs`), and each tensor from its raw storage entry. Nested dicts flatten to dotted
//! keys (`{"model": {"conv.weight": t}}` -> `model.conv.weight`); numbers, strings, lists and other
//! non-tensor entries (an epoch, optimizer settings) are left out.
use super::pickle::{self, PickleError, TensorRef, Value};
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use tch::Tensor;

/// The tensors a `torch.save` archive at `path` describes, by flattened key, before any storage is
/// read; `Err` is the reason, for `ScConvError::WeightsFile`.
pub(crate) fn index(path: &Path) -> Result<Vec<(String, TensorRef)>, String> {
    let mut archive = open(path)?;
    let prefix = pickle_prefix(&archive)?;
    check_byte_order(&mut archive, &prefix)?;
    let data = entry(&mut archive, &format!("{prefix}data.pkl"), u64::MAX)?;
    let root = pickle::read(&data).map_err(|e| explain(path, e))?;
    let mut found = Vec::new();
    flatten(root, String::new(), &mut found)?;
    for (key, spec) in &found {
        check_view(key, spec)?;
    }
    check_storages(&found)?;
    Ok(found)
}

/// Every tensor of one storage reads it with the same dtype and element count, as PyTorch's storages
/// have one of each: otherwise the storage read first would decide for all (in whatever order the
/// tensors are visited), so such a file is refused, naming two tensors that disagree.
fn check_storages(found: &[(String, TensorRef)]) -> Result<(), String> {
    let mut first: HashMap<&str, (&str, &TensorRef)> = HashMap::new();
    for (key, spec) in found {
        let (other_key, other) = *first.entry(spec.storage.as_str()).or_insert((key, spec));
        if (other.kind, other.storage_numel) != (spec.kind, spec.storage_numel) {
            return Err(format!(
                "tensors {other_key} and {key} read one storage ({}) as {} x {:?} and {} x {:?}; a \
                 torch.save file types each storage once",
                spec.storage, other.storage_numel, other.kind, spec.storage_numel, spec.kind
            ));
        }
    }
    Ok(())
}

/// The tensors `refs` (from `index`) from the archive's storages, each storage read once.
pub(crate) fn fetch(path: &Path, refs: &[(String, TensorRef)]) -> Result<Vec<(String, Tensor)>, String> {
    let mut archive = open(path)?;
    let prefix = pickle_prefix(&archive)?;
    let mut storages = Storages { archive: &mut archive, prefix: &prefix, cache: HashMap::new() };
    refs.iter().map(|(key, spec)| Ok((key.clone(), storages.tensor(key, spec)?))).collect()
}

fn open(path: &Path) -> Result<zip::ZipArchive<std::fs::File>, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    zip::ZipArchive::new(file).map_err(|e| not_an_archive(path, &e.to_string()))
}

fn not_an_archive(path: &Path, why: &str) -> String {
    let name = path.display();
    format!(
        "not a torch.save zip archive ({why}); a truncated download, or a file saved with \
         _use_new_zipfile_serialization=False: load it in Python and save it again with \
         torch.save(torch.load(\"{name}\", weights_only=True), \"{name}\")"
    )
}

/// The folder inside the archive (`torch.save` names it after the file): where `data.pkl` is.
fn pickle_prefix(archive: &zip::ZipArchive<std::fs::File>) -> Result<String, String> {
    let pickles: Vec<&str> = archive.file_names().filter(|n| n.ends_with("data.pkl")).collect();
    match pickles.as_slice() {
        [one] => Ok(one.trim_end_matches("data.pkl").to_string()),
        [] => Err("a zip archive without data.pkl: not a torch.save file".into()),
        _ => Err(format!("a zip archive with {} data.pkl entries", pickles.len())),
    }
}

fn check_byte_order(archive: &mut zip::ZipArchive<std::fs::File>, prefix: &str) -> Result<(), String> {
    let name = format!("{prefix}byteorder");
    if archive.file_names().any(|n| n == name) {
        let order = entry(archive, &name, 16)?;
        if order != b"little" {
            return Err(format!(
                "byte order {:?}: only little-endian files are read",
                String::from_utf8_lossy(&order)
            ));
        }
    }
    Ok(())
}

/// An entry's bytes, refusing one larger than `limit` (a storage's expected size) before reading it.
fn entry(archive: &mut zip::ZipArchive<std::fs::File>, name: &str, limit: u64) -> Result<Vec<u8>, String> {
    let mut file = archive.by_name(name).map_err(|e| format!("entry {name}: {e}"))?;
    if file.size() > limit {
        return Err(format!("entry {name} holds {} bytes, more than its tensor's {limit}", file.size()));
    }
    let mut bytes = Vec::with_capacity(file.size() as usize);
    file.read_to_end(&mut bytes).map_err(|e| format!("entry {name}: {e}"))?;
    Ok(bytes)
}

fn explain(path: &Path, error: PickleError) -> String {
    match error {
        PickleError::Forbidden(global) if global.rsplit('.').next().is_some_and(starts_upper) => format!(
            "holds a pickled Python object of class `{global}` (a whole model saved with torch.save(model)?), \
             not a state dict; only tensors and containers are read. In Python, with the code that defines \
             the class: torch.save(torch.load(\"{p}\", weights_only=False).state_dict(), \"state_dict.pt\")",
            p = path.display()
        ),
        PickleError::Forbidden(global) => format!(
            "the pickle asks for `{global}`, which only Python could run; refused (only tensors and \
             containers are read)"
        ),
        PickleError::Malformed(why) => format!("cannot read its pickle: {why}"),
    }
}

fn starts_upper(name: &str) -> bool {
    name.chars().next().is_some_and(char::is_uppercase)
}

/// Collects the tensors under `value`, keys joined with dots.
fn flatten(value: Value, prefix: String, out: &mut Vec<(String, TensorRef)>) -> Result<(), String> {
    match value {
        Value::Tensor(spec) if !prefix.is_empty() => out.push((prefix, spec)),
        Value::Tensor(_) => return Err("holds a single tensor, not a dict of tensors".into()),
        Value::Dict(entries) => {
            for (key, value) in entries {
                let key = match key {
                    Value::Str(key) => key,
                    Value::Int(i) => i.to_string(),
                    _ => continue,
                };
                let key = if prefix.is_empty() { key } else { format!("{prefix}.{key}") };
                flatten(value, key, out)?;
            }
        }
        _ if prefix.is_empty() => {
            return Err("holds no dict at the top: not a state dict or checkpoint".into())
        }
        _ => {}
    }
    Ok(())
}

/// The archive's storages, read once each.
struct Storages<'a> {
    archive: &'a mut zip::ZipArchive<std::fs::File>,
    prefix: &'a str,
    cache: HashMap<String, Tensor>,
}

impl Storages<'_> {
    /// The tensor `spec` describes (a view `index` checked against its storage): a strided view of
    /// the storage, copied out (contiguous).
    fn tensor(&mut self, key: &str, spec: &TensorRef) -> Result<Tensor, String> {
        if !self.cache.contains_key(&spec.storage) {
            let storage = self.read_storage(key, spec)?;
            self.cache.insert(spec.storage.clone(), storage);
        }
        let storage = &self.cache[&spec.storage];
        storage
            .f_as_strided(spec.size.as_slice(), spec.stride.as_slice(), spec.offset)
            .and_then(|view| view.f_contiguous())
            .map_err(|e| format!("tensor {key}: {e}"))
    }

    fn read_storage(&mut self, key: &str, spec: &TensorRef) -> Result<Tensor, String> {
        let element = spec.kind.elt_size_in_bytes() as u64;
        let bytes_expected = (spec.storage_numel as u64).checked_mul(element).ok_or("storage too large")?;
        let name = format!("{}data/{}", self.prefix, spec.storage);
        let bytes = entry(self.archive, &name, bytes_expected)?;
        if bytes.len() as u64 != bytes_expected {
            return Err(format!(
                "tensor {key}: its storage {name} holds {} bytes, {bytes_expected} expected (truncated file?)",
                bytes.len()
            ));
        }
        Tensor::f_from_data_size(&bytes, &[spec.storage_numel], spec.kind)
            .map_err(|e| format!("tensor {key}: {e}"))
    }
}

/// Every element the view reaches lies inside the storage (a bad file must not read out of bounds).
fn check_view(key: &str, spec: &TensorRef) -> Result<(), String> {
    let bad = |why: &str| {
        Err(format!(
            "tensor {key}: {why} (size {:?}, stride {:?}, offset {})",
            spec.size, spec.stride, spec.offset
        ))
    };
    if spec.size.len() != spec.stride.len() {
        return bad("size and stride differ in length");
    }
    if spec.offset < 0 || spec.storage_numel < 0 || spec.size.iter().chain(&spec.stride).any(|&v| v < 0) {
        return bad("a negative size, stride or offset");
    }
    if spec.size.contains(&0) {
        return Ok(());
    }
    // No state dict holds a broadcast view; refusing them bounds the copy by the storage's size.
    let elements = spec.size.iter().try_fold(1i64, |n, &d| n.checked_mul(d));
    if elements.is_none_or(|n| n > spec.storage_numel) {
        return bad(&format!("more elements than its storage's {}", spec.storage_numel));
    }
    let mut last = spec.offset as i128;
    for (&n, &s) in spec.size.iter().zip(&spec.stride) {
        last += (n as i128 - 1) * s as i128;
    }
    if last >= spec.storage_numel as i128 {
        return bad(&format!("reaches element {last} of a storage of {}", spec.storage_numel));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn view(storage: &str, kind: Kind, storage_numel: i64) -> TensorRef {
        TensorRef { storage: storage.into(), kind, storage_numel, offset: 0, size: vec![2], stride: vec![1] }
    }

    #[test]
    fn a_storage_typed_two_ways_is_refused_naming_both_tensors() {
        let agree =
            [("a".to_string(), view("0", Kind::Float, 4)), ("b".to_string(), view("0", Kind::Float, 4))];
        assert_eq!(check_storages(&agree), Ok(()));
        let found = [
            ("a".to_string(), view("0", Kind::Float, 4)),
            ("c".to_string(), view("1", Kind::Half, 2)),
            ("b".to_string(), view("0", Kind::Half, 4)),
        ];
        let err = check_storages(&found).unwrap_err();
        assert!(err.contains("tensors a and b read one storage (0) as 4 x Float and 4 x Half"), "{err}");
    }
}
