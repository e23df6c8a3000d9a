//! A convolution's weight and bias in f64, for the values the inference form derives from sums of a
//! convolution's input instead of running it: the mean of its output over the positions
//! (`branch_means`), and a classifier's logits from the pooled means (`head`, a 1x1 convolution of one
//! position). Summed in f64 and rounded once by the caller.
use tch::{Kind, Tensor};

/// A weight `(out, in / groups, k, k)` and bias in f64, row-major.
#[derive(Debug)]
pub(super) struct F64Conv {
    weight: Vec<f64>,
    bias: Option<Vec<f64>>,
    out: usize,
    inputs_per_group: usize,
    groups: usize,
    kernel: usize,
}

impl F64Conv {
    /// `weight` (4-d) and `bias` with `groups`, as a same-size convolution: stride 1, padding `k / 2`,
    /// no dilation, as the CRU builds its layers (`crate::cru`; tch keeps a layer's geometry private,
    /// so it cannot be checked here); `None` for an even or non-square kernel, whose output is not
    /// the input's size.
    pub(super) fn of(weight: &Tensor, bias: Option<&Tensor>, groups: i64) -> Option<F64Conv> {
        let [out, inputs_per_group, kh, kw] = <[i64; 4]>::try_from(weight.size()).ok()?;
        if kh != kw || kh % 2 == 0 || groups < 1 || out % groups != 0 {
            return None;
        }
        let f64s = |t: &Tensor| Vec::<f64>::try_from(t.detach().to_kind(Kind::Double).flatten(0, -1)).ok();
        Some(F64Conv {
            weight: f64s(weight)?,
            bias: match bias {
                Some(b) => Some(f64s(b)?),
                None => None,
            },
            out: out as usize,
            inputs_per_group: inputs_per_group as usize,
            groups: groups as usize,
            kernel: kh as usize,
        })
    }

    /// Input channels.
    pub(super) fn inputs(&self) -> usize {
        self.inputs_per_group * self.groups
    }

    /// Output channels.
    pub(super) fn outputs(&self) -> usize {
        self.out
    }

    /// Its kernel's side.
    pub(super) fn kernel(&self) -> usize {
        self.kernel
    }

    /// Multiply-adds per sample of `add_means`.
    pub(super) fn cost(&self) -> usize {
        self.weight.len()
    }

    /// Its output's mean per channel, added to `means`, from the input's `windows` over `positions`
    /// output positions: for each input channel and tap, the sum of the input values that tap reads
    /// (`(inputs, k, k)`, a weight's order; for a 1x1 convolution, the input's sums).
    pub(super) fn add_means(&self, windows: &[f64], positions: usize, means: &mut [f64]) {
        // Output channel c's weights (its group's inputs, every tap) and those inputs' window sums
        // are both contiguous and in the same order: one dot product a channel.
        let row = self.inputs_per_group * self.kernel * self.kernel;
        let outputs_per_group = self.out / self.groups;
        for (c, (mean, weights)) in means.iter_mut().zip(self.weight.chunks_exact(row)).enumerate() {
            let first = c / outputs_per_group * row;
            let sum = dot(weights, &windows[first..first + row]);
            *mean += sum / positions as f64 + self.bias.as_ref().map_or(0.0, |b| b[c]);
        }
    }
}

/// `sum of a[i] * b[i]` in f64, four partial sums (so the compiler keeps them in vector lanes).
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut lanes = [0f64; 4];
    for (a, b) in a.chunks_exact(4).zip(b.chunks_exact(4)) {
        for lane in 0..4 {
            lanes[lane] += a[lane] * b[lane];
        }
    }
    let tail = a.len() / 4 * 4;
    let rest: f64 = a[tail..].iter().zip(&b[tail..]).map(|(a, b)| a * b).sum();
    (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]) + rest
}
