//! `ScConv`: the SRU followed by the CRU, under the variable paths `SRU.*` and `CRU.*` that a PyTorch
//! `state_dict` of the reference uses.
use crate::config::ScConvConfig;
use crate::cru::{cru, Cru};
use crate::error::ScConvError;
use crate::input::{self, Expected};
use crate::sru::{sru, Gate, GateDecisions, Sru};
use tch::{nn, nn::Module, Tensor};

#[derive(Debug)]
#[allow(non_snake_case)]
pub struct ScConv {
    pub SRU: Sru,
    pub CRU: Cru,
    config: ScConvConfig,
}

/// Builds an ScConv under `p` after validating `config`; every invalid setting is a typed error.
pub fn scconv(p: nn::Path, config: &ScConvConfig) -> Result<ScConv, ScConvError> {
    config.validate()?;
    Ok(ScConv { SRU: sru(&p / "SRU", config), CRU: cru(&p / "CRU", config), config: config.clone() })
}

impl ScConv {
    pub fn config(&self) -> &ScConvConfig {
        &self.config
    }

    /// `forward` after checking rank, channels, dtype, device and size: bad input is an error.
    pub fn try_forward(&self, x: &Tensor) -> Result<Tensor, ScConvError> {
        self.check_input(x)?;
        Ok(self.forward(x))
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
        let decisions = decisions.to_device(x.device());
        Ok(self.CRU.forward(&self.SRU.forward_with_decisions(x, &decisions)))
    }

    /// `forward`, also returning the gate it used (for per-layer gate reports in whole networks).
    pub fn forward_recording_gate(&self, x: &Tensor) -> (Tensor, Gate) {
        let gate = self.SRU.gate(x);
        let y = self.CRU.forward(&self.SRU.forward_with_decisions(x, &gate.decisions));
        (y, gate)
    }

    fn check_input(&self, x: &Tensor) -> Result<(), ScConvError> {
        let nchw = input::check(x, &Expected::of(self.config.op_channel, &self.SRU.gn.gamma))?;
        input::check_group_size(nchw, self.config.group_num)
    }
}

impl Module for ScConv {
    /// The reference's forward. Panics (as tch modules do) on input `try_forward` would reject.
    fn forward(&self, x: &Tensor) -> Tensor {
        self.CRU.forward(&self.SRU.forward(x))
    }
}
