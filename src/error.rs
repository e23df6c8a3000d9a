//! The library's error type: everything a caller can get wrong, with the expected and actual values.
use crate::weights::LoadReport;

/// Every error the library returns. Its `Display` is one sentence naming the values involved.
#[derive(Debug, thiserror::Error)]
pub enum ScConvError {
    /// A hyper-parameter combination that the reference would crash on or silently mishandle.
    /// (Not `#[from]`: that would also make it the error's source, and a cause chain would repeat it.)
    #[error("invalid ScConv config: {0}")]
    InvalidConfig(ConfigError),

    /// A model config the network cannot be built from.
    #[error("invalid model config: {0}")]
    InvalidModel(String),

    /// An input tensor that `try_forward` cannot run.
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// A state dict that does not match the module (every problem at once), naming its file when it
    /// came from one.
    #[error("state dict {file}does not match the model:\n{report}", file = file_named(.0), report = .0)]
    StateDict(Box<LoadReport>),

    /// A file that cannot be read as what it should be (weights, a config, a record).
    #[error("cannot read {path}: {reason}")]
    WeightsFile {
        /// The file, as given.
        path: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A file that cannot be written (an export's target).
    #[error("cannot write {path}: {reason}")]
    Write {
        /// The file, as given.
        path: String,
        /// Why it was not written.
        reason: String,
    },

    /// libtorch failed while running a checked input (e.g. out of memory for a huge one).
    #[error("libtorch failed: {0}")]
    Runtime(String),

    /// The fast path's cheap gate `z >= z_t` cannot stand in for `sigmoid(z) >= t` on this device.
    #[error("no exact fast gate for gate_treshold {threshold}: {why}")]
    GateThreshold {
        /// The configured `gate_treshold`.
        threshold: f64,
        /// What the calibration found.
        why: String,
    },

    /// The fused CUDA kernels or a CUDA graph could not be used (not built, no NVRTC or driver, a
    /// failed launch or capture).
    #[error("CUDA: {0}")]
    Cuda(String),

    /// Any other libtorch error, passed through.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

impl From<ConfigError> for ScConvError {
    fn from(error: ConfigError) -> Self {
        ScConvError::InvalidConfig(error)
    }
}

/// One variant per way a config can be wrong; each names the offending values.
/// Why an `ScConvConfig` is rejected, one variant per rule. The fields keep the names of `ScConvConfig`'s fields they refer to.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[allow(missing_docs)]
pub enum ConfigError {
    /// `op_channel` above `MAX_CHANNELS`.
    #[error("op_channel {0} is more than any block can hold (at most 65536)")]
    TooManyChannels(i64),
    /// The block would hold more than `MAX_PARAMETERS` parameters.
    #[error(
        "op_channel {op_channel}: the block would hold {parameters} parameters ({:.1} GB in fp32), more \
         than a model may hold (2^30, 4.3 GB)", *parameters as f64 * 4e-9
    )]
    TooManyParameters { op_channel: i64, parameters: i64 },
    /// `op_channel` is odd.
    #[error("op_channel must be even (the SRU reconstructs by splitting channels in halves), got {0}")]
    OddChannels(i64),
    /// `op_channel < group_num`.
    #[error("op_channel ({op_channel}) must be at least group_num ({group_num})")]
    FewerChannelsThanGroups { op_channel: i64, group_num: i64 },
    /// `op_channel % group_num != 0`.
    #[error(
        "op_channel ({op_channel}) must be divisible by group_num ({group_num}), or groups straddle channels"
    )]
    ChannelsNotDivisibleByGroups { op_channel: i64, group_num: i64 },
    /// `group_num <= 0`.
    #[error("group_num must be positive, got {0}")]
    NonPositiveGroupNum(i64),
    /// `alpha` outside (0, 1).
    #[error("alpha must lie strictly between 0 and 1, got {0}")]
    AlphaOutOfRange(f64),
    /// `gate_treshold` outside (0, 1).
    #[error("gate_treshold must lie strictly between 0 and 1 (it is compared with a sigmoid), got {0}")]
    GateThresholdOutOfRange(f64),
    /// `squeeze_radio <= 0`.
    #[error("squeeze_radio must be positive, got {0}")]
    NonPositiveSqueezeRadio(i64),
    /// A CRU part (`"up"` or `"low"`) would have no channels after squeezing.
    #[error("the {part} part has {channels} channels, which squeeze_radio {squeeze_radio} squeezes to 0")]
    SqueezedToZero { part: &'static str, channels: i64, squeeze_radio: i64 },
    /// `group_size <= 0`.
    #[error("group_size must be positive, got {0}")]
    NonPositiveGroupSize(i64),
    /// `group_size` does not divide `GWC`'s `"input"` or `"output"` channels.
    #[error("group_size ({group_size}) must divide the grouped conv's {which} channels ({channels})")]
    GroupSizeDoesNotDivide { group_size: i64, which: &'static str, channels: i64 },
    /// `torch_gn` set for a variant that has no such option.
    #[error("torch_gn does not exist in variant {0} (it came with 2023-09-12)")]
    TorchGnNotInVariant(&'static str),
    /// `group_kernel_size` is even or not positive.
    #[error("group_kernel_size must be odd and positive (padding k // 2 keeps the size only then), got {0}")]
    BadGroupKernelSize(i64),
}

/// `"FILE "` for a report about a file, else nothing.
fn file_named(report: &LoadReport) -> String {
    report.file.as_ref().map(|f| format!("{f} ")).unwrap_or_default()
}
