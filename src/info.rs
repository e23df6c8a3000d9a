//! Parameter and multiply-add counts of an ScConv block, layer by layer, against the plain 3x3 conv
//! it replaces.
//!
//! Convention: multiply-adds (MACs; FLOPs are about twice this) of the convolutions, weights x inputs,
//! per output position; bias adds, GroupNorm, the gate's sigmoid and comparisons, masking, the
//! reconstruct adds, pooling, the softmax and the fuse are not counted (O(C) per position, against the
//! convolutions' O(C^2)). Parameters count every learnable tensor, GroupNorm's affine and GWC's bias included.
use crate::ScConvConfig;
use serde::Serialize;

/// One layer's cost.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerCost {
    /// The layer's state-dict prefix (`CRU.GWC`, ...).
    pub name: String,
    /// Learnable values (weights and biases).
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

/// The sum of `layers`, named `total`.
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

/// One row of a network's table: a residual 3x3 conv position (SC and plain side by side), or the
/// layers both variants share.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NetworkRow {
    /// The position (`layer1.0.conv2`) or the shared layers' name.
    pub name: String,
    /// Parameters in the SC network.
    pub parameters: i64,
    /// Multiply-adds of one image in the SC network.
    pub macs: i64,
    /// Parameters in the plain network.
    pub plain_parameters: i64,
    /// Multiply-adds of one image in the plain network.
    pub plain_macs: i64,
}

/// Walks a network, collecting the rows.
struct Walker {
    /// The ScConv settings where the network is SC.
    sc: Option<crate::ScConvSettings>,
    rows: Vec<NetworkRow>,
    shared: NetworkRow,
}

/// The output size of a conv or pool along one axis.
pub(crate) fn out_size(size: i64, kernel: i64, stride: i64, padding: i64) -> i64 {
    (size + 2 * padding - kernel) / stride + 1
}

impl Walker {
    fn shared(&mut self, parameters: i64, macs: i64) {
        self.shared.parameters += parameters;
        self.shared.plain_parameters += parameters;
        self.shared.macs += macs;
        self.shared.plain_macs += macs;
    }

    fn batch_norm(&mut self, channels: i64) {
        self.shared(2 * channels, 0);
    }

    fn conv1x1(&mut self, cin: i64, cout: i64, out: (i64, i64)) {
        self.shared(cin * cout, cin * cout * out.0 * out.1);
    }

    /// A residual 3x3 conv on an `input`-sized map: an ScConv row where it keeps its channels in the
    /// SC variant (run at the input resolution, pooled after a stride 2), else shared.
    fn residual(&mut self, name: String, cin: i64, cout: i64, input: (i64, i64), stride: i64) {
        let out = (out_size(input.0, 3, stride, 1), out_size(input.1, 3, stride, 1));
        let (plain_parameters, plain_macs) = (9 * cin * cout, 9 * cin * cout * out.0 * out.1);
        let scconv = self.sc.filter(|_| cin == cout).and_then(|s| s.config(cout).ok());
        if let Some(config) = scconv {
            let sc = total(&scconv_costs(&config));
            let macs = sc.macs_per_position * input.0 * input.1;
            self.rows.push(NetworkRow {
                name,
                parameters: sc.parameters,
                macs,
                plain_parameters,
                plain_macs,
            });
        } else {
            self.shared(plain_parameters, plain_macs);
        }
    }
}

/// Per-layer costs of `config` (assumed valid) on `height` x `width` inputs, against its plain twin.
pub fn network_costs(config: &crate::models::ResNetConfig, height: i64, width: i64) -> Vec<NetworkRow> {
    use crate::models::BlockKind;
    let shared = NetworkRow {
        name: "shared layers".into(),
        parameters: 0,
        macs: 0,
        plain_parameters: 0,
        plain_macs: 0,
    };
    let mut walk = Walker { sc: config.sc.then_some(config.scconv), rows: Vec::new(), shared };
    let (w0, cin) = (config.widths[0], config.in_channels);
    let (k, stride, pad) = if config.small_input { (3, 1, 1) } else { (7, 2, 3) };
    let mut size = (out_size(height, k, stride, pad), out_size(width, k, stride, pad));
    walk.shared(w0 * cin * k * k, w0 * cin * k * k * size.0 * size.1);
    walk.batch_norm(w0);
    if !config.small_input {
        size = (out_size(size.0, 3, 2, 1), out_size(size.1, 3, 2, 1));
    }
    let expansion = config.block.expansion();
    let mut in_planes = w0;
    for (index, (&planes, &blocks)) in config.widths.iter().zip(&config.layers).enumerate() {
        for b in 0..blocks {
            let stride = if index > 0 && b == 0 { 2 } else { 1 };
            let out = (out_size(size.0, 1, stride, 0), out_size(size.1, 1, stride, 0));
            let name = |conv: &str| format!("layer{}.{b}.{conv}", index + 1);
            match config.block {
                BlockKind::Basic => {
                    walk.residual(name("conv1"), in_planes, planes, size, stride);
                    walk.batch_norm(planes);
                    walk.residual(name("conv2"), planes, planes, out, 1);
                    walk.batch_norm(planes);
                }
                BlockKind::Bottleneck => {
                    walk.conv1x1(in_planes, planes, size);
                    walk.batch_norm(planes);
                    walk.residual(name("conv2"), planes, planes, size, stride);
                    walk.batch_norm(planes);
                    walk.conv1x1(planes, planes * expansion, out);
                    walk.batch_norm(planes * expansion);
                }
            }
            if b == 0 && (stride != 1 || in_planes != planes * expansion) {
                walk.conv1x1(in_planes, planes * expansion, out);
                walk.batch_norm(planes * expansion);
            }
            in_planes = planes * expansion;
            size = out;
        }
    }
    walk.shared(in_planes * config.num_classes + config.num_classes, in_planes * config.num_classes);
    walk.rows.push(walk.shared.clone());
    walk.rows
}
