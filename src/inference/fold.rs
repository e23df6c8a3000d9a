//! The fold pass's arithmetic: an eval-mode BatchNorm `y = (u - mean) / sqrt(var + eps) * gamma + beta`
//! is the per-channel affine `y = u * scale + shift`, with `scale = gamma / sqrt(var + eps)` and
//! `shift = beta - mean * scale`; after a convolution `u = W x + b` it folds into the convolution's
//! weight (`W * scale`, per output channel) and bias (`b * scale + shift`).
//!
//! What folding changes is rounding: the folded weight is `W * scale` rounded once to fp32 (relative
//! error at most 2^-24 per weight), and the convolution then accumulates other products. The inference
//! form's tests hold the folded network to PyTorch's own fp32 rounding error (`crate::inference` docs).
use tch::{nn, Kind, Tensor};

/// An eval-mode BatchNorm's tensors (shared with the layer, not copied) and its `eps` (which `tch`
/// keeps private, so the caller gives it).
#[derive(Debug)]
pub struct BatchNormParams {
    /// `gamma` (`None`: 1).
    pub weight: Option<Tensor>,
    /// `beta` (`None`: 0).
    pub bias: Option<Tensor>,
    /// The running mean used in eval mode.
    pub running_mean: Tensor,
    /// The running variance used in eval mode.
    pub running_var: Tensor,
    /// Added to the variance.
    pub eps: f64,
}

impl BatchNormParams {
    /// The tensors of `bn` (detached views), with its `eps`.
    pub fn of(bn: &nn::BatchNorm, eps: f64) -> BatchNormParams {
        BatchNormParams {
            weight: bn.ws.as_ref().map(Tensor::detach),
            bias: bn.bs.as_ref().map(Tensor::detach),
            running_mean: bn.running_mean.detach(),
            running_var: bn.running_var.detach(),
            eps,
        }
    }

    /// The eval-mode BatchNorm on `x`, by libtorch's operation (what `nn::BatchNorm` runs).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (mean, var) = (Some(&self.running_mean), Some(&self.running_var));
        Tensor::batch_norm(x, self.weight.as_ref(), self.bias.as_ref(), mean, var, false, 0.1, self.eps, true)
    }

    /// `scale` and `shift` (each `[C]`) in fp64.
    fn scale_shift_f64(&self) -> (Tensor, Tensor) {
        let (channels, device) = (self.running_mean.size()[0], self.running_mean.device());
        let of = |t: &Option<Tensor>, fill: f64| match t {
            Some(t) => t.to_kind(Kind::Double),
            None => Tensor::full([channels], fill, (Kind::Double, device)),
        };
        let scale = of(&self.weight, 1.0) / (self.running_var.to_kind(Kind::Double) + self.eps).sqrt();
        let shift = of(&self.bias, 0.0) - self.running_mean.to_kind(Kind::Double) * &scale;
        (scale, shift)
    }

    /// The per-channel `scale` and `shift` it applies (each `[C]`), computed in fp64 from the layer's
    /// statistics and affine, then rounded once to the layer's dtype.
    pub fn scale_shift(&self) -> (Tensor, Tensor) {
        let kind = self.running_mean.kind();
        let (scale, shift) = tch::no_grad(|| self.scale_shift_f64());
        (scale.to_kind(kind), shift.to_kind(kind))
    }
}

/// A convolution's weight and bias with the BatchNorm after it folded in: `(W * scale, b * scale +
/// shift)`, computed in fp64 and rounded once to the weight's dtype. `bias` is the convolution's own
/// (none in the networks here).
pub fn fold_batchnorm(weight: &Tensor, bias: Option<&Tensor>, bn: &BatchNormParams) -> (Tensor, Tensor) {
    tch::no_grad(|| {
        let kind = weight.kind();
        let (scale, shift) = bn.scale_shift_f64();
        let folded = weight.to_kind(Kind::Double) * scale.view([-1, 1, 1, 1]);
        let bias = match bias {
            Some(b) => b.to_kind(Kind::Double) * &scale + shift,
            None => shift,
        };
        (folded.to_kind(kind).contiguous(), bias.to_kind(kind))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::VarStore;
    use tch::Device;

    fn trained_like_batchnorm(vs: &VarStore, channels: i64) -> nn::BatchNorm {
        let mut bn = nn::batch_norm2d(vs.root() / "bn", channels, Default::default());
        tch::no_grad(|| {
            bn.running_mean.copy_(&Tensor::randn([channels], (Kind::Float, Device::Cpu)));
            bn.running_var.copy_(&(Tensor::rand([channels], (Kind::Float, Device::Cpu)) + 0.1));
            bn.ws.as_mut().unwrap().copy_(&Tensor::randn([channels], (Kind::Float, Device::Cpu)));
            bn.bs.as_mut().unwrap().copy_(&Tensor::randn([channels], (Kind::Float, Device::Cpu)));
        });
        bn
    }

    /// The folded convolution against conv-then-BatchNorm, both against the fp64 truth: folding must
    /// not be less accurate than the reference's own fp32 arithmetic (by more than the one rounding of
    /// the output, 2^-24 of its largest value).
    #[test]
    fn a_folded_convolution_is_as_accurate_as_conv_then_batchnorm() {
        let vs = VarStore::new(Device::Cpu);
        let conv = nn::conv2d(
            vs.root() / "conv",
            16,
            32,
            3,
            nn::ConvConfig { padding: 1, bias: false, ..Default::default() },
        );
        let bn = trained_like_batchnorm(&vs, 32);
        let x = Tensor::randn([4, 16, 10, 10], (Kind::Float, Device::Cpu));
        let params = BatchNormParams::of(&bn, 1e-5);
        let (w, b) = fold_batchnorm(&conv.ws, None, &params);
        tch::no_grad(|| {
            let reference = x.conv2d(&conv.ws, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1).apply_t(&bn, false);
            let folded = x.conv2d(&w, Some(&b), [1, 1], [1, 1], [1, 1], 1);
            let xd = x.to_kind(Kind::Double);
            let truth = xd.conv2d(&conv.ws.to_kind(Kind::Double), None::<Tensor>, [1, 1], [1, 1], [1, 1], 1);
            let (scale, shift) = params.scale_shift_f64();
            let truth = truth * scale.view([1, -1, 1, 1]) + shift.view([1, -1, 1, 1]);
            let err = |t: &Tensor| (t.to_kind(Kind::Double) - &truth).abs().max().double_value(&[]);
            let (err_ref, err_folded) = (err(&reference), err(&folded));
            let output_ulp = truth.abs().max().double_value(&[]) * f64::powi(2.0, -24);
            assert!(err_folded <= 2.0 * err_ref + output_ulp, "folded {err_folded:e}, reference {err_ref:e}");
            assert!(err_ref > 0.0 && err_folded > 0.0, "the check must see rounding on both sides");
        });
    }

    #[test]
    fn scale_and_shift_are_the_eval_mode_batchnorm() {
        let vs = VarStore::new(Device::Cpu);
        let bn = trained_like_batchnorm(&vs, 8);
        let x = Tensor::randn([2, 8, 5, 5], (Kind::Float, Device::Cpu));
        let (scale, shift) = BatchNormParams::of(&bn, 1e-5).scale_shift();
        let y = tch::no_grad(|| x.apply_t(&bn, false));
        let affine = &x * scale.view([1, -1, 1, 1]) + shift.view([1, -1, 1, 1]);
        // Both sides round a few operations on terms of size |x * scale|, |mean * scale| and |beta|
        // (BatchNorm: sub, div, mul, add; the affine: scale and shift rounded, a mul, an add; the
        // shift cancels the other two): 8 ulps of their sum.
        let per_channel = |t: &Tensor| t.abs().view([1, -1, 1, 1]);
        let beta = bn.bs.as_ref().unwrap();
        let size = (&x * scale.view([1, -1, 1, 1])).abs()
            + per_channel(&(&bn.running_mean * &scale))
            + per_channel(beta);
        let excess = ((y - affine).abs() - size * (8.0 * f64::powi(2.0, -24))).max().double_value(&[]);
        assert!(excess <= 0.0, "{excess:e}");
    }
}
