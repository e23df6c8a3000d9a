//! The inference form of a whole `ResNet`: its layers as steps (`InferenceConv`, `ScConvStep`) that
//! borrow the exact model's tensors, compiled by named passes (`Pass`), each of which changes one thing
//! and leaves a network that computes the same function.
use super::channels_last_sru::to_channels_last;
use super::conv::InferenceConv;
use super::ffi::ConvGeometry;
use super::fold::BatchNormParams;
use super::head::Head;
use super::precision::{Arithmetic, Precision};
use super::scconv_step::ScConvStep;
use crate::error::ScConvError;
use crate::input;
use crate::models::blocks::{Block, Conv3x3, Downsample, BATCHNORM_EPS};
use crate::models::ResNet;
use crate::profile::scope;
use crate::sru::GateDecisions;
use tch::{nn, Tensor};

/// A compilation pass of the inference form, applied in the order given (see [`Pass::ALL`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pass {
    /// Every BatchNorm into the convolution before it (stem, 1x1 and 3x3 convs, downsample), or into
    /// the CRU's fuse weights (scale) and a shift where it follows an ScConv.
    FoldBatchnorm,
    /// ReLU and residual add into each convolution's epilogue (oneDNN post-ops), or in place.
    FuseEpilogues,
    /// The bf16 form's cast (after fold, before prepack): every convolution's weight stored in bf16
    /// once, and so the activations between them; the biases fp32 but for the calls with a residual
    /// add (`crate::inference::Precision`). Refused in an fp32 form.
    Bf16,
    /// A batch run in tiles of a few images, each through the whole network before the next, so that a
    /// tile's activations stay in the cores' caches (`batch_tile`: as many images as keep the largest
    /// activation within the threads' L2 caches, at least 8), and prepack made for the tile's sizes.
    /// Each image's numbers are unchanged (its arithmetic does not depend on the others'). Before prepack.
    TileBatch,
    /// Where a stride-2 ScConv step pools its output, the 2x2 average pool moved before the CRU's
    /// convolutions (`pool_first`): GWC and the pool as one stride-2 convolution, PWC1, PWC2 and the
    /// weighted sum at a quarter of the positions. Before prepack (which packs PWC1 and PWC2 for the
    /// pooled inputs) and, in a bf16 form, after the bf16 pass (the pooled GWC is made in the form's
    /// precision); taken by the steps that run channels-last (after [`Pass::ChannelsLast`]) on inputs
    /// of even height and width. Changes rounding (the pooled kernel, sums of fewer terms; in bf16 the
    /// pooled halves are stored in bf16 as the convolutions read them).
    PoolFirst,
    /// Each convolution's weight reordered once into oneDNN's layout for the input size given.
    Prepack,
    /// Each fused convolution (fp32, or native bf16) as a oneDNN primitive of this crate's own, created
    /// once for each size prepack packed for, where the build has them (`own_onednn_version`): dense
    /// ones, and grouped ones where a call is small. A call then costs ~1-2 us of fixed time where
    /// libtorch's `_convolution_pointwise` rebuilds descriptors and looks its primitive up (~18-30 us).
    /// After prepack. The same function (another oneDNN's kernels).
    OwnPrimitives,
    /// Activations kept channels-last (NHWC strides) between the convolutions, the ScConv steps'
    /// SRU reading and writing them so (for the hard gate on the custom norm; other versions convert),
    /// and the head pooling them in one pass and, for a small classifier, multiplying in f64 (`head`).
    ChannelsLast,
    /// The CRU's squeeze convolutions computed by the channels-last SRU on the rows it reconstructs,
    /// while they are in the cache (`fused_squeeze`), instead of written out and read back by two
    /// convolutions: fp32 forms, after the channels-last pass. Changes rounding (its own sums, not
    /// oneDNN's).
    FuseSqueezes,
    /// The CRU's `GWC + PWC1` as one kernel of ours (`grouped_plus_pointwise`) reading the
    /// channels-last SRU's output, instead of two oneDNN calls, where a group of GWC reads at most 8
    /// channels and the CPU has AVX-512: fp32 forms, after the channels-last pass. Changes rounding
    /// (its own sums, not oneDNN's).
    FuseGwcPwc1,
}

impl Pass {
    /// Every pass of the fp32 form, in the order they compose.
    pub const ALL: [Pass; 9] = [
        Pass::FoldBatchnorm,
        Pass::FuseEpilogues,
        Pass::TileBatch,
        Pass::PoolFirst,
        Pass::Prepack,
        Pass::OwnPrimitives,
        Pass::ChannelsLast,
        Pass::FuseSqueezes,
        Pass::FuseGwcPwc1,
    ];

    /// Every pass of a form of `precision`, in the order they compose: [`Pass::ALL`], with
    /// [`Pass::Bf16`] after the fuse and without the fp32 ones ([`Pass::FuseSqueezes`],
    /// [`Pass::FuseGwcPwc1`]) for the bf16 precisions.
    pub fn all_for(precision: Precision) -> Vec<Pass> {
        let mut passes = Pass::ALL.to_vec();
        if precision != Precision::Fp32 {
            passes.insert(2, Pass::Bf16);
            passes.retain(|p| !p.computes_in_fp32());
        }
        passes
    }

    /// Whether the pass changes what the CRU computes in fp32 forms only.
    fn computes_in_fp32(self) -> bool {
        matches!(self, Pass::FuseSqueezes | Pass::FuseGwcPwc1)
    }
}

/// One residual 3x3 step.
#[derive(Debug)]
enum Step<'a> {
    Conv(Box<InferenceConv>),
    Sc(Box<ScConvStep<'a>>),
}

#[derive(Debug)]
struct InferenceBlock<'a> {
    /// All but the last run in order; the last adds the residual.
    steps: Vec<Step<'a>>,
    downsample: Option<InferenceConv>,
}

/// The inference form of a [`ResNet`] (see `crate::inference`), borrowing its weights.
#[derive(Debug)]
pub struct InferenceResNet<'a> {
    model: &'a ResNet,
    stem: InferenceConv,
    blocks: Vec<InferenceBlock<'a>>,
    channels_last: bool,
    /// The pooling and classifier as the channels-last pass runs them.
    head: Head<'a>,
    passes: Vec<Pass>,
    /// The arithmetic its precision runs in on this machine, decided once when the form is built.
    arithmetic: Arithmetic,
    /// How many images a batch's tiles hold (the tile pass); `None`: batches run whole.
    tile: Option<i64>,
}

fn conv(c: &nn::Conv2D, stride: i64, padding: i64, bn: &nn::BatchNorm) -> InferenceConv {
    InferenceConv::new(c, ConvGeometry::square(stride, padding, 1))
        .then_batchnorm(BatchNormParams::of(bn, BATCHNORM_EPS))
}

fn residual_step<'a>(c: &'a Conv3x3, bn: &nn::BatchNorm, relu: bool) -> Result<Step<'a>, ScConvError> {
    Ok(match c {
        Conv3x3::Plain(layer, stride) => {
            let step = conv(layer, *stride, 1, bn);
            Step::Conv(Box::new(if relu { step.then_relu() } else { step }))
        }
        Conv3x3::Sc { scconv, pool, path } => {
            let bn = BatchNormParams::of(bn, BATCHNORM_EPS);
            Step::Sc(Box::new(ScConvStep::new(scconv, path, *pool, bn, relu)?))
        }
    })
}

fn downsample(d: &Option<Downsample>) -> Option<InferenceConv> {
    d.as_ref().map(|d| conv(&d.conv, d.stride, 0, &d.bn))
}

fn block(b: &Block) -> Result<InferenceBlock<'_>, ScConvError> {
    Ok(match b {
        Block::Basic(b) => InferenceBlock {
            steps: vec![residual_step(&b.conv1, &b.bn1, true)?, residual_step(&b.conv2, &b.bn2, true)?],
            downsample: downsample(&b.downsample),
        },
        Block::Bottleneck(b) => InferenceBlock {
            steps: vec![
                Step::Conv(Box::new(conv(&b.conv1, 1, 0, &b.bn1).then_relu())),
                residual_step(&b.conv2, &b.bn2, true)?,
                Step::Conv(Box::new(conv(&b.conv3, 1, 0, &b.bn3).then_relu())),
            ],
            downsample: downsample(&b.downsample),
        },
    })
}

impl<'a> InferenceResNet<'a> {
    /// The network's layers as inference steps, no pass applied yet: the same function as the
    /// model's eval-mode forward with every ScConv on its fast path. For fp32 networks on the CPU (its
    /// passes are oneDNN's); others are refused.
    pub fn new(model: &'a ResNet) -> Result<InferenceResNet<'a>, ScConvError> {
        InferenceResNet::with_precision(model, Precision::Fp32)
    }

    /// As [`InferenceResNet::new`], for a form of `precision` (its arithmetic on this CPU decided
    /// now: [`InferenceResNet::arithmetic`]); the [`Pass::Bf16`] pass then casts it.
    pub fn with_precision(
        model: &'a ResNet,
        precision: Precision,
    ) -> Result<InferenceResNet<'a>, ScConvError> {
        let (kind, device) = (model.conv1.ws.kind(), model.conv1.ws.device());
        if kind != tch::Kind::Float || device != tch::Device::Cpu {
            return Err(ScConvError::InvalidInput(format!(
                "the inference form runs fp32 networks on the CPU (its passes are oneDNN's); this one is \
                 {kind:?} on {device:?}: use the model itself (`set_scconv_execution(Execution::Fast)`)"
            )));
        }
        let (kernel, stride) = if model.config().small_input { (3, 1) } else { (7, 2) };
        let stem = conv(&model.conv1, stride, kernel / 2, &model.bn1).then_relu();
        let blocks = model.stages.iter().flatten().map(block).collect::<Result<_, _>>()?;
        let arithmetic = Arithmetic::for_precision(precision);
        let head = Head::new(&model.fc);
        Ok(InferenceResNet {
            model,
            stem,
            blocks,
            channels_last: false,
            head,
            passes: Vec::new(),
            arithmetic,
            tile: None,
        })
    }

    /// How this form computes on this machine: fp32, bf16 natively, or bf16 emulated (and why).
    pub fn arithmetic(&self) -> &Arithmetic {
        &self.arithmetic
    }

    /// The form with the passes that measured fastest applied, prepacked for inputs of `input_size`:
    /// every pass of [`Pass::ALL`], except `ChannelsLast` and the passes that work on its steps
    /// (`PoolFirst`, `FuseSqueezes`, `FuseGwcPwc1`) in SC networks whose ScConv version has no
    /// channels-last kernel (the soft gate, `nn.GroupNorm`: converting at each ScConv cost more than it
    /// saved, docs/speed.md), and `TileBatch`, `Prepack` and `OwnPrimitives` without the shim.
    pub fn compiled(model: &'a ResNet, input_size: [i64; 4]) -> Result<InferenceResNet<'a>, ScConvError> {
        InferenceResNet::compiled_with(model, input_size, Precision::Fp32)
    }

    /// As [`InferenceResNet::compiled`], in `precision`: the bf16 precisions add [`Pass::Bf16`]. A
    /// `Precision::Bf16` form runs emulated where the CPU has no bf16 units: check
    /// [`InferenceResNet::arithmetic`] (the CLI warns).
    pub fn compiled_with(
        model: &'a ResNet,
        input_size: [i64; 4],
        precision: Precision,
    ) -> Result<InferenceResNet<'a>, ScConvError> {
        let mut form = InferenceResNet::with_precision(model, precision)?;
        for pass in Pass::all_for(precision) {
            let skipped = match pass {
                // Tiles pay where each runs prepacked primitives made for its size.
                Pass::TileBatch | Pass::Prepack | Pass::OwnPrimitives => !super::ffi::shim_built(),
                Pass::PoolFirst | Pass::ChannelsLast | Pass::FuseSqueezes | Pass::FuseGwcPwc1 => {
                    !form.sc_steps_run_channels_last()
                }
                _ => false,
            };
            if skipped {
                continue;
            }
            form.apply(pass, input_size)?;
        }
        Ok(form)
    }

    /// Whether every ScConv step has a channels-last kernel for its version (true without ScConvs):
    /// where one has not, converting at each would cost more than channels-last saves (docs/speed.md).
    fn sc_steps_run_channels_last(&self) -> bool {
        self.blocks.iter().flat_map(|b| &b.steps).all(|step| match step {
            Step::Sc(s) => s.has_channels_last_kernel(),
            Step::Conv(_) => true,
        })
    }

    fn each_sc_step(
        &mut self,
        mut f: impl FnMut(&mut ScConvStep<'a>) -> Result<(), ScConvError>,
    ) -> Result<(), ScConvError> {
        for step in self.blocks.iter_mut().flat_map(|b| &mut b.steps) {
            if let Step::Sc(s) = step {
                f(s)?;
            }
        }
        Ok(())
    }

    /// The passes applied so far, in order.
    pub fn passes(&self) -> &[Pass] {
        &self.passes
    }

    /// Applies `pass`; `Prepack` reorders the weights for inputs of `input_size` (N, C, H, W), which
    /// are then fastest (other sizes still run, correctly). Errors: fuse, bf16 or prepack before fold,
    /// bf16 after prepack or in an fp32 form, tile or pool-first after prepack, pool-first before the
    /// bf16 pass in a bf16 form, own-primitives before prepack or fuse, fuse-squeezes and
    /// fuse-GWC-PWC1 before channels-last or in a bf16 form, prepack without the shim, a pass applied
    /// twice.
    pub fn apply(&mut self, pass: Pass, input_size: [i64; 4]) -> Result<(), ScConvError> {
        if self.passes.contains(&pass) {
            return Err(ScConvError::InvalidInput(format!("the pass {pass:?} is applied already")));
        }
        // Folding replaces the weights that prepacking reorders.
        if pass == Pass::Prepack && !self.passes.contains(&Pass::FoldBatchnorm) {
            return Err(ScConvError::InvalidInput(
                "prepack needs the BatchNorms folded first (the fold pass)".into(),
            ));
        }
        if pass == Pass::Bf16 {
            self.check_cast()?;
        }
        if pass.computes_in_fp32() {
            self.check_fp32_kernels(pass)?;
        }
        if pass == Pass::TileBatch && self.passes.contains(&Pass::Prepack) {
            return Err(ScConvError::InvalidInput(
                "tile the batch before prepack, which makes the primitives for the tile's sizes".into(),
            ));
        }
        if pass == Pass::PoolFirst {
            self.check_pool_first()?;
        }
        if pass == Pass::OwnPrimitives {
            self.check_own_primitives()?;
        }
        match pass {
            Pass::FoldBatchnorm => self.each_step(|s| {
                s.fold();
                Ok(())
            })?,
            Pass::FuseEpilogues => self.each_step(|s| s.fuse())?,
            Pass::Bf16 => {
                let arithmetic = self.arithmetic.clone();
                self.each_step(|s| s.cast(&arithmetic))?
            }
            Pass::TileBatch => self.tile = self.tile_for(input_size)?,
            Pass::Prepack => self.prepack(input_size)?,
            Pass::OwnPrimitives => self.each_step(|s| s.own_primitives())?,
            Pass::ChannelsLast => {
                self.each_sc_step(|s| s.channels_last().map(drop))?;
                self.channels_last = true
            }
            Pass::FuseSqueezes => self.each_sc_step(|s| s.fuse_squeezes().map(drop))?,
            Pass::FuseGwcPwc1 => self.each_sc_step(|s| s.fuse_gwc_pwc1().map(drop))?,
            Pass::PoolFirst => self.each_sc_step(|s| s.pool_first().map(drop))?,
        }
        self.passes.push(pass);
        Ok(())
    }

    /// Whether the bf16 pass may run now: in a bf16 form, after fold (the BatchNorms are folded in
    /// fp32), before prepack (which reorders the weights it casts). Checked before any step changes.
    fn check_cast(&self) -> Result<(), ScConvError> {
        if !self.arithmetic.is_bf16() {
            return Err(ScConvError::InvalidInput(
                "the bf16 pass casts a form built for bf16 (`with_precision`); this one is fp32".into(),
            ));
        }
        let applied = |pass| self.passes.contains(&pass);
        super::conv::cast_allowed(applied(Pass::FoldBatchnorm), applied(Pass::Prepack))
    }

    /// Whether the pool-first pass may run now: before prepack (which packs PWC1 and PWC2 for the
    /// pooled sizes) and, in a bf16 form, after the bf16 pass (the pooled GWC is cast with the rest).
    fn check_pool_first(&self) -> Result<(), ScConvError> {
        let refused = if self.passes.contains(&Pass::Prepack) {
            "move the pool first before prepack, which packs PWC1 and PWC2 for the pooled sizes"
        } else if self.arithmetic.is_bf16() && !self.passes.contains(&Pass::Bf16) {
            "move the pool first after the bf16 pass, which casts the CRU the pooled GWC joins"
        } else {
            return Ok(());
        };
        Err(ScConvError::InvalidInput(refused.into()))
    }

    /// Whether the own-primitives pass may run now: after prepack (the sizes it packed for) and the
    /// fuse (the primitives run the fused convolution, its epilogue included).
    fn check_own_primitives(&self) -> Result<(), ScConvError> {
        let refused = if !self.passes.contains(&Pass::Prepack) {
            "own primitives need prepack first, for the sizes it packed (the prepack pass)"
        } else if !self.passes.contains(&Pass::FuseEpilogues) {
            "own primitives run the fused convolutions: apply the fuse pass first"
        } else {
            return Ok(());
        };
        Err(ScConvError::InvalidInput(refused.into()))
    }

    /// Whether `pass` (fuse-squeezes or fuse-GWC-PWC1) may run now: in an fp32 form (a bf16 form's
    /// convolutions run in bf16), after the channels-last pass (whose SRU computes the squeezes and
    /// writes what GWC and PWC1 read).
    fn check_fp32_kernels(&self, pass: Pass) -> Result<(), ScConvError> {
        if self.arithmetic != Arithmetic::Fp32 {
            return Err(ScConvError::InvalidInput(format!(
                "the pass {pass:?} computes its convolutions in fp32; this form is bf16"
            )));
        }
        if !self.passes.contains(&Pass::ChannelsLast) {
            return Err(ScConvError::InvalidInput(format!(
                "apply {pass:?} after the channels-last pass, whose SRU writes what it reads"
            )));
        }
        Ok(())
    }

    fn each_step(
        &mut self,
        f: impl Fn(&mut dyn FoldAndFuse) -> Result<(), ScConvError>,
    ) -> Result<(), ScConvError> {
        f(&mut self.stem)?;
        for block in &mut self.blocks {
            for step in &mut block.steps {
                match step {
                    Step::Conv(c) => f(c.as_mut())?,
                    Step::Sc(s) => f(s.as_mut())?,
                }
            }
            if let Some(d) = &mut block.downsample {
                f(d)?;
            }
        }
        Ok(())
    }

    /// How many images a batch's tiles hold, and `None` where a batch runs whole.
    pub fn batch_tile(&self) -> Option<i64> {
        self.tile
    }

    /// The tile for batches of `input_size` (`batch_tile::tile_for`) on this machine's L2 caches and
    /// libtorch's threads; `None` where the caches are not known.
    fn tile_for(&self, input_size: [i64; 4]) -> Result<Option<i64>, ScConvError> {
        let Some(l2) = super::batch_tile::l2_bytes_per_core() else { return Ok(None) };
        let shapes = self.one_images_step_shapes(input_size)?;
        let largest = shapes.iter().map(|[_, c, h, w]| c * h * w).max().unwrap_or(1);
        let bytes = if self.arithmetic == Arithmetic::Bf16Native { 2 } else { 4 };
        let threads = tch::get_num_threads() as i64;
        Ok(super::batch_tile::tile_for(input_size[0], largest * bytes, threads, l2))
    }

    /// Every step's input shape (`step_input_shapes`) for one image of `input_size`: one forward pass
    /// on zeros; a batch's shapes differ from them only in N.
    fn one_images_step_shapes(&self, input_size: [i64; 4]) -> Result<Vec<[i64; 4]>, ScConvError> {
        let [_, c, h, w] = input_size;
        let x = Tensor::zeros([1, c, h, w], (tch::Kind::Float, self.stem.weight_device()));
        input::guard(|| tch::no_grad(|| self.step_input_shapes(&x)))
    }

    /// Reorders every convolution's weight for the input sizes it sees (a tiled batch's full tiles
    /// and its rest).
    fn prepack(&mut self, input_size: [i64; 4]) -> Result<(), ScConvError> {
        let batches = super::batch_tile::tile_sizes(input_size[0], self.tile);
        let at_each_batch =
            |[_, c, h, w]: [i64; 4]| batches.iter().map(|&n| [n, c, h, w]).collect::<Vec<_>>();
        let mut shapes = self.one_images_step_shapes(input_size)?.into_iter().map(at_each_batch);
        let mut next =
            || shapes.next().ok_or_else(|| ScConvError::InvalidInput("prepack: a step saw no input".into()));
        self.stem.prepack_sizes(&next()?)?;
        for block in &mut self.blocks {
            if let Some(d) = &mut block.downsample {
                d.prepack_sizes(&next()?)?;
            }
            for step in &mut block.steps {
                match step {
                    Step::Conv(c) => c.prepack_sizes(&next()?)?,
                    Step::Sc(s) => s.prepack_sizes(&next()?)?,
                }
            }
        }
        Ok(())
    }

    /// The input shape of every step in `prepack`'s order (stem; per block: downsample, then its
    /// steps).
    fn step_input_shapes(&self, x: &Tensor) -> Vec<[i64; 4]> {
        let shape = |t: &Tensor| <[i64; 4]>::try_from(t.size()).expect("4-d activations");
        let mut shapes = vec![shape(x)];
        let mut x = self.after_stem(x);
        for block in &self.blocks {
            if block.downsample.is_some() {
                shapes.push(shape(&x));
            }
            let mut out = x.shallow_clone();
            for step in &block.steps {
                shapes.push(shape(&out));
                out = self.run_step(step, &out, None, &mut FormGates::Off);
            }
            x = out;
        }
        shapes
    }

    fn after_stem(&self, x: &Tensor) -> Tensor {
        // Channels-last strides (the same NCHW sizes): the convolutions then read and write NHWC.
        let x = if self.channels_last { to_channels_last(x) } else { x.shallow_clone() };
        let x = scope("stem", || self.stem.forward(&x));
        match self.model.config().small_input {
            true => x,
            false => x.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false),
        }
    }

    /// The logits of `x`, tile by tile where the tile pass set a tile smaller than its batch.
    fn run(&self, x: &Tensor, gates: &mut FormGates) -> Tensor {
        let n = x.size()[0];
        let Some(tile) = self.tile.filter(|t| *t < n) else { return self.run_tile(x, gates) };
        let mut logits = Vec::new();
        let mut logs = Vec::new();
        for start in (0..n).step_by(tile as usize) {
            let len = tile.min(n - start);
            let part = x.narrow(0, start, len);
            logits.push(match gates {
                FormGates::Off => self.run_tile(&part, &mut FormGates::Off),
                FormGates::Record(_) => {
                    let mut log = Vec::new();
                    let y = self.run_tile(&part, &mut FormGates::Record(&mut log));
                    logs.push(log);
                    y
                }
                FormGates::Inject(given) => {
                    let part_of = |d: &GateDecisions| GateDecisions {
                        info_mask: d.info_mask.narrow(0, start, len),
                        noninfo_mask: d.noninfo_mask.narrow(0, start, len),
                    };
                    let given: Vec<_> = given.iter().map(|(path, d)| (path.clone(), part_of(d))).collect();
                    self.run_tile(&part, &mut FormGates::Inject(&given))
                }
            });
        }
        if let FormGates::Record(log) = gates {
            log.extend(join_tiles(logs));
        }
        Tensor::cat(&logits, 0)
    }

    fn run_tile(&self, x: &Tensor, gates: &mut FormGates) -> Tensor {
        let mut x = self.after_stem(x);
        for block in &self.blocks {
            x = self.run_block(block, x, gates);
        }
        // The logits in fp32 from the last activation (bf16 in the bf16 form).
        match self.channels_last {
            true => scope("head (pooling, classifier)", || self.head.forward(&x)),
            false => self.head.libtorch(&x),
        }
    }

    fn run_block(&self, block: &InferenceBlock, x: Tensor, gates: &mut FormGates) -> Tensor {
        let identity = match &block.downsample {
            Some(d) => scope("downsample", || d.forward(&x)),
            None => x.shallow_clone(),
        };
        let (last, first) = block.steps.split_last().expect("a block has steps");
        let mut out = x;
        for step in first {
            out = self.run_step(step, &out, None, gates);
        }
        // `out` and `identity` are not read again: the last step may write into `identity`.
        self.run_step(last, &out, Some(identity), gates)
    }

    fn run_step(&self, step: &Step, x: &Tensor, residual: Option<Tensor>, gates: &mut FormGates) -> Tensor {
        match (step, residual) {
            (Step::Conv(c), None) => scope("conv (inference form)", || c.forward(x)),
            (Step::Conv(c), Some(r)) => scope("conv + add (inference form)", || c.forward_add(x, r)),
            (Step::Sc(s), residual) => {
                let x = s.input(x); // as its SRU reads it (layout, and fp32 unless bf16)
                let given = match gates {
                    FormGates::Record(log) => {
                        if let Some(mask) = s.info_mask(&x) {
                            log.push((s.path.clone(), mask));
                        }
                        None
                    }
                    FormGates::Inject(given) => given.iter().find(|(p, _)| *p == s.path).map(|(_, d)| d),
                    FormGates::Off => None,
                };
                s.forward(&x, residual, given)
            }
        }
    }

    /// Eval-mode logits after the model's input checks.
    pub fn try_forward(&self, x: &Tensor) -> Result<Tensor, ScConvError> {
        self.model.check_input(x)?;
        input::guard(|| tch::no_grad(|| self.run(x, &mut FormGates::Off)))
    }

    /// Logits and each ScConv's informative mask as this form decides it, keyed by path.
    pub fn forward_recording_decisions(
        &self,
        x: &Tensor,
    ) -> Result<(Tensor, Vec<(String, Tensor)>), ScConvError> {
        self.model.check_input(x)?;
        let mut log = Vec::new();
        let logits = input::guard(|| tch::no_grad(|| self.run(x, &mut FormGates::Record(&mut log))))?;
        Ok((logits, log))
    }

    /// Logits with every ScConv taking the decisions given for its path (the reference's, from
    /// `ResNet::forward_recording_gates`): what is left is the form's rounding.
    pub fn forward_with_decisions(
        &self,
        x: &Tensor,
        decisions: &[(String, GateDecisions)],
    ) -> Result<Tensor, ScConvError> {
        self.model.check_input(x)?;
        input::guard(|| tch::no_grad(|| self.run(x, &mut FormGates::Inject(decisions))))
    }
}

/// Each ScConv's masks of every tile, joined along the batch (the tiles record the same paths in the
/// same order).
fn join_tiles(tiles: Vec<Vec<(String, Tensor)>>) -> Vec<(String, Tensor)> {
    let Some(first) = tiles.first() else { return Vec::new() };
    (0..first.len())
        .map(|i| {
            let masks: Vec<&Tensor> = tiles.iter().map(|log| &log[i].1).collect();
            (first[i].0.clone(), Tensor::cat(&masks, 0))
        })
        .collect()
}

/// What the ScConv steps do with their gates in one forward pass.
enum FormGates<'g> {
    Off,
    Record(&'g mut Vec<(String, Tensor)>),
    Inject(&'g [(String, GateDecisions)]),
}

/// A step the fold and fuse passes act on.
trait FoldAndFuse {
    fn fold(&mut self);
    fn fuse(&mut self) -> Result<(), ScConvError>;
    fn cast(&mut self, arithmetic: &Arithmetic) -> Result<(), ScConvError>;
    fn own_primitives(&mut self) -> Result<(), ScConvError>;
}

impl FoldAndFuse for InferenceConv {
    fn fold(&mut self) {
        InferenceConv::fold(self)
    }
    fn fuse(&mut self) -> Result<(), ScConvError> {
        InferenceConv::fuse(self)
    }
    fn cast(&mut self, arithmetic: &Arithmetic) -> Result<(), ScConvError> {
        InferenceConv::cast(self, arithmetic)
    }
    fn own_primitives(&mut self) -> Result<(), ScConvError> {
        InferenceConv::own_primitives(self).map(drop)
    }
}

impl FoldAndFuse for ScConvStep<'_> {
    fn fold(&mut self) {
        ScConvStep::fold(self)
    }
    fn fuse(&mut self) -> Result<(), ScConvError> {
        ScConvStep::fuse(self)
    }
    fn cast(&mut self, arithmetic: &Arithmetic) -> Result<(), ScConvError> {
        ScConvStep::cast(self, arithmetic)
    }
    fn own_primitives(&mut self) -> Result<(), ScConvError> {
        ScConvStep::own_primitives(self)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{batch_tile, ffi};
    use super::*;
    use crate::models::{resnet, ResNetConfig};
    use tch::{nn::VarStore, Device, Kind};

    /// The Fashion-MNIST networks' shape (basic blocks, small input) and a small bottleneck one (7x7
    /// stem, max pool, stride-2 ScConvs with their pool).
    fn configs() -> Vec<(ResNetConfig, [i64; 3])> {
        let mut out = Vec::new();
        for sc in [false, true] {
            let mut basic = ResNetConfig::named("resnet18", sc).unwrap();
            (basic.layers, basic.widths, basic.num_classes) = (vec![1, 1, 1], vec![32, 64, 128], 10);
            (basic.in_channels, basic.small_input) = (1, true);
            out.push((basic, [1, 28, 28]));
            let mut bottleneck = ResNetConfig::named("resnet50", sc).unwrap();
            (bottleneck.layers, bottleneck.widths, bottleneck.num_classes) = (vec![1, 1], vec![16, 32], 10);
            out.push((bottleneck, [3, 32, 32]));
        }
        out
    }

    /// Every pass, with the tile set to `tile` in place of the tile pass's choice for this machine.
    fn form_with_tile(model: &ResNet, size: [i64; 4], tile: Option<i64>) -> InferenceResNet<'_> {
        let mut form = InferenceResNet::new(model).unwrap();
        form.apply(Pass::FoldBatchnorm, size).unwrap();
        form.apply(Pass::FuseEpilogues, size).unwrap();
        form.tile = tile;
        form.apply(Pass::PoolFirst, size).unwrap();
        form.apply(Pass::Prepack, size).unwrap();
        for pass in [Pass::OwnPrimitives, Pass::ChannelsLast, Pass::FuseSqueezes, Pass::FuseGwcPwc1] {
            form.apply(pass, size).unwrap();
        }
        form
    }

    /// Tiles of 8 over a batch of 17 (8, 8 and the rest, 1): the same logits, the same recorded
    /// decisions and, with decisions injected, the same logits as the batch run whole, bit for bit.
    #[test]
    fn a_tiled_batch_computes_what_the_whole_batch_does() {
        if !ffi::shim_built() {
            return;
        }
        for (config, [c, h, w]) in configs() {
            tch::manual_seed(3);
            let vs = VarStore::new(Device::Cpu);
            let model = resnet(vs.root(), &config).unwrap();
            let size = [17, c, h, w];
            let (whole, tiled) = (form_with_tile(&model, size, None), form_with_tile(&model, size, Some(8)));
            assert_eq!(tiled.batch_tile(), Some(8));
            let x = Tensor::randn(size, (Kind::Float, Device::Cpu));
            let what = format!("{:?}, sc {}", config.block, config.sc);
            assert!(tiled.try_forward(&x).unwrap().equal(&whole.try_forward(&x).unwrap()), "{what}");
            let (logits, made) = tiled.forward_recording_decisions(&x).unwrap();
            let (expected, expected_made) = whole.forward_recording_decisions(&x).unwrap();
            assert!(logits.equal(&expected), "{what}: recording");
            assert_eq!(made.len(), expected_made.len(), "{what}: one mask an ScConv");
            for ((path, mask), (expected_path, expected_mask)) in made.iter().zip(&expected_made) {
                assert_eq!(path, expected_path);
                assert!(mask.equal(expected_mask), "{what}: {path}'s decisions");
            }
            // Decisions to inject that differ from the form's own: each mask flipped at random.
            let given: Vec<_> = made
                .iter()
                .map(|(path, mask)| {
                    let flip = Tensor::rand_like(&mask.to_kind(Kind::Float)).lt(0.1);
                    (path.clone(), GateDecisions::from_info_mask(&mask.logical_xor(&flip)))
                })
                .collect();
            let injected = tiled.forward_with_decisions(&x, &given).unwrap();
            assert!(injected.equal(&whole.forward_with_decisions(&x, &given).unwrap()), "{what}: injected");
            if config.sc {
                assert!(!injected.equal(&logits), "{what}: the injected decisions changed the logits");
            }
        }
    }

    /// The tile pass picks no tile for a batch no larger than the floor, and is refused after prepack
    /// (whose primitives are made for the tile's sizes).
    #[test]
    fn the_tile_pass_tiles_large_batches_only_and_before_prepack() {
        let (config, [c, h, w]) = configs().remove(0);
        let vs = VarStore::new(Device::Cpu);
        let model = resnet(vs.root(), &config).unwrap();
        let mut form = InferenceResNet::new(&model).unwrap();
        form.apply(Pass::FoldBatchnorm, [1, c, h, w]).unwrap();
        form.apply(Pass::TileBatch, [batch_tile::MIN_TILE, c, h, w]).unwrap();
        assert_eq!(form.batch_tile(), None, "a batch of the floor's size runs whole");
        let mut form = InferenceResNet::new(&model).unwrap();
        form.apply(Pass::FoldBatchnorm, [1, c, h, w]).unwrap();
        form.apply(Pass::Prepack, [64, c, h, w]).unwrap();
        let err = form.apply(Pass::TileBatch, [64, c, h, w]).unwrap_err().to_string();
        assert!(err.contains("before prepack"), "{err}");
        if batch_tile::l2_bytes_per_core().is_some() {
            let mut form = InferenceResNet::new(&model).unwrap();
            form.apply(Pass::TileBatch, [1024, c, h, w]).unwrap();
            let tile = form.batch_tile().expect("1,024 images of 100 KB are tiled");
            assert!((batch_tile::MIN_TILE..1024).contains(&tile), "{tile}");
        }
    }
}
