//! `ScConvConfig`: the reference constructor's arguments, with its defaults and names
//! (`gate_treshold` and `squeeze_radio` are spelt as in the reference so configs read alike), plus
//! which published version of the reference to follow (`variant`, `torch_gn`) and which CRU fuse.
use crate::error::ConfigError;
use serde::{Deserialize, Serialize};

/// The published states of the unofficial reference (`cheng-haha/ScConv`) this crate follows, each
/// mirrored by a PyTorch twin in `parity/`. JSON: `"2023-07-27"`, `"2023-09-12"`, ...
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub enum Variant {
    /// bebf345, the seed: `GroupBatchnorm2d` with `gamma`/`beta`, hard masks on `x`, builtin `sum`.
    #[default]
    #[serde(rename = "2023-07-27")]
    V20230727,
    /// 0305aed: the GroupNorm's parameters renamed `weight`/`bias`, an optional `nn.GroupNorm`
    /// (`torch_gn`, default off), the hard masks applied to `gn_x`, `ScConv`'s `group_num` default 4.
    #[serde(rename = "2023-09-12")]
    V20230912,
    /// 4caff96: as 2023-09-12 with `torch.sum` for `w_gamma`'s denominator.
    #[serde(rename = "2023-09-14")]
    V20230914,
    /// cf3b372: `torch_gn` on by default, builtin `sum` again, and a soft gate on `x`:
    /// `w1 = where(r > t, 1, r)`, `w2 = where(r > t, 0, r)`.
    #[serde(rename = "2023-10-19")]
    V20231019,
}

impl Variant {
    /// Every variant, oldest first.
    pub const ALL: [Variant; 4] =
        [Variant::V20230727, Variant::V20230912, Variant::V20230914, Variant::V20231019];

    /// The name used in JSON and messages (`"2023-07-27"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Variant::V20230727 => "2023-07-27",
            Variant::V20230912 => "2023-09-12",
            Variant::V20230914 => "2023-09-14",
            Variant::V20231019 => "2023-10-19",
        }
    }

    /// `ScConv`'s default `group_num` in this version.
    pub fn default_group_num(self) -> i64 {
        match self {
            Variant::V20230727 => 16,
            _ => 4,
        }
    }

    /// `SRU`'s default `torch_gn` in this version; `None` where the option does not exist.
    pub fn default_torch_gn(self) -> Option<bool> {
        match self {
            Variant::V20230727 => None,
            Variant::V20230912 | Variant::V20230914 => Some(false),
            Variant::V20231019 => Some(true),
        }
    }

    /// The GroupNorm's parameter names in the state dict (scale, shift).
    pub fn norm_names(self) -> (&'static str, &'static str) {
        match self {
            Variant::V20230727 => ("gamma", "beta"),
            _ => ("weight", "bias"),
        }
    }
}

/// How the CRU fuses its two branches `Y1`, `Y2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fuse {
    /// The code's: one softmax over all 2C pooled channels of `cat(Y1, Y2)`, then the two halves of
    /// the weighted concatenation added.
    #[default]
    Global,
    /// The paper's (SKNet-style): per channel, `beta1 = e^S1 / (e^S1 + e^S2)` with `S = GAP(Y)`,
    /// and `Y = beta1 * Y1 + beta2 * Y2`.
    Paper,
}

/// The arguments of the reference's `ScConv(op_channel, group_num=16, gate_treshold=0.5, alpha=1/2,
/// squeeze_radio=2, group_size=2, group_kernel_size=3)`, the version it follows and its fuse. As JSON,
/// every field but `op_channel` may be left out (the chosen variant's default applies: `group_num` is
/// 16 for 2023-07-27 and 4 later; `torch_gn` exists from 2023-09-12 on) and unknown fields are an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "ScConvConfigJson")]
pub struct ScConvConfig {
    /// Channels in and out (`C`); even, and divisible by `group_num`.
    pub op_channel: i64,
    /// Which published version of the reference (default 2023-07-27, the seed).
    pub variant: Variant,
    /// PyTorch's `nn.GroupNorm` (eps 1e-5, biased variance, parameters of shape `[C]`) in place of
    /// the reference's `GroupBatchnorm2d`; from 2023-09-12 on (default: the variant's).
    pub torch_gn: bool,
    /// The CRU fuse (default `global`, the code's).
    pub fuse: Fuse,
    /// Groups of the SRU's GroupNorm statistics (default 16, or 4 from 2023-09-12 on).
    pub group_num: i64,
    /// The SRU gate's threshold on `sigmoid(gn_x * w_gamma)`, strictly between 0 and 1 (default 0.5).
    pub gate_treshold: f64,
    /// The CRU's split: `int(alpha * op_channel)` channels go to the upper part (default 0.5).
    pub alpha: f64,
    /// The CRU's squeeze ratio: both parts are squeezed by this factor with 1x1 convs (default 2).
    pub squeeze_radio: i64,
    /// Groups of the CRU's group-wise conv `GWC` (default 2).
    pub group_size: i64,
    /// Kernel size of `GWC`, odd (default 3).
    pub group_kernel_size: i64,
}

/// An `ScConvConfig` without its channel count, every setting optional (the variant's default
/// applies): what a network's config says of all its ScConvs, each taking its stage's width. JSON: the
/// block config's fields but `op_channel`, e.g. `{"variant": "2023-10-19", "group_num": 4}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScConvSettings {
    /// Which published version of the reference (default 2023-07-27, the seed).
    #[serde(default)]
    pub variant: Variant,
    /// `nn.GroupNorm` in place of `GroupBatchnorm2d` (default: the variant's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_gn: Option<bool>,
    /// The CRU fuse (default `global`).
    #[serde(default)]
    pub fuse: Fuse,
    /// As `ScConvConfig::group_num` (default: the variant's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_num: Option<i64>,
    /// As `ScConvConfig::gate_treshold` (default 0.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate_treshold: Option<f64>,
    /// As `ScConvConfig::alpha` (default 0.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    /// As `ScConvConfig::squeeze_radio` (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub squeeze_radio: Option<i64>,
    /// As `ScConvConfig::group_size` (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_size: Option<i64>,
    /// As `ScConvConfig::group_kernel_size` (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_kernel_size: Option<i64>,
}

impl ScConvSettings {
    /// Whether these are the seed's defaults (nothing said).
    pub fn is_seed_default(&self) -> bool {
        *self == ScConvSettings::default()
    }

    /// The block config for `op_channel` channels: the settings given, the variant's defaults for the
    /// rest. `torch_gn: true` in a variant without the option is an error; the rest is checked by
    /// `ScConvConfig::validate`.
    pub fn config(&self, op_channel: i64) -> Result<ScConvConfig, ConfigError> {
        let variant = self.variant;
        let torch_gn = match (self.torch_gn, variant.default_torch_gn()) {
            (Some(true), None) => return Err(ConfigError::TorchGnNotInVariant(variant.name())),
            (Some(value), _) => value,
            (None, default) => default.unwrap_or(false),
        };
        let defaults = ScConvConfig::for_variant(op_channel, variant);
        Ok(ScConvConfig {
            torch_gn,
            fuse: self.fuse,
            group_num: self.group_num.unwrap_or(defaults.group_num),
            gate_treshold: self.gate_treshold.unwrap_or(defaults.gate_treshold),
            alpha: self.alpha.unwrap_or(defaults.alpha),
            squeeze_radio: self.squeeze_radio.unwrap_or(defaults.squeeze_radio),
            group_size: self.group_size.unwrap_or(defaults.group_size),
            group_kernel_size: self.group_kernel_size.unwrap_or(defaults.group_kernel_size),
            ..defaults
        })
    }
}

/// JSON's block config: `op_channel` and the `ScConvSettings` fields, parsed typed, so a key given
/// twice, an unknown key or a value of the wrong type (an array where a number belongs) is an error at
/// its first token, before anything is built. The fields are spelled out rather than
/// `#[serde(flatten)] settings`: flatten buffers every other key's value whole (a huge array included)
/// and cannot refuse unknown or repeated keys.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScConvConfigJson {
    op_channel: i64,
    #[serde(default)]
    variant: Variant,
    #[serde(default)]
    torch_gn: Option<bool>,
    #[serde(default)]
    fuse: Fuse,
    #[serde(default)]
    group_num: Option<i64>,
    #[serde(default)]
    gate_treshold: Option<f64>,
    #[serde(default)]
    alpha: Option<f64>,
    #[serde(default)]
    squeeze_radio: Option<i64>,
    #[serde(default)]
    group_size: Option<i64>,
    #[serde(default)]
    group_kernel_size: Option<i64>,
}

impl TryFrom<ScConvConfigJson> for ScConvConfig {
    type Error = ConfigError;

    fn try_from(json: ScConvConfigJson) -> Result<Self, ConfigError> {
        let settings = ScConvSettings {
            variant: json.variant,
            torch_gn: json.torch_gn,
            fuse: json.fuse,
            group_num: json.group_num,
            gate_treshold: json.gate_treshold,
            alpha: json.alpha,
            squeeze_radio: json.squeeze_radio,
            group_size: json.group_size,
            group_kernel_size: json.group_kernel_size,
        };
        settings.config(json.op_channel)
    }
}

/// The GroupBatchnorm2d epsilon, added to the std (not inside a square root), as in the reference.
pub const GN_EPS: f64 = 1e-10;

/// The most channels a block may have: its CRU alone then holds 7.8e9 weights (31 GB in fp32), and
/// every count `info` makes still fits in an `i64`.
pub const MAX_CHANNELS: i64 = 65536;

/// The most parameters a model built from a config may hold, a block or a whole network: 2^30
/// (4 GiB in fp32, a sixth of the 24 GB machines this is tested on; ResNet-101 holds 44.5M). Checked
/// from the config before anything is allocated, so a config a few bytes long cannot make the process
/// ask for more memory than the machine has.
pub const MAX_PARAMETERS: i64 = 1 << 30;

/// `nn.GroupNorm`'s default epsilon, under the square root (`torch_gn`).
pub const TORCH_GN_EPS: f64 = 1e-5;

impl ScConvConfig {
    /// The seed reference's (2023-07-27) defaults for `op_channel` channels.
    pub fn new(op_channel: i64) -> Self {
        Self::for_variant(op_channel, Variant::V20230727)
    }

    /// `variant`'s defaults for `op_channel` channels (its `group_num` and `torch_gn`), the code's fuse.
    pub fn for_variant(op_channel: i64, variant: Variant) -> Self {
        Self {
            op_channel,
            variant,
            torch_gn: variant.default_torch_gn().unwrap_or(false),
            fuse: Fuse::Global,
            group_num: variant.default_group_num(),
            gate_treshold: 0.5,
            alpha: 0.5,
            squeeze_radio: 2,
            group_size: 2,
            group_kernel_size: 3,
        }
    }

    /// The same config with another fuse.
    pub fn with_fuse(self, fuse: Fuse) -> Self {
        Self { fuse, ..self }
    }

    /// `int(alpha * op_channel)`: Python's `int` truncates toward zero, as `as i64` does.
    pub fn up_channel(&self) -> i64 {
        (self.alpha * self.op_channel as f64) as i64
    }

    /// `op_channel - up_channel`: the CRU's lower part.
    pub fn low_channel(&self) -> i64 {
        self.op_channel - self.up_channel()
    }

    /// Channels after `squeeze1`, the input of `GWC` and `PWC1`.
    pub fn squeezed_up(&self) -> i64 {
        self.up_channel() / self.squeeze_radio
    }

    /// Channels after `squeeze2`, the input of `PWC2`.
    pub fn squeezed_low(&self) -> i64 {
        self.low_channel() / self.squeeze_radio
    }

    /// Rejects every setting the reference crashes on or silently mishandles.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_sru()?;
        self.validate_cru()?;
        let parameters = crate::info::total(&crate::info::scconv_costs(self)).parameters;
        if parameters > MAX_PARAMETERS {
            return Err(ConfigError::TooManyParameters { op_channel: self.op_channel, parameters });
        }
        Ok(())
    }

    fn validate_sru(&self) -> Result<(), ConfigError> {
        if self.torch_gn && self.variant.default_torch_gn().is_none() {
            return Err(ConfigError::TorchGnNotInVariant(self.variant.name()));
        }
        let (op_channel, group_num) = (self.op_channel, self.group_num);
        if op_channel > MAX_CHANNELS {
            return Err(ConfigError::TooManyChannels(op_channel));
        }
        if group_num <= 0 {
            return Err(ConfigError::NonPositiveGroupNum(group_num));
        }
        if op_channel < group_num {
            return Err(ConfigError::FewerChannelsThanGroups { op_channel, group_num });
        }
        if op_channel % 2 != 0 {
            return Err(ConfigError::OddChannels(op_channel));
        }
        if op_channel % group_num != 0 {
            return Err(ConfigError::ChannelsNotDivisibleByGroups { op_channel, group_num });
        }
        if !(self.gate_treshold > 0.0 && self.gate_treshold < 1.0) {
            return Err(ConfigError::GateThresholdOutOfRange(self.gate_treshold));
        }
        Ok(())
    }

    fn validate_cru(&self) -> Result<(), ConfigError> {
        if !(self.alpha > 0.0 && self.alpha < 1.0) {
            return Err(ConfigError::AlphaOutOfRange(self.alpha));
        }
        if self.squeeze_radio <= 0 {
            return Err(ConfigError::NonPositiveSqueezeRadio(self.squeeze_radio));
        }
        for (part, channels) in [("up", self.up_channel()), ("low", self.low_channel())] {
            if channels / self.squeeze_radio == 0 {
                let squeeze_radio = self.squeeze_radio;
                return Err(ConfigError::SqueezedToZero { part, channels, squeeze_radio });
            }
        }
        self.validate_gwc()
    }

    fn validate_gwc(&self) -> Result<(), ConfigError> {
        let group_size = self.group_size;
        if group_size <= 0 {
            return Err(ConfigError::NonPositiveGroupSize(group_size));
        }
        for (which, channels) in [("input", self.squeezed_up()), ("output", self.op_channel)] {
            if channels % group_size != 0 {
                return Err(ConfigError::GroupSizeDoesNotDivide { group_size, which, channels });
            }
        }
        let k = self.group_kernel_size;
        if k <= 0 || k % 2 == 0 {
            return Err(ConfigError::BadGroupKernelSize(k));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(op_channel: i64, edit: impl FnOnce(&mut ScConvConfig)) -> ScConvConfig {
        let mut config = ScConvConfig::new(op_channel);
        edit(&mut config);
        config
    }

    #[test]
    fn defaults_are_the_reference_defaults() {
        let config: ScConvConfig = serde_json::from_str(r#"{"op_channel": 64}"#).unwrap();
        assert_eq!(config, ScConvConfig::new(64));
        assert_eq!(config.group_num, 16);
        assert_eq!(config.gate_treshold, 0.5);
        assert_eq!(config.alpha, 0.5);
        assert_eq!((config.squeeze_radio, config.group_size, config.group_kernel_size), (2, 2, 3));
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn defaults_follow_the_chosen_variant() {
        let parse = |json: &str| serde_json::from_str::<ScConvConfig>(json);
        let seed = parse(r#"{"op_channel": 64}"#).unwrap();
        assert_eq!(
            (seed.variant, seed.group_num, seed.torch_gn, seed.fuse),
            (Variant::V20230727, 16, false, Fuse::Global)
        );
        let later = parse(r#"{"op_channel": 64, "variant": "2023-09-12"}"#).unwrap();
        assert_eq!((later.group_num, later.torch_gn), (4, false));
        let head = parse(r#"{"op_channel": 64, "variant": "2023-10-19", "fuse": "paper"}"#).unwrap();
        assert_eq!((head.group_num, head.torch_gn, head.fuse), (4, true, Fuse::Paper));
        let explicit =
            parse(r#"{"op_channel": 64, "variant": "2023-10-19", "group_num": 8, "torch_gn": false}"#);
        assert_eq!(explicit.map(|c| (c.group_num, c.torch_gn)).unwrap(), (8, false));
        assert_eq!(ScConvConfig::for_variant(64, Variant::V20231019), head.clone().with_fuse(Fuse::Global));
        let err = parse(r#"{"op_channel": 64, "torch_gn": true}"#).unwrap_err().to_string();
        assert!(err.contains("torch_gn does not exist in variant 2023-07-27"), "{err}");
        let err = parse(r#"{"op_channel": 64, "variant": "2023-11-01"}"#).unwrap_err().to_string();
        assert!(err.contains("unknown variant `2023-11-01`"), "{err}");
        let round_trip: ScConvConfig = serde_json::from_value(serde_json::to_value(&head).unwrap()).unwrap();
        assert_eq!(round_trip, head);
    }

    #[test]
    fn channel_arithmetic_follows_python_int() {
        let config = with(64, |c| c.alpha = 0.3);
        // int(0.3 * 64) = int(19.2) = 19
        assert_eq!((config.up_channel(), config.low_channel()), (19, 45));
        assert_eq!((config.squeezed_up(), config.squeezed_low()), (9, 22));
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err =
            serde_json::from_str::<ScConvConfig>(r#"{"op_channel": 64, "squeeze_ratio": 2}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `squeeze_ratio`"), "{err}");
    }

    #[test]
    fn each_bad_setting_has_its_own_error() {
        use ConfigError::*;
        let cases: Vec<(ScConvConfig, ConfigError, &str)> = vec![
            (with(33, |c| c.group_num = 3), OddChannels(33), "must be even"),
            (with(8, |_| ()), FewerChannelsThanGroups { op_channel: 8, group_num: 16 }, "at least group_num"),
            (
                with(40, |_| ()),
                ChannelsNotDivisibleByGroups { op_channel: 40, group_num: 16 },
                "divisible by group_num",
            ),
            (with(64, |c| c.group_num = 0), NonPositiveGroupNum(0), "group_num must be positive"),
            (with(64, |c| c.alpha = 0.0), AlphaOutOfRange(0.0), "strictly between 0 and 1"),
            (with(64, |c| c.alpha = 1.0), AlphaOutOfRange(1.0), "strictly between 0 and 1"),
            (with(64, |c| c.gate_treshold = 1.5), GateThresholdOutOfRange(1.5), "gate_treshold"),
            (with(64, |c| c.squeeze_radio = 0), NonPositiveSqueezeRadio(0), "squeeze_radio must be positive"),
            (
                with(16, |c| c.alpha = 0.0625),
                SqueezedToZero { part: "up", channels: 1, squeeze_radio: 2 },
                "squeezes to 0",
            ),
            (
                with(16, |c| c.squeeze_radio = 16),
                SqueezedToZero { part: "up", channels: 8, squeeze_radio: 16 },
                "squeezes to 0",
            ),
            (with(64, |c| c.group_size = 0), NonPositiveGroupSize(0), "group_size must be positive"),
            (
                with(64, |c| c.group_size = 3),
                GroupSizeDoesNotDivide { group_size: 3, which: "input", channels: 16 },
                "must divide the grouped conv's input channels (16)",
            ),
            (
                // up = int(0.1875 * 64) = 12, squeezed to 6, which 3 divides; 64 is not divisible by 3.
                with(64, |c| (c.alpha, c.group_size) = (0.1875, 3)),
                GroupSizeDoesNotDivide { group_size: 3, which: "output", channels: 64 },
                "must divide the grouped conv's output channels (64)",
            ),
            (with(64, |c| c.group_kernel_size = 4), BadGroupKernelSize(4), "must be odd"),
        ];
        for (config, expected, message) in cases {
            let err = config.validate().expect_err(&format!("{config:?} must be rejected"));
            assert_eq!(err, expected);
            assert!(err.to_string().contains(message), "message `{err}` lacks `{message}`");
        }
    }
}
