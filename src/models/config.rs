//! `ResNetConfig`: the same JSON the Python twin (`parity/models.py::build`) reads.
use crate::config::{ScConvSettings, MAX_CHANNELS, MAX_PARAMETERS};
use crate::error::ScConvError;
use serde::{Deserialize, Serialize};

/// torchvision's two residual blocks (`"basic"`, `"bottleneck"` in JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockKind {
    /// Two 3x3 convs (ResNet-18/34).
    Basic,
    /// 1x1, 3x3, 1x1 with expansion 4 (ResNet-50/101).
    Bottleneck,
}

impl BlockKind {
    /// Output channels per `planes` (torchvision's `expansion`).
    pub fn expansion(self) -> i64 {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// A ResNet in torchvision's layout. `sc` swaps every residual 3x3 conv that keeps its channel count
/// for ScConv (of the version and settings `scconv` gives: the seed's defaults unless said);
/// `small_input` uses a 3x3/1 stem and no max pool (28x28, 32x32 images).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResNetConfig {
    /// The residual block.
    pub block: BlockKind,
    /// Blocks per stage (ResNet-50: `[3, 4, 6, 3]`).
    pub layers: Vec<i64>,
    /// `planes` per stage (default `[64, 128, 256, 512]`).
    #[serde(default = "imagenet_widths")]
    pub widths: Vec<i64>,
    /// Outputs of the final `fc` (default 1000).
    #[serde(default = "imagenet_classes")]
    pub num_classes: i64,
    /// Channels of the input image (default 3).
    #[serde(default = "rgb")]
    pub in_channels: i64,
    /// ScConv in place of every residual 3x3 conv that keeps its channel count (default false).
    #[serde(default)]
    pub sc: bool,
    /// A 3x3 stride-1 stem without max pool, for 28x28 or 32x32 images (default false).
    #[serde(default)]
    pub small_input: bool,
    /// The settings of every ScConv (`variant`, `torch_gn`, `fuse`, `group_num`, ...: a block config
    /// without `op_channel`, with the same defaults per version; default: the seed's). Only with `sc`.
    #[serde(default, skip_serializing_if = "ScConvSettings::is_seed_default")]
    pub scconv: ScConvSettings,
}

fn imagenet_widths() -> Vec<i64> {
    vec![64, 128, 256, 512]
}
fn imagenet_classes() -> i64 {
    1000
}
fn rgb() -> i64 {
    3
}

impl ResNetConfig {
    /// torchvision's `resnet18/34/50/101` (`sc`: the SC-ResNet twin), 1000 classes, RGB.
    pub fn named(arch: &str, sc: bool) -> Result<ResNetConfig, ScConvError> {
        let (block, layers) = match arch {
            "resnet18" => (BlockKind::Basic, vec![2, 2, 2, 2]),
            "resnet34" => (BlockKind::Basic, vec![3, 4, 6, 3]),
            "resnet50" => (BlockKind::Bottleneck, vec![3, 4, 6, 3]),
            "resnet101" => (BlockKind::Bottleneck, vec![3, 4, 23, 3]),
            other => {
                return Err(ScConvError::InvalidModel(format!(
                    "unknown architecture `{other}`; known: resnet18, resnet34, resnet50, resnet101"
                )))
            }
        };
        Ok(ResNetConfig {
            block,
            layers,
            widths: imagenet_widths(),
            num_classes: 1000,
            in_channels: 3,
            sc,
            small_input: false,
            scconv: ScConvSettings::default(),
        })
    }

    /// Rejects configs the network cannot be built from, naming the offending value.
    pub fn validate(&self) -> Result<(), ScConvError> {
        let invalid = |m: String| Err(ScConvError::InvalidModel(m));
        if self.layers.is_empty() || self.layers.len() != self.widths.len() {
            return invalid(format!(
                "layers ({:?}) and widths ({:?}) must be non-empty and of the same length",
                self.layers, self.widths
            ));
        }
        if let Some(bad) = self.layers.iter().chain(&self.widths).find(|&&v| v <= 0) {
            return invalid(format!("layers and widths must be positive, got {bad}"));
        }
        if self.num_classes <= 0 || self.in_channels <= 0 {
            return invalid(format!(
                "num_classes ({}) and in_channels ({}) must be positive",
                self.num_classes, self.in_channels
            ));
        }
        self.validate_size()?;
        if !self.sc && self.scconv != ScConvSettings::default() {
            return invalid(
                "\"scconv\" settings are given, but \"sc\" is false (the network has no ScConv)".into(),
            );
        }
        if self.sc {
            for &width in &self.widths {
                self.scconv.config(width).and_then(|c| c.validate()).map_err(|e| {
                    ScConvError::InvalidModel(format!("stage width {width} cannot hold an ScConv: {e}"))
                })?;
            }
        }
        self.validate_cost()
    }

    /// The input side `info` and the size bounds assume: 224, or 28 with `small_input`.
    pub fn default_side(&self) -> i64 {
        if self.small_input {
            28
        } else {
            224
        }
    }

    /// Each count within its bound, so that the costs below cannot overflow.
    fn validate_size(&self) -> Result<(), ScConvError> {
        let too_big = |field: &str, value: String, limit: i64| {
            Err(ScConvError::InvalidModel(format!(
                "{field}: {value}, more than the {limit} a network may have"
            )))
        };
        let blocks = self.layers.iter().fold(0i64, |sum, &n| sum.saturating_add(n));
        if blocks > MAX_BLOCKS {
            return too_big("layers", format!("{blocks} residual blocks in all"), MAX_BLOCKS);
        }
        if let Some(width) = self.widths.iter().find(|&&w| w > MAX_CHANNELS) {
            return too_big("widths", format!("a stage {width} channels wide"), MAX_CHANNELS);
        }
        if self.in_channels > MAX_CHANNELS {
            return too_big("in_channels", format!("{} input channels", self.in_channels), MAX_CHANNELS);
        }
        if self.num_classes > MAX_CLASSES {
            return too_big("num_classes", format!("{} classes", self.num_classes), MAX_CLASSES);
        }
        Ok(())
    }

    /// Parameters and the activations of one image (at `default_side`) within `MAX_PARAMETERS` and
    /// `MAX_ACTIVATIONS_PER_IMAGE`, estimated from the config before anything is built.
    fn validate_cost(&self) -> Result<(), ScConvError> {
        let side = self.default_side();
        let rows = crate::info::network_costs(self, side, side);
        let parameters: i64 =
            rows.iter().map(|r| if self.sc { r.parameters } else { r.plain_parameters }).sum();
        if parameters > MAX_PARAMETERS {
            return Err(ScConvError::InvalidModel(format!(
                "layers, widths and num_classes: the network would hold {parameters} parameters ({:.1} GB in \
                 fp32), more than a model may hold (2^30, 4.3 GB)",
                parameters as f64 * 4e-9
            )));
        }
        let activations = self.activations_per_image(side);
        if activations > MAX_ACTIVATIONS_PER_IMAGE as f64 {
            return Err(ScConvError::InvalidModel(format!(
                "layers and widths: one {side}x{side} image would make about {activations:.3e} activation values \
                 ({:.1} GB in fp32), more than the 2^28 (1.1 GB) a network may make per image",
                activations * 4e-9
            )));
        }
        Ok(())
    }

    /// The values one image's forward pass writes at `side` x `side` (the stem's and every block's
    /// convolution outputs, a downsample's too): an estimate for the bound, in f64 so it cannot overflow.
    fn activations_per_image(&self, side: i64) -> f64 {
        let (mut h, mut w) = if self.small_input { (side, side) } else { ((side + 1) / 2, (side + 1) / 2) };
        let mut total = (self.widths[0] * h * w) as f64;
        if !self.small_input {
            (h, w) = ((h + 1) / 2, (w + 1) / 2);
        }
        let expansion = self.block.expansion() as f64;
        for (index, (&planes, &blocks)) in self.widths.iter().zip(&self.layers).enumerate() {
            if index > 0 {
                (h, w) = ((h + 1) / 2, (w + 1) / 2);
            }
            let map = (h * w) as f64 * planes as f64;
            // Basic: two 3x3 outputs; bottleneck: 1x1, 3x3, 1x1 (x expansion); one downsample a stage.
            let per_block = match self.block {
                BlockKind::Basic => 2.0 * map,
                BlockKind::Bottleneck => (2.0 + expansion) * map,
            };
            total += per_block * blocks as f64 + expansion * map;
        }
        total
    }
}

/// The most residual blocks a network may have in all: torchvision's deepest ResNet has 50, the
/// 1001-layer CIFAR ResNets 333.
pub const MAX_BLOCKS: i64 = 1000;

/// The most classes a network may have (ImageNet-21k has 21,843).
pub const MAX_CLASSES: i64 = 1 << 20;

/// The most activation values one image may make in a forward pass at `ResNetConfig::default_side`:
/// 2^28 (1 GiB in fp32; ResNet-50 at 224x224 makes about 2.5e7).
pub const MAX_ACTIVATIONS_PER_IMAGE: i64 = 1 << 28;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Fuse, Variant};

    #[test]
    fn the_scconv_settings_follow_the_block_configs_defaults() {
        let json = r#"{"block": "bottleneck", "layers": [3, 4, 6, 3], "sc": true,
                       "scconv": {"variant": "2023-10-19", "fuse": "paper"}}"#;
        let config: ResNetConfig = serde_json::from_str(json).unwrap();
        assert!(config.validate().is_ok());
        let block = config.scconv.config(64).unwrap();
        assert_eq!(
            (block.variant, block.torch_gn, block.group_num, block.fuse),
            (Variant::V20231019, true, 4, Fuse::Paper)
        );
        let round_trip: ResNetConfig =
            serde_json::from_value(serde_json::to_value(&config).unwrap()).unwrap();
        assert_eq!(round_trip, config);
        let seed = ResNetConfig::named("resnet50", true).unwrap();
        assert!(
            !serde_json::to_string(&seed).unwrap().contains("scconv"),
            "the seed's settings are not spelt out"
        );
        let bad =
            r#"{"block": "basic", "layers": [1], "widths": [64], "sc": true, "scconv": {"group_nums": 4}}"#;
        let err = serde_json::from_str::<ResNetConfig>(bad).unwrap_err().to_string();
        assert!(err.contains("unknown field `group_nums`"), "{err}");
        let unsupported =
            r#"{"block": "basic", "layers": [1], "widths": [64], "sc": true, "scconv": {"torch_gn": true}}"#;
        let err =
            serde_json::from_str::<ResNetConfig>(unsupported).unwrap().validate().unwrap_err().to_string();
        assert!(err.contains("torch_gn does not exist in variant 2023-07-27"), "{err}");
        let without_sc =
            r#"{"block": "basic", "layers": [1], "widths": [64], "scconv": {"variant": "2023-10-19"}}"#;
        let err =
            serde_json::from_str::<ResNetConfig>(without_sc).unwrap().validate().unwrap_err().to_string();
        assert!(err.contains("\"sc\" is false"), "{err}");
    }

    #[test]
    fn python_style_json_parses() {
        let json = r#"{"block": "basic", "layers": [1, 1, 1], "widths": [32, 64, 128], "num_classes": 10,
                       "in_channels": 1, "small_input": true, "sc": true}"#;
        let config: ResNetConfig = serde_json::from_str(json).unwrap();
        assert_eq!(config.block, BlockKind::Basic);
        assert!(config.validate().is_ok());
    }

    #[test]
    fn a_width_scconv_rejects_is_a_clear_error() {
        let config = ResNetConfig {
            widths: vec![24, 64],
            layers: vec![1, 1],
            ..ResNetConfig::named("resnet18", true).unwrap()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("stage width 24 cannot hold an ScConv"), "{err}");
        assert!(err.contains("divisible by group_num (16)"), "{err}");
        // The plain twin has no such constraint.
        assert!(ResNetConfig { sc: false, ..config }.validate().is_ok());
    }

    #[test]
    fn mismatched_layers_and_widths_are_rejected() {
        let config = ResNetConfig { layers: vec![2, 2], ..ResNetConfig::named("resnet18", false).unwrap() };
        assert!(config.validate().unwrap_err().to_string().contains("of the same length"));
        assert!(ResNetConfig::named("resnet19", false)
            .unwrap_err()
            .to_string()
            .contains("unknown architecture"));
    }
}
