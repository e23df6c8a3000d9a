//! A restricted reader of the pickles `torch.save` writes: it interprets the pickle opcodes itself
//! (protocols 0-5, data opcodes only) and builds containers, numbers, strings, storages and tensor
//! references. A global outside PyTorch's `weights_only` list (`allowlist.rs`: a model class,
//! `os.system`, ...) is an error naming it: nothing pickled is ever run.
//!
//! Bounded whatever the bytes do: the machine is a loop over an explicit stack (no recursion, so no
//! nesting overflows it); memoised and `DUP`ed values are shared, not copied (containers are
//! reference-counted, as Python's objects are), so a pickle that recalls one list a million times
//! costs a million pointers; every value is charged to a budget and the read ends with an error when
//! it is spent; and the containers are emptied one by one when the pickle is dropped, so neither a
//! million-deep nesting nor a list that holds itself is dropped by recursion or leaked.
//!
//! No general pickle crate reads PyTorch's files: `serde-pickle` has no persistent ids (how tensors
//! point into the archive), and candle's reader comes with all of candle.
use super::allowlist::{self, Allowed};
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{BufRead, Read};
use std::rc::Rc;
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

/// A tensor in the file that this reader does not turn into a tch tensor: what it is, its size.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Unreadable {
    pub what: String,
    pub size: Vec<i64>,
}

/// How a storage's persistent id types it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum StorageType {
    /// `torch.FloatStorage` and the other legacy typed storages: `numel` counts elements.
    Typed(Kind),
    /// `torch.storage.UntypedStorage` (with `_rebuild_tensor_v3`): `numel` counts bytes.
    Untyped,
    /// A quantized storage.
    Unreadable(&'static str),
}

/// A storage named by a persistent id.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Storage {
    pub key: Rc<str>,
    pub ty: StorageType,
    pub numel: i64,
}

/// A shared, growable sequence (a list, a tuple, a set's stand-in) or a dict's entries.
pub(crate) type Seq = Rc<RefCell<Vec<Value>>>;
pub(crate) type Map = Rc<RefCell<Vec<(Value, Value)>>>;

/// What the restricted reader builds. Cloning shares containers (as Python's references do).
#[derive(Clone)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    /// A value read and never looked into: bytes, an int beyond 64 bits, a set, a device, ...
    Opaque(&'static str),
    Tuple(Seq),
    List(Seq),
    /// Entries in insertion order (a dict, an `OrderedDict` and a `Counter` alike).
    Dict(Map),
    Global(Allowed),
    Storage(Rc<Storage>),
    Tensor(Rc<TensorRef>),
    Unreadable(Rc<Unreadable>),
}

impl Value {
    pub(crate) fn dict(entries: Vec<(Value, Value)>) -> Value {
        Value::Dict(Rc::new(RefCell::new(entries)))
    }

    /// What the value is, in a few words and at most a few hundred characters, whatever its size or
    /// depth (error messages name it; a container's contents are not printed).
    pub(crate) fn describe(&self) -> String {
        let text = match self {
            Value::None => "None".to_string(),
            Value::Bool(b) => format!("the bool {b}"),
            Value::Int(i) => format!("the int {i}"),
            Value::Float(f) => format!("the float {f}"),
            Value::Str(s) => format!("the string {:?}", s.chars().take(60).collect::<String>()),
            Value::Opaque(what) => (*what).to_string(),
            Value::Tuple(items) => format!("a tuple of {} items", items.borrow().len()),
            Value::List(items) => format!("a list of {} items", items.borrow().len()),
            Value::Dict(entries) => format!("a dict of {} entries", entries.borrow().len()),
            Value::Global(global) => format!("the global {global:?}"),
            Value::Storage(s) => format!("storage {:?} ({} x {:?})", s.key, s.numel, s.ty),
            Value::Tensor(t) => format!("a tensor of size {:?}", t.size),
            Value::Unreadable(t) => format!("{} of size {:?}", t.what, t.size),
        };
        text.chars().take(200).collect()
    }
}

/// Never recursive (a derived `Debug` would walk a million-deep nesting): the value described.
impl std::fmt::Debug for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Why a pickle was not read.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum PickleError {
    /// A global outside the allowed set: `module.name`.
    Forbidden(String),
    /// Anything else: truncated data, an unknown opcode, a malformed structure, the budget spent.
    Malformed(String),
}

pub(crate) fn malformed<T>(why: impl Into<String>) -> Result<T, PickleError> {
    Err(PickleError::Malformed(why.into()))
}

/// A read pickle: its top value, and every container it built (emptied on drop, see the module).
pub(crate) struct Pickle {
    pub root: Value,
    heap: Heap,
}

/// Reads one pickle from `data` up to its STOP opcode (what follows is not read), building at most
/// `budget` bytes of values.
pub(crate) fn read(data: impl BufRead, budget: u64) -> Result<Pickle, PickleError> {
    let mut machine = Machine {
        data,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        heap: Heap(Vec::new()),
        spent: 0,
        budget,
    };
    let root = machine.run()?;
    Ok(Pickle { root, heap: std::mem::take(&mut machine.heap) })
}

/// Every container of a pickle, held until the pickle goes: then each is emptied in turn, which
/// breaks cycles, and no container is freed while another still points at it (no recursive drop).
#[derive(Default)]
struct Heap(Vec<Value>);

impl Drop for Heap {
    fn drop(&mut self) {
        for container in &self.0 {
            match container {
                Value::Tuple(seq) | Value::List(seq) => drop(std::mem::take(&mut *seq.borrow_mut())),
                Value::Dict(map) => drop(std::mem::take(&mut *map.borrow_mut())),
                _ => {}
            }
        }
    }
}

impl Pickle {
    /// How many containers the pickle built (the flattening's visit budget is tied to it).
    pub(crate) fn containers(&self) -> usize {
        self.heap.0.len()
    }
}

/// What a value costs the budget, in bytes: its slot, plus a container's or a string's heap.
const VALUE_COST: u64 = std::mem::size_of::<Value>() as u64;
const CONTAINER_COST: u64 = 128;
const MEMO_COST: u64 = 48;
/// The longest line a text opcode (a global's name, protocol 0's numbers) may take.
const MAX_LINE: u64 = 4096;

struct Machine<R> {
    data: R,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    heap: Heap,
    spent: u64,
    budget: u64,
}

impl<R: BufRead> Machine<R> {
    fn run(&mut self) -> Result<Value, PickleError> {
        loop {
            let op = self.byte()?;
            if op == b'.' {
                return self.pop();
            }
            self.step(op)?;
        }
    }

    fn step(&mut self, op: u8) -> Result<(), PickleError> {
        match op {
            0x80 => drop(self.byte()?),       // PROTO
            0x95 => drop(self.array::<8>()?), // FRAME
            b'(' => self.marks.push(self.stack.len()),
            b'0' => drop(self.pop()?),
            b'1' => drop(self.pop_mark()?),
            b'2' => {
                let top = self.stack.last().cloned().ok_or_else(|| empty("DUP"))?;
                self.push(top)?
            }
            b'N' => self.push(Value::None)?,
            0x88 => self.push(Value::Bool(true))?,
            0x89 => self.push(Value::Bool(false))?,
            b'K' => {
                let v = self.byte()?;
                self.push(Value::Int(i64::from(v)))?
            }
            b'M' => {
                let v = u16::from_le_bytes(self.array()?);
                self.push(Value::Int(i64::from(v)))?
            }
            b'J' => {
                let v = i32::from_le_bytes(self.array()?);
                self.push(Value::Int(i64::from(v)))?
            }
            0x8a => {
                let n = u64::from(self.byte()?);
                self.push_long(n)?
            }
            0x8b => {
                let n = u64::from(self.u32()?);
                self.push_long(n)?
            }
            b'I' | b'L' => {
                let line = self.line()?;
                self.push(text_int(&line))?
            }
            b'G' => {
                let v = f64::from_be_bytes(self.array()?);
                self.push(Value::Float(v))?
            }
            b'F' => {
                let line = self.line()?;
                let v = line.trim().parse().or_else(|_| malformed("a FLOAT that is not a number"))?;
                self.push(Value::Float(v))?
            }
            b'X' | b'T' => {
                let n = u64::from(self.u32()?);
                self.push_str(n)?
            }
            0x8c | b'U' => {
                let n = u64::from(self.byte()?);
                self.push_str(n)?
            }
            0x8d => {
                let n = u64::from_le_bytes(self.array()?);
                self.push_str(n)?
            }
            b'V' | b'S' => {
                let line = self.line()?;
                self.push(Value::Str(line.trim_matches(|c| c == '\'' || c == '"').into()))?
            }
            b'C' => {
                let n = u64::from(self.byte()?);
                self.skip_bytes(n)?
            }
            b'B' => {
                let n = u64::from(self.u32()?);
                self.skip_bytes(n)?
            }
            0x8e | 0x96 => {
                let n = u64::from_le_bytes(self.array()?);
                self.skip_bytes(n)?
            }
            b')' => self.push_container(Value::Tuple(Seq::default()))?,
            b']' => self.push_container(Value::List(Seq::default()))?,
            b'}' => self.push_container(Value::dict(Vec::new()))?,
            0x8f => self.push(Value::Opaque("a set"))?,
            b't' => {
                let items = self.pop_mark()?;
                self.push_container(Value::Tuple(Rc::new(RefCell::new(items))))?
            }
            0x85..=0x87 => {
                let items = self.pop_n(usize::from(op - 0x84))?;
                self.push_container(Value::Tuple(Rc::new(RefCell::new(items))))?
            }
            b'l' => {
                let items = self.pop_mark()?;
                self.push_container(Value::List(Rc::new(RefCell::new(items))))?
            }
            b'd' => {
                let items = self.pop_mark()?;
                self.push_container(Value::dict(pairs(items)?))?
            }
            0x91 => {
                drop(self.pop_mark()?);
                self.push(Value::Opaque("a frozenset"))?
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
            0x90 => {
                drop(self.pop_mark()?);
                match self.stack.last() {
                    Some(Value::Opaque("a set")) => {}
                    _ => return malformed("ADDITEMS to something that is not a set"),
                }
            }
            b'q' => {
                let key = u32::from(self.byte()?);
                self.memoize(key)?
            }
            b'r' => {
                let key = self.u32()?;
                self.memoize(key)?
            }
            b'p' => {
                let key = self.line_u32()?;
                self.memoize(key)?
            }
            0x94 => {
                let key = u32::try_from(self.memo.len()).or_else(|_| malformed("too many memo entries"))?;
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
            b'g' => {
                let key = self.line_u32()?;
                self.recall(key)?
            }
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
                self.push(storage(&id)?)?
            }
            b'R' | 0x81 => {
                let args = self.pop()?;
                let callable = self.pop()?;
                self.call(&callable, &args)?
            }
            0x92 => {
                let _kwargs = self.pop()?;
                let args = self.pop()?;
                let callable = self.pop()?;
                self.call(&callable, &args)?
            }
            // BUILD: an OrderedDict's `_metadata`, a tensor's or a Parameter's state; nothing we read.
            b'b' => drop(self.pop()?),
            b'P' => return malformed("a text persistent id (PERSID): torch.save writes none"),
            b'i' | b'o' => return malformed("an INST or OBJ opcode: an object of a class, not data"),
            0x82..=0x84 => return malformed("an EXT opcode (the copyreg extension registry)"),
            0x97 | 0x98 => return malformed("an out-of-band buffer (pickle protocol 5 buffers)"),
            other => return malformed(format!("unsupported pickle opcode 0x{other:02x}")),
        }
        Ok(())
    }

    fn charge(&mut self, bytes: u64) -> Result<(), PickleError> {
        self.spent = self.spent.saturating_add(bytes);
        if self.spent > self.budget {
            return malformed(format!(
                "it builds more than {} MiB of values (a state dict's pickle needs a few MiB); refused \
                 to bound memory",
                self.budget >> 20
            ));
        }
        Ok(())
    }

    fn push(&mut self, value: Value) -> Result<(), PickleError> {
        self.charge(VALUE_COST)?;
        self.stack.push(value);
        Ok(())
    }

    fn push_container(&mut self, value: Value) -> Result<(), PickleError> {
        self.charge(CONTAINER_COST)?;
        self.heap.0.push(value.clone());
        self.push(value)
    }

    fn byte(&mut self) -> Result<u8, PickleError> {
        Ok(self.array::<1>()?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], PickleError> {
        let mut bytes = [0; N];
        self.data.read_exact(&mut bytes).or_else(|e| ended(&e))?;
        Ok(bytes)
    }

    fn u32(&mut self) -> Result<u32, PickleError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    /// `n` bytes, charged before they are read (a length that lies is refused by the budget or
    /// ends with the data, never allocated whole).
    fn take(&mut self, n: u64) -> Result<Vec<u8>, PickleError> {
        self.charge(n)?;
        let mut bytes = Vec::new();
        (&mut self.data).take(n).read_to_end(&mut bytes).or_else(|e| ended(&e))?;
        if (bytes.len() as u64) < n {
            return malformed("the pickle ends early (truncated file?)");
        }
        Ok(bytes)
    }

    fn skip_bytes(&mut self, n: u64) -> Result<(), PickleError> {
        let skipped =
            std::io::copy(&mut (&mut self.data).take(n), &mut std::io::sink()).or_else(|e| ended(&e))?;
        if skipped < n {
            return malformed("the pickle ends early (truncated file?)");
        }
        self.push(Value::Opaque("bytes"))
    }

    fn line(&mut self) -> Result<String, PickleError> {
        let mut line = Vec::new();
        (&mut self.data).take(MAX_LINE).read_until(b'\n', &mut line).or_else(|e| ended(&e))?;
        if line.pop() != Some(b'\n') {
            return malformed("a text opcode's line has no end");
        }
        Ok(String::from_utf8_lossy(&line).into_owned())
    }

    fn line_u32(&mut self) -> Result<u32, PickleError> {
        self.line()?.trim().parse().or_else(|_| malformed("a memo key that is not a small integer"))
    }

    fn push_long(&mut self, n: u64) -> Result<(), PickleError> {
        let bytes = self.take(n)?;
        if n > 8 {
            return self.push(Value::Opaque("an int beyond 64 bits"));
        }
        let negative = bytes.last().is_some_and(|&b| b & 0x80 != 0);
        let mut buf = [if negative { 0xff } else { 0 }; 8];
        buf[..bytes.len()].copy_from_slice(&bytes);
        self.push(Value::Int(i64::from_le_bytes(buf)))
    }

    fn push_str(&mut self, n: u64) -> Result<(), PickleError> {
        let bytes = self.take(n)?;
        self.push(Value::Str(String::from_utf8_lossy(&bytes).into()))
    }

    fn push_global(&mut self, module: &str, name: &str) -> Result<(), PickleError> {
        match allowlist::allowed(module, name) {
            Some(global) => self.push(Value::Global(global)),
            None => Err(PickleError::Forbidden(format!("{module}.{name}"))),
        }
    }

    fn call(&mut self, callable: &Value, args: &Value) -> Result<(), PickleError> {
        let Value::Tuple(args) = args else { return malformed("REDUCE with arguments that are not a tuple") };
        let args = args.borrow().clone();
        let value = allowlist::call(callable, &args)?;
        match value {
            Value::Tuple(_) | Value::List(_) | Value::Dict(_) => self.push_container(value),
            value => self.push(value),
        }
    }

    fn pop(&mut self) -> Result<Value, PickleError> {
        self.stack.pop().ok_or_else(|| empty("an opcode"))
    }

    fn pop_str(&mut self) -> Result<String, PickleError> {
        match self.pop()? {
            Value::Str(s) => Ok(s.to_string()),
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
        let items = self.stack.split_off(start);
        // A million items pushed between a mark and its end leave their room behind: give it back.
        if self.stack.capacity() > 4 * self.stack.len() + 1024 {
            self.stack.shrink_to(2 * self.stack.len());
        }
        Ok(items)
    }

    fn extend_list(&mut self, items: Vec<Value>) -> Result<(), PickleError> {
        match self.stack.last() {
            Some(Value::List(list)) => {
                list.borrow_mut().extend(items);
                Ok(())
            }
            _ => malformed("APPEND to something that is not a list"),
        }
    }

    fn extend_dict(&mut self, items: Vec<Value>) -> Result<(), PickleError> {
        let new = pairs(items)?;
        match self.stack.last() {
            Some(Value::Dict(entries)) => {
                entries.borrow_mut().extend(new);
                Ok(())
            }
            _ => malformed("SETITEM on something that is not a dict"),
        }
    }

    fn memoize(&mut self, key: u32) -> Result<(), PickleError> {
        let top = self.stack.last().cloned().ok_or_else(|| empty("PUT"))?;
        self.charge(MEMO_COST)?;
        self.memo.insert(key, top);
        Ok(())
    }

    fn recall(&mut self, key: u32) -> Result<(), PickleError> {
        let value = self.memo.get(&key).cloned();
        let Some(value) = value else { return malformed(format!("memo entry {key} was never stored")) };
        self.push(value)
    }
}

fn ended<T>(error: &std::io::Error) -> Result<T, PickleError> {
    match error.kind() {
        std::io::ErrorKind::UnexpectedEof => malformed("the pickle ends early (truncated file?)"),
        _ => malformed(format!("cannot read the pickle: {error}")),
    }
}

fn empty(what: &str) -> PickleError {
    PickleError::Malformed(format!("{what} on an empty stack"))
}

/// Protocol 0's INT and LONG: decimal text (`01` / `00` are True / False, `L` ends a LONG).
fn text_int(line: &str) -> Value {
    match line.trim().trim_end_matches('L') {
        "01" => Value::Bool(true),
        "00" => Value::Bool(false),
        digits => digits.parse().map(Value::Int).unwrap_or(Value::Opaque("an int beyond 64 bits")),
    }
}

fn pairs(items: Vec<Value>) -> Result<Vec<(Value, Value)>, PickleError> {
    if !items.len().is_multiple_of(2) {
        return malformed("a dict with an odd number of items");
    }
    let mut it = items.into_iter();
    Ok(std::iter::from_fn(|| Some((it.next()?, it.next()?))).collect())
}

/// A persistent id `('storage', <storage type>, key, location, numel)`.
fn storage(id: &Value) -> Result<Value, PickleError> {
    let Value::Tuple(parts) = id else { return malformed("a persistent id that is not a tuple") };
    let parts = parts.borrow();
    match parts.as_slice() {
        [Value::Str(tag), Value::Global(Allowed::StorageType(ty)), Value::Str(key), _, Value::Int(numel)]
            if &**tag == "storage" =>
        {
            Ok(Value::Storage(Rc::new(Storage { key: key.clone(), ty: *ty, numel: *numel })))
        }
        _ => {
            let parts: Vec<String> = parts.iter().take(6).map(Value::describe).collect();
            malformed(format!("an unknown persistent id ({})", parts.join(", ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: u64 = 256 << 20;

    fn read_all(data: &[u8]) -> Result<Pickle, PickleError> {
        read(data, BUDGET)
    }

    /// A small value written out as Python would print it (tests only: recursive).
    fn show(value: &Value) -> String {
        let seq = |items: &Seq| items.borrow().iter().map(show).collect::<Vec<_>>().join(", ");
        match value {
            Value::None => "None".into(),
            Value::Bool(b) => if *b { "True" } else { "False" }.into(),
            Value::Int(i) => i.to_string(),
            Value::Float(f) => format!("{f:?}"),
            Value::Str(s) => format!("{s:?}"),
            Value::Tuple(items) => format!("({})", seq(items)),
            Value::List(items) => format!("[{}]", seq(items)),
            Value::Dict(map) => {
                let entries: Vec<String> =
                    map.borrow().iter().map(|(k, v)| format!("{}: {}", show(k), show(v))).collect();
                format!("{{{}}}", entries.join(", "))
            }
            other => format!("<{}>", other.describe()),
        }
    }

    fn shown(data: &[u8]) -> String {
        show(&read_all(data).unwrap().root)
    }

    const EXPECTED: &str = r#"{"a": [1, -2, 300, 70000, 1099511627776], "b": (True, None, 1.5), "c": "é"}"#;

    #[test]
    fn reads_containers_numbers_and_strings_in_protocols_2_and_4() {
        // pickle.dumps({"a": [1, -2, 300, 70000, 2**40], "b": (True, None, 1.5), "c": "é"}, protocol=2 / 4)
        let protocol_2 = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01J\xfe\xff\xff\xffM,\x01Jp\x11\x01\x00\x8a\x06\x00\x00\x00\x00\x00\x01eX\x01\x00\x00\x00bq\x03\x88NG?\xf8\x00\x00\x00\x00\x00\x00\x87q\x04X\x01\x00\x00\x00cq\x05X\x02\x00\x00\x00\xc3\xa9q\x06u.";
        let protocol_4 = b"\x80\x04\x95>\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x01a\x94]\x94(K\x01J\xfe\xff\xff\xffM,\x01Jp\x11\x01\x00\x8a\x06\x00\x00\x00\x00\x00\x01e\x8c\x01b\x94\x88NG?\xf8\x00\x00\x00\x00\x00\x00\x87\x94\x8c\x01c\x94\x8c\x02\xc3\xa9\x94u.";
        assert_eq!(shown(protocol_2), EXPECTED);
        assert_eq!(shown(protocol_4), EXPECTED);
    }

    /// `pickle.dumps({"a": [1, -2], "n": 2**70, "f": 0.5, "t": True}, protocol=0)`: text opcodes.
    #[test]
    fn reads_protocol_0_text_opcodes() {
        let protocol_0 = b"(dp0\nVa\np1\n(lp2\nI1\naI-2\nasVn\np3\nL1180591620717411303424L\nsVf\np4\nF0.5\nsVt\np5\nI01\ns.";
        assert_eq!(shown(protocol_0), r#"{"a": [1, -2], "n": <an int beyond 64 bits>, "f": 0.5, "t": True}"#);
    }

    /// A list built with APPENDS, memoised, then recalled into another list (LONG_BINPUT/BINGET).
    #[test]
    fn a_memoised_list_is_recalled_by_reference() {
        let data = b"\x80\x02](NNNer@B\x0f\x00(j@B\x0f\x00j@B\x0f\x00l.";
        let pickle = read_all(data).unwrap();
        assert_eq!(show(&pickle.root), "[[None, None, None], [None, None, None]]");
        let Value::List(outer) = &pickle.root else { panic!() };
        let outer = outer.borrow();
        let (Value::List(a), Value::List(b)) = (&outer[0], &outer[1]) else { panic!() };
        assert!(Rc::ptr_eq(a, b), "the two entries are one list, as in Python");
    }

    /// `{"model": sd, "ema": sd}` with one dict object: the memo shares it, so `ema` holds what
    /// `model` was filled with after the PUT (issue 18: a copy at PUT time was empty).
    #[test]
    fn a_dict_filled_after_it_was_memoised_is_recalled_full() {
        // d = {}; outer = {"model": d, "ema": d}; d["w"] = 1 (as pickle writes it: PUT before SETITEMS)
        let data =
            b"\x80\x02}q\x00(X\x05\x00\x00\x00model}q\x01X\x01\x00\x00\x00wK\x01sX\x03\x00\x00\x00emah\x01u.";
        assert_eq!(shown(data), r#"{"model": {"w": 1}, "ema": {"w": 1}}"#);
    }

    /// A million nested lists, tuples and dicts: read and dropped without recursion (the old
    /// recursive `Value` overflowed the stack on each).
    #[test]
    fn deep_nesting_is_read_and_dropped_without_overflowing_the_stack() {
        let n = 1_000_000;
        let lists = [&[0x80, 2][..], &vec![b']'; n], &vec![b'a'; n - 1], b"."].concat();
        let tuples = [&b"\x80\x02N"[..], &vec![0x85; n], b"."].concat();
        let dicts =
            [&b"\x80\x02}"[..], &b"X\x01\x00\x00\x00k}".repeat(n - 1), &vec![b's'; n - 1], b"."].concat();
        for data in [lists, tuples, dicts] {
            let pickle = read_all(&data).unwrap();
            assert!(pickle.containers() >= n - 1);
            assert!(format!("{:?}", pickle.root).len() < 100);
            drop(pickle);
        }
    }

    /// 40 doublings by DUP / memo (80 bytes; issue 18 measured 5.4 GB when values were copied): the
    /// list holds itself 40 times, in a few hundred bytes.
    #[test]
    fn dup_and_memo_share_instead_of_doubling() {
        let dup = [&b"\x80\x02]"[..], &b"2a".repeat(40), b"."].concat();
        let memo = [&b"\x80\x02]q\x00"[..], &b"h\x00aq\x00".repeat(40), b"."].concat();
        for data in [dup, memo] {
            let pickle = read_all(&data).unwrap();
            let Value::List(list) = &pickle.root else { panic!() };
            assert_eq!(list.borrow().len(), 40);
            assert!(list.borrow().iter().all(|v| matches!(v, Value::List(l) if Rc::ptr_eq(l, list))));
        }
    }

    #[test]
    fn the_budget_ends_a_pickle_that_builds_too_much() {
        let data = [&b"\x80\x02("[..], &vec![b'N'; 100_000], b"l."].concat();
        assert!(read(&data[..], 1 << 20)
            .is_err_and(|e| matches!(e, PickleError::Malformed(m) if m.contains("more than 1 MiB"))));
        assert!(read(&data[..], 8 << 20).is_ok());
        // A length that lies is charged before anything is allocated.
        let lying = b"\x80\x02X\xff\xff\xff\xffabc.";
        assert!(read(&lying[..], 1 << 20).is_err());
    }

    /// REDUCE on a 100,000-element list (issue 18 measured an 8 MB error line for 1M): the error names
    /// what was called in a few words.
    #[test]
    fn an_error_names_a_huge_value_briefly() {
        let mut data = b"\x80\x02](".to_vec();
        data.extend(std::iter::repeat_n(*b"K\x01", 100_000).flatten());
        data.extend(b"e)R.");
        let Err(PickleError::Malformed(message)) = read_all(&data) else { panic!("a list is not callable") };
        assert!(message.contains("cannot call a list of 100000 items"), "{message}");
        assert!(message.len() < 300, "{} characters", message.len());
    }

    #[test]
    fn a_foreign_global_is_refused_by_name() {
        // pickle.dumps(os.system) with a call: c posix\nsystem\n (X 'ls') R .
        let data = b"\x80\x02cposix\nsystem\nX\x02\x00\x00\x00ls\x85R.";
        assert!(matches!(read_all(data), Err(PickleError::Forbidden(g)) if g == "posix.system"));
        let data = b"\x80\x02cmodels.yolo\nDetectionModel\n)\x81.";
        assert!(
            matches!(read_all(data), Err(PickleError::Forbidden(g)) if g == "models.yolo.DetectionModel")
        );
    }

    #[test]
    fn truncated_and_malformed_pickles_are_errors() {
        let data = b"\x80\x02}q\x00(X\x05\x00\x00\x00ab";
        assert!(matches!(read_all(data), Err(PickleError::Malformed(m)) if m.contains("ends early")));
        assert!(
            matches!(read_all(b"\x80\x02\xff"), Err(PickleError::Malformed(m)) if m.contains("opcode 0xff"))
        );
        assert!(matches!(read_all(b"u."), Err(PickleError::Malformed(_))));
        assert!(matches!(read_all(b"h\x07."), Err(PickleError::Malformed(m)) if m.contains("memo entry 7")));
    }

    /// What torch.save writes for values of a training checkpoint that are not tensors.
    #[test]
    fn weights_only_values_are_read_as_opaque() {
        // [2**64 - 1, {1, 2}, 1+2j, b"ab", torch.Size([2, 3])] as torch.save's protocol 2 writes them
        let data = b"\x80\x02](\x8a\t\xff\xff\xff\xff\xff\xff\xff\xff\x00c__builtin__\nset\n]q\x00(K\x01K\x02e\x85Rc__builtin__\ncomplex\nG?\xf0\x00\x00\x00\x00\x00\x00G@\x00\x00\x00\x00\x00\x00\x00\x86Rc_codecs\nencode\nX\x02\x00\x00\x00abX\x06\x00\x00\x00latin1\x86Rctorch\nSize\nK\x02K\x03\x86\x85Re.";
        assert_eq!(shown(data), "[<an int beyond 64 bits>, <a set>, <a complex number>, <bytes>, (2, 3)]");
    }
}
