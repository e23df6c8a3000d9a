//! What a weights file holds, read before its data: each tensor's name, shape and dtype. A load is
//! checked key by key against the model on this index, and then only the tensors the model takes are
//! read (an unrelated 3 GB tensor in the file costs nothing).
use super::checkpoint;
use super::flatten::Found;
use super::pickle::{TensorRef, Unreadable};
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// A tensor's shape and dtype, as the file declares them; the dtype is `Err(what it is)` for a
/// tensor this reader does not read (quantized, sparse, a dtype tch has no kind for).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    pub shape: Vec<i64>,
    pub kind: Result<Kind, String>,
}

/// A weights file's tensors, not yet read.
pub(crate) enum Index {
    Safetensors { path: PathBuf, data_start: u64, tensors: BTreeMap<String, (Entry, (u64, u64))> },
    Torch { path: PathBuf, tensors: BTreeMap<String, TensorRef>, unreadable: BTreeMap<String, Unreadable> },
}

/// The largest safetensors header read (the format's own limit).
const MAX_HEADER: u64 = 100_000_000;

impl Index {
    /// The index of a `.safetensors` file or a `torch.save` archive; `Err` is the reason.
    pub(crate) fn safetensors(path: &Path) -> Result<Index, String> {
        let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
        let file_len = file.metadata().map_err(|e| e.to_string())?.len();
        let mut len = [0u8; 8];
        file.read_exact(&mut len)
            .map_err(|_| "not a safetensors file: shorter than its 8-byte header length")?;
        let header_len = u64::from_le_bytes(len);
        if header_len > MAX_HEADER || header_len > file_len.saturating_sub(8) {
            return Err(format!(
                "not a safetensors file: a header of {header_len} bytes in a file of {file_len}"
            ));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(|e| e.to_string())?;
        let Header(entries) =
            serde_json::from_slice(&header).map_err(|e| format!("not a safetensors header: {e}"))?;
        let data_len = file_len.saturating_sub(8 + header_len);
        check_layout(&entries, data_len)?;
        let mut tensors = BTreeMap::new();
        for (name, info) in entries {
            let entry = Entry {
                shape: info.shape.iter().map(|&d| d as i64).collect(),
                kind: Ok(kind_of(info.dtype, &name)?),
            };
            let (begin, end) = (info.data_offsets.0 as u64, info.data_offsets.1 as u64);
            let numel = info.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64));
            let bytes = numel.and_then(|n| n.checked_mul(info.dtype.size() as u64));
            if bytes.is_none() || bytes != end.checked_sub(begin) {
                return Err(format!(
                    "tensor {name}: shape {:?} of {:?} does not fit its data offsets ({begin}, {end}) in {data_len} bytes",
                    info.shape, info.dtype
                ));
            }
            tensors.insert(name, (entry, (begin, end)));
        }
        Ok(Index::Safetensors { path: path.to_path_buf(), data_start: 8 + header_len, tensors })
    }

    /// The index of a `torch.save` archive.
    pub(crate) fn torch(path: &Path) -> Result<Index, String> {
        let (mut tensors, mut unreadable) = (BTreeMap::new(), BTreeMap::new());
        for (key, found) in checkpoint::index(path)? {
            match found {
                Found::Tensor(spec) => drop(tensors.insert(key, spec)),
                Found::Unreadable(what) => drop(unreadable.insert(key, what)),
            }
        }
        Ok(Index::Torch { path: path.to_path_buf(), tensors, unreadable })
    }

    /// Every tensor's name, shape and dtype.
    pub(crate) fn entries(&self) -> BTreeMap<String, Entry> {
        match self {
            Index::Safetensors { tensors, .. } => {
                tensors.iter().map(|(k, (e, _))| (k.clone(), e.clone())).collect()
            }
            Index::Torch { tensors, unreadable, .. } => {
                let readable = tensors
                    .iter()
                    .map(|(k, r)| (k.clone(), Entry { shape: r.size.clone(), kind: Ok(r.kind) }));
                let others = unreadable
                    .iter()
                    .map(|(k, u)| (k.clone(), Entry { shape: u.size.clone(), kind: Err(u.what.clone()) }));
                readable.chain(others).collect()
            }
        }
    }

    /// The tensors named `keys` (all of them in the index), read now.
    pub(crate) fn fetch(&self, keys: &[&String]) -> Result<Vec<(String, Tensor)>, String> {
        match self {
            Index::Safetensors { path, data_start, tensors } => {
                let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
                keys.iter()
                    .map(|&key| {
                        let (entry, (begin, end)) = &tensors[key];
                        let kind = entry.kind.clone()?;
                        let mut bytes = vec![0u8; (end - begin) as usize];
                        file.seek(SeekFrom::Start(data_start + begin)).map_err(|e| e.to_string())?;
                        file.read_exact(&mut bytes).map_err(|e| format!("tensor {key}: {e}"))?;
                        let tensor = Tensor::f_from_data_size(&bytes, &entry.shape, kind)
                            .map_err(|e| format!("tensor {key}: {e}"))?;
                        Ok((key.clone(), tensor))
                    })
                    .collect()
            }
            Index::Torch { path, tensors, unreadable } => {
                let refs: Vec<(String, TensorRef)> = keys
                    .iter()
                    .map(|&k| match tensors.get(k) {
                        Some(spec) => Ok((k.clone(), spec.clone())),
                        None => Err(format!(
                            "tensor {}: {}, which this reader does not read",
                            super::shown(k),
                            unreadable.get(k).map_or("not in the file", |u| u.what.as_str())
                        )),
                    })
                    .collect::<Result<_, _>>()?;
                checkpoint::fetch(path, &refs)
            }
        }
    }
}

/// A safetensors header's tensors in file order, each name once (`__metadata__`, free text, skipped).
/// The `safetensors` crate's own `Metadata` keeps the last of two entries with one name (a JSON map),
/// so the header is read here; its `TensorInfo` is the crate's.
struct Header(Vec<(String, safetensors::tensor::TensorInfo)>);

impl<'de> serde::Deserialize<'de> for Header {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Header, D::Error> {
        deserializer.deserialize_map(HeaderVisitor)
    }
}

struct HeaderVisitor;

impl<'de> serde::de::Visitor<'de> for HeaderVisitor {
    type Value = Header;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object of tensors")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Header, A::Error> {
        let mut entries = Vec::new();
        let mut seen = std::collections::HashSet::new();
        while let Some(name) = map.next_key::<String>()? {
            if name == "__metadata__" {
                map.next_value::<Option<BTreeMap<String, String>>>()?;
                continue;
            }
            if !seen.insert(name.clone()) {
                let shown = super::shown(&name);
                return Err(serde::de::Error::custom(format!("the tensor name {shown} appears twice")));
            }
            entries.push((name, map.next_value()?));
        }
        Ok(Header(entries))
    }
}

/// The format's rules on where the data lies (as the `safetensors` crate and Python's `safetensors`
/// enforce them): taken in offset order, each tensor begins where the one before ended, the first at 0,
/// and the last ends where the file does, so no byte belongs to two tensors and none to no tensor.
fn check_layout(entries: &[(String, safetensors::tensor::TensorInfo)], data_len: u64) -> Result<(), String> {
    let mut by_offset: Vec<&(String, safetensors::tensor::TensorInfo)> = entries.iter().collect();
    by_offset.sort_by_key(|(_, info)| info.data_offsets);
    let mut covered = 0u64;
    for (name, info) in by_offset {
        let (begin, end) = (info.data_offsets.0 as u64, info.data_offsets.1 as u64);
        if begin != covered || end < begin {
            let what = match begin.cmp(&covered) {
                _ if end < begin => "ends before it begins",
                std::cmp::Ordering::Less => "overlaps the tensor before it",
                _ => "leaves a gap after the tensor before it",
            };
            return Err(format!(
                "invalid offset for tensor {}: its data ({begin}, {end}) {what}, which ends at byte {covered}; \
                 the format lays tensors end to end",
                super::shown(name)
            ));
        }
        covered = end;
    }
    if covered != data_len {
        return Err(format!(
            "incomplete metadata: the tensors cover {covered} of the {data_len} bytes after the header (the \
             format requires every byte to belong to a tensor)"
        ));
    }
    Ok(())
}

fn kind_of(dtype: safetensors::Dtype, name: &str) -> Result<Kind, String> {
    use safetensors::Dtype::*;
    Ok(match dtype {
        F64 => Kind::Double,
        F32 => Kind::Float,
        F16 => Kind::Half,
        BF16 => Kind::BFloat16,
        I64 => Kind::Int64,
        I32 => Kind::Int,
        I16 => Kind::Int16,
        I8 => Kind::Int8,
        U8 => Kind::Uint8,
        BOOL => Kind::Bool,
        other => return Err(format!("tensor {name}: dtype {other:?} has no libtorch counterpart")),
    })
}
