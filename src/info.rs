//! Parameter and multiply-add counts of an ScConv block, layer by layer, against the plain 3x3 conv
//! it replaces.
//!
//! Convention: multiply-adds (MACs; FLOPs are about twice this) of the convolutions, weights x inputs,
//! per output position; bias adds, GroupNorm, the gate's sigmoid and comparisons, masking, the
//! reconstruct adds, pooling, the softmax and the fuse are not counted (O(C) per position, against the
//! convolutions' O(C^2)). Parameters count every learnable tensor, GroupNorm's affine and GWC's bias included.
use crate::ScConvConfig;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerCost {
    /// The layer's state-dict prefix (`CRU.GWC`, ...).
    pub name: String,
    pub parameters: i64,
    /// Multiply-adds per output position (multiply by H x W for the layer's total).
    pub macs_per_position: i64,
}

fn conv(name: &str, in_channels: i64, out_channels: i64, kernel: i64, groups: i64, bias: bool) -> LayerCost {
    let weights = out_channels * (in_channels / groups) * kernel * kernel;
    let parameters = weights + if bias { out_channels } else { 0 };
    LayerCost { name: name.into(), parameters, macs_per_position: weights }
}

/// The layers of the reference ScConv for `config` (assumed valid), in forward order.
pub fn scconv_costs(config: &ScConvConfig) -> Vec<LayerCost> {
    let c = config.op_channel;
    let (up, low) = (config.squeezed_up(), config.squeezed_low());
    let k = config.group_kernel_size;
    vec![
        LayerCost { name: "SRU.gn".into(), parameters: 2 * c, macs_per_position: 0 },
        conv("CRU.squeeze1", config.up_channel(), up, 1, 1, false),
        conv("CRU.squeeze2", config.low_channel(), low, 1, 1, false),
        conv("CRU.GWC", up, c, k, config.group_size, true),
        conv("CRU.PWC1", up, c, 1, 1, false),
        conv("CRU.PWC2", low, c - low, 1, 1, false),
    ]
}

/// The plain 3x3 conv (no bias) that the block replaces.
pub fn conv3x3_cost(channels: i64) -> LayerCost {
    conv("conv3x3", channels, channels, 3, 1, false)
}

pub fn total(layers: &[LayerCost]) -> LayerCost {
    LayerCost {
        name: "total".into(),
        parameters: layers.iter().map(|l| l.parameters).sum(),
        macs_per_position: layers.iter().map(|l| l.macs_per_position).sum(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cru_weights_are_1_8125_c_squared_at_the_defaults() {
        for c in [64i64, 128, 256, 512] {
            let layers = scconv_costs(&ScConvConfig::new(c));
            let cru_weights: i64 =
                layers.iter().filter(|l| l.name.starts_with("CRU")).map(|l| l.macs_per_position).sum();
            assert_eq!(cru_weights * 16, 29 * c * c, "1.8125 C^2 = 29/16 C^2 at C = {c}");
            // Parameters add GWC's bias (C) and GroupNorm's gamma and beta (2C).
            assert_eq!(total(&layers).parameters, cru_weights + 3 * c);
            assert_eq!(conv3x3_cost(c).parameters, 9 * c * c);
        }
    }

    #[test]
    fn c64_has_7616_parameters_against_36864() {
        let layers = scconv_costs(&ScConvConfig::new(64));
        assert_eq!((total(&layers).parameters, conv3x3_cost(64).parameters), (7_616, 36_864));
    }
}
