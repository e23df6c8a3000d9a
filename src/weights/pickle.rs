//! A restricted reader of the pickles `torch.save` writes: it interprets the pickle opcodes itself and
//! builds only containers (dict, `OrderedDict`, list, tuple), numbers, strings, storages and tensors.
//! Any other global a pickle names (a model class, `os.system`, ...) is an error naming it: nothing
//! pickled is ever run. The same stance as PyTorch's `torch.load(weights_only=True)`.
//!
//! No general pickle crate reads PyTorch's files: `serde-pickle` has no persistent ids (how tensors
//! point into the archive), and candle's reader comes with all of candle.
use std::collections::HashMap;
use tch::Kind;

/// A tensor as `torch._utils._rebuild_tensor_v2` describes it: a view of a storage in the archive.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TensorRef {
    pub storage: String,
    pub kind: Kind,
    pub storage_numel: i64,
    pub offset: i64,
    pub size: Vec<i64>,
    pub stride: Vec<i64>,
}

/// What the restricted reader builds.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// Entries in insertion order (a dict and an `OrderedDict` alike).
    Dict(Vec<(Value, Value)>),
    /// An allowed global, before it is called.
    Global(Allowed),
    /// A storage named by a persistent id: its archive key, dtype and element count.
    Storage {
        key: String,
        kind: Kind,
        numel: i64,
    },
    Tensor(TensorRef),
}

impl Value {
    /// What the value is, in a few words and at most a few hundred characters, whatever its size or
    /// depth (error messages name it; a container's contents are not printed).
    pub(crate) fn describe(&self) -> String {
        let text = match self {
            Value::None => "None".to_string(),
            Value::Bool(b) => format!("the bool {b}"),
            Value::Int(i) => format!("the int {i}"),
            Value::Float(f) => format!("the float {f}"),
            Value::Str(s) => format!("the string {:?}", s.chars().take(60).collect::<String>()),
            Value::Bytes(b) => format!("{} bytes", b.len()),
            Value::Tuple(items) => format!("a tuple of {} items", items.len()),
            Value::List(items) => format!("a list of {} items", items.len()),
            Value::Dict(entries) => format!("a dict of {} entries", entries.len()),
            Value::Global(global) => format!("the global {global:?}"),
            Value::Storage { key, kind, numel } => format!("storage {key:?} ({numel} x {kind:?})"),
            Value::Tensor(t) => format!("a tensor of size {:?}", t.size),
        };
        text.chars().take(200).collect()
    }
}

/// The globals a state dict or a training checkpoint needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Allowed {
    OrderedDict,
    RebuildTensor,
    RebuildParameter,
    StorageType(Kind),
}

/// Why a pickle was not read.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum PickleError {
    /// A global outside the allowed set: `module.name`.
    Forbidden(String),
    /// Anything else: truncated data, an unknown opcode, a malformed structure.
    Malformed(String),
}

fn allowed(module: &str, name: &str) -> Option<Allowed> {
    let storage = |kind| Some(Allowed::StorageType(kind));
    match (module, name) {
        ("collections", "OrderedDict") => Some(Allowed::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => Some(Allowed::RebuildTensor),
        ("torch._utils", "_rebuild_parameter") => Some(Allowed::RebuildParameter),
        ("torch", "FloatStorage") => storage(Kind::Float),
        ("torch", "DoubleStorage") => storage(Kind::Double),
        ("torch", "HalfStorage") => storage(Kind::Half),
        ("torch", "BFloat16Storage") => storage(Kind::BFloat16),
        ("torch", "LongStorage") => storage(Kind::Int64),
        ("torch", "IntStorage") => storage(Kind::Int),
        ("torch", "ShortStorage") => storage(Kind::Int16),
        ("torch", "CharStorage") => storage(Kind::Int8),
        ("torch", "ByteStorage") => storage(Kind::Uint8),
        ("torch", "BoolStorage") => storage(Kind::Bool),
        _ => None,
    }
}

/// Reads one pickle (up to its STOP opcode) into a `Value`.
pub(crate) fn read(data: &[u8]) -> Result<Value, PickleError> {
    Machine { data, at: 0, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new() }.run()
}

struct Machine<'a> {
    data: &'a [u8],
    at: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

fn malformed<T>(why: impl Into<String>) -> Result<T, PickleError> {
    Err(PickleError::Malformed(why.into()))
}

impl Machine<'_> {
    fn run(mut self) -> Result<Value, PickleError> {
        loop {
            let op = self.byte()?;
            match op {
                b'.' => return self.pop(),
                0x80 => drop(self.byte()?),  // PROTO
                0x95 => drop(self.take(8)?), // FRAME
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b']' => self.stack.push(Value::List(Vec::new())),
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b'(' => self.marks.push(self.stack.len()),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items))
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let items = self.pop_n(n)?;
                    self.stack.push(Value::Tuple(items))
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(items))
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Dict(pairs(items)?))
                }
                b'a' => {
                    let item = self.pop()?;
                    self.extend_list(vec![item])?
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.extend_list(items)?
                }
                b's' => {
                    let items = self.pop_n(2)?;
                    self.extend_dict(items)?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.extend_dict(items)?
                }
                b'q' => {
                    let key = u32::from(self.byte()?);
                    self.memoize(key)?
                }
                b'r' => {
                    let key = self.u32()?;
                    self.memoize(key)?
                }
                0x94 => {
                    let key = self.memo.len() as u32;
                    self.memoize(key)?
                }
                b'h' => {
                    let key = u32::from(self.byte()?);
                    self.recall(key)?
                }
                b'j' => {
                    let key = self.u32()?;
                    self.recall(key)?
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    self.push_str(n)?
                }
                0x8c => {
                    let n = usize::from(self.byte()?);
                    self.push_str(n)?
                }
                0x8d => {
                    let n = self.u64_len()?;
                    self.push_str(n)?
                }
                b'U' | b'C' => {
                    let n = usize::from(self.byte()?);
                    self.push_bytes(n)?
                }
                b'T' | b'B' => {
                    let n = self.u32()? as usize;
                    self.push_bytes(n)?
                }
                b'K' => {
                    let v = self.byte()?;
                    self.stack.push(Value::Int(i64::from(v)))
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.array()?);
                    self.stack.push(Value::Int(i64::from(v)))
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.array()?);
                    self.stack.push(Value::Int(i64::from(v)))
                }
                0x8a => {
                    let n = usize::from(self.byte()?);
                    let v = self.long(n)?;
                    self.stack.push(v)
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.array()?);
                    self.stack.push(Value::Float(v))
                }
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push_global(&module, &name)?
                }
                0x93 => {
                    let name = self.pop_str()?;
                    let module = self.pop_str()?;
                    self.push_global(&module, &name)?
                }
                b'Q' => {
                    let id = self.pop()?;
                    self.stack.push(storage(id)?)
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.stack.push(call(callable, args)?)
                }
                b'b' => drop(self.pop()?), // BUILD: an OrderedDict's `_metadata`; nothing else of ours has state
                b'0' => drop(self.pop()?),
                b'1' => drop(self.pop_mark()?),
                b'2' => {
                    let top = self.stack.last().cloned().ok_or_else(|| empty("DUP"))?;
                    self.stack.push(top)
                }
                other => return malformed(format!("unsupported pickle opcode 0x{other:02x}")),
            }
        }
    }

    fn byte(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }

    fn take(&mut self, n: usize) -> Result<&[u8], PickleError> {
        let end = self.at.checked_add(n).filter(|&end| end <= self.data.len());
        let Some(end) = end else { return malformed("the pickle ends early (truncated file?)") };
        let bytes = &self.data[self.at..end];
        self.at = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], PickleError> {
        Ok(self.take(N)?.try_into().expect("take returns N bytes"))
    }

    fn u32(&mut self) -> Result<u32, PickleError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64_len(&mut self) -> Result<usize, PickleError> {
        usize::try_from(u64::from_le_bytes(self.array()?)).or_else(|_| malformed("a string too long"))
    }

    fn line(&mut self) -> Result<String, PickleError> {
        let rest = &self.data[self.at..];
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            return malformed("a global's name has no end");
        };
        let text = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.at += end + 1;
        Ok(text)
    }

    fn long(&mut self, n: usize) -> Result<Value, PickleError> {
        let bytes = self.take(n)?;
        if n > 8 {
            return malformed(format!("an integer of {n} bytes"));
        }
        let negative = bytes.last().is_some_and(|&b| b & 0x80 != 0);
        let mut buf = [if negative { 0xff } else { 0 }; 8];
        buf[..n].copy_from_slice(bytes);
        Ok(Value::Int(i64::from_le_bytes(buf)))
    }

    fn push_str(&mut self, n: usize) -> Result<(), PickleError> {
        let text = String::from_utf8_lossy(self.take(n)?).into_owned();
        self.stack.push(Value::Str(text));
        Ok(())
    }

    fn push_bytes(&mut self, n: usize) -> Result<(), PickleError> {
        let bytes = self.take(n)?.to_vec();
        self.stack.push(Value::Bytes(bytes));
        Ok(())
    }

    fn push_global(&mut self, module: &str, name: &str) -> Result<(), PickleError> {
        match allowed(module, name) {
            Some(global) => {
                self.stack.push(Value::Global(global));
                Ok(())
            }
            None => Err(PickleError::Forbidden(format!("{module}.{name}"))),
        }
    }

    fn pop(&mut self) -> Result<Value, PickleError> {
        self.stack.pop().ok_or_else(|| empty("an opcode"))
    }

    fn pop_str(&mut self) -> Result<String, PickleError> {
        match self.pop()? {
            Value::Str(s) => Ok(s),
            other => malformed(format!("expected a string, found {}", other.describe())),
        }
    }

    fn pop_n(&mut self, n: usize) -> Result<Vec<Value>, PickleError> {
        let Some(start) = self.stack.len().checked_sub(n) else { return Err(empty("a tuple")) };
        Ok(self.stack.split_off(start))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, PickleError> {
        let start = self.marks.pop().ok_or_else(|| PickleError::Malformed("no mark to pop to".into()))?;
        if start > self.stack.len() {
            return malformed("a mark above the stack");
        }
        Ok(self.stack.split_off(start))
    }

    fn extend_list(&mut self, items: Vec<Value>) -> Result<(), PickleError> {
        match self.stack.last_mut() {
            Some(Value::List(list)) => {
                list.extend(items);
                Ok(())
            }
            _ => malformed("APPEND to something that is not a list"),
        }
    }

    fn extend_dict(&mut self, items: Vec<Value>) -> Result<(), PickleError> {
        let new = pairs(items)?;
        match self.stack.last_mut() {
            Some(Value::Dict(entries)) => {
                entries.extend(new);
                Ok(())
            }
            _ => malformed("SETITEM on something that is not a dict"),
        }
    }

    fn memoize(&mut self, key: u32) -> Result<(), PickleError> {
        let top = self.stack.last().cloned().ok_or_else(|| empty("PUT"))?;
        self.memo.insert(key, top);
        Ok(())
    }

    fn recall(&mut self, key: u32) -> Result<(), PickleError> {
        let value = self.memo.get(&key).cloned();
        let Some(value) = value else { return malformed(format!("memo entry {key} was never stored")) };
        self.stack.push(value);
        Ok(())
    }
}

fn empty(what: &str) -> PickleError {
    PickleError::Malformed(format!("{what} on an empty stack"))
}

fn pairs(items: Vec<Value>) -> Result<Vec<(Value, Value)>, PickleError> {
    if !items.len().is_multiple_of(2) {
        return malformed("a dict with an odd number of items");
    }
    let mut it = items.into_iter();
    Ok(std::iter::from_fn(|| Some((it.next()?, it.next()?))).collect())
}

/// A persistent id `('storage', <dtype>Storage, key, location, numel)`.
fn storage(id: Value) -> Result<Value, PickleError> {
    let Value::Tuple(parts) = id else { return malformed("a persistent id that is not a tuple") };
    match parts.as_slice() {
        [Value::Str(tag), Value::Global(Allowed::StorageType(kind)), Value::Str(key), _, Value::Int(numel)]
            if tag == "storage" =>
        {
            Ok(Value::Storage { key: key.clone(), kind: *kind, numel: *numel })
        }
        _ => {
            let parts: Vec<String> = parts.iter().take(6).map(Value::describe).collect();
            malformed(format!("an unknown persistent id ({})", parts.join(", ")))
        }
    }
}

/// REDUCE: the allowed globals called with their arguments.
fn call(callable: Value, args: Value) -> Result<Value, PickleError> {
    let Value::Tuple(args) = args else { return malformed("REDUCE with arguments that are not a tuple") };
    match (callable, args.as_slice()) {
        (Value::Global(Allowed::OrderedDict), []) => Ok(Value::Dict(Vec::new())),
        (Value::Global(Allowed::RebuildTensor), [storage, offset, size, stride, ..]) => {
            rebuild_tensor(storage, offset, size, stride)
        }
        (Value::Global(Allowed::RebuildParameter), [tensor @ Value::Tensor(_), ..]) => Ok(tensor.clone()),
        (callable, args) => {
            malformed(format!("cannot call {} with {} arguments", callable.describe(), args.len()))
        }
    }
}

fn rebuild_tensor(
    storage: &Value,
    offset: &Value,
    size: &Value,
    stride: &Value,
) -> Result<Value, PickleError> {
    let Value::Storage { key, kind, numel } = storage else {
        return malformed("a tensor whose storage is not a storage");
    };
    let Value::Int(offset) = *offset else { return malformed("a tensor offset that is not an integer") };
    Ok(Value::Tensor(TensorRef {
        storage: key.clone(),
        kind: *kind,
        storage_numel: *numel,
        offset,
        size: ints(size)?,
        stride: ints(stride)?,
    }))
}

fn ints(value: &Value) -> Result<Vec<i64>, PickleError> {
    let Value::Tuple(items) = value else { return malformed("a shape that is not a tuple") };
    items.iter().map(|v| if let Value::Int(i) = v { Ok(*i) } else { malformed("a shape entry") }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `pickle.dumps({"a": [1, -2, 300, 70000, 2**40], "b": (True, None, 1.5), "c": "é"})`
    fn expected() -> Value {
        let s = |t: &str| Value::Str(t.into());
        let ints = [1, -2, 300, 70000, 1 << 40].map(Value::Int).to_vec();
        Value::Dict(vec![
            (s("a"), Value::List(ints)),
            (s("b"), Value::Tuple(vec![Value::Bool(true), Value::None, Value::Float(1.5)])),
            (s("c"), s("é")),
        ])
    }

    #[test]
    fn reads_containers_numbers_and_strings_in_protocols_2_and_4() {
        let protocol_2 = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01J\xfe\xff\xff\xffM,\x01Jp\x11\x01\x00\x8a\x06\x00\x00\x00\x00\x00\x01eX\x01\x00\x00\x00bq\x03\x88NG?\xf8\x00\x00\x00\x00\x00\x00\x87q\x04X\x01\x00\x00\x00cq\x05X\x02\x00\x00\x00\xc3\xa9q\x06u.";
        let protocol_4 = b"\x80\x04\x95>\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x01a\x94]\x94(K\x01J\xfe\xff\xff\xffM,\x01Jp\x11\x01\x00\x8a\x06\x00\x00\x00\x00\x00\x01e\x8c\x01b\x94\x88NG?\xf8\x00\x00\x00\x00\x00\x00\x87\x94\x8c\x01c\x94\x8c\x02\xc3\xa9\x94u.";
        assert_eq!(read(protocol_2).unwrap(), expected());
        assert_eq!(read(protocol_4).unwrap(), expected());
    }

    /// REDUCE on a 100,000-element list (issue 18 measured an 8 MB error line for 1M): the error names
    /// what was called in a few words.
    #[test]
    fn an_error_names_a_huge_value_briefly() {
        let mut data = b"\x80\x02](".to_vec();
        data.extend(std::iter::repeat_n(*b"K\x01", 100_000).flatten());
        data.extend(b"e)R.");
        let Err(PickleError::Malformed(message)) = read(&data) else { panic!("a list is not callable") };
        assert!(message.contains("cannot call a list of 100000 items with 0 arguments"), "{message}");
        assert!(message.len() < 300, "{} characters", message.len());
    }

    #[test]
    fn a_foreign_global_is_refused_by_name() {
        // pickle.dumps(os.system) with a call: c posix\nsystem\n (X 'ls') R .
        let data = b"\x80\x02cposix\nsystem\nX\x02\x00\x00\x00ls\x85R.";
        assert_eq!(read(data), Err(PickleError::Forbidden("posix.system".into())));
        let data = b"\x80\x02cmodels.yolo\nDetectionModel\n)\x81.";
        assert_eq!(read(data), Err(PickleError::Forbidden("models.yolo.DetectionModel".into())));
    }

    #[test]
    fn truncated_and_malformed_pickles_are_errors() {
        let data = b"\x80\x02}q\x00(X\x05\x00\x00\x00ab";
        assert!(matches!(read(data), Err(PickleError::Malformed(m)) if m.contains("ends early")));
        assert!(matches!(read(b"\x80\x02\xff"), Err(PickleError::Malformed(m)) if m.contains("opcode 0xff")));
        assert!(matches!(read(b"u."), Err(PickleError::Malformed(_))));
        assert!(matches!(read(b"h\x07."), Err(PickleError::Malformed(m)) if m.contains("memo entry 7")));
    }
}
