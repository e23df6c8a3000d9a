//! A read pickle's tensors under dotted keys: dicts by key (`{"model": {"conv.weight": t}}` ->
//! `model.conv.weight`), lists and tuples by index (`{"models": [sd, sd]}` -> `models.1.conv.weight`),
//! as PyTorch users name them. Numbers, strings and containers without tensors are skipped.
//!
//! Bounded like the pickle reader: a loop with an explicit stack (any depth); each container is
//! asked once whether it holds a tensor, so containers without one are never walked, however often
//! they are shared; a container met again on its own path (a list that holds itself) adds nothing;
//! and the keys are counted, so a small file whose shared dicts would name billions of tensors is an
//! error, not a hang.
use super::pickle::{Pickle, TensorRef, Unreadable, Value};
use std::collections::{HashMap, HashSet};
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
        root @ (Value::Dict(_) | Value::List(_) | Value::Tuple(_)) => {
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

/// For every container under `root`: whether a tensor lies anywhere below it. Post-order, each
/// container visited once and its items borrowed, not copied (a list of a million numbers costs
/// nothing); a cycle back to a container being visited counts as no tensor (its tensors are found
/// on the first visit).
fn holds_tensors(root: &Value, containers: usize) -> HashMap<usize, bool> {
    let mut known: HashMap<usize, bool> = HashMap::with_capacity(containers.min(1 << 20));
    let mut stack = vec![(root.clone(), false)];
    while let Some((value, done)) = stack.pop() {
        let Some(me) = id(&value) else { continue };
        if done {
            let holds = any_item(&value, |v| is_tensor(v) || id(v).is_some_and(|c| known[&c]));
            known.insert(me, holds);
        } else if let std::collections::hash_map::Entry::Vacant(slot) = known.entry(me) {
            slot.insert(false);
            stack.push((value.clone(), true));
            for_each_item(&value, |v| {
                if id(v).is_some() {
                    stack.push((v.clone(), false))
                }
            });
        }
    }
    known
}

/// Calls `f` on each item of a list or tuple, each value of a dict.
fn for_each_item(value: &Value, mut f: impl FnMut(&Value)) {
    match value {
        Value::Tuple(seq) | Value::List(seq) => seq.borrow().iter().for_each(f),
        Value::Dict(map) => map.borrow().iter().for_each(|(_, v)| f(v)),
        _ => {}
    }
}

fn any_item(value: &Value, mut f: impl FnMut(&Value) -> bool) -> bool {
    match value {
        Value::Tuple(seq) | Value::List(seq) => seq.borrow().iter().any(f),
        Value::Dict(map) => map.borrow().iter().any(|(_, v)| f(v)),
        _ => false,
    }
}

/// One container being walked: its children, the next to visit, and the key segment naming it.
struct Frame {
    id: usize,
    children: Vec<(Option<String>, Value)>,
    next: usize,
}

fn walk(root: &Value, holds: &HashMap<usize, bool>) -> Result<Vec<(String, Found)>, String> {
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
            if holds.get(&child_id) == Some(&true) && on_path.insert(child_id) {
                path.push(segment);
                frames.push(Frame { id: child_id, children: children(&child), next: 0 });
            }
        }
    }
    Ok(out)
}
