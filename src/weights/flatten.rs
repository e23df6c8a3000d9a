//! A read pickle's tensors under dotted keys: dicts by key (`{"model": {"conv.weight": t}}` ->
//! `model.conv.weight`), lists and tuples by index (`{"models": [sd, sd]}` -> `models.1.conv.weight`),
//! as PyTorch users name them. Numbers, strings and containers without tensors are skipped.
//!
//! Bounded like the pickle reader: loops with explicit stacks (any depth); whether a container holds
//! a tensor is found once for all containers, so those without one are never walked, however often
//! they are shared; a container met again on its own path (a list that holds itself) adds nothing;
//! and the keys are counted, so a small file whose shared dicts would name billions of tensors is an
//! error, not a hang.
use super::pickle::{Pickle, TensorRef, Unreadable, Value};
use std::collections::HashSet;
use std::rc::Rc;

/// A tensor found in the pickle.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Found {
    Tensor(TensorRef),
    Unreadable(Unreadable),
}

/// The most keys a file may name once flattened, and the most bytes of keys.
const MAX_KEYS: usize = 1 << 20;
const MAX_KEY_BYTES: usize = 256 << 20;

/// The tensors of `pickle`, in the order Python would visit them.
pub(crate) fn tensors(pickle: &Pickle) -> Result<Vec<(String, Found)>, String> {
    match &pickle.root {
        Value::Tensor(_) | Value::Unreadable(_) => Err("holds a single tensor, not a dict of tensors".into()),
        root @ Value::Dict(_) => {
            let holds = holds_tensors(root, pickle.containers());
            walk(root, &holds)
        }
        _ => Err("holds no dict at the top: not a state dict or checkpoint".into()),
    }
}

/// A container's identity: the address of its shared cell.
fn id(value: &Value) -> Option<usize> {
    match value {
        Value::Tuple(seq) | Value::List(seq) => Some(Rc::as_ptr(seq) as *const () as usize),
        Value::Dict(map) => Some(Rc::as_ptr(map) as *const () as usize),
        _ => None,
    }
}

fn is_tensor(value: &Value) -> bool {
    matches!(value, Value::Tensor(_) | Value::Unreadable(_))
}

/// A container's children, with the key segment each is named by (`None`: a dict key that is not
/// a string or an int, which names nothing).
fn children(value: &Value) -> Vec<(Option<String>, Value)> {
    match value {
        Value::Tuple(seq) | Value::List(seq) => {
            seq.borrow().iter().enumerate().map(|(i, v)| (Some(i.to_string()), v.clone())).collect()
        }
        Value::Dict(map) => map
            .borrow()
            .iter()
            .map(|(key, v)| {
                let key = match key {
                    Value::Str(s) => Some(s.to_string()),
                    Value::Int(i) => Some(i.to_string()),
                    _ => None,
                };
                (key, v.clone())
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The containers under `root` with a tensor anywhere below them, cycles and sharing included. Each
/// container is visited once and its items borrowed, not copied (a list of a million numbers costs
/// nothing); then "holds a tensor" spreads from the containers that hold one directly to every
/// container that reaches them, along the (child, parent) edges, sorted by child.
fn holds_tensors(root: &Value, containers: usize) -> HashSet<usize> {
    let mut seen: HashSet<usize> = HashSet::with_capacity(containers.min(1 << 20));
    let mut edges: Vec<(usize, usize)> = Vec::new();
    let mut holding = Vec::new();
    let mut stack = vec![root.clone()];
    seen.insert(id(root).expect("the root is a container"));
    while let Some(value) = stack.pop() {
        let me = id(&value).expect("only containers are stacked");
        let mut direct = false;
        for_each_item(&value, |child| match id(child) {
            Some(child_id) => {
                edges.push((child_id, me));
                if seen.insert(child_id) {
                    stack.push(child.clone());
                }
            }
            None => direct |= is_tensor(child),
        });
        if direct {
            holding.push(me);
        }
    }
    drop(seen);
    edges.sort_unstable();
    let mut holds = HashSet::new();
    while let Some(container) = holding.pop() {
        if holds.insert(container) {
            let first = edges.partition_point(|&(child, _)| child < container);
            let parents = edges[first..].iter().take_while(|&&(child, _)| child == container);
            holding.extend(parents.map(|&(_, parent)| parent));
        }
    }
    holds
}

/// Calls `f` on each item of a list or tuple, each value of a dict.
fn for_each_item(value: &Value, mut f: impl FnMut(&Value)) {
    match value {
        Value::Tuple(seq) | Value::List(seq) => seq.borrow().iter().for_each(f),
        Value::Dict(map) => map.borrow().iter().for_each(|(_, v)| f(v)),
        _ => {}
    }
}

/// One container being walked: its children, the next to visit, and the key segment naming it.
struct Frame {
    id: usize,
    children: Vec<(Option<String>, Value)>,
    next: usize,
}

fn walk(root: &Value, holds: &HashSet<usize>) -> Result<Vec<(String, Found)>, String> {
    let mut out = Vec::new();
    let mut key_bytes = 0usize;
    let mut path: Vec<String> = Vec::new();
    let mut on_path: HashSet<usize> = HashSet::new();
    let root_id = id(root).expect("the root is a container");
    let mut frames = vec![Frame { id: root_id, children: children(root), next: 0 }];
    on_path.insert(root_id);
    while let Some(frame) = frames.last_mut() {
        let Some((segment, child)) = frame.children.get(frame.next).cloned() else {
            on_path.remove(&frame.id);
            frames.pop();
            path.pop();
            continue;
        };
        frame.next += 1;
        let Some(segment) = segment else { continue };
        let found = match &child {
            Value::Tensor(t) => Some(Found::Tensor((**t).clone())),
            Value::Unreadable(t) => Some(Found::Unreadable((**t).clone())),
            _ => None,
        };
        if let Some(found) = found {
            let key = path.iter().chain(std::iter::once(&segment)).cloned().collect::<Vec<_>>().join(".");
            key_bytes += key.len();
            if out.len() >= MAX_KEYS || key_bytes > MAX_KEY_BYTES {
                return Err(format!(
                    "its containers name more than {} tensors (or {} MiB of keys) when flattened: \
                     shared dicts repeated past any checkpoint's size; refused",
                    MAX_KEYS,
                    MAX_KEY_BYTES >> 20
                ));
            }
            out.push((key, found));
        } else if let Some(child_id) = id(&child) {
            if holds.contains(&child_id) && on_path.insert(child_id) {
                path.push(segment);
                frames.push(Frame { id: child_id, children: children(&child), next: 0 });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::pickle;

    fn s(text: &str) -> Vec<u8> {
        [&b"X"[..], &(text.len() as u32).to_le_bytes(), text.as_bytes()].concat()
    }

    /// `_rebuild_tensor_v2(storage "0" of 1 float, 0, (1,), (1,))`.
    fn tensor() -> Vec<u8> {
        let storage =
            [&b"("[..], &s("storage"), b"ctorch\nFloatStorage\n", &s("0"), &s("cpu"), b"K\x01tQ"].concat();
        [&b"ctorch._utils\n_rebuild_tensor_v2\n("[..], &storage, b"K\x00K\x01\x85K\x01\x85tR"].concat()
    }

    fn keys(data: &[u8]) -> Vec<String> {
        let pickle = pickle::read(data, 1 << 24).unwrap();
        tensors(&pickle).unwrap().into_iter().map(|(k, _)| k).collect()
    }

    /// root = {"a": Y, "b": X}, X = {"t": tensor, "y": Y}, Y = {"x": X}: Y reaches the tensor only
    /// through X, which holds Y (a cycle); each path to the tensor is named once, the cycle adds none.
    #[test]
    fn tensors_reached_through_a_cycle_are_found_on_every_path() {
        let data = [
            &b"\x80\x02}q\x00"[..],
            &s("a"),
            b"}q\x02",
            &s("x"),
            b"}q\x01",
            &s("t"),
            &tensor(),
            b"s",
            &s("y"),
            b"h\x02s",
            b"ss",
            &s("b"),
            b"h\x01s.",
        ]
        .concat();
        assert_eq!(keys(&data), ["a.x.t", "b.t"]);
    }

    /// Lists and tuples flatten by index; keys that are not strings or ints name nothing:
    /// `{"models": [(t, t), (None, t)], True: t}`.
    #[test]
    fn lists_flatten_by_index_and_other_keys_are_skipped() {
        let data = [
            &b"\x80\x02}("[..],
            &s("models"),
            b"](",
            &tensor(),
            &tensor(),
            b"\x86",
            b"N",
            &tensor(),
            b"\x86e",
            b"\x88",
            &tensor(),
            b"u.",
        ]
        .concat();
        assert_eq!(keys(&data), ["models.0.0", "models.0.1", "models.1.1"]);
    }
}
