//! The globals a `torch.save` pickle may name, and what calling each builds. The list is PyTorch
//! 2.11's own for `torch.load(weights_only=True)`: `_get_allowed_globals()` and
//! `_tensor_rebuild_functions()` in `torch/_weights_only_unpickler.py`, with `_codecs.encode` (bytes),
//! `builtins.set`, `builtins.complex`, `builtins.bytearray`, `collections.OrderedDict` / `Counter`,
//! `torch.Size`, `torch.device`, every dtype, storage type, tensor type and qscheme, and the
//! `torch._utils._rebuild_*` functions. Nothing is run: each global is a tag, and "calling" it builds
//! a container, a tensor reference, or an opaque value that only says what it was.
use super::pickle::{malformed, PickleError};
use super::pickle::{Storage, StorageType, TensorRef, Unreadable, Value};
use std::rc::Rc;
use tch::Kind;

/// An allowed global, before it is called.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Allowed {
    OrderedDict,
    Counter,
    /// `torch._utils._rebuild_tensor` and `_rebuild_tensor_v2`: (storage, offset, size, stride, ..).
    RebuildTensor,
    /// `_rebuild_tensor_v3`: (storage, offset, size, stride, requires_grad, hooks, dtype, ..).
    RebuildTensorV3,
    /// `torch.nn.Parameter`, `_rebuild_parameter`, `_rebuild_parameter_with_state`: the tensor is
    /// their first argument.
    Parameter,
    /// `torch._tensor._rebuild_from_type_v2(func, type, args, state)`: `func(*args)`.
    RebuildFromType,
    /// A tensor this reader does not turn into a tch tensor (quantized, sparse, nested, ...).
    RebuildUnreadable(&'static str),
    StorageType(StorageType),
    /// A dtype global (`torch.float16`): libtorch's kind, or the name tch has no kind for.
    Dtype(Result<Kind, &'static str>),
    /// `torch.Size`: its argument, a tuple.
    Size,
    /// Anything else on the list (a device, a set, bytes, a complex, a layout, a tensor type, a
    /// qscheme): read, never looked into.
    Opaque(&'static str),
}

/// `module.name` as `torch/_weights_only_unpickler.py` allows it (after pickle's Python 2 renames:
/// `__builtin__` is `builtins`), or `None`.
pub(crate) fn allowed(module: &str, name: &str) -> Option<Allowed> {
    let module = if module == "__builtin__" { "builtins" } else { module };
    Some(match (module, name) {
        ("collections", "OrderedDict") => Allowed::OrderedDict,
        ("collections", "Counter") => Allowed::Counter,
        ("torch._utils", "_rebuild_tensor" | "_rebuild_tensor_v2") => Allowed::RebuildTensor,
        ("torch._utils", "_rebuild_tensor_v3") => Allowed::RebuildTensorV3,
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => Allowed::Parameter,
        ("torch.nn.parameter", "Parameter") => Allowed::Parameter,
        ("torch._tensor", "_rebuild_from_type_v2") => Allowed::RebuildFromType,
        ("torch._utils", "_rebuild_qtensor") => Allowed::RebuildUnreadable("a quantized tensor"),
        ("torch._utils", "_rebuild_sparse_tensor") => Allowed::RebuildUnreadable("a sparse tensor"),
        ("torch._utils", "_rebuild_nested_tensor") => Allowed::RebuildUnreadable("a nested tensor"),
        ("torch._utils", "_rebuild_wrapper_subclass") => Allowed::RebuildUnreadable("a tensor subclass"),
        ("torch._utils", "_rebuild_meta_tensor_no_storage") => Allowed::RebuildUnreadable("a meta tensor"),
        ("torch._utils", "_rebuild_device_tensor_from_numpy" | "_rebuild_device_tensor_from_cpu_tensor") => {
            Allowed::RebuildUnreadable("a device tensor rebuilt from numpy or CPU")
        }
        ("torch" | "torch.cuda", storage) if storage.ends_with("Storage") => {
            Allowed::StorageType(storage_type(storage.trim_end_matches("Storage"))?)
        }
        ("torch.storage", "UntypedStorage") => Allowed::StorageType(StorageType::Untyped),
        ("torch.storage", "TypedStorage") => Allowed::Opaque("torch.storage.TypedStorage"),
        ("torch", dtype) if dtype_kind(dtype).is_some() => Allowed::Dtype(dtype_kind(dtype)?),
        ("torch", "Size") => Allowed::Size,
        ("torch", "device") => Allowed::Opaque("a torch.device"),
        ("torch", "Tensor") => Allowed::Opaque("the torch.Tensor class"),
        ("torch", "per_tensor_affine" | "per_tensor_symmetric" | "per_channel_affine")
        | ("torch", "per_channel_symmetric" | "per_channel_affine_float_qparams") => {
            Allowed::Opaque("a qscheme")
        }
        ("torch" | "torch.cuda" | "torch.sparse" | "torch.cuda.sparse", tensor) if tensor_type(tensor) => {
            Allowed::Opaque("a tensor type")
        }
        ("torch.serialization", "_get_layout") => Allowed::Opaque("a layout"),
        ("_codecs", "encode") => Allowed::Opaque("bytes"),
        ("builtins", "bytearray") => Allowed::Opaque("a bytearray"),
        ("builtins", "set") => Allowed::Opaque("a set"),
        ("builtins", "complex") => Allowed::Opaque("a complex number"),
        _ => return None,
    })
}

/// `torch.<Name>Storage`: the legacy typed storages `torch._storage_classes` lists.
fn storage_type(name: &str) -> Option<StorageType> {
    let kind = match name {
        "Float" => Kind::Float,
        "Double" => Kind::Double,
        "Half" => Kind::Half,
        "BFloat16" => Kind::BFloat16,
        "Long" => Kind::Int64,
        "Int" => Kind::Int,
        "Short" => Kind::Int16,
        "Char" => Kind::Int8,
        "Byte" => Kind::Uint8,
        "Bool" => Kind::Bool,
        "ComplexFloat" => Kind::ComplexFloat,
        "ComplexDouble" => Kind::ComplexDouble,
        "QInt8" => return Some(StorageType::Unreadable("qint8")),
        "QUInt8" => return Some(StorageType::Unreadable("quint8")),
        "QInt32" => return Some(StorageType::Unreadable("qint32")),
        "QUInt4x2" => return Some(StorageType::Unreadable("quint4x2")),
        "QUInt2x4" => return Some(StorageType::Unreadable("quint2x4")),
        _ => return None,
    };
    Some(StorageType::Typed(kind))
}

/// Every dtype PyTorch 2.11 names in a pickle (`str(dtype)` without `torch.`): its tch kind, or
/// `Err(name)` for those tch has no kind for (they are refused by key, when selected).
fn dtype_kind(name: &str) -> Option<Result<Kind, &'static str>> {
    use Kind::*;
    const NO_KIND: [&str; 26] = [
        "uint16",
        "uint32",
        "uint64",
        "uint1",
        "uint2",
        "uint3",
        "uint4",
        "uint5",
        "uint6",
        "uint7",
        "int1",
        "int2",
        "int3",
        "int4",
        "int5",
        "int6",
        "int7",
        "bits1x8",
        "bits2x4",
        "bits4x2",
        "bits8",
        "bits16",
        "float4_e2m1fn_x2",
        "float8_e8m0fnu",
        "quint4x2",
        "quint2x4",
    ];
    Some(Ok(match name {
        "float32" => Float,
        "float64" => Double,
        "float16" => Half,
        "bfloat16" => BFloat16,
        "int64" => Int64,
        "int32" => Int,
        "int16" => Int16,
        "int8" => Int8,
        "uint8" => Uint8,
        "bool" => Bool,
        "complex32" => ComplexHalf,
        "complex64" => ComplexFloat,
        "complex128" => ComplexDouble,
        "float8_e5m2" => Float8e5m2,
        "float8_e4m3fn" => Float8e4m3fn,
        "float8_e5m2fnuz" => Float8e5m2fnuz,
        "float8_e4m3fnuz" => Float8e4m3fnuz,
        "qint8" | "quint8" | "qint32" => return Some(Err("a quantized dtype")),
        other => return NO_KIND.iter().find(|&&n| n == other).map(|&n| Err(n)),
    }))
}

/// `torch.FloatTensor` and the other legacy tensor types (`torch._tensor_classes`).
fn tensor_type(name: &str) -> bool {
    const TYPES: [&str; 9] = ["BFloat16", "Bool", "Byte", "Char", "Double", "Float", "Half", "Int", "Long"];
    name.strip_suffix("Tensor").is_some_and(|t| t == "Short" || TYPES.contains(&t))
}

/// REDUCE / NEWOBJ: the allowed global `callable` called with `args`.
pub(crate) fn call(callable: &Value, args: &[Value]) -> Result<Value, PickleError> {
    let Value::Global(global) = callable else {
        return malformed(format!("cannot call {}", callable.describe()));
    };
    match (global, args) {
        (Allowed::OrderedDict | Allowed::Counter, []) => Ok(Value::dict(Vec::new())),
        (Allowed::OrderedDict | Allowed::Counter, [items]) => Ok(Value::dict(entries_of(items)?)),
        (Allowed::RebuildTensor, [storage, offset, size, stride, ..]) => {
            tensor(storage, offset, size, stride, None)
        }
        (
            Allowed::RebuildTensorV3,
            [storage, offset, size, stride, _, _, Value::Global(Allowed::Dtype(d)), ..],
        ) => tensor(storage, offset, size, stride, Some(*d)),
        (Allowed::Parameter, [tensor @ (Value::Tensor(_) | Value::Unreadable(_)), ..]) => Ok(tensor.clone()),
        (Allowed::RebuildFromType, [func, _, Value::Tuple(inner), ..]) => {
            let inner = inner.borrow().clone();
            call(func, &inner)
        }
        (Allowed::RebuildUnreadable(what), _) => {
            let size = args.get(2).and_then(|s| ints(s).ok()).unwrap_or_default();
            Ok(Value::Unreadable(Rc::new(Unreadable { what: (*what).to_string(), size })))
        }
        (Allowed::Size, [tuple @ Value::Tuple(_)]) => Ok(tuple.clone()),
        (Allowed::Opaque(what), _) => Ok(Value::Opaque(what)),
        (global, args) => malformed(format!("cannot call {global:?} with {} arguments", args.len())),
    }
}

/// `OrderedDict(x)` / `Counter(x)`: the entries of a dict, or of a list or tuple of pairs.
fn entries_of(items: &Value) -> Result<Vec<(Value, Value)>, PickleError> {
    match items {
        Value::Dict(map) => Ok(map.borrow().clone()),
        Value::List(seq) | Value::Tuple(seq) => seq
            .borrow()
            .iter()
            .map(|pair| match pair {
                Value::Tuple(kv) | Value::List(kv) if kv.borrow().len() == 2 => {
                    let kv = kv.borrow();
                    Ok((kv[0].clone(), kv[1].clone()))
                }
                other => malformed(format!("an OrderedDict item that is {}, not a pair", other.describe())),
            })
            .collect(),
        other => malformed(format!("an OrderedDict made from {}", other.describe())),
    }
}

fn tensor(
    storage: &Value,
    offset: &Value,
    size: &Value,
    stride: &Value,
    dtype: Option<Result<Kind, &'static str>>,
) -> Result<Value, PickleError> {
    let Value::Storage(storage) = storage else {
        return malformed("a tensor whose storage is not a storage");
    };
    let Value::Int(offset) = *offset else { return malformed("a tensor offset that is not an integer") };
    let size = ints(size)?;
    let unreadable = |what: String| Ok(Value::Unreadable(Rc::new(Unreadable { what, size: size.clone() })));
    let Storage { key, ty, numel } = storage.as_ref();
    let (kind, storage_numel) = match (*ty, dtype) {
        (_, Some(Err(name))) | (StorageType::Unreadable(name), None) => {
            return unreadable(format!("a tensor of dtype {name}"))
        }
        // An untyped storage counts bytes; the dtype says how many elements they hold.
        (StorageType::Untyped, Some(Ok(kind))) => {
            let size = kind.elt_size_in_bytes() as i64;
            if numel % size != 0 {
                return malformed(format!("an untyped storage of {numel} bytes read as {kind:?}"));
            }
            (kind, numel / size)
        }
        (StorageType::Typed(_), Some(Ok(kind))) | (StorageType::Typed(kind), None) => (kind, *numel),
        (StorageType::Unreadable(name), Some(_)) => return unreadable(format!("a tensor of dtype {name}")),
        (StorageType::Untyped, None) => return malformed("_rebuild_tensor_v2 on an untyped storage"),
    };
    Ok(Value::Tensor(Rc::new(TensorRef {
        storage: key.to_string(),
        kind,
        storage_numel,
        offset,
        size,
        stride: ints(stride)?,
    })))
}

fn ints(value: &Value) -> Result<Vec<i64>, PickleError> {
    let Value::Tuple(items) = value else { return malformed("a shape that is not a tuple") };
    let items = items.borrow();
    items.iter().map(|v| if let Value::Int(i) = v { Ok(*i) } else { malformed("a shape entry") }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_weights_only_globals_are_allowed_and_others_are_not() {
        assert_eq!(
            allowed("torch", "HalfStorage"),
            Some(Allowed::StorageType(StorageType::Typed(Kind::Half)))
        );
        assert_eq!(allowed("torch", "uint16"), Some(Allowed::Dtype(Err("uint16"))));
        assert_eq!(allowed("torch", "float8_e4m3fn"), Some(Allowed::Dtype(Ok(Kind::Float8e4m3fn))));
        assert_eq!(allowed("__builtin__", "set"), Some(Allowed::Opaque("a set")));
        assert_eq!(allowed("torch.cuda.sparse", "FloatTensor"), Some(Allowed::Opaque("a tensor type")));
        for (module, name) in
            [("torch", "load"), ("posix", "system"), ("builtins", "eval"), ("torch", "Storage")]
        {
            assert_eq!(allowed(module, name), None, "{module}.{name}");
        }
    }
}
