//! `ScConvConfig`: the reference constructor's arguments, with its defaults and names
//! (`gate_treshold` and `squeeze_radio` are spelt as in the reference so configs read alike).
use crate::error::ConfigError;
use serde::{Deserialize, Serialize};

/// The arguments of the reference's `ScConv(op_channel, group_num=16, gate_treshold=0.5, alpha=1/2,
/// squeeze_radio=2, group_size=2, group_kernel_size=3)`. As JSON, every field but `op_channel` may be
/// left out (the reference's default applies) and unknown fields are an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScConvConfig {
    /// Channels in and out (`C`); even, and divisible by `group_num`.
    pub op_channel: i64,
    /// Groups of the SRU's GroupBatchnorm2d statistics (default 16).
    #[serde(default = "defaults::group_num")]
    pub group_num: i64,
    /// The SRU gate's threshold on `sigmoid(gn_x * w_gamma)`, strictly between 0 and 1 (default 0.5).
    #[serde(default = "defaults::gate_treshold")]
    pub gate_treshold: f64,
    /// The CRU's split: `int(alpha * op_channel)` channels go to the upper part (default 0.5).
    #[serde(default = "defaults::alpha")]
    pub alpha: f64,
    /// The CRU's squeeze ratio: both parts are squeezed by this factor with 1x1 convs (default 2).
    #[serde(default = "defaults::squeeze_radio")]
    pub squeeze_radio: i64,
    /// Groups of the CRU's group-wise conv `GWC` (default 2).
    #[serde(default = "defaults::group_size")]
    pub group_size: i64,
    /// Kernel size of `GWC`, odd (default 3).
    #[serde(default = "defaults::group_kernel_size")]
    pub group_kernel_size: i64,
}

mod defaults {
    pub fn group_num() -> i64 {
        16
    }
    pub fn gate_treshold() -> f64 {
        0.5
    }
    pub fn alpha() -> f64 {
        0.5
    }
    pub fn squeeze_radio() -> i64 {
        2
    }
    pub fn group_size() -> i64 {
        2
    }
    pub fn group_kernel_size() -> i64 {
        3
    }
}

/// The GroupBatchnorm2d epsilon, added to the std (not inside a square root), as in the reference.
pub const GN_EPS: f64 = 1e-10;

impl ScConvConfig {
    /// The reference's defaults for `op_channel` channels.
    pub fn new(op_channel: i64) -> Self {
        Self {
            op_channel,
            group_num: defaults::group_num(),
            gate_treshold: defaults::gate_treshold(),
            alpha: defaults::alpha(),
            squeeze_radio: defaults::squeeze_radio(),
            group_size: defaults::group_size(),
            group_kernel_size: defaults::group_kernel_size(),
        }
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
        self.validate_cru()
    }

    fn validate_sru(&self) -> Result<(), ConfigError> {
        let (op_channel, group_num) = (self.op_channel, self.group_num);
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
