//! Checks that `try_forward` runs before touching libtorch, so bad input gets a message naming the
//! expected and the actual value instead of a crash deep inside a kernel.
use crate::error::ScConvError;
use tch::{Device, Kind, Tensor};

/// What a model expects of its input.
#[derive(Debug, Clone, Copy)]
pub struct Expected {
    pub channels: i64,
    pub kind: Kind,
    pub device: Device,
}

impl Expected {
    /// The channels a model takes, with the dtype and device of one of its parameters.
    pub fn of(channels: i64, parameter: &Tensor) -> Expected {
        Expected { channels, kind: parameter.kind(), device: parameter.device() }
    }
}

/// Checks rank, channels, dtype, device and emptiness; returns the (N, C, H, W) sizes.
pub fn check(x: &Tensor, expected: &Expected) -> Result<[i64; 4], ScConvError> {
    let size = x.size();
    let invalid = |message: String| Err(ScConvError::InvalidInput(message));
    let &[n, c, h, w] = size.as_slice() else {
        return invalid(format!(
            "expected a 4-d (N, C, H, W) tensor, got {}-d with shape {size:?}",
            size.len()
        ));
    };
    if c != expected.channels {
        return invalid(format!(
            "expected {} channels (dim 1), got {c} in shape {size:?}",
            expected.channels
        ));
    }
    if x.kind() != expected.kind {
        return invalid(format!("expected dtype {:?} (the model's), got {:?}", expected.kind, x.kind()));
    }
    if x.device() != expected.device {
        return invalid(format!(
            "expected a tensor on {:?} (the model's device), got {:?}",
            expected.device,
            x.device()
        ));
    }
    if n == 0 || h == 0 || w == 0 {
        return invalid(format!("expected a non-empty batch and spatial size, got shape {size:?}"));
    }
    Ok([n, c, h, w])
}

/// GroupBatchnorm2d takes the unbiased std over each group: a group of one value gives NaN.
pub fn check_group_size(nchw: [i64; 4], group_num: i64) -> Result<(), ScConvError> {
    let [_, c, h, w] = nchw;
    let per_group = c / group_num * h * w;
    if per_group < 2 {
        return Err(ScConvError::InvalidInput(format!(
            "each of the {group_num} groups needs at least 2 values for its unbiased std, got {per_group} \
             (shape {nchw:?})"
        )));
    }
    Ok(())
}

/// Runs a forward pass, turning a libtorch failure into an error. tch's operators panic when libtorch
/// throws (e.g. an allocation that fails for a huge input); caught here, the caller gets
/// `ScConvError::Runtime` instead of an unwinding panic. (The default panic hook still prints the
/// panic; the `scconv-tch` binary installs a quiet one.)
pub fn guard<T>(forward: impl FnOnce() -> T) -> Result<T, ScConvError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(forward))
        .map_err(|payload| ScConvError::Runtime(panic_message(payload.as_ref())))
}

/// The text a panic carries (`panic!` with a format string gives a `String`, with a literal a `&str`);
/// for tch's panics on a libtorch exception, libtorch's message without its C++ stack frames.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let raw = payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown failure".into());
    libtorch_message(&raw).unwrap_or(raw)
}

/// tch panics with ``called `Result::unwrap()` on an `Err` value: Torch("<message>\nframe #0 ...")``:
/// the message, unescaped, up to the stack frames.
fn libtorch_message(raw: &str) -> Option<String> {
    let start = raw.find("Torch(\"")? + "Torch(\"".len();
    let inner = raw[start..].trim_end_matches(')').trim_end_matches('"');
    let text = inner.replace("\\n", "\n").replace("\\\"", "\"");
    let noise = |l: &&str| l.starts_with("frame #") || l.starts_with("Exception raised from");
    let lines: Vec<&str> =
        text.lines().map(str::trim).filter(|l| !l.is_empty()).take_while(|l| !noise(l)).collect();
    Some(lines.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtorch_panics_read_as_their_message() {
        let raw = "called `Result::unwrap()` on an `Err` value: Torch(\"[enforce fail] can't allocate \\\"x\\\"\\nframe #0: c10::f() + 0x6a\\nframe #1: g\")";
        let payload: Box<dyn std::any::Any + Send> = Box::new(raw.to_string());
        assert_eq!(panic_message(payload.as_ref()), "[enforce fail] can't allocate \"x\"");
        let plain: Box<dyn std::any::Any + Send> = Box::new("index out of bounds");
        assert_eq!(panic_message(plain.as_ref()), "index out of bounds");
    }

    const EXPECTED: Expected = Expected { channels: 16, kind: Kind::Float, device: Device::Cpu };

    /// The checks `ScConv::try_forward` makes with 16 channels in 16 groups.
    fn message(x: &Tensor) -> String {
        match check(x, &EXPECTED).and_then(|nchw| check_group_size(nchw, 16)) {
            Err(ScConvError::InvalidInput(message)) => message,
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }

    #[test]
    fn accepts_a_matching_input() {
        assert!(check(&Tensor::zeros([2, 16, 3, 5], (Kind::Float, Device::Cpu)), &EXPECTED).is_ok());
    }

    #[test]
    fn rejects_wrong_rank() {
        let m = message(&Tensor::zeros([16, 8, 8], (Kind::Float, Device::Cpu)));
        assert!(m.contains("expected a 4-d (N, C, H, W) tensor, got 3-d with shape [16, 8, 8]"), "{m}");
    }

    #[test]
    fn rejects_wrong_channels() {
        let m = message(&Tensor::zeros([1, 32, 8, 8], (Kind::Float, Device::Cpu)));
        assert!(m.contains("expected 16 channels (dim 1), got 32"), "{m}");
    }

    #[test]
    fn rejects_non_float_and_other_float_dtypes() {
        let m = message(&Tensor::zeros([1, 16, 8, 8], (Kind::Int64, Device::Cpu)));
        assert!(m.contains("expected dtype Float (the model's), got Int64"), "{m}");
        let m = message(&Tensor::zeros([1, 16, 8, 8], (Kind::Half, Device::Cpu)));
        assert!(m.contains("expected dtype Float (the model's), got Half"), "{m}");
    }

    #[test]
    fn rejects_empty_input() {
        let m = message(&Tensor::zeros([0, 16, 8, 8], (Kind::Float, Device::Cpu)));
        assert!(m.contains("non-empty batch and spatial size, got shape [0, 16, 8, 8]"), "{m}");
    }

    #[test]
    fn rejects_groups_too_small_for_an_unbiased_std() {
        let m = message(&Tensor::zeros([1, 16, 1, 1], (Kind::Float, Device::Cpu)));
        assert!(m.contains("needs at least 2 values for its unbiased std, got 1"), "{m}");
    }
}
