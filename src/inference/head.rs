//! The network's head in the inference form: the global average pooling and the classifier. At batch
//! 1 libtorch's `adaptive_avg_pool2d`, `flatten` and `linear` cost ~15 us of calls (a reduction set up
//! by `TensorIterator`, MKL's `sgemv` with its own set-up, the bias added) for the Fashion-MNIST
//! networks' 6,272 additions and 1,280 multiply-adds (docs/speed.md, "Batch 1"). Here, where the last
//! activation is channels-last (the forms' layout), the pooling is `channel_means` (one call, f64 sums
//! rounded once) and a small classifier's product is summed in f64 and rounded once too; a large
//! classifier (ResNet-50's 2048 x 1000, whose 8 MB of weights are the cost) runs libtorch's `linear` on
//! the pooled means. A change of rounding, not of meaning: the networks' tests hold the forms to
//! their bounds.
use super::channel_means::channel_means;
use super::f64_conv::F64Conv;
use super::precision::as_fp32;
use tch::{nn, Tensor};

/// Classifier weights up to this many are multiplied here (the Fashion-MNIST networks' 1,280);
/// above, libtorch's `linear` (MKL, on all threads) is faster.
const SMALL_WEIGHTS: usize = 1 << 16;

/// The pooling and the classifier `fc` of a network's inference form.
#[derive(Debug)]
pub(crate) struct Head<'a> {
    fc: &'a nn::Linear,
    /// A small `fc` in f64, as a 1x1 convolution of the pooled means' one position.
    small: Option<F64Conv>,
}

impl<'a> Head<'a> {
    /// The head ending in `fc` (borrowed; a small one's weights copied).
    pub(crate) fn new(fc: &'a nn::Linear) -> Head<'a> {
        let small = match <[i64; 2]>::try_from(fc.ws.size()) {
            Ok([classes, inputs])
                if (classes * inputs) as usize <= SMALL_WEIGHTS && fc.ws.device() == tch::Device::Cpu =>
            {
                F64Conv::of(&fc.ws.view([classes, inputs, 1, 1]), fc.bs.as_ref(), 1)
            }
            _ => None,
        };
        Head { fc, small }
    }

    /// The logits `(N, classes)` in fp32 from the last activation `x` (fp32, or bf16 in the bf16 form).
    pub(crate) fn forward(&self, x: &Tensor) -> Tensor {
        let x = as_fp32(x);
        let Some(pooled) = channel_means(&[&x]) else {
            return self.libtorch(&x);
        };
        let [n, c, _, _] = <[i64; 4]>::try_from(pooled.size()).expect("(N, C, 1, 1) means");
        match &self.small {
            Some(small) if small.inputs() as i64 == c => logits(small, &pooled, n as usize),
            _ => pooled.view([n, c]).apply(self.fc),
        }
    }

    /// libtorch's head, as the model runs it: its pooling, `flatten` and `linear`, on `x` in fp32.
    pub(crate) fn libtorch(&self, x: &Tensor) -> Tensor {
        as_fp32(x).adaptive_avg_pool2d([1, 1]).flatten(1, -1).apply(self.fc)
    }
}

/// `bias + weight . means` of `fc` for each of the `n` samples of `pooled` (fp32, `(N, inputs, 1, 1)`),
/// in f64, rounded once.
fn logits(fc: &F64Conv, pooled: &Tensor, n: usize) -> Tensor {
    let means = Vec::<f32>::try_from(pooled.flatten(0, -1)).expect("fp32 means");
    let mut logits = Vec::with_capacity(n * fc.outputs());
    for sample in means.chunks_exact(fc.inputs()) {
        let sample: Vec<f64> = sample.iter().map(|&m| m as f64).collect();
        let mut row = vec![0f64; fc.outputs()];
        fc.add_means(&sample, 1, &mut row);
        logits.extend(row.into_iter().map(|v| v as f32));
    }
    Tensor::from_slice(&logits).view([n as i64, fc.outputs() as i64])
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::VarStore;
    use tch::{Device, Kind};

    fn channels_last(shape: [i64; 4]) -> Tensor {
        super::super::channels_last_sru::to_channels_last(&Tensor::randn(shape, (Kind::Float, Device::Cpu)))
    }

    /// libtorch's head in f64, rounded to fp32.
    fn f64_logits(fc: &nn::Linear, x: &Tensor) -> Tensor {
        let d = |t: &Tensor| t.to_kind(Kind::Double);
        let pooled = d(x).mean_dim(&[2i64, 3][..], false, Kind::Double);
        pooled.linear(&d(&fc.ws), fc.bs.as_ref().map(d)).to_kind(Kind::Float)
    }

    #[test]
    fn a_small_head_is_libtorchs_in_f64_and_a_large_one_libtorchs_linear() {
        tch::manual_seed(0);
        // Fashion-MNIST's head (128 -> 10) at batch 1 and 3, and one past the small limit.
        for (inputs, classes, n, small) in [(128, 10, 1, true), (128, 10, 3, true), (512, 200, 2, false)] {
            let vs = VarStore::new(Device::Cpu);
            let fc = nn::linear(vs.root() / "fc", inputs, classes, Default::default());
            let head = Head::new(&fc);
            assert_eq!(head.small.is_some(), small);
            let x = channels_last([n, inputs, 7, 7]);
            let ours = tch::no_grad(|| head.forward(&x));
            assert_eq!(ours.size(), [n, classes]);
            let expected = f64_logits(&fc, &x);
            let libtorch = tch::no_grad(|| x.adaptive_avg_pool2d([1, 1]).flatten(1, -1).apply(&fc));
            let largest = expected.abs().max().double_value(&[]);
            let ours_off = (&ours - &expected).abs().max().double_value(&[]);
            let libtorch_off = (&libtorch - &expected).abs().max().double_value(&[]);
            // Ours sums in f64 (the means rounded to fp32 once, the logits once): no further from the
            // f64 head than libtorch's fp32 one, give or take one rounding of the largest logit.
            let rounding = largest * f64::from(f32::EPSILON);
            assert!(ours_off <= libtorch_off + rounding, "{inputs}->{classes}: {ours_off} vs {libtorch_off}");
            if small {
                assert!(ours_off <= 2.0 * rounding, "{inputs}->{classes}: {ours_off} off the f64 head");
            }
        }
    }

    #[test]
    fn other_layouts_and_kinds_take_libtorchs_head() {
        let vs = VarStore::new(Device::Cpu);
        let fc = nn::linear(vs.root() / "fc", 16, 4, Default::default());
        let head = Head::new(&fc);
        let x = Tensor::randn([2, 16, 3, 3], (Kind::Float, Device::Cpu)); // NCHW
        let libtorch = tch::no_grad(|| x.adaptive_avg_pool2d([1, 1]).flatten(1, -1).apply(&fc));
        assert!(tch::no_grad(|| head.forward(&x)).equal(&libtorch), "NCHW: libtorch's head, its bits");
        let bf16 = channels_last([2, 16, 3, 3]).to_kind(Kind::BFloat16);
        let fp32 = bf16.to_kind(Kind::Float);
        assert!(
            tch::no_grad(|| head.forward(&bf16)).equal(&tch::no_grad(|| head.forward(&fp32))),
            "bf16 in fp32"
        );
    }
}
