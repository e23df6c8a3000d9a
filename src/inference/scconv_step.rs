//! An ScConv of the inference form with what follows it in its block: its 2x2 pool (at stride 2), the
//! BatchNorm, a ReLU and possibly the residual add. The ScConv runs its fast path (the same gate
//! decisions as the reference on the same input); the fold pass moves the BatchNorm's scale into the
//! CRU's fuse weights and its shift after the pool (per channel, both commute with the pool), and the
//! fuse pass runs the shift, add and ReLU in place. In the bf16 form (the cast pass) the CRU's
//! convolutions run in bf16 and everything else in fp32 on their bf16 values, the step's output
//! stored in bf16 once (`precision`).
use super::branch_means::BranchMeans;
use super::channels_last_sru::{channels_last_input, ChannelsLastSru};
use super::conv::{cast_allowed, epilogue, fuse_needs_fold, InferenceConv};
use super::ffi::ConvGeometry;
use super::fold::BatchNormParams;
use super::fused_squeeze::FusedSqueezes;
use super::grouped_plus_pointwise::GroupedPlusPointwise;
use super::pool_first;
use super::pooled_weighted_sum::weighted_sum_pool_shift_add_relu;
use super::precision::{as_fp32, Arithmetic};
use super::weighted_sum::weighted_sum_shift_add_relu;
use crate::error::ScConvError;
use crate::fast::{CruConvs, Execution, FastPath, FuseParts};
use crate::profile::scope;
use crate::sru::GateDecisions;
use crate::ScConv;
use tch::{nn, Tensor};

/// One ScConv step of an inference form, borrowing the exact model's ScConv.
#[derive(Debug)]
pub struct ScConvStep<'a> {
    scconv: &'a ScConv,
    /// Its path in the network (`layer1.0.conv2`), as the gate reports name it.
    pub(crate) path: String,
    fast: FastPath,
    pool: bool,
    batchnorm: Option<BatchNormParams>,
    /// The folded BatchNorm: its scale as the fuse weights' factor `(1, 2C, 1, 1)` (output channel c
    /// is `w[c] * Y1[c] + w[C + c] * Y2[c]`, so both weights take its scale) and its shift
    /// `(1, C, 1, 1)`.
    folded: Option<(Tensor, Tensor)>,
    relu: bool,
    fused: bool,
    /// The CRU's convolutions as the form's own (the cast or the prepack pass makes them).
    cru: Option<FormCru>,
    /// How the step stores its output (the cast pass).
    arithmetic: Arithmetic,
    /// The channels-last pass's SRU (`channels_last_sru`): read and written NHWC, in two passes.
    channels_last: Option<ChannelsLastSru>,
    /// The fuse-squeezes pass's squeeze convolutions, computed by the channels-last SRU (fp32 forms).
    squeezes: Option<FusedSqueezes>,
    /// Its `(up, low)` of the last forward, written over by the next (`ChannelsLastSru::forward`).
    sru_buffers: std::cell::RefCell<Option<(Tensor, Tensor)>>,
}

/// The CRU's five convolutions as the form's convolutions (fused, cast and prepacked as the passes
/// say), `GWC + PWC1` as one with the sum in its epilogue, or as one kernel of ours (the fuse-GWC-PWC1
/// pass); the fuse's pooling from their inputs (`branch_means`, of the bf16 layers in the bf16 forms).
#[derive(Debug)]
struct FormCru {
    squeeze1: InferenceConv,
    squeeze2: InferenceConv,
    gwc: InferenceConv,
    pwc1: InferenceConv,
    pwc2: InferenceConv,
    means: Option<BranchMeans>,
    gwc_pwc1: Option<GroupedPlusPointwise>,
    /// GWC and the 2x2 pool after it as one stride-2 convolution (the pool-first pass).
    pooled_gwc: Option<InferenceConv>,
}

impl FormCru {
    fn new(scconv: &ScConv, arithmetic: &Arithmetic) -> Result<FormCru, ScConvError> {
        let (cru, config) = (&scconv.CRU, scconv.config());
        let k = config.group_kernel_size;
        let pointwise = ConvGeometry::square(1, 0, 1);
        let conv = |layer: &nn::Conv2D, geometry| -> Result<InferenceConv, ScConvError> {
            let mut conv = InferenceConv::new(layer, geometry);
            conv.fuse()?;
            conv.cast(arithmetic)?;
            Ok(conv)
        };
        let (gwc, pwc1, pwc2) = (
            conv(&cru.GWC, ConvGeometry::square(1, k / 2, config.group_size))?,
            conv(&cru.PWC1, pointwise)?,
            conv(&cru.PWC2, pointwise)?,
        );
        Ok(FormCru {
            squeeze1: conv(&cru.squeeze1, pointwise)?,
            squeeze2: conv(&cru.squeeze2, pointwise)?,
            means: BranchMeans::new(&gwc, &pwc1, &pwc2),
            gwc,
            pwc1,
            pwc2,
            gwc_pwc1: None,
            pooled_gwc: None,
        })
    }

    /// GWC and the 2x2 pool after it as the form's stride-2 convolution (`pool_first::pooled_gwc`).
    fn pooled_gwc(scconv: &ScConv, arithmetic: &Arithmetic) -> Result<InferenceConv, ScConvError> {
        let mut gwc = pool_first::pooled_gwc(&scconv.CRU.GWC, scconv.config().group_size, arithmetic);
        gwc.fuse()?;
        gwc.cast(arithmetic)?;
        Ok(gwc)
    }

    /// Prepacked for ScConv inputs of each of `sizes` (N, C, H, W): PWC1 and PWC2 for the pooled inputs
    /// where GWC is pooled and the size takes the pooled path (`pool_first::fits`).
    fn prepack(&mut self, scconv: &ScConv, sizes: &[[i64; 4]]) -> Result<(), ScConvError> {
        let config = scconv.config();
        let (up, low) = (config.squeezed_up(), config.squeezed_low());
        let with_channels =
            |c: i64| -> Vec<[i64; 4]> { sizes.iter().map(|&[n, _, h, w]| [n, c, h, w]).collect() };
        let pooled = self.pooled_gwc.is_some();
        let after_gwc = |c: i64| -> Vec<[i64; 4]> {
            let shrink = |[n, _, h, w]: [i64; 4]| match pooled && pool_first::fits_size(h, w) {
                true => [n, c, h / 2, w / 2],
                false => [n, c, h, w],
            };
            sizes.iter().map(|&size| shrink(size)).collect()
        };
        self.squeeze1.prepack_sizes(&with_channels(config.up_channel()))?;
        self.squeeze2.prepack_sizes(&with_channels(config.low_channel()))?;
        self.gwc.prepack_sizes(&with_channels(up))?;
        if let Some(gwc) = &mut self.pooled_gwc {
            gwc.prepack_sizes(&with_channels(up))?;
        }
        self.pwc1.prepack_sizes(&after_gwc(up))?;
        self.pwc2.prepack_sizes(&after_gwc(low))
    }

    /// Its convolutions as oneDNN primitives of our own where they pay (`InferenceConv::own_primitives`;
    /// after prepack).
    fn own_primitives(&mut self) -> Result<(), ScConvError> {
        for conv in [&mut self.squeeze1, &mut self.squeeze2, &mut self.gwc, &mut self.pwc1, &mut self.pwc2] {
            conv.own_primitives()?;
        }
        if let Some(gwc) = &mut self.pooled_gwc {
            gwc.own_primitives()?;
        }
        Ok(())
    }
}

impl CruConvs for FormCru {
    fn squeezes(&self, up: &Tensor, low: &Tensor) -> (Tensor, Tensor) {
        (self.squeeze1.forward(up), self.squeeze2.forward(low))
    }

    fn gwc_plus_pwc1(&self, up: &Tensor) -> Tensor {
        let ours = self.gwc_pwc1.as_ref().and_then(|kernel| kernel.forward(up));
        ours.unwrap_or_else(|| self.gwc.forward_add(up, self.pwc1.forward(up)))
    }

    fn pwc2(&self, low: &Tensor) -> Tensor {
        self.pwc2.forward(low)
    }

    fn fuse_in_fp32(&self) -> bool {
        self.pwc2.arithmetic().is_bf16()
    }

    fn channel_means(&self, up: &Tensor, parts: [&Tensor; 3]) -> Option<Tensor> {
        let from_inputs = self.means.as_ref().and_then(|means| means.means_where_cheaper(up, parts[2]));
        from_inputs.or_else(|| super::channel_means::channel_means(&parts))
    }
}

/// The CRU's convolutions with the 2x2 pool moved before them (`pool_first`): GWC pooled, PWC1 on the
/// pooled `up`, PWC2 on the pooled `low` (the caller pools it: it is also a branch), the channel means
/// from the pooled branches.
struct PoolFirstCru<'a> {
    cru: &'a FormCru,
    pooled_gwc: &'a InferenceConv,
}

impl CruConvs for PoolFirstCru<'_> {
    fn squeezes(&self, up: &Tensor, low: &Tensor) -> (Tensor, Tensor) {
        self.cru.squeezes(up, low)
    }

    fn gwc_plus_pwc1(&self, up: &Tensor) -> Tensor {
        self.pooled_gwc.forward_add(up, self.cru.pwc1.forward(&pool_first::pool(up)))
    }

    fn pwc2(&self, low: &Tensor) -> Tensor {
        self.cru.pwc2.forward(low)
    }

    fn fuse_in_fp32(&self) -> bool {
        self.cru.fuse_in_fp32()
    }

    fn channel_means(&self, _up: &Tensor, parts: [&Tensor; 3]) -> Option<Tensor> {
        super::channel_means::channel_means(&parts)
    }
}

impl<'a> ScConvStep<'a> {
    /// `scconv` at `path`, then its pool (`pool`), the eval-mode `bn`, and a ReLU when `relu`.
    pub fn new(
        scconv: &'a ScConv,
        path: &str,
        pool: bool,
        bn: BatchNormParams,
        relu: bool,
    ) -> Result<Self, ScConvError> {
        let fast = FastPath::new(&scconv.SRU, Execution::Fast)?;
        let path = path.to_string();
        Ok(ScConvStep {
            scconv,
            path,
            fast,
            pool,
            batchnorm: Some(bn),
            folded: None,
            relu,
            fused: false,
            cru: None,
            arithmetic: Arithmetic::Fp32,
            channels_last: None,
            squeezes: None,
            sru_buffers: Default::default(),
        })
    }

    /// The fold pass: the BatchNorm as the CRU's output scale and a shift after the pool.
    pub fn fold(&mut self) {
        if let Some(bn) = self.batchnorm.take() {
            let (scale, shift) = bn.scale_shift();
            let fuse_scale = Tensor::cat(&[&scale, &scale], 0).view([1, -1, 1, 1]);
            self.folded = Some((fuse_scale, shift.view([1, -1, 1, 1])));
        }
    }

    /// The fuse pass: shift, residual add and ReLU in place (after fold).
    pub fn fuse(&mut self) -> Result<(), ScConvError> {
        if self.batchnorm.is_some() {
            return Err(fuse_needs_fold());
        }
        self.fused = true;
        Ok(())
    }

    /// The cast pass: the CRU's convolutions stored as `arithmetic` stores values, and the step's
    /// output (after fold, before prepack, as a convolution's).
    pub fn cast(&mut self, arithmetic: &Arithmetic) -> Result<(), ScConvError> {
        if self.cru.as_ref().is_some_and(|cru| cru.pooled_gwc.is_some()) {
            return Err(ScConvError::InvalidInput(
                "cast before the pool-first pass, which makes the pooled GWC as the CRU is stored".into(),
            ));
        }
        cast_allowed(self.batchnorm.is_none(), self.cru.is_some())?;
        self.cru = Some(FormCru::new(self.scconv, arithmetic)?);
        self.arithmetic = arithmetic.clone();
        Ok(())
    }

    /// The prepack pass: the CRU's convolutions' weights reordered for oneDNN for inputs of `size`.
    pub fn prepack(&mut self, size: [i64; 4]) -> Result<(), ScConvError> {
        self.prepack_sizes(&[size])
    }

    /// As [`ScConvStep::prepack`], for inputs of each size given (a tiled batch's full tiles and its
    /// rest).
    pub fn prepack_sizes(&mut self, sizes: &[[i64; 4]]) -> Result<(), ScConvError> {
        let scconv = self.scconv;
        self.form_cru()?.prepack(scconv, sizes)
    }

    /// The own-primitives pass (after prepack): the CRU's convolutions as oneDNN primitives of our own
    /// where they pay (`InferenceConv::own_primitives`).
    pub fn own_primitives(&mut self) -> Result<(), ScConvError> {
        match self.cru.as_mut() {
            Some(cru) => cru.own_primitives(),
            None => {
                Err(ScConvError::InvalidInput("own primitives need prepack first (the prepack pass)".into()))
            }
        }
    }

    /// The channels-last pass: the SRU read and written channels-last (`channels_last_sru`), for the
    /// versions that kernel covers; `Ok(false)` (the step unchanged, reading NCHW) for the others.
    pub fn channels_last(&mut self) -> Result<bool, ScConvError> {
        self.channels_last = ChannelsLastSru::new(&self.scconv.SRU, self.scconv.config().up_channel())?;
        Ok(self.channels_last.is_some())
    }

    /// The fuse-squeezes pass: the CRU's squeeze convolutions computed by the channels-last SRU on the
    /// rows it reconstructs (`fused_squeeze`), in fp32 forms after the channels-last pass; `Ok(false)`
    /// (the step unchanged) where its SRU reads NCHW, its arithmetic is not fp32 or its squeezes read
    /// more channels than the fused ones pay for (`fused_squeeze::MOST_INPUTS`).
    pub fn fuse_squeezes(&mut self) -> Result<bool, ScConvError> {
        if self.channels_last.is_none() || self.arithmetic != Arithmetic::Fp32 {
            return Ok(false);
        }
        let (cru, config) = (&self.scconv.CRU, self.scconv.config());
        let inputs = [config.up_channel(), config.low_channel()];
        self.squeezes = FusedSqueezes::new([&cru.squeeze1, &cru.squeeze2], inputs)?;
        Ok(self.squeezes.is_some())
    }

    /// The fuse-GWC-PWC1 pass: the CRU's `GWC + PWC1` as one kernel of ours on the channels-last SRU's
    /// output (`grouped_plus_pointwise`), in fp32 forms after the channels-last pass; `Ok(false)` (the
    /// step unchanged) where its SRU reads NCHW, its arithmetic is not fp32, or the kernel does not pay
    /// there (a group reads more than `grouped_plus_pointwise::MOST_INPUTS_A_GROUP` channels, or the CPU
    /// has no AVX-512).
    pub fn fuse_gwc_pwc1(&mut self) -> Result<bool, ScConvError> {
        if self.channels_last.is_none() || self.arithmetic != Arithmetic::Fp32 {
            return Ok(false);
        }
        let (cru, config) = (&self.scconv.CRU, self.scconv.config());
        let Some(kernel) =
            GroupedPlusPointwise::new(&cru.GWC, &cru.PWC1, config.squeezed_up(), config.group_size)?
        else {
            return Ok(false);
        };
        self.form_cru()?.gwc_pwc1 = Some(kernel);
        Ok(true)
    }

    /// The pool-first pass: where the step pools, the pool moved before the CRU's convolutions
    /// (`pool_first`), for the versions with the channels-last kernel (whose path takes it, on inputs
    /// of even height and width); `Ok(false)` (the step unchanged) elsewhere. Before prepack, which
    /// then packs PWC1 and PWC2 for the pooled inputs; after the cast, whose precision the pooled GWC
    /// takes.
    pub fn pool_first(&mut self) -> Result<bool, ScConvError> {
        if !self.pool || !self.has_channels_last_kernel() {
            return Ok(false);
        }
        let pooled = FormCru::pooled_gwc(self.scconv, &self.arithmetic)?;
        self.form_cru()?.pooled_gwc = Some(pooled);
        Ok(true)
    }

    /// The form's CRU, made (unprepacked) where no pass has made it yet.
    fn form_cru(&mut self) -> Result<&mut FormCru, ScConvError> {
        let cru = match self.cru.take() {
            Some(cru) => cru,
            None => FormCru::new(self.scconv, &self.arithmetic)?,
        };
        Ok(self.cru.insert(cru))
    }

    /// Whether its ScConv version has the channels-last kernel (what the channels-last pass needs).
    pub(crate) fn has_channels_last_kernel(&self) -> bool {
        ChannelsLastSru::covers(&self.scconv.SRU)
    }

    /// `x` as this step's SRU reads it: channels-last after the channels-last pass (fp32, or bf16 as
    /// the bf16 form stores it), else NCHW fp32.
    pub(crate) fn input(&self, x: &Tensor) -> Tensor {
        scope("ScConv step input (its layout)", || match self.channels_last {
            Some(_) => channels_last_input(x),
            None => as_fp32(x).contiguous(),
        })
    }

    /// The ScConv's informative mask on `x` (as `input` gives it), as this step decides it.
    pub(crate) fn info_mask(&self, x: &Tensor) -> Option<Tensor> {
        match &self.channels_last {
            Some(sru) => Some(tch::no_grad(|| sru.info_mask(x))),
            None => self.fast.info_mask(&self.scconv.SRU, x),
        }
    }

    /// `relu(bn(pool(scconv(x))) [+ residual])`, the ScConv's decisions `given` where passed.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        residual: Option<Tensor>,
        given: Option<&GateDecisions>,
    ) -> Tensor {
        let scale = self.folded.as_ref().map(|(scale, _)| scale);
        let convs = self.cru.as_ref().map(|c| c as &dyn CruConvs);
        let y = match (&self.channels_last, given) {
            (Some(sru), given) => {
                return tch::no_grad(|| self.forward_channels_last(sru, x, residual, given))
            }
            (None, None) => self.scconv.forward_fast(&self.fast, x, scale, convs),
            (None, Some(decisions)) => {
                let sru_out = self.scconv.SRU.forward_with_decisions(x, &decisions.to_device(x.device()));
                let cru = &self.scconv.CRU;
                let copies = self.fast.copies_squeeze_inputs();
                tch::no_grad(|| cru.forward_fused(convs.unwrap_or(cru), &sru_out, false, copies, scale))
            }
        };
        scope("ScConv step pool, shift, add, ReLU", || self.after_scconv(y, residual, true))
    }

    /// `forward` after the channels-last pass: its SRU writes the CRU's halves, and the weighted sum
    /// takes the shift, residual add and ReLU along where it can (`fused_weighted_sum`).
    fn forward_channels_last(
        &self,
        sru: &ChannelsLastSru,
        x: &Tensor,
        residual: Option<Tensor>,
        given: Option<&GateDecisions>,
    ) -> Tensor {
        let scale = self.folded.as_ref().map(|(scale, _)| scale);
        let convs = self.cru.as_ref().map_or(&self.scconv.CRU as &dyn CruConvs, |c| c as &dyn CruConvs);
        let buffers = self.sru_buffers.take();
        let mask = given.map(|d| &d.info_mask);
        let squeezes = self.squeezes.as_ref();
        // The native bf16 form's squeeze convolutions read bf16: the SRU rounds its output as they would.
        let bf16 = self.arithmetic == Arithmetic::Bf16Native;
        let (up, low) = scope("SRU (channels-last)", || sru.forward(x, mask, squeezes, buffers, bf16));
        let pool_first = self.pool_first_cru(x);
        let cru = &self.scconv.CRU;
        let parts = match &pool_first {
            Some(pooled) => self.pooled_parts(pooled, convs, &up, &low, scale),
            None if squeezes.is_some() => {
                cru.forward_squeezed(convs, up.shallow_clone(), low.shallow_clone(), scale)
            }
            None => cru.forward_halves(convs, &up, &low, scale),
        };
        // The CRU has read both (its output is a new tensor): the next forward may write them.
        self.sru_buffers.replace(Some((up, low)));
        // Whether the parts are still to be pooled (where the step pools).
        let pool = pool_first.is_none();
        if let Some(out) = self.fused_weighted_sum(&parts, residual.as_ref(), pool) {
            return out;
        }
        let y = scope("CRU fuse: weighted sum", || parts.weighted_sum());
        scope("ScConv step pool, shift, add, ReLU", || self.after_scconv(y, residual, pool))
    }

    /// The CRU's parts with the pool first: the SRU's halves squeezed (unless it squeezed them), `low`
    /// pooled (a branch as it is) and stored as the step stores values (in bf16, as PWC2 reads it and
    /// as the native form's pool writes it), `up` pooled by `pooled`'s convolutions.
    fn pooled_parts(
        &self,
        pooled: &PoolFirstCru,
        convs: &dyn CruConvs,
        up: &Tensor,
        low: &Tensor,
        scale: Option<&Tensor>,
    ) -> FuseParts {
        let (up, low) = match self.squeezes {
            Some(_) => (up.shallow_clone(), low.shallow_clone()),
            None => scope("CRU squeeze1, squeeze2", || convs.squeezes(up, low)),
        };
        let low = scope("CRU pool first", || self.arithmetic.store(&pool_first::pool(&low)));
        self.scconv.CRU.forward_squeezed(pooled, up, low, scale)
    }

    /// The pool-first CRU where this step takes that path on `x`: after the pass (which made the
    /// pooled GWC), on an even height and width.
    fn pool_first_cru(&self, x: &Tensor) -> Option<PoolFirstCru<'_>> {
        let cru = self.cru.as_ref()?;
        let pooled_gwc = cru.pooled_gwc.as_ref()?;
        pool_first::fits(x).then_some(PoolFirstCru { cru, pooled_gwc })
    }

    /// The weighted sum, its pool where the step pools and `parts` are not pooled already, the shift,
    /// residual add, ReLU and the step's store as one pass (`weighted_sum`, `pooled_weighted_sum`),
    /// where this step runs them in place; `None` where it does not (or the pass cannot).
    fn fused_weighted_sum(&self, parts: &FuseParts, residual: Option<&Tensor>, pool: bool) -> Option<Tensor> {
        let (_, shift) = self.folded.as_ref()?;
        if !self.fused {
            return None;
        }
        let (relu, store) = (self.relu, &self.arithmetic);
        match self.pool && pool {
            true => scope("CRU fuse: weighted sum, pool, shift, add, ReLU (one pass)", || {
                weighted_sum_pool_shift_add_relu(parts, shift, residual, relu, store)
            }),
            false => scope("CRU fuse: weighted sum, shift, add, ReLU (one pass)", || {
                weighted_sum_shift_add_relu(parts, shift, residual, relu, store)
            }),
        }
    }

    /// `relu(bn(pool(y)) [+ residual])` on the ScConv's output, stored as the step stores values; the
    /// pool where the step pools and `pool` (`y` not pooled already).
    fn after_scconv(&self, y: Tensor, residual: Option<Tensor>, pool: bool) -> Tensor {
        let y = match self.pool && pool {
            true => pool_first::pool(&y),
            false => y,
        };
        let y = match (&self.batchnorm, &self.folded) {
            (Some(bn), _) => bn.forward(&y),
            (None, Some((_, shift))) if self.fused => {
                let mut y = y;
                y += shift;
                y
            }
            (None, Some((_, shift))) => y + shift,
            (None, None) => y,
        };
        self.arithmetic.store(&epilogue(y, residual, self.relu, self.fused))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Variant;
    use crate::harness::parity::{compare, Tolerance};
    use crate::{scconv, ScConvConfig};
    use tch::nn::{Module, VarStore};
    use tch::{Device, Kind};

    fn batchnorm(vs: &VarStore, channels: i64) -> nn::BatchNorm {
        let mut bn = nn::batch_norm2d(vs.root() / "bn", channels, Default::default());
        tch::no_grad(|| {
            bn.running_mean.copy_(&(Tensor::randn([channels], (Kind::Float, Device::Cpu)) * 0.1));
            bn.running_var.copy_(&(Tensor::rand([channels], (Kind::Float, Device::Cpu)) + 0.5));
            bn.ws.as_mut().unwrap().copy_(&(Tensor::rand([channels], (Kind::Float, Device::Cpu)) + 0.5));
            bn.bs.as_mut().unwrap().copy_(&(Tensor::randn([channels], (Kind::Float, Device::Cpu)) * 0.1));
        });
        bn
    }

    fn channels_last(x: &Tensor) -> Tensor {
        x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
    }

    /// The channels-last step (its SRU kernel, the CRU on NHWC halves, the weighted sum with its pool
    /// where it pools, shift, residual add and ReLU in one pass), with the squeezes fused into its SRU,
    /// and with `GWC + PWC1` as one kernel of ours too (AVX-512 CPUs), against the NCHW step and the
    /// reference mode, the reference's decisions given to all, with and without the 2x2 pool: within
    /// the fast path's fp32 tolerance; and its own decisions are the ones it reports.
    #[test]
    fn the_channels_last_step_is_the_reference_block_with_the_same_decisions() {
        let cases =
            [(ScConvConfig::new(64), false), (ScConvConfig::for_variant(32, Variant::V20230912), false)];
        for (config, pool) in cases.into_iter().chain([(ScConvConfig::new(32), true)]) {
            let vs = VarStore::new(Device::Cpu);
            let mut model = scconv(vs.root() / "sc", &config).unwrap();
            tch::no_grad(|| model.SRU.gn.gamma.copy_(&Tensor::randn_like(&model.SRU.gn.gamma)));
            let bn = batchnorm(&vs, config.op_channel);
            let params = || BatchNormParams::of(&bn, crate::models::blocks::BATCHNORM_EPS);
            let size = [2, config.op_channel, 14, 14];
            let x = channels_last(&Tensor::randn(size, (Kind::Float, Device::Cpu)));
            let pooled = if pool { [2, config.op_channel, 7, 7] } else { size };
            let residual = channels_last(&Tensor::randn(pooled, (Kind::Float, Device::Cpu)));
            let decisions = tch::no_grad(|| model.SRU.gate(&x.contiguous()).decisions);
            let reference = tch::no_grad(|| {
                let y = model.CRU.forward(&model.SRU.forward_with_decisions(&x.contiguous(), &decisions));
                let y = if pool { y.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None) } else { y };
                (y.apply_t(&bn, false) + &residual).relu()
            });
            let mut steps = Vec::new();
            for passes in [0, 1, 2, 3, 4] {
                let (layout_pass, fused_squeezes, own_gwc_pwc1) = (passes >= 1, passes >= 2, passes >= 3);
                let pooled_first = passes == 4;
                let mut step = ScConvStep::new(&model, "sc", pool, params(), true).unwrap();
                step.fold();
                step.fuse().unwrap();
                if pooled_first {
                    assert_eq!(step.pool_first().unwrap(), pool, "{config:?}: the step pools");
                }
                if crate::inference::shim_built() {
                    step.prepack(size).unwrap();
                    step.own_primitives().unwrap();
                }
                if layout_pass {
                    assert!(step.channels_last().unwrap());
                }
                assert_eq!(step.fuse_squeezes().unwrap(), layout_pass, "{config:?}");
                if !fused_squeezes {
                    step.squeezes = None;
                }
                // Every ScConv here has at most 8 inputs a group and 16 outputs or more.
                let avx512 = super::super::grouped_plus_pointwise::has_avx512();
                assert_eq!(step.fuse_gwc_pwc1().unwrap(), layout_pass && avx512, "{config:?}");
                if !own_gwc_pwc1 {
                    if let Some(cru) = step.cru.as_mut() {
                        cru.gwc_pwc1 = None;
                    }
                }
                let input = step.input(&x);
                let takes_pooled_path = step.pool_first_cru(&input).is_some();
                assert_eq!(takes_pooled_path, pooled_first && pool, "{config:?}: the pooled path");
                let out = tch::no_grad(|| step.forward(&input, Some(residual.copy()), Some(&decisions)));
                let check = compare(&out, &reference, Tolerance::FP32).unwrap();
                assert!(
                    check.passed(),
                    "{config:?}, channels-last {layout_pass}, squeezes {fused_squeezes}, GWC + PWC1 {own_gwc_pwc1}, \
                     pool first {pooled_first}: {check:?}"
                );
                steps.push((step, out));
            }
            let pairs = [(1, 0), (2, 0), (2, 1), (3, 0), (3, 2), (4, 0), (4, 3)];
            for (i, j) in pairs {
                let against = [
                    "the NCHW step",
                    "the channels-last step",
                    "the step with fused squeezes",
                    "the step with its own GWC + PWC1",
                ][j];
                let check = compare(&steps[i].1, &steps[j].1, Tolerance::FP32).unwrap();
                assert!(check.passed(), "{config:?}: step {i} against {against}: {check:?}");
            }
            for (step, _) in &steps[1..] {
                let input = step.input(&x);
                let own = step.info_mask(&input).unwrap();
                assert!(own.equal(&decisions.info_mask), "{config:?}: no z near the threshold here");
                let given = GateDecisions::from_info_mask(&own);
                let with_own = tch::no_grad(|| step.forward(&input, Some(residual.copy()), None));
                let with_given = tch::no_grad(|| step.forward(&input, Some(residual.copy()), Some(&given)));
                assert!(with_own.equal(&with_given), "{config:?}: it applies the decisions it reports");
            }
        }
    }

    /// With the pool first but the weighted sum not fused (no fuse pass), the step pools once: its
    /// parts are pooled already, so the plain weighted sum's epilogue does not pool again.
    #[test]
    fn a_pool_first_step_pools_once_without_the_fused_weighted_sum() {
        let config = ScConvConfig::new(32);
        let vs = VarStore::new(Device::Cpu);
        let model = scconv(vs.root() / "sc", &config).unwrap();
        let bn = batchnorm(&vs, config.op_channel);
        let x = channels_last(&Tensor::randn([2, 32, 14, 14], (Kind::Float, Device::Cpu)));
        let decisions = tch::no_grad(|| model.SRU.gate(&x.contiguous()).decisions);
        let reference = tch::no_grad(|| {
            let y = model.CRU.forward(&model.SRU.forward_with_decisions(&x.contiguous(), &decisions));
            y.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None).apply_t(&bn, false).relu()
        });
        let mut step = ScConvStep::new(&model, "sc", true, BatchNormParams::of(&bn, 1e-5), true).unwrap();
        step.fold();
        assert!(step.pool_first().unwrap());
        assert!(step.channels_last().unwrap());
        let input = step.input(&x);
        assert!(step.pool_first_cru(&input).is_some(), "the pooled path");
        let out = tch::no_grad(|| step.forward(&input, None, Some(&decisions)));
        assert_eq!(out.size(), [2, 32, 7, 7]);
        let check = compare(&out, &reference, Tolerance::FP32).unwrap();
        assert!(check.passed(), "{check:?}");
    }

    /// A bf16 step's pooled GWC is made in the step's precision: the pool-first pass after the cast,
    /// a cast after it refused.
    #[test]
    fn a_bf16_step_moves_its_pool_first_after_the_cast() {
        let vs = VarStore::new(Device::Cpu);
        let model = scconv(vs.root() / "sc", &ScConvConfig::new(32)).unwrap();
        let bn = batchnorm(&vs, 32);
        let bf16 = Arithmetic::for_precision(crate::inference::Precision::Bf16Emulated);
        let mut early = ScConvStep::new(&model, "sc", true, BatchNormParams::of(&bn, 1e-5), true).unwrap();
        early.fold();
        assert!(early.pool_first().unwrap());
        let err = early.cast(&bf16).unwrap_err().to_string();
        assert!(err.contains("before the pool-first pass"), "{err}");
        let mut step = ScConvStep::new(&model, "sc", true, BatchNormParams::of(&bn, 1e-5), true).unwrap();
        step.fold();
        step.cast(&bf16).unwrap();
        assert!(step.pool_first().unwrap());
        let pooled_gwc = step.cru.as_ref().and_then(|cru| cru.pooled_gwc.as_ref()).unwrap();
        assert_eq!(pooled_gwc.arithmetic(), &bf16);
    }

    /// With the pool first, an emulated bf16 step's pooled `low` (PWC2's input and its own reuse
    /// branch) holds bf16 values, as the native step's pool writes them: the two forms round alike.
    #[test]
    fn an_emulated_bf16_step_rounds_its_pooled_low_as_the_native_one_stores_it() {
        let config = ScConvConfig::new(32);
        let vs = VarStore::new(Device::Cpu);
        let model = scconv(vs.root() / "sc", &config).unwrap();
        let bn = batchnorm(&vs, config.op_channel);
        let emulated = Arithmetic::for_precision(crate::inference::Precision::Bf16Emulated);
        let mut step = ScConvStep::new(&model, "sc", true, BatchNormParams::of(&bn, 1e-5), true).unwrap();
        step.fold();
        step.fuse().unwrap();
        step.cast(&emulated).unwrap();
        assert!(step.pool_first().unwrap());
        assert!(step.channels_last().unwrap());
        let x = emulated.store(&channels_last(&Tensor::randn([2, 32, 14, 14], (Kind::Float, Device::Cpu))));
        let input = step.input(&x);
        let sru = step.channels_last.as_ref().unwrap();
        let (up, low) = tch::no_grad(|| sru.forward(&input, None, None, None, false));
        let pooled = step.pool_first_cru(&input).expect("the pooled path");
        let cru = step.cru.as_ref().unwrap();
        let scale = step.folded.as_ref().map(|(scale, _)| scale);
        let parts = tch::no_grad(|| step.pooled_parts(&pooled, cru, &up, &low, scale));
        let unrounded = tch::no_grad(|| pool_first::pool(&cru.squeezes(&up, &low).1));
        assert!(parts.low.equal(&crate::inference::round_to_bf16(&parts.low)), "bf16 values");
        assert!(!parts.low.equal(&unrounded), "rounded after the pool");
    }

    /// The fuse-squeezes pass leaves a bf16 step as it is (its squeezes run in bf16).
    #[test]
    fn a_bf16_step_keeps_its_squeeze_convolutions() {
        let vs = VarStore::new(Device::Cpu);
        let config = ScConvConfig::new(32);
        let model = scconv(vs.root() / "sc", &config).unwrap();
        let bn = batchnorm(&vs, config.op_channel);
        let mut step = ScConvStep::new(&model, "sc", false, BatchNormParams::of(&bn, 1e-5), true).unwrap();
        step.fold();
        step.cast(&Arithmetic::for_precision(crate::inference::Precision::Bf16)).unwrap();
        assert!(step.channels_last().unwrap());
        assert!(!step.fuse_squeezes().unwrap());
        assert!(step.squeezes.is_none());
    }
}
