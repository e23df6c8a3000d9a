//! `torch.save` files, read natively: the zip archive, its `data.pkl` through the restricted pickle
//! reader (`pickle.rs`), its tensors found by `flatten.rs`, and each tensor from its raw storage
//! entry. Every size the archive declares is checked against the file's length before anything is
//! allocated, and no entry is inflated past the size its reader needs (a storage: its tensor's bytes;
//! the pickle: up to its STOP opcode).
use super::flatten::{self, Found};
use super::pickle::{self, PickleError, TensorRef};
use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::path::Path;
use tch::Tensor;

/// A `torch.save` archive's tensors by flattened key, before any storage is read: those this
/// reader reads, and those it does not (quantized, sparse, dtypes tch lacks: what each is); `Err`
/// is the reason, for `ScConvError::WeightsFile`.
pub(crate) fn index(path: &Path) -> Result<Vec<(String, Found)>, String> {
    let mut archive = Archive::open(path)?;
    let prefix = archive.pickle_prefix()?;
    archive.check_byte_order(&prefix)?;
    let budget = pickle_budget(archive.len);
    let pickle = {
        let name = format!("{prefix}data.pkl");
        let mut data = BufReader::new(archive.entry(&name, None)?);
        let read = pickle::read(&mut data, budget);
        // Every declared byte consumed by the pickle machine (none left in the buffer) when it failed
        // on malformed data: the pickle was cut at the entry's declared size.
        let consumed = data.buffer().is_empty();
        let entry = data.into_inner();
        let pickle = read.map_err(|e| {
            match consumed && entry.exhausted() && matches!(e, PickleError::Malformed(_)) {
                true => format!(
                    "entry {}: its pickle is cut at the entry's declared size ({} bytes) before its STOP \
                 opcode ({}); the archive's sizes are wrong (a damaged file?)",
                    super::shown(&name),
                    entry.size,
                    explain(path, e)
                ),
                false => explain(path, e),
            }
        })?;
        entry.verify_after_stop()?;
        pickle
    };
    let found = flatten::tensors(&pickle)?;
    drop(pickle);
    for (key, found) in &found {
        if let Found::Tensor(spec) = found {
            check_view(key, spec)?;
        }
    }
    check_storages(&found)?;
    Ok(found)
}

/// The bytes of values a pickle may build: 256 times the file (each opcode byte builds at most one
/// value, and a container costs 150 bytes), within 256 MiB and 384 MiB. Reading and flattening take
/// about 1.2 times the charge above a plain file's peak (measured on 2.4M nested lists, 435 MiB, before the corpus case was halved to 1.2M for the debug build;
/// `tests/hostile_checkpoints.rs`), which keeps any file well under 1 GiB above it.
fn pickle_budget(file_len: u64) -> u64 {
    file_len.saturating_mul(256).clamp(256 << 20, 384 << 20)
}

/// Every tensor of one storage reads it with the same dtype and element count, as PyTorch's storages
/// have one of each: otherwise the storage read first would decide for all (in whatever order the
/// tensors are visited), so such a file is refused, naming two tensors that disagree.
fn check_storages(found: &[(String, Found)]) -> Result<(), String> {
    let mut first: HashMap<&str, (&str, &TensorRef)> = HashMap::new();
    for (key, found) in found {
        let Found::Tensor(spec) = found else { continue };
        let (other_key, other) = *first.entry(spec.storage.as_str()).or_insert((key, spec));
        if (other.kind, other.storage_numel) != (spec.kind, spec.storage_numel) {
            return Err(format!(
                "tensors {} and {} read one storage ({}) as {} x {:?} and {} x {:?}; a torch.save file \
                 types each storage once",
                super::shown(other_key),
                super::shown(key),
                super::shown(&spec.storage),
                other.storage_numel,
                other.kind,
                spec.storage_numel,
                spec.kind
            ));
        }
    }
    Ok(())
}

/// The tensors `refs` (from `index`) from the archive's storages, each storage read once.
pub(crate) fn fetch(path: &Path, refs: &[(String, TensorRef)]) -> Result<Vec<(String, Tensor)>, String> {
    let mut archive = Archive::open(path)?;
    let prefix = archive.pickle_prefix()?;
    let mut storages = Storages { archive: &mut archive, prefix: &prefix, refs, cache: HashMap::new() };
    refs.iter().map(|(key, spec)| Ok((key.clone(), storages.tensor(key, spec)?))).collect()
}

/// A zip archive and the file's real length, which every declared size is checked against.
struct Archive {
    zip: zip::ZipArchive<std::fs::File>,
    len: u64,
}

impl Archive {
    fn open(path: &Path) -> Result<Archive, String> {
        let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
        let len = file.metadata().map_err(|e| e.to_string())?.len();
        // torch.save writes nothing before the archive. zip's default detection of a prefix (a
        // self-extracting stub) misreads some real torch.save files (measured: `torch.save(sd,
        // "state_dict_2023-07-27.pt")`, "Invalid Central Directory header"), so the offset is 0.
        let config = zip::read::Config { archive_offset: zip::read::ArchiveOffset::Known(0) };
        let zip =
            zip::ZipArchive::with_config(config, file).map_err(|e| not_an_archive(path, &e.to_string()))?;
        Ok(Archive { zip, len })
    }

    /// The folder inside the archive (`torch.save` names it after the file): where `data.pkl` is.
    fn pickle_prefix(&self) -> Result<String, String> {
        let pickles: Vec<String> = (self.zip.file_names_raw())
            .filter(|n| n.ends_with(b"data.pkl"))
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect();
        match pickles.as_slice() {
            [one] => Ok(one.trim_end_matches("data.pkl").to_string()),
            [] => Err("a zip archive without data.pkl: not a torch.save file".into()),
            _ => Err(format!("a zip archive with {} data.pkl entries", pickles.len())),
        }
    }

    fn check_byte_order(&mut self, prefix: &str) -> Result<(), String> {
        let name = format!("{prefix}byteorder");
        if self.zip.index_for_name(&name).is_some() {
            let mut order = Vec::new();
            let mut entry = self.entry(&name, Some(16))?;
            entry.read_to_end(&mut order).map_err(|e| format!("entry {name}: {e}"))?;
            entry.verify()?;
            if order != b"little" {
                return Err(format!(
                    "byte order {:?}: only little-endian files are read",
                    String::from_utf8_lossy(&order).chars().take(20).collect::<String>()
                ));
            }
        }
        Ok(())
    }

    /// A reader of entry `name`, refusing one whose declared sizes cannot be (its compressed bytes
    /// past the file's end) or whose size is larger than `expected`; it yields at most the declared
    /// size, whatever the compressed stream holds, and checks the bytes against the entry's CRC-32.
    fn entry(&mut self, name: &str, expected: Option<u64>) -> Result<Checked<impl Read + '_>, String> {
        let file_len = self.len;
        let file = self.zip.by_name(name).map_err(|e| format!("entry {}: {e}", super::shown(name)))?;
        let (size, compressed) = (file.size(), file.compressed_size());
        if compressed > file_len {
            return Err(format!(
                "entry {} declares {compressed} compressed bytes in a file of {file_len}",
                super::shown(name)
            ));
        }
        if let Some(expected) = expected.filter(|&e| size > e) {
            return Err(format!("entry {} holds {size} bytes, more than its {expected}", super::shown(name)));
        }
        let stored = file.crc32();
        Ok(Checked {
            data: file.take(size),
            size,
            stored,
            hasher: crc32fast::Hasher::new(),
            name: name.into(),
        })
    }
}

/// The most bytes read after a pickle's STOP opcode to check its entry's CRC-32 (`torch.save` writes
/// none there; a bigger tail, which PyTorch's reader ignores too, is left unread and unchecked).
const MAX_AFTER_STOP: u64 = 1 << 20;

/// An entry's declared bytes, with their CRC-32 computed as they are read. PyTorch writes every
/// entry's CRC unless told not to (`torch.serialization.set_crc32_options(False)`: then each entry's
/// stored CRC is 0, and is not checked; a real CRC is 0 once in 2^32).
struct Checked<R> {
    data: std::io::Take<R>,
    /// The declared (uncompressed) size.
    size: u64,
    stored: u32,
    hasher: crc32fast::Hasher,
    name: String,
}

impl<R: Read> Read for Checked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.data.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

impl<R: Read> Checked<R> {
    /// Whether every declared byte has been read.
    fn exhausted(&self) -> bool {
        self.data.limit() == 0
    }

    /// After the whole entry was read: its CRC-32 is the stored one (or none was stored). An entry
    /// that ended before its declared size is left to the caller's size check.
    fn verify(self) -> Result<(), String> {
        let exhausted = self.exhausted();
        let Checked { stored, hasher, name, .. } = self;
        let computed = hasher.finalize();
        if !exhausted || stored == 0 || computed == stored {
            return Ok(());
        }
        Err(format!(
            "entry {}: its bytes do not match the archive's CRC-32 (stored {stored:08x}, computed \
             {computed:08x}): a corrupt or altered file, download it again",
            super::shown(&name)
        ))
    }

    /// For the pickle, read up to its STOP opcode: the rest of the entry read too (up to
    /// `MAX_AFTER_STOP`), then `verify`.
    fn verify_after_stop(mut self) -> Result<(), String> {
        if self.data.limit() > MAX_AFTER_STOP || self.stored == 0 {
            return Ok(());
        }
        std::io::copy(&mut self, &mut std::io::sink())
            .map_err(|e| format!("entry {}: {e}", super::shown(&self.name)))?;
        self.verify()
    }
}

fn not_an_archive(path: &Path, why: &str) -> String {
    let name = path.display();
    format!(
        "not a torch.save zip archive ({why}); a truncated download, or a file saved with \
         _use_new_zipfile_serialization=False: load it in Python and save it again with \
         torch.save(torch.load(\"{name}\", weights_only=True), \"{name}\")"
    )
}

fn explain(path: &Path, error: PickleError) -> String {
    match error {
        PickleError::Forbidden(global) if global.rsplit('.').next().is_some_and(starts_upper) => format!(
            "holds a pickled Python object of class `{}` (a whole model saved with torch.save(model)?), \
             not a state dict; only tensors and containers are read. In Python, with the code that defines \
             the class: torch.save(torch.load(\"{p}\", weights_only=False).state_dict(), \"state_dict.pt\")",
            super::shown(&global),
            p = path.display()
        ),
        PickleError::Forbidden(global) => format!(
            "the pickle asks for `{}`, which only Python could run; refused (only tensors and \
             containers are read)",
            super::shown(&global)
        ),
        PickleError::Malformed(why) => format!("cannot read its pickle: {why}"),
    }
}

fn starts_upper(name: &str) -> bool {
    name.chars().next().is_some_and(char::is_uppercase)
}

/// The archive's storages, read once each.
struct Storages<'a> {
    archive: &'a mut Archive,
    prefix: &'a str,
    /// Every tensor asked for, for naming those on a corrupt storage.
    refs: &'a [(String, TensorRef)],
    cache: HashMap<String, Tensor>,
}

impl Storages<'_> {
    /// The keys of the tensors asked for that view `storage`, for an error.
    fn on_storage(&self, storage: &str) -> String {
        let keys: Vec<String> =
            self.refs.iter().filter(|(_, r)| r.storage == storage).map(|(k, _)| super::shown(k)).collect();
        keys.join(", ")
    }

    /// The tensor `spec` describes (a view `index` checked against its storage): a strided view of
    /// the storage, copied out (contiguous).
    fn tensor(&mut self, key: &str, spec: &TensorRef) -> Result<Tensor, String> {
        if !self.cache.contains_key(&spec.storage) {
            let storage = self.read_storage(key, spec)?;
            self.cache.insert(spec.storage.clone(), storage);
        }
        let storage = &self.cache[&spec.storage];
        let view = storage.f_as_strided(spec.size.as_slice(), spec.stride.as_slice(), spec.offset);
        // A broadcast view (a stride of 0: more elements than its storage) stays a view, as PyTorch
        // loads it; any other is copied out, so no two keys share memory.
        let broadcast = spec.size.iter().product::<i64>() > spec.storage_numel;
        view.and_then(|view| if broadcast { Ok(view) } else { view.f_contiguous() })
            .map_err(|e| format!("tensor {}: {e}", super::shown(key)))
    }

    fn read_storage(&mut self, key: &str, spec: &TensorRef) -> Result<Tensor, String> {
        let element = spec.kind.elt_size_in_bytes() as u64;
        let name = format!("{}data/{}", self.prefix, spec.storage);
        let bytes_expected = (spec.storage_numel as u64).checked_mul(element).ok_or_else(|| {
            format!(
                "tensor {}: its storage {} claims {} elements of {element} bytes, more bytes than a file can hold",
                super::shown(key),
                super::shown(&name),
                spec.storage_numel
            )
        })?;
        let mut bytes = Vec::new();
        let mut entry = self.archive.entry(&name, Some(bytes_expected))?;
        entry.read_to_end(&mut bytes).map_err(|e| format!("entry {}: {e}", super::shown(&name)))?;
        entry.verify().map_err(|e| format!("{e}; tensors on it: {}", self.on_storage(&spec.storage)))?;
        if bytes.len() as u64 != bytes_expected {
            return Err(format!(
                "tensor {}: its storage {} holds {} bytes, {bytes_expected} expected (truncated file?)",
                super::shown(key),
                super::shown(&name),
                bytes.len()
            ));
        }
        Tensor::f_from_data_size(&bytes, &[spec.storage_numel], spec.kind)
            .map_err(|e| format!("tensor {}: {e}", super::shown(key)))
    }
}

/// Every element the view reaches lies inside the storage (a bad file must not read out of bounds).
fn check_view(key: &str, spec: &TensorRef) -> Result<(), String> {
    let bad = |why: &str| {
        Err(format!(
            "tensor {}: {why} (size {:?}, stride {:?}, offset {})",
            super::shown(key),
            spec.size,
            spec.stride,
            spec.offset
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
    // A broadcast view (stride 0, `torch.zeros(1).expand(32, 1, 1)`) may hold more elements than its
    // storage; PyTorch loads it as a view, and so does `fetch` (no copy of that size is made).
    if spec.size.iter().try_fold(1i64, |n, &d| n.checked_mul(d)).is_none() {
        return bad("more elements than an i64 counts");
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

    fn view(storage: &str, kind: Kind, storage_numel: i64) -> Found {
        Found::Tensor(TensorRef {
            storage: storage.into(),
            kind,
            storage_numel,
            offset: 0,
            size: vec![2],
            stride: vec![1],
        })
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
