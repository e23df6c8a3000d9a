//! One convolution of the inference form and what follows it (an eval-mode BatchNorm, a ReLU, a
//! residual add), in the state the passes leave it: each pass changes one thing, so each can be tested
//! alone against the state before it.
//! - `fold`: the BatchNorm becomes the convolution's weight and bias (`fold::fold_batchnorm`);
//! - `fuse`: the ReLU and the residual add run in the convolution's epilogue (one oneDNN primitive,
//!   `mkldnn::_convolution_pointwise`) when the shim is built, else in place on its output;
//! - `cast` (the bf16 form only): weight stored in bf16, and so its input and output
//!   (`precision::Arithmetic`); the bias kept in fp32 but for the residual add's call (bf16);
//! - `prepack`: the weight reordered once into oneDNN's blocked layout for the input size it will see;
//! - `own_primitives` (after prepack): where the build has oneDNN primitives of its own (`onednn.rs`)
//!   and the convolution is a fused fp32 or native bf16 one, dense or grouped and small, a primitive
//!   created once for each prepacked size (a tiled batch's full tile and its rest), which
//!   channels-last inputs of that size then run instead of libtorch's call.
use super::ffi::{self, ConvGeometry};
use super::fold::{self, BatchNormParams};
use super::onednn::OwnConv;
use super::precision::Arithmetic;
use crate::error::ScConvError;
use tch::{nn, Kind, Tensor};

/// Grouped convolutions of fewer multiply-adds a call run as primitives of our own
/// (`InferenceConv::own_primitive_pays`): measured on the Fashion-MNIST SC form's GWCs (0.9 M
/// multiply-adds an image), whose forward ran 1.14x faster at batch 1, level at 2 and slower from 4
/// (docs/speed.md, "Small grouped convolutions").
const SMALL_GROUPED_MULTIPLY_ADDS: i64 = 2_500_000;

/// A convolution with its BatchNorm (until folded), ReLU and epilogue state.
#[derive(Debug)]
pub struct InferenceConv {
    weight: Tensor,
    bias: Option<Tensor>,
    /// The bias of the call with the residual add where the cast pass stores it apart (`add_bias`).
    residual_bias: Option<Tensor>,
    geometry: ConvGeometry,
    /// The BatchNorm after the convolution, until the fold pass.
    batchnorm: Option<BatchNormParams>,
    relu: bool,
    /// ReLU and residual add in the epilogue: oneDNN's with the shim, else in place on the output.
    fused: bool,
    /// The weight in oneDNN's layout for one input size (`None`: the dense weight).
    packed: Option<Tensor>,
    /// How its weight, input and output are stored (the cast pass).
    arithmetic: Arithmetic,
    /// The input sizes prepack packed for (the own-primitives pass makes a primitive for each).
    packed_sizes: Vec<[i64; 4]>,
    /// The fused convolution as oneDNN primitives of our own, one for each prepacked input size.
    own: Vec<OwnConv>,
}

impl InferenceConv {
    /// The convolution `conv` (its weight and bias shared, not copied) with `geometry` (tch keeps a
    /// layer's stride and padding private, so the builder of the network gives them).
    pub fn new(conv: &nn::Conv2D, geometry: ConvGeometry) -> InferenceConv {
        InferenceConv::from_weights(conv.ws.detach(), conv.bs.as_ref().map(Tensor::detach), geometry)
    }

    /// A convolution of `weight` and `bias` made here (not a layer of the model) with `geometry`.
    pub(crate) fn from_weights(
        weight: Tensor,
        bias: Option<Tensor>,
        geometry: ConvGeometry,
    ) -> InferenceConv {
        InferenceConv {
            weight,
            bias,
            residual_bias: None,
            geometry,
            batchnorm: None,
            relu: false,
            fused: false,
            packed: None,
            arithmetic: Arithmetic::Fp32,
            packed_sizes: Vec::new(),
            own: Vec::new(),
        }
    }

    /// Followed by the eval-mode BatchNorm `bn`.
    pub fn then_batchnorm(mut self, bn: BatchNormParams) -> InferenceConv {
        self.batchnorm = Some(bn);
        self
    }

    /// Followed by a ReLU (after the BatchNorm and, in `forward_add`, after the residual add).
    pub fn then_relu(mut self) -> InferenceConv {
        self.relu = true;
        self
    }

    /// The fold pass: the BatchNorm into the weight and bias (no-op without one).
    pub fn fold(&mut self) {
        if let Some(bn) = self.batchnorm.take() {
            let (weight, bias) = fold::fold_batchnorm(&self.weight, self.bias.as_ref(), &bn);
            (self.weight, self.bias, self.packed, self.own) = (weight, Some(bias), None, Vec::new());
            self.residual_bias = None;
            self.packed_sizes.clear();
        }
    }

    /// The fuse pass: ReLU and residual add into the convolution's epilogue. Refused while a
    /// BatchNorm sits between them (fold first).
    pub fn fuse(&mut self) -> Result<(), ScConvError> {
        if self.batchnorm.is_some() {
            return Err(fuse_needs_fold());
        }
        self.fused = true;
        Ok(())
    }

    /// The prepack pass: the weight reordered once into oneDNN's layout for inputs of `input_size`
    /// (N, C, H, W). Needs the shim (libtorch's own convolution would reorder it back every call).
    pub fn prepack(&mut self, input_size: [i64; 4]) -> Result<(), ScConvError> {
        self.prepack_sizes(&[input_size])
    }

    /// As [`InferenceConv::prepack`], for inputs of each size given (a tiled batch's full tiles and
    /// its rest): the weight reordered for the first; the sizes kept for
    /// [`InferenceConv::own_primitives`].
    pub fn prepack_sizes(&mut self, input_sizes: &[[i64; 4]]) -> Result<(), ScConvError> {
        if !ffi::shim_built() {
            return Err(ScConvError::InvalidInput(
                "prepack needs the oneDNN shim, which this build lacks".into(),
            ));
        }
        let first = *input_sizes
            .first()
            .ok_or_else(|| ScConvError::InvalidInput("prepack: no input size given".into()))?;
        let packed = tch::no_grad(|| ffi::reorder_conv_weight(&self.weight, &self.geometry, first))
            .map_err(|e| ScConvError::InvalidInput(format!("prepack: {e}")))?;
        self.packed = Some(packed);
        self.packed_sizes = input_sizes.to_vec();
        self.own = Vec::new();
        Ok(())
    }

    /// The own-primitives pass (after prepack): the convolution as oneDNN primitives of our own, one
    /// for each size prepack packed for, where this build has them and they pay
    /// (`own_primitive_pays`); `Ok(false)` (libtorch's calls kept) elsewhere, and where our oneDNN
    /// cannot make one for every size or offers only its reference kernel (e.g. bf16 on a CPU where
    /// libtorch's newer oneDNN takes it and ours does not). The same function as libtorch's call,
    /// another oneDNN's kernels (the unit tests hold them to its accuracy).
    pub fn own_primitives(&mut self) -> Result<bool, ScConvError> {
        let Some(&first) = self.packed_sizes.first() else {
            return Err(ScConvError::InvalidInput(
                "own primitives need prepack first, for the sizes it packed (the prepack pass)".into(),
            ));
        };
        self.own = Vec::new();
        // Decided on the first size (a tiled batch's full tile) for every size, so that a form computes
        // each image alike whichever tile it runs in.
        if !self.own_primitive_pays(first) {
            return Ok(false);
        }
        let made: Result<Vec<_>, String> = (self.packed_sizes.iter())
            .map(|&size| OwnConv::new(&self.weight, self.biases(), &self.geometry, size, self.relu))
            .collect();
        // Every size or none: an image's numbers must not depend on the tile it runs in.
        self.own = made.ok().and_then(|own| own.into_iter().collect::<Option<Vec<_>>>()).unwrap_or_default();
        Ok(!self.own.is_empty())
    }

    /// Whether a primitive of our own runs inputs of `size` faster than libtorch's call: fused fp32 or
    /// native bf16 convolutions (emulated bf16 rounds each output after an fp32 call: libtorch's),
    /// dense ones always; grouped ones (the CRU's GWC) only when small, since oneDNN 3.2's grouped
    /// kernels take 1.1-1.75x the time of libtorch's oneDNN 3.10 ones (SC-ResNet-50's GWCs at batch 1,
    /// fp32), which pays where a call's work is large, and the call's ~28 us where it is small.
    fn own_primitive_pays(&self, size: [i64; 4]) -> bool {
        let fused = self.fused && matches!(self.arithmetic, Arithmetic::Fp32 | Arithmetic::Bf16Native);
        fused && (self.geometry.groups == 1 || self.multiply_adds(size) < SMALL_GROUPED_MULTIPLY_ADDS)
    }

    /// Multiply-adds of one call on inputs of `size` (N, C, H, W).
    fn multiply_adds(&self, size: [i64; 4]) -> i64 {
        let [n, _, h, w] = size;
        let kernel = &self.weight.size()[2..];
        let g = &self.geometry;
        let out = |i: usize, extent: i64| {
            crate::info::out_size(extent, g.dilation[i] * (kernel[i] - 1) + 1, g.stride[i], g.padding[i])
        };
        n * out(0, h) * out(1, w) * self.weight.numel() as i64
    }

    /// Whether the own-primitives pass made it a oneDNN primitive of our own (`own_onednn_version`).
    pub fn runs_own_primitive(&self) -> bool {
        !self.own.is_empty()
    }

    /// The cast pass: the weight stored as `arithmetic` stores values (rounded to bf16 once, after
    /// folding), and so its input and output from then on. The bias stays fp32: oneDNN's bf16
    /// kernels add it to the fp32 sums before the output's one rounding, so rounding it too would
    /// add an error of up to 2^-9 of a folded BatchNorm's shift, often the larger part of an output.
    /// Only the call with the residual add (`forward_add`) takes it stored as the weight: libtorch's
    /// in-place add (`_convolution_pointwise_.binary`) refuses a bias of another type, and our own
    /// primitive's add takes it alike, so that a form's numbers do not depend on which runs.
    /// Refused before fold (the BatchNorm is folded in full precision first) and after prepack (which
    /// reorders the weight it casts).
    pub fn cast(&mut self, arithmetic: &Arithmetic) -> Result<(), ScConvError> {
        cast_allowed(self.batchnorm.is_none(), self.packed.is_some())?;
        self.weight = arithmetic.store(&self.weight);
        self.residual_bias =
            (self.bias.as_ref()).filter(|_| arithmetic.is_bf16()).map(|b| arithmetic.store(b));
        self.arithmetic = arithmetic.clone();
        Ok(())
    }

    /// The bias of the call with the residual add: bf16 in the bf16 forms (`cast`), else the bias.
    fn add_bias(&self) -> Option<&Tensor> {
        self.residual_bias.as_ref().or(self.bias.as_ref())
    }

    /// The weight, the bias and the groups its call with the residual add (`with_add`) or without it
    /// computes with, as stored (for `BranchMeans`, which follows these convolutions' outputs).
    pub(crate) fn computed_with(&self, with_add: bool) -> (&Tensor, Option<&Tensor>, i64) {
        let bias = if with_add { self.add_bias() } else { self.bias.as_ref() };
        (&self.weight, bias, self.geometry.groups)
    }

    /// The bias and the residual add's bias, for our own primitive.
    fn biases(&self) -> Option<(&Tensor, &Tensor)> {
        self.bias.as_ref().zip(self.add_bias())
    }

    /// How it stores its weight, input and output.
    pub fn arithmetic(&self) -> &Arithmetic {
        &self.arithmetic
    }

    pub(crate) fn weight_device(&self) -> tch::Device {
        self.weight.device()
    }

    /// Which passes have run on it: (folded, fused, prepacked).
    pub fn state(&self) -> (bool, bool, bool) {
        (self.batchnorm.is_none(), self.fused, self.packed.is_some())
    }

    /// `relu(bn(conv(x)))`, each part where configured; in bf16 (after `cast`), `x` is stored in bf16
    /// first and the result is bf16.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        // In fp32 `x` as it is (no call); in bf16 its bf16 values, which the own primitive reads too.
        let stored = self.arithmetic.is_bf16().then(|| self.arithmetic.store(x));
        let x = stored.as_ref().unwrap_or(x);
        if let Some(y) = self.own.iter().find_map(|own| own.forward(x)) {
            return y;
        }
        if self.fused && ffi::shim_built() {
            let y =
                ffi::conv_pointwise(x, self.onednn_weight(), self.bias.as_ref(), &self.geometry, self.relu);
            return self.arithmetic.store(&expect_onednn(y));
        }
        let y = self.conv_then_batchnorm(x, self.bias.as_ref());
        self.arithmetic.store(&epilogue(y, None, self.relu, self.fused))
    }

    /// `relu(bn(conv(x)) + residual)`; fused, the result is written into `residual` in place (into
    /// its bf16 copy when it is not stored as this convolution stores values).
    pub fn forward_add(&self, x: &Tensor, residual: Tensor) -> Tensor {
        let x = &self.arithmetic.store(x);
        let mut residual = self.arithmetic.store(&residual);
        if self.own.iter().any(|own| own.forward_add(x, &mut residual)) {
            return residual;
        }
        if self.fused && ffi::shim_built() {
            let w = self.onednn_weight();
            expect_onednn(ffi::conv_pointwise_add_(
                &mut residual,
                x,
                w,
                self.add_bias(),
                &self.geometry,
                self.relu,
            ));
            return self.arithmetic.store(&residual);
        }
        let y = self.conv_then_batchnorm(x, self.add_bias());
        self.arithmetic.store(&epilogue(y, Some(residual), self.relu, self.fused))
    }

    fn onednn_weight(&self) -> &Tensor {
        self.packed.as_ref().unwrap_or(&self.weight)
    }

    /// The convolution with `bias` (oneDNN's primitive when prepacked, else libtorch's) and the
    /// BatchNorm when not folded.
    fn conv_then_batchnorm(&self, x: &Tensor, bias: Option<&Tensor>) -> Tensor {
        let g = &self.geometry;
        let y = match &self.packed {
            Some(w) if ffi::shim_built() => expect_onednn(ffi::conv_pointwise(x, w, bias, g, false)),
            // libtorch's conv2d takes one type: bf16 values beside the fp32 bias are computed in fp32,
            // as the emulated form computes them (the unfused bf16 form; not a fast path).
            _ if bias.is_some_and(|b| b.kind() != x.kind()) => {
                let fp32 = |t: &Tensor| t.to_kind(Kind::Float);
                fp32(x).conv2d(&fp32(&self.weight), bias, g.stride, g.padding, g.dilation, g.groups)
            }
            _ => x.conv2d(&self.weight, bias, g.stride, g.padding, g.dilation, g.groups),
        };
        match &self.batchnorm {
            Some(bn) => bn.forward(&y),
            None => y,
        }
    }
}

/// The fuse pass's refusal while a BatchNorm is not folded.
pub(super) fn fuse_needs_fold() -> ScConvError {
    ScConvError::InvalidInput("fuse needs the BatchNorm folded first (the fold pass)".into())
}

/// The cast pass's refusals, for a convolution, an ScConv step or a whole form: before fold (the
/// BatchNorm is folded in full precision first), after prepack (which reorders the weights it casts).
pub(super) fn cast_allowed(folded: bool, prepacked: bool) -> Result<(), ScConvError> {
    let refused = match (folded, prepacked) {
        (false, _) => "casting needs the BatchNorm folded first (the fold pass)",
        (true, true) => "cast before prepack: the packed weights would stay fp32",
        (true, false) => return Ok(()),
    };
    Err(ScConvError::InvalidInput(refused.into()))
}

/// `relu(y + residual)`, each part where asked: in place on `y` when `in_place` (the fuse pass's
/// form where no oneDNN epilogue runs), else as new tensors like the reference's operations.
pub(super) fn epilogue(mut y: Tensor, residual: Option<Tensor>, relu: bool, in_place: bool) -> Tensor {
    if !in_place {
        let y = match residual {
            Some(r) => y + r,
            None => y,
        };
        return if relu { y.relu() } else { y };
    }
    if let Some(r) = residual {
        y += r;
    }
    if relu {
        y.relu_()
    } else {
        y
    }
}

/// A oneDNN failure on input the network checked is a bug or an allocation failure: a panic, as tch's
/// own operations do (`input::guard` turns it into an error at the public entry points).
fn expect_onednn<T>(result: Result<T, String>) -> T {
    result.unwrap_or_else(|e| panic!("oneDNN convolution: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::VarStore;
    use tch::{Device, Kind};

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
    }

    /// `relu(conv(x) + b + residual)` in fp64, the truth both sides are measured against.
    fn truth(conv: &nn::Conv2D, bias: &Tensor, x: &Tensor, residual: &Tensor) -> Tensor {
        let d = |t: &Tensor| t.to_kind(Kind::Double);
        let y = d(x).conv2d(&d(&conv.ws), Some(&d(bias)), [2, 2], [1, 1], [1, 1], 1);
        (y + d(residual)).relu()
    }

    /// Each pass on one convolution with a residual add and ReLU: fusing (oneDNN's post-ops, or in
    /// place) and prepacking change only the kernel's summation order, so each state is as accurate
    /// against fp64 as libtorch's own convolution-add-ReLU (twice its error plus one output rounding).
    #[test]
    fn fuse_and_prepack_keep_a_convolutions_accuracy() {
        let vs = VarStore::new(Device::Cpu);
        let config = nn::ConvConfig { stride: 2, padding: 1, bias: false, ..Default::default() };
        let layer = nn::conv2d(vs.root() / "c", 24, 48, 3, config);
        let x = Tensor::randn([3, 24, 14, 14], (Kind::Float, Device::Cpu));
        let residual = Tensor::randn([3, 48, 7, 7], (Kind::Float, Device::Cpu));
        let bias = Tensor::randn([48], (Kind::Float, Device::Cpu));
        let truth = truth(&layer, &bias, &x, &residual);
        let reference =
            tch::no_grad(|| (x.conv2d(&layer.ws, Some(&bias), [2, 2], [1, 1], [1, 1], 1) + &residual).relu());
        let ulp = truth.abs().max().double_value(&[]) * f64::powi(2.0, -24);
        let budget = 2.0 * max_abs_diff(&reference, &truth) + ulp;
        let mut conv = InferenceConv::new(&layer, ConvGeometry::square(2, 1, 1)).then_relu();
        conv.bias = Some(bias);
        let mut states = vec![("plain", tch::no_grad(|| conv.forward_add(&x, residual.copy())))];
        conv.fuse().unwrap();
        states.push(("fused", tch::no_grad(|| conv.forward_add(&x, residual.copy()))));
        if ffi::shim_built() {
            conv.prepack([3, 24, 14, 14]).unwrap();
            states.push(("prepacked", tch::no_grad(|| conv.forward_add(&x, residual.copy()))));
            assert_eq!(conv.state(), (true, true, true));
        }
        for (state, y) in &states {
            let err = max_abs_diff(y, &truth);
            assert!(err <= budget, "{state}: off by {err:e}, budget {budget:e}");
        }
    }

    /// The cast pass (emulated bf16, as on every CPU): the output is bf16 values, and it is the fp32
    /// convolution-add-ReLU of the bf16-rounded input, weight, bias (the residual add's is rounded:
    /// `cast`) and residual, rounded once (within
    /// one bf16 step: oneDNN and libtorch sum in other orders, which can tip a rounding).
    #[test]
    fn a_cast_convolution_rounds_its_operands_and_its_output_to_bf16_once() {
        use crate::inference::precision::{round_to_bf16, Arithmetic, Precision};
        let vs = VarStore::new(Device::Cpu);
        let config = nn::ConvConfig { stride: 2, padding: 1, ..Default::default() };
        let layer = nn::conv2d(vs.root() / "c", 24, 48, 3, config);
        let x = Tensor::randn([3, 24, 14, 14], (Kind::Float, Device::Cpu));
        let residual = Tensor::randn([3, 48, 7, 7], (Kind::Float, Device::Cpu));
        let r = round_to_bf16;
        let bias = layer.bs.as_ref().unwrap();
        let expected = tch::no_grad(|| {
            let y = r(&x).conv2d(&r(&layer.ws), Some(&r(bias)), [2, 2], [1, 1], [1, 1], 1);
            r(&(y + r(&residual)).relu())
        });
        let mut conv = InferenceConv::new(&layer, ConvGeometry::square(2, 1, 1)).then_relu();
        conv.fuse().unwrap();
        conv.cast(&Arithmetic::for_precision(Precision::Bf16Emulated)).unwrap();
        if ffi::shim_built() {
            conv.prepack([3, 24, 14, 14]).unwrap();
        }
        let y = tch::no_grad(|| conv.forward_add(&x, residual.copy()));
        assert!(y.equal(&r(&y)), "the output holds bf16 values");
        let step = expected.abs().max().double_value(&[]) / 128.0;
        assert!(max_abs_diff(&y, &expected) <= step, "{} > {step}", max_abs_diff(&y, &expected));
        assert!(
            max_abs_diff(&y, &expected)
                < max_abs_diff(&y, &tch::no_grad(|| conv_fp32(&layer, &x, &residual)))
        );
        assert!(!layer.ws.equal(&r(&layer.ws)), "the model's own weight is not changed");
    }

    /// The bf16 cast keeps the bias in fp32, added before the output's one rounding, but for the call
    /// with the residual add, whose bias is rounded to bf16 as its weight (`cast`): emulated, and on
    /// oneDNN's bf16 kernels (our own primitive where built) where libtorch's oneDNN takes bf16. A
    /// bias large beside the products (a folded BatchNorm's shift can be) makes a rounded one show:
    /// it moves about a quarter of the outputs by a bf16 step.
    #[test]
    fn a_cast_convolution_keeps_its_bias_in_fp32_but_with_the_residual_add() {
        use crate::inference::precision::{round_to_bf16 as r, Precision};
        let cl = crate::inference::channels_last_sru::to_channels_last;
        let mut arithmetics = vec![Arithmetic::for_precision(Precision::Bf16Emulated)];
        if crate::inference::onednn_bf16_support().is_ok() {
            arithmetics.push(Arithmetic::Bf16Native);
        }
        let vs = VarStore::new(Device::Cpu);
        let layer =
            nn::conv2d(vs.root() / "c", 16, 32, 3, nn::ConvConfig { padding: 1, ..Default::default() });
        let bias = Tensor::randn([32], (Kind::Float, Device::Cpu)) * 30.0 + 0.0123;
        let x = cl(&Tensor::randn([2, 16, 8, 8], (Kind::Float, Device::Cpu)));
        let residual = cl(&Tensor::randn([2, 32, 8, 8], (Kind::Float, Device::Cpu)));
        let fp32 = |t: &Tensor| t.to_kind(Kind::Float);
        // The fp32 convolution of the bf16 values with `b` [and the bf16 residual], rounded once.
        let expected = |b: &Tensor, add: bool| {
            let y = tch::no_grad(|| r(&x).conv2d(&r(&layer.ws), Some(b), [1, 1], [1, 1], [1, 1], 1));
            r(&if add { y + r(&residual) } else { y })
        };
        let share_off = |y: &Tensor, want: &Tensor| {
            let off = fp32(y).ne_tensor(want).sum(Kind::Int64).int64_value(&[]);
            off as f64 / want.numel() as f64
        };
        for arithmetic in arithmetics {
            let mut conv = InferenceConv::from_weights(
                layer.ws.detach(),
                Some(bias.copy()),
                ConvGeometry::square(1, 1, 1),
            );
            conv.fuse().unwrap();
            conv.cast(&arithmetic).unwrap();
            if ffi::shim_built() {
                conv.prepack([2, 16, 8, 8]).unwrap();
                conv.own_primitives().unwrap();
            }
            let input = arithmetic.store(&x);
            // Our own primitive where built, then libtorch's calls (the fallback) likewise.
            for path in ["own primitive", "libtorch's call"] {
                if path == "libtorch's call" {
                    conv.own.clear();
                }
                let (y, y_added) = tch::no_grad(|| {
                    (conv.forward(&input), conv.forward_add(&input, arithmetic.store(&residual)))
                });
                let what = format!("{} ({path})", arithmetic.describe());
                assert!(
                    share_off(&y, &expected(&bias, false)) <= 0.01,
                    "{what}: the fp32 bias, one rounding"
                );
                assert!(share_off(&y, &expected(&r(&bias), false)) >= 0.1, "{what}: not a rounded bias");
                assert!(
                    share_off(&y_added, &expected(&r(&bias), true)) <= 0.01,
                    "{what}: with the add, bf16"
                );
                assert!(share_off(&y_added, &expected(&bias, true)) >= 0.1, "{what}: with the add, not fp32");
            }
        }
    }

    /// Prepack's own oneDNN primitive (where built) against libtorch's fused call on the same weights,
    /// fp32 and (where libtorch's oneDNN takes bf16) native bf16, on channels-last inputs of the
    /// prepacked size, for the geometries the networks use: the same function, as accurate against
    /// fp64 on the same (rounded) operands (twice libtorch's error plus one rounding of the output
    /// type; the two oneDNNs may pick other kernels). Other inputs (NCHW, another batch) run
    /// libtorch's call.
    #[test]
    fn the_own_primitive_is_as_accurate_as_libtorchs_call() {
        let mut arithmetics = vec![(Arithmetic::Fp32, f64::powi(2.0, -24))];
        if crate::inference::onednn_bf16_support().is_ok() {
            arithmetics.push((Arithmetic::Bf16Native, f64::powi(2.0, -8)));
        }
        for (arithmetic, rounding) in arithmetics {
            own_primitive_against_libtorch(&arithmetic, rounding);
        }
    }

    fn own_primitive_against_libtorch(arithmetic: &Arithmetic, rounding: f64) {
        let cl = crate::inference::channels_last_sru::to_channels_last;
        // (in, out, kernel, stride, groups, input size, relu)
        for (c_in, c_out, k, stride, groups, size, relu) in [
            (1, 32, 3, 1, 1, 28, true), // the stem: a one-channel NCHW input is channels-last too
            (32, 32, 3, 1, 1, 28, true),
            (32, 64, 3, 2, 1, 28, true),
            (32, 64, 1, 2, 1, 28, false),
            (16, 32, 3, 1, 4, 14, false),
            (8, 16, 1, 1, 1, 7, false),
        ] {
            let vs = VarStore::new(Device::Cpu);
            let config = nn::ConvConfig { stride, padding: k / 2, groups, ..Default::default() };
            let layer = nn::conv2d(vs.root() / "c", c_in, c_out, k, config);
            let input = [2, c_in, size, size];
            let x = arithmetic.store(&cl(&Tensor::randn(input, (Kind::Float, Device::Cpu))));
            let out = (size + 2 * (k / 2) - k) / stride + 1;
            let residual =
                arithmetic.store(&cl(&Tensor::randn([2, c_out, out, out], (Kind::Float, Device::Cpu))));
            let mut conv = InferenceConv::new(&layer, ConvGeometry::square(stride, k / 2, groups));
            if relu {
                conv = conv.then_relu();
            }
            conv.fuse().unwrap();
            conv.cast(arithmetic).unwrap();
            if !ffi::shim_built() {
                return;
            }
            conv.prepack(input).unwrap();
            let what = format!("{} {c_in}->{c_out} k{k} s{stride} g{groups}", arithmetic.name());
            assert!(!conv.runs_own_primitive(), "{what}: prepack alone keeps libtorch's call");
            // Every case is dense or a grouped one small enough (0.45 M multiply-adds).
            let own = crate::inference::own_onednn_version().is_some();
            assert_eq!(
                conv.own_primitives().unwrap(),
                own,
                "{what}: dense convolutions and small grouped ones"
            );
            assert_eq!(conv.runs_own_primitive(), own, "{what}");
            let ours = tch::no_grad(|| (conv.forward(&x), conv.forward_add(&x, residual.copy())));
            let nchw = tch::no_grad(|| conv.forward(&x.contiguous()));
            if let Some(own) = conv.own.first() {
                assert!(tch::no_grad(|| own.forward(&x).is_some()), "{what}: the primitive takes its input");
                let takes_nchw = tch::no_grad(|| own.forward(&x.contiguous()).is_some());
                assert_eq!(takes_nchw, c_in == 1, "{what}: the primitive takes NCHW only with one channel");
                let other = x.to_kind(if x.kind() == Kind::Float { Kind::BFloat16 } else { Kind::Float });
                assert!(tch::no_grad(|| own.forward(&other).is_none()), "{what}: another kind is libtorch's");
            }
            conv.own.clear(); // libtorch's call from here on
            let libtorch = tch::no_grad(|| (conv.forward(&x), conv.forward_add(&x, residual.copy())));
            match c_in {
                1 => assert!(nchw.equal(&ours.0), "{what}: a one-channel NCHW input runs the own primitive"),
                _ => assert!(nchw.equal(&libtorch.0), "{what}: an NCHW input runs libtorch's call"),
            }
            let d = |t: &Tensor| t.to_kind(Kind::Double);
            let g = |v: i64| [v, v];
            // Each call's bias: fp32 without the add, stored as the weight with it (`cast`).
            let conv_with = |bias: Option<&Tensor>| {
                d(&x).conv2d(&d(&conv.weight), bias.map(d).as_ref(), g(stride), g(k / 2), g(1), groups)
            };
            let (plain, added) = (conv_with(conv.bias.as_ref()), conv_with(conv.add_bias()) + d(&residual));
            let activate = |t: Tensor| if relu { t.relu() } else { t };
            for (name, ours, libtorch, truth) in [
                ("conv", &ours.0, &libtorch.0, activate(plain)),
                ("conv + add", &ours.1, &libtorch.1, activate(added)),
            ] {
                let ulp = truth.abs().max().double_value(&[]) * rounding;
                let budget = 2.0 * max_abs_diff(libtorch, &truth) + ulp;
                let err = max_abs_diff(ours, &truth);
                assert!(err <= budget, "{what} {name}: {err:e} > {budget:e}");
                assert_eq!(ours.kind(), x.kind(), "{what} {name}: the output's kind");
                assert!(
                    crate::inference::channels_last_sru::is_channels_last(ours),
                    "{what} {name}: channels-last out"
                );
            }
        }
    }

    fn conv_fp32(layer: &nn::Conv2D, x: &Tensor, residual: &Tensor) -> Tensor {
        (x.conv2d(&layer.ws, layer.bs.as_ref(), [2, 2], [1, 1], [1, 1], 1) + residual).relu()
    }

    /// Prepacked for a tiled batch's two sizes, a convolution runs each on a primitive of its own, and
    /// an image's output does not depend on the size of the batch it came in (the same bits).
    #[test]
    fn a_convolution_prepacked_for_two_sizes_computes_each_image_alike() {
        if crate::inference::own_onednn_version().is_none() {
            return;
        }
        let cl = crate::inference::channels_last_sru::to_channels_last;
        for (c_in, c_out, k, stride) in [(1, 32, 3, 1), (32, 32, 3, 1), (32, 64, 3, 2), (32, 64, 1, 2)] {
            let vs = VarStore::new(Device::Cpu);
            let config = nn::ConvConfig { stride, padding: k / 2, ..Default::default() };
            let layer = nn::conv2d(vs.root() / "c", c_in, c_out, k, config);
            let mut conv = InferenceConv::new(&layer, ConvGeometry::square(stride, k / 2, 1)).then_relu();
            conv.fuse().unwrap();
            conv.prepack_sizes(&[[10, c_in, 28, 28], [6, c_in, 28, 28]]).unwrap();
            assert!(conv.own_primitives().unwrap());
            assert_eq!(conv.own.len(), 2, "one primitive a size");
            let x = cl(&Tensor::randn([10, c_in, 28, 28], (Kind::Float, Device::Cpu)));
            let rest = cl(&x.narrow(0, 4, 6));
            for (own, input) in conv.own.iter().zip([&x, &rest]) {
                assert!(tch::no_grad(|| own.forward(input)).is_some(), "its own size runs it");
            }
            let (whole, part) = tch::no_grad(|| (conv.forward(&x), conv.forward(&rest)));
            assert!(whole.narrow(0, 4, 6).equal(&part), "{c_in}->{c_out} k{k}/{stride}: the same bits");
        }
    }

    /// A grouped convolution (the CRU's GWC) runs as a primitive of our own where a call is small (the
    /// Fashion-MNIST SC network's at batch 1), libtorch's call where it is large; dense ones always.
    #[test]
    fn grouped_convolutions_run_our_own_primitive_only_where_small() {
        let vs = VarStore::new(Device::Cpu);
        let config = nn::ConvConfig { padding: 1, groups: 2, ..Default::default() };
        let gwc = nn::conv2d(vs.root() / "gwc", 8, 32, 3, config);
        let mut conv = InferenceConv::new(&gwc, ConvGeometry::square(1, 1, 2));
        conv.fuse().unwrap();
        // 28 x 28 positions x 32 outputs x 4 inputs a group x 9 taps an image.
        assert_eq!(conv.multiply_adds([1, 8, 28, 28]), 28 * 28 * 32 * 4 * 9);
        assert_eq!(conv.multiply_adds([3, 8, 28, 28]), 3 * 28 * 28 * 32 * 4 * 9);
        assert!(conv.own_primitive_pays([2, 8, 28, 28]) && !conv.own_primitive_pays([3, 8, 28, 28]));
        let stride2 = InferenceConv::new(&gwc, ConvGeometry::square(2, 1, 2));
        assert_eq!(stride2.multiply_adds([1, 8, 28, 28]), 14 * 14 * 32 * 4 * 9);
        if crate::inference::own_onednn_version().is_some() {
            conv.prepack_sizes(&[[10, 8, 28, 28], [1, 8, 28, 28]]).unwrap();
            assert!(!conv.own_primitives().unwrap());
            assert!(conv.own.is_empty(), "decided on the full tile, for its rest too");
            conv.prepack_sizes(&[[1, 8, 28, 28]]).unwrap();
            assert!(conv.own_primitives().unwrap());
            assert_eq!(conv.own.len(), 1, "a batch of 1 on our own primitive");
            let x = crate::inference::channels_last_sru::to_channels_last(&Tensor::randn(
                [1, 8, 28, 28],
                (Kind::Float, Device::Cpu),
            ));
            assert!(tch::no_grad(|| conv.own[0].forward(&x)).is_some());
        }
        let dense =
            nn::conv2d(vs.root() / "dense", 8, 32, 3, nn::ConvConfig { padding: 1, ..Default::default() });
        let mut dense = InferenceConv::new(&dense, ConvGeometry::square(1, 1, 1));
        dense.fuse().unwrap();
        assert!(dense.own_primitive_pays([256, 8, 28, 28]), "dense ones at any size");
    }

    #[test]
    fn own_primitives_before_prepack_are_refused() {
        let vs = VarStore::new(Device::Cpu);
        let layer = nn::conv2d(vs.root() / "c", 4, 4, 1, Default::default());
        let mut conv = InferenceConv::new(&layer, ConvGeometry::square(1, 0, 1));
        conv.fuse().unwrap();
        let err = conv.own_primitives().unwrap_err().to_string();
        assert!(err.contains("prepack first"), "{err}");
    }

    #[test]
    fn fuse_before_fold_is_refused() {
        let vs = VarStore::new(Device::Cpu);
        let layer = nn::conv2d(vs.root() / "c", 4, 4, 1, Default::default());
        let bn = nn::batch_norm2d(vs.root() / "bn", 4, Default::default());
        let mut conv = InferenceConv::new(&layer, ConvGeometry::square(1, 0, 1))
            .then_batchnorm(BatchNormParams::of(&bn, 1e-5));
        assert!(conv.fuse().unwrap_err().to_string().contains("fold"));
        conv.fold();
        conv.fuse().unwrap();
        assert_eq!(conv.state(), (true, true, false));
    }
}
