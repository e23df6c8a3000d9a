//! `ScConv`: the SRU followed by the CRU, under the variable paths `SRU.*` and `CRU.*` that a PyTorch
//! `state_dict` of the reference uses.
use crate::config::ScConvConfig;
use crate::cru::{cru, Cru};
use crate::cuda::CudaGraph;
use crate::error::ScConvError;
use crate::fast::{CruConvs, Execution, FastPath};
use crate::input::{self, Expected};
use crate::sru::{sru, Gate, GateDecisions, Sru};
use std::borrow::Borrow;
use tch::{nn, nn::Module, Tensor};

/// The reference's `ScConv`: `CRU(SRU(x))`, same shape in and out. Built by [`scconv`].
#[derive(Debug)]
#[allow(non_snake_case)]
pub struct ScConv {
    /// The Spatial Reconstruction Unit (state-dict keys `SRU.gn.*`).
    pub SRU: Sru,
    /// The Channel Reconstruction Unit (state-dict keys `CRU.*`).
    pub CRU: Cru,
    config: ScConvConfig,
    /// Present when the fast path is enabled (`set_execution`).
    fast: Option<FastPath>,
    execution: Execution,
}

/// Builds an ScConv under `p` after validating `config`; every invalid setting is a typed error.
pub fn scconv<'a>(p: impl Borrow<nn::Path<'a>>, config: &ScConvConfig) -> Result<ScConv, ScConvError> {
    let p = p.borrow();
    config.validate()?;
    // Creating the variables allocates: a failure (memory) is an error, not a panic.
    let (sru, cru) = input::guard(|| (sru(p / "SRU", config), cru(p / "CRU", config)))?;
    Ok(ScConv { SRU: sru, CRU: cru, config: config.clone(), fast: None, execution: Execution::Reference })
}

impl ScConv {
    /// The config it was built from.
    pub fn config(&self) -> &ScConvConfig {
        &self.config
    }

    /// Chooses the forward pass: `Reference` (the default) or a fast path. A fast path is for inference
    /// (its output carries no gradient); enable it after loading weights, since it keeps constants
    /// derived from them (a later change to `gamma` or `beta` is noticed and handled, at some cost).
    pub fn set_execution(&mut self, execution: Execution) -> Result<(), ScConvError> {
        self.fast = match execution {
            Execution::Reference => None,
            fast => Some(FastPath::new(&self.SRU, fast)?),
        };
        self.execution = execution;
        Ok(())
    }

    /// The fast path's state, when one is enabled (e.g. whether it runs the fused CUDA kernels).
    pub fn fast_path(&self) -> Option<&FastPath> {
        self.fast.as_ref()
    }

    /// The execution mode chosen by `set_execution`.
    pub fn execution(&self) -> Execution {
        self.execution
    }

    /// The reference's forward, whatever the execution mode (what the fast path is checked against).
    pub fn forward_reference(&self, x: &Tensor) -> Tensor {
        self.CRU.forward(&self.SRU.forward(x))
    }

    /// `forward` after checking rank, channels, dtype, device and size: bad input is an error.
    pub fn try_forward(&self, x: &Tensor) -> Result<Tensor, ScConvError> {
        self.check_input(x)?;
        input::guard(|| self.forward(x))
    }

    /// The SRU gate on `x` (its `z = gn_x * w_gamma` and decisions).
    pub fn try_gate(&self, x: &Tensor) -> Result<Gate, ScConvError> {
        self.check_input(x)?;
        Ok(self.SRU.gate(x))
    }

    /// The forward pass with the gate's decisions given instead of computed: the entry point the parity
    /// suite uses to check everything downstream of the gate with the reference's own decisions.
    pub fn forward_with_decisions(
        &self,
        x: &Tensor,
        decisions: &GateDecisions,
    ) -> Result<Tensor, ScConvError> {
        self.check_input(x)?;
        for mask in [&decisions.info_mask, &decisions.noninfo_mask] {
            if mask.size() != x.size() {
                let (got, want) = (mask.size(), x.size());
                return Err(ScConvError::InvalidInput(format!(
                    "gate mask shape {got:?} differs from input shape {want:?}"
                )));
            }
        }
        Ok(self.forward_given_decisions(x, decisions))
    }

    /// The inference forward captured into a CUDA graph for inputs shaped like `example` (a CUDA
    /// tensor); `run` on the returned graph replays it as one launch. See [`CudaGraph::capture`].
    pub fn cuda_graph(&self, example: &Tensor) -> Result<CudaGraph<'_>, ScConvError> {
        self.check_input(example)?;
        CudaGraph::capture(self, example, |x| self.forward(x))
    }

    /// The informative mask the fast path decides on `x`; `None` in `Reference` mode.
    pub fn try_fast_info_mask(&self, x: &Tensor) -> Result<Option<Tensor>, ScConvError> {
        self.check_input(x)?;
        Ok(self.fast.as_ref().and_then(|fast| fast.info_mask(&self.SRU, x)))
    }

    /// `forward`, also returning the gate it used (for per-layer gate reports in whole networks).
    pub fn forward_recording_gate(&self, x: &Tensor) -> (Tensor, Gate) {
        let gate = self.SRU.gate(x);
        let y = self.CRU.forward(&self.SRU.forward_with_decisions(x, &gate.decisions));
        (y, gate)
    }

    /// The reference's forward after the gate, with `decisions` given (shapes checked by the caller).
    pub(crate) fn forward_given_decisions(&self, x: &Tensor, decisions: &GateDecisions) -> Tensor {
        let decisions = decisions.to_device(x.device());
        self.CRU.forward(&self.SRU.forward_with_decisions(x, &decisions))
    }

    /// The fast path's forward with `fast` (this module's or another's, e.g. an inference form's), the
    /// CRU's fuse weights multiplied by `fuse_scale` (`(1, 2C, 1, 1)`: a per-channel output scale, given
    /// for both branches) where given: a BatchNorm folded into the CRU's last step (`crate::inference`).
    /// `convs` runs the CRU's convolutions where given (else its own layers).
    pub(crate) fn forward_fast(
        &self,
        fast: &FastPath,
        x: &Tensor,
        fuse_scale: Option<&Tensor>,
        convs: Option<&dyn CruConvs>,
    ) -> Tensor {
        let sru_out = crate::profile::scope("SRU", || fast.sru_into_kept_buffer(&self.SRU, x));
        tch::no_grad(|| match sru_out {
            Some(sru_out) => self.CRU.forward_fused(
                convs.unwrap_or(&self.CRU),
                &sru_out,
                fast.uses_cuda_fuse_kernel(),
                fast.copies_squeeze_inputs(),
                fuse_scale,
            ),
            None => match fuse_scale {
                Some(s) => self.forward_reference(x) * s.narrow(1, 0, self.config.op_channel),
                None => self.forward_reference(x),
            },
        })
    }

    fn check_input(&self, x: &Tensor) -> Result<(), ScConvError> {
        let nchw = input::check(x, &Expected::of(self.config.op_channel, &self.SRU.gn.gamma))?;
        input::check_group_size(nchw, self.config.group_num)
    }
}

impl Module for ScConv {
    /// The forward pass of the chosen execution mode. Panics (as tch modules do) on input
    /// `try_forward` would reject.
    fn forward(&self, x: &Tensor) -> Tensor {
        let Some(fast) = &self.fast else {
            return crate::profile::scope("ScConv (reference mode)", || self.forward_reference(x));
        };
        self.forward_fast(fast, x, None, None)
    }
}
