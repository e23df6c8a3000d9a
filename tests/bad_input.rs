//! Bad configs, bad inputs and mismatched weights get typed errors with clear messages, through the
//! public API a user calls (`scconv`, `try_forward`, `weights::load`).
mod common;

use common::scratch_dir;
use scconv_tch::harness::parity::committed_fixtures;
use scconv_tch::{scconv, weights, ConfigError, ScConvConfig, ScConvError};
use tch::{nn::VarStore, Device, Kind, Tensor};

fn build(config: ScConvConfig) -> Result<scconv_tch::ScConv, ScConvError> {
    scconv(VarStore::new(Device::Cpu).root(), &config)
}

fn config_error(config: ScConvConfig) -> (ConfigError, String) {
    match build(config) {
        Err(ScConvError::InvalidConfig(e)) => {
            let message = ScConvError::InvalidConfig(e.clone()).to_string();
            (e, message)
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

#[test]
fn odd_channels_are_rejected_not_crashed_on_in_reconstruct() {
    let (e, m) = config_error(ScConvConfig { group_num: 5, ..ScConvConfig::new(35) });
    assert_eq!(e, ConfigError::OddChannels(35));
    assert_eq!(m, "invalid ScConv config: op_channel must be even (the SRU reconstructs by splitting channels in halves), got 35");
}

#[test]
fn fewer_channels_than_groups_is_rejected() {
    let (e, m) = config_error(ScConvConfig::new(8));
    assert_eq!(e, ConfigError::FewerChannelsThanGroups { op_channel: 8, group_num: 16 });
    assert!(m.contains("op_channel (8) must be at least group_num (16)"), "{m}");
}

#[test]
fn channels_not_divisible_by_groups_is_rejected() {
    let (e, m) = config_error(ScConvConfig::new(72));
    assert_eq!(e, ConfigError::ChannelsNotDivisibleByGroups { op_channel: 72, group_num: 16 });
    assert!(m.contains("op_channel (72) must be divisible by group_num (16)"), "{m}");
}

#[test]
fn alpha_outside_the_open_unit_interval_is_rejected() {
    for alpha in [0.0, 1.0, -0.5, 1.5, f64::NAN] {
        let (e, m) = config_error(ScConvConfig { alpha, ..ScConvConfig::new(64) });
        assert!(matches!(e, ConfigError::AlphaOutOfRange(a) if a.to_bits() == alpha.to_bits()), "{e:?}");
        assert!(m.contains("alpha must lie strictly between 0 and 1"), "{m}");
    }
}

#[test]
fn a_squeeze_to_zero_channels_is_rejected() {
    // C = 16 with r = 16: up = 8 squeezes to 8 // 16 = 0 channels, a zero-width conv in the reference.
    let (e, m) = config_error(ScConvConfig { squeeze_radio: 16, ..ScConvConfig::new(16) });
    assert_eq!(e, ConfigError::SqueezedToZero { part: "up", channels: 8, squeeze_radio: 16 });
    assert!(m.contains("the up part has 8 channels, which squeeze_radio 16 squeezes to 0"), "{m}");
    let (e, _) = config_error(ScConvConfig { alpha: 0.9375, ..ScConvConfig::new(16) });
    assert_eq!(e, ConfigError::SqueezedToZero { part: "low", channels: 1, squeeze_radio: 2 });
}

#[test]
fn group_size_must_divide_the_grouped_conv_channels() {
    let (e, m) = config_error(ScConvConfig { group_size: 3, ..ScConvConfig::new(64) });
    assert_eq!(e, ConfigError::GroupSizeDoesNotDivide { group_size: 3, which: "input", channels: 16 });
    assert!(m.contains("group_size (3) must divide the grouped conv's input channels (16)"), "{m}");
}

#[test]
fn an_even_group_kernel_size_is_rejected() {
    let (e, m) = config_error(ScConvConfig { group_kernel_size: 4, ..ScConvConfig::new(64) });
    assert_eq!(e, ConfigError::BadGroupKernelSize(4));
    assert!(m.contains("group_kernel_size must be odd and positive"), "{m}");
}

fn input_error(x: &Tensor) -> String {
    let block = build(ScConvConfig::new(32)).unwrap();
    match block.try_forward(x) {
        Err(e @ ScConvError::InvalidInput(_)) => e.to_string(),
        other => panic!("expected InvalidInput, got {other:?}"),
    }
}

#[test]
fn try_forward_rejects_a_wrong_rank() {
    let m = input_error(&Tensor::zeros([32, 8, 8], (Kind::Float, Device::Cpu)));
    assert_eq!(m, "invalid input: expected a 4-d (N, C, H, W) tensor, got 3-d with shape [32, 8, 8]");
}

#[test]
fn try_forward_rejects_a_wrong_channel_count() {
    let m = input_error(&Tensor::zeros([1, 64, 8, 8], (Kind::Float, Device::Cpu)));
    assert_eq!(m, "invalid input: expected 32 channels (dim 1), got 64 in shape [1, 64, 8, 8]");
}

#[test]
fn try_forward_rejects_non_float_dtypes() {
    for kind in [Kind::Int64, Kind::Uint8, Kind::Bool, Kind::Double] {
        let m = input_error(&Tensor::zeros([1, 32, 8, 8], (kind, Device::Cpu)));
        assert_eq!(m, format!("invalid input: expected dtype Float (the model's), got {kind:?}"));
    }
}

#[test]
fn try_forward_accepts_a_valid_input() {
    let block = build(ScConvConfig::new(32)).unwrap();
    let y = block.try_forward(&Tensor::randn([2, 32, 5, 7], (Kind::Float, Device::Cpu))).unwrap();
    assert_eq!(y.size(), [2, 32, 5, 7]);
}

fn load_error(config: ScConvConfig, file: &str) -> String {
    let mut vs = VarStore::new(Device::Cpu);
    scconv(vs.root(), &config).unwrap();
    match weights::load(&mut vs, file) {
        Err(e @ ScConvError::StateDict(_)) => e.to_string(),
        other => panic!("expected a StateDict error, got {other:?}"),
    }
}

#[test]
fn loading_reports_every_shape_mismatch_at_once() {
    // The C = 64 reference weights into a C = 128 model: all eight tensors have the wrong shape.
    let file = committed_fixtures().join("c64_56x56_b1.safetensors");
    let m = load_error(ScConvConfig::new(128), file.to_str().unwrap());
    assert_eq!(m.matches("size mismatch for").count(), 8, "{m}");
    assert!(
        m.contains("size mismatch for SRU.gn.gamma: the model has [128, 1, 1], the state dict [64, 1, 1]"),
        "{m}"
    );
    assert!(
        m.contains(
            "size mismatch for CRU.GWC.weight: the model has [128, 16, 3, 3], the state dict [64, 8, 3, 3]"
        ),
        "{m}"
    );
}

#[test]
fn loading_reports_missing_and_unexpected_keys_together() {
    let source = committed_fixtures().join("c64_56x56_b1.safetensors");
    let mut tensors = weights::read(source).unwrap();
    for (key, _) in tensors.iter_mut().filter(|(k, _)| k == "CRU.GWC.bias") {
        *key = "CRU.GWC.bias_typo".into();
    }
    tensors.retain(|(k, _)| k != "SRU.gn.beta");
    tensors.push(("SRU.gn.running_mean".into(), Tensor::from(0f32)));
    let file = scratch_dir("bad-keys").join("renamed.safetensors");
    Tensor::write_safetensors(&tensors, &file).unwrap();
    let m = load_error(ScConvConfig::new(64), file.to_str().unwrap());
    assert!(m.contains("missing keys: CRU.GWC.bias, SRU.gn.beta"), "{m}");
    assert!(m.contains("unexpected keys: CRU.GWC.bias_typo, SRU.gn.running_mean"), "{m}");
}

fn small_resnet(sc: bool) -> scconv_tch::models::ResNet {
    use scconv_tch::models::{resnet, BlockKind, ResNetConfig};
    let config = ResNetConfig {
        block: BlockKind::Basic,
        layers: vec![1, 1],
        widths: vec![32, 32],
        num_classes: 10,
        in_channels: 3,
        sc,
        small_input: true,
        scconv: Default::default(),
    };
    resnet(VarStore::new(Device::Cpu).root(), &config).unwrap()
}

#[test]
fn a_network_rejects_an_odd_size_where_an_scconv_pools() {
    let x = Tensor::zeros([1, 3, 15, 15], (Kind::Float, Device::Cpu));
    let m = small_resnet(true).try_forward(&x).unwrap_err().to_string();
    assert!(
        m.contains("layer2 halves a 15x15 map with ScConv and a 2x2 average pool, which needs even sizes"),
        "{m}"
    );
    // The plain twin downsamples with strided convs only and takes it.
    assert_eq!(small_resnet(false).try_forward(&x).unwrap().size(), [1, 10]);
    assert_eq!(
        small_resnet(true)
            .try_forward(&Tensor::zeros([1, 3, 16, 16], (Kind::Float, Device::Cpu)))
            .unwrap()
            .size(),
        [1, 10]
    );
}

#[test]
fn a_network_rejects_wrong_channels_and_dtype() {
    let model = small_resnet(true);
    let m = model
        .try_forward(&Tensor::zeros([1, 1, 16, 16], (Kind::Float, Device::Cpu)))
        .unwrap_err()
        .to_string();
    assert_eq!(m, "invalid input: expected 3 channels (dim 1), got 1 in shape [1, 1, 16, 16]");
    let m = model
        .try_forward(&Tensor::zeros([1, 3, 16, 16], (Kind::Uint8, Device::Cpu)))
        .unwrap_err()
        .to_string();
    assert_eq!(m, "invalid input: expected dtype Float (the model's), got Uint8");
}

#[test]
fn nan_input_propagates_instead_of_being_rejected() {
    // Documented behaviour (README, "Errors and guarantees"): as in the reference, NaN flows through.
    let block = build(ScConvConfig::new(32)).unwrap();
    let x = Tensor::randn([1, 32, 6, 6], (Kind::Float, Device::Cpu));
    let _ = x.get(0).get(0).get(0).get(0).fill_(f64::NAN);
    let y = tch::no_grad(|| block.try_forward(&x)).unwrap();
    assert!(y.isnan().any().int64_value(&[]) == 1, "NaN must propagate");
}

#[test]
fn a_huge_input_is_an_error_not_a_crash() {
    // 1 x 3 x 2^20 x 2^20 as a zero-stride view: tiny in memory, but the stem convolution needs 4 TiB.
    let model = small_resnet(true);
    let x = Tensor::zeros([1, 1, 1, 1], (Kind::Float, Device::Cpu)).expand([1, 3, 1 << 20, 1 << 20], false);
    let err = tch::no_grad(|| model.try_forward(&x)).unwrap_err();
    assert!(matches!(err, ScConvError::Runtime(_)), "{err}");
    assert!(err.to_string().contains("libtorch failed"), "{err}");
}
