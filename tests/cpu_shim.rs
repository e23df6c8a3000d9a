//! The inference form's CPU shim (`src/inference/shim.cpp`: libtorch's fused oneDNN convolutions, its
//! prepacked weights and thread pool) is part of every build in this repository. `build.rs` only warns
//! when it does not compile (a user's odd toolchain still gets a working crate, with libtorch's plain
//! convolutions), so without this test the form's `Prepack` pass and fused epilogues could drop out of
//! `make test` unseen.
use scconv_tch::inference::{own_onednn_version, shim_built, InferenceResNet, Pass};
use scconv_tch::models::{resnet, ResNetConfig};
use scconv_tch::Variant;
use tch::{nn::VarStore, Device};

#[test]
fn this_build_has_the_cpu_shim() {
    assert!(
        shim_built(),
        "this build has no CPU shim: see build.rs's warning (a C++17 compiler and libtorch's headers under \
         .libtorch/include are needed; SCCONV_NO_CPU_SHIM must be unset)"
    );
}

/// The same for the form's own oneDNN primitives (`src/inference/onednn.cpp`, the `onednn` feature of
/// the default build): build.rs only warns when it finds no oneDNN, which `make setup` installs.
#[test]
fn this_build_has_its_own_onednn_primitives() {
    let version = own_onednn_version();
    assert_eq!(
        version.as_deref(),
        Some("3.2.0"),
        "this build runs no oneDNN primitives of its own: see build.rs's warning (make setup installs \
         onednn-cpu-gomp 2023.2.0 beside libtorch)"
    );
}

#[test]
fn the_compiled_form_applies_every_pass_it_names() {
    // Channels-last everywhere but in SC networks whose ScConv version has no channels-last kernel
    // (the soft gate of 2023-10-19).
    for (sc, variant, channels_last) in [
        (false, Variant::V20230727, true),
        (true, Variant::V20230727, true),
        (true, Variant::V20230912, true),
        (true, Variant::V20231019, false),
    ] {
        let vs = VarStore::new(Device::Cpu);
        let mut config = ResNetConfig::named("resnet18", sc).unwrap();
        config.num_classes = 10;
        config.scconv.variant = variant;
        let model = resnet(vs.root(), &config).unwrap();
        let form = InferenceResNet::compiled(&model, [1, 3, 64, 64]).unwrap();
        let mut expected = vec![Pass::FoldBatchnorm, Pass::FuseEpilogues, Pass::TileBatch];
        if channels_last {
            expected.extend([Pass::PoolFirst, Pass::Prepack, Pass::OwnPrimitives, Pass::ChannelsLast]);
            expected.extend([Pass::FuseSqueezes, Pass::FuseGwcPwc1]);
        } else {
            expected.extend([Pass::Prepack, Pass::OwnPrimitives]);
        }
        assert_eq!(form.passes(), expected, "sc {sc}, {variant:?}");
    }
}
