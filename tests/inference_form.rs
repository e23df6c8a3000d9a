//! The inference form (`scconv_tch::inference`): each pass alone keeps the network's function, the
//! folded form is as accurate as PyTorch's own fp32 arithmetic (against an fp64 run with the same
//! gate decisions), and the trained Fashion-MNIST networks keep PyTorch's classes with every differing
//! gate decision counted by layer.
mod common;

use common::crate_dir;
use common::trained::{differing_decisions, f64_twin, max_abs_diff, pytorch_batch, reference_decisions};
use scconv_tch::harness::infer::Classifier;
use scconv_tch::inference::{InferenceResNet, Pass};
use scconv_tch::models::{resnet, ResNet, ResNetConfig};
use scconv_tch::Execution;
use tch::nn::{ModuleT, VarStore};
use tch::{Device, Kind, Tensor};

const FP32_ULP: f64 = 1.0 / (1u64 << 24) as f64;

fn fmnist_config(sc: bool) -> ResNetConfig {
    let name = if sc { "fmnist_sc" } else { "fmnist_plain" };
    scconv_tch::harness::infer::ModelRecord::read(&crate_dir().join(format!("weights/{name}.json")))
        .unwrap()
        .config
}

/// A network with random weights and BatchNorm statistics far from the identity (as trained ones are),
/// and its fp64 twin with the same values.
fn network_and_f64_twin(config: &ResNetConfig, seed: i64) -> (VarStore, ResNet, VarStore, ResNet) {
    tch::manual_seed(seed);
    let vs = VarStore::new(Device::Cpu);
    let model = resnet(vs.root(), config).unwrap();
    tch::no_grad(|| {
        for (name, mut t) in vs.variables() {
            if name.ends_with("running_var") {
                t.copy_(&(Tensor::rand_like(&t) * 2.0 + 0.2));
            } else if name.ends_with("running_mean")
                || name.ends_with("bn1.bias")
                || name.ends_with("bn2.bias")
            {
                t.copy_(&(Tensor::randn_like(&t) * 0.1));
            } else if name.contains(".bn") && name.ends_with("weight") {
                t.copy_(&(Tensor::rand_like(&t) + 0.5));
            }
        }
    });
    let mut twin_vs = VarStore::new(Device::Cpu);
    let twin = resnet(twin_vs.root(), config).unwrap();
    twin_vs.copy(&vs).unwrap();
    twin_vs.double();
    (vs, model, twin_vs, twin)
}

/// The form's logits against fp64 truth may be off by at most twice what the fp32 reference is off,
/// plus one rounding of the largest logit (`crate::inference`'s documented tolerance).
fn assert_as_accurate_as_the_reference(form: &Tensor, reference: &Tensor, truth: &Tensor, what: &str) {
    let (err_form, err_ref) = (max_abs_diff(form, truth), max_abs_diff(reference, truth));
    let ulp = truth.abs().max().double_value(&[]) * FP32_ULP;
    println!("{what}: form {err_form:.2e}, reference {err_ref:.2e}, largest logit's ulp {ulp:.2e}");
    assert!(
        err_form <= 2.0 * err_ref + ulp,
        "{what}: form off by {err_form:e}, the fp32 reference by {err_ref:e}"
    );
}

/// Every pass, in order: `Prepack` needs the shim, which `tests/cpu_shim.rs` requires of this build.
fn passes_in_order() -> Vec<Pass> {
    Pass::ALL.to_vec()
}

/// A small torchvision-style bottleneck ResNet (7x7 stem, max pool, downsample, stride-2 ScConvs with
/// their pool): ResNet-50's structure at a test's cost.
fn small_bottleneck_config(sc: bool) -> ResNetConfig {
    let mut config = ResNetConfig::named("resnet50", sc).unwrap();
    (config.layers, config.widths, config.num_classes) = (vec![2, 1, 1, 1], vec![16, 32, 32, 64], 10);
    config
}

/// Each network of the checks: (config, input size). 64 images, so that "off by" is the largest error
/// of 640 logits, not of a handful: over 30 seeds the ratio form / reference reached 2.15 with 2
/// images (20 logits) on an AVX2 CPU, and 2.46 on CI's CPU, whose kernels sum in other orders; with 64
/// images it stayed within 1.13-1.60 on every network and pass. The accuracy asked is the same; only
/// the luck of one small draw is taken out of its measure.
fn networks() -> Vec<(ResNetConfig, [i64; 4])> {
    const IMAGES: i64 = 64;
    let mut out = Vec::new();
    for sc in [false, true] {
        out.push((fmnist_config(sc), [IMAGES, 1, 28, 28]));
        out.push((small_bottleneck_config(sc), [IMAGES, 3, 64, 64]));
    }
    out
}

#[test]
fn without_passes_the_form_is_the_model_bit_for_bit() {
    for (config, size) in networks() {
        let (_vs, mut model, _, _) = network_and_f64_twin(&config, 1);
        model.set_scconv_execution(Execution::Fast).unwrap();
        let x = Tensor::randn(size, (Kind::Float, Device::Cpu));
        let form = InferenceResNet::new(&model).unwrap();
        let expected = tch::no_grad(|| model.forward_t(&x, false));
        assert!(form.try_forward(&x).unwrap().equal(&expected), "{config:?}");
    }
}

#[test]
fn each_pass_keeps_the_networks_function_within_fp32_accuracy() {
    for (config, size) in networks() {
        let (_vs, model, _tvs, twin) = network_and_f64_twin(&config, 2);
        let x = Tensor::randn(size, (Kind::Float, Device::Cpu));
        let decisions = reference_decisions(&model, &x);
        let reference = model.forward_with_decisions(&x, &decisions).unwrap();
        let truth = twin.forward_with_decisions(&x.to_kind(Kind::Double), &decisions).unwrap();
        let mut form = InferenceResNet::new(&model).unwrap();
        for (applied, pass) in passes_in_order().into_iter().enumerate() {
            form.apply(pass, size).unwrap();
            assert_eq!(form.passes().len(), applied + 1, "{pass:?} recorded as applied");
            assert_eq!(form.passes().last(), Some(&pass));
            let logits = form.forward_with_decisions(&x, &decisions).unwrap();
            let what = format!("{:?} {}, {:?}", config.block, config.sc, form.passes());
            assert_as_accurate_as_the_reference(&logits, &reference, &truth, &what);
        }
    }
}

#[test]
fn a_pass_out_of_order_or_twice_is_an_error() {
    let config = fmnist_config(false);
    let (_vs, model, _, _) = network_and_f64_twin(&config, 4);
    let mut form = InferenceResNet::new(&model).unwrap();
    for early in [Pass::FuseEpilogues, Pass::Prepack] {
        let err = form.apply(early, [1, 1, 28, 28]).unwrap_err().to_string();
        assert!(err.contains("fold"), "{early:?}: {err}");
    }
    let err = form.apply(Pass::OwnPrimitives, [1, 1, 28, 28]).unwrap_err().to_string();
    assert!(err.contains("prepack first"), "{err}");
    assert!(form.passes().is_empty(), "a refused pass is not recorded");
    form.apply(Pass::FoldBatchnorm, [1, 1, 28, 28]).unwrap();
    let err = form.apply(Pass::FoldBatchnorm, [1, 1, 28, 28]).unwrap_err().to_string();
    assert!(err.contains("applied already"), "{err}");
    form.apply(Pass::Prepack, [1, 1, 28, 28]).unwrap();
    let err = form.apply(Pass::PoolFirst, [1, 1, 28, 28]).unwrap_err().to_string();
    assert!(err.contains("before prepack"), "{err}");
    let err = form.apply(Pass::OwnPrimitives, [1, 1, 28, 28]).unwrap_err().to_string();
    assert!(err.contains("fuse pass first"), "{err}");
}

#[test]
fn other_batch_sizes_than_the_prepacked_one_run_correctly() {
    let config = fmnist_config(true);
    let (_vs, model, _tvs, twin) = network_and_f64_twin(&config, 5);
    // Compiled for 8 (run whole) and for 64 (in tiles where the machine's caches call for them, its
    // rest prepacked too): batches of 1 and 3, and 13 (a full tile and a rest prepacked for no size).
    // About 64 images in each case: the error is measured on 640 logits (see `networks`).
    for (compiled, batches) in [(8, vec![1, 3]), (64, vec![13])] {
        let form = InferenceResNet::compiled(&model, [compiled, 1, 28, 28]).unwrap();
        for batch in batches {
            let (mut logits, mut reference, mut truth) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..(64 + batch - 1) / batch {
                let x = Tensor::randn([batch, 1, 28, 28], (Kind::Float, Device::Cpu));
                let decisions = reference_decisions(&model, &x);
                reference.push(model.forward_with_decisions(&x, &decisions).unwrap());
                truth.push(twin.forward_with_decisions(&x.to_kind(Kind::Double), &decisions).unwrap());
                logits.push(form.forward_with_decisions(&x, &decisions).unwrap());
            }
            let [logits, reference, truth] = [logits, reference, truth].map(|parts| Tensor::cat(&parts, 0));
            let what = format!("compiled for {compiled} (tile {:?}), batch {batch}", form.batch_tile());
            assert_as_accurate_as_the_reference(&logits, &reference, &truth, &what);
        }
    }
}

#[test]
fn a_network_other_than_fp32_on_the_cpu_is_refused() {
    let config = fmnist_config(true);
    let (mut vs, model, _, _) = network_and_f64_twin(&config, 7);
    vs.double();
    let err = InferenceResNet::new(&model).unwrap_err().to_string();
    assert!(err.contains("fp32 networks on the CPU") && err.contains("Double"), "{err}");
}

#[test]
fn bad_input_is_an_error_not_a_crash() {
    let config = fmnist_config(true);
    let (_vs, model, _, _) = network_and_f64_twin(&config, 6);
    let form = InferenceResNet::compiled(&model, [2, 1, 28, 28]).unwrap();
    for x in [
        Tensor::randn([2, 3, 28, 28], (Kind::Float, Device::Cpu)),
        Tensor::randn([2, 1, 28], (Kind::Float, Device::Cpu)),
        Tensor::randn([2, 1, 28, 28], (Kind::Double, Device::Cpu)),
    ] {
        assert!(form.try_forward(&x).is_err(), "{:?} {:?}", x.size(), x.kind());
    }
}

/// Differing decisions allowed against the reference: 1 in a million. They come from the form's other
/// rounding (about 1e-7 of a value) meeting a `z` just as close to the gate's edge; measured 106 of
/// 690M on the 10,000 test images (0.15 in a million).
const DIFFERING_DECISIONS_PER_POSITION: f64 = 1e-6;

/// The trained networks on PyTorch's own fixture batch: with PyTorch's decisions injected, the form's
/// logits within fp32 accuracy of the fp64 truth (the fp64 twin with the same decisions), PyTorch's
/// classes, and its own decisions bounded against PyTorch's. On the shipped 1,000 test images:
/// PyTorch's recorded classes (the record's `test_predictions`) and the differing decisions against the
/// reference mode bounded, by layer.
#[test]
fn the_trained_networks_keep_pytorchs_classes() {
    let images = scconv_tch::harness::data::read_idx_split(&scconv_tch::harness::data::sample_dir()).unwrap();
    for name in ["fmnist_plain", "fmnist_sc"] {
        let classifier =
            Classifier::load(&crate_dir().join(format!("weights/{name}.json")), Device::Cpu).unwrap();
        let model = &classifier.model;
        let form = InferenceResNet::compiled(model, [250, 1, 28, 28]).unwrap();
        assert!(form.passes().contains(&Pass::Prepack) && form.passes().contains(&Pass::FuseEpilogues));

        let batch = pytorch_batch(name, model);
        let (_twin_vs, twin) = f64_twin(&classifier.vs, model.config());
        let truth =
            twin.forward_with_decisions(&batch.input.to_kind(Kind::Double), &batch.decisions).unwrap();
        let injected = form.forward_with_decisions(&batch.input, &batch.decisions).unwrap();
        assert_as_accurate_as_the_reference(
            &injected,
            &batch.logits,
            &truth,
            &format!("{name}, PyTorch's batch"),
        );
        let (logits, made) = form.forward_recording_decisions(&batch.input).unwrap();
        assert!(
            logits.argmax(1, false).equal(&batch.logits.argmax(1, false)),
            "{name}: PyTorch's batch classes"
        );
        let (differing, positions) = differing_decisions(&made, &batch.decisions);
        println!("{name}, PyTorch's batch: {differing} of {positions} decisions differ from PyTorch's");
        assert!(
            differing as f64 <= DIFFERING_DECISIONS_PER_POSITION * positions as f64,
            "{name}: {differing}"
        );

        let pytorch_classes = Tensor::from_slice(&classifier.record.test_predictions);
        let (mut disagreements, mut differing, mut positions) = (0, 0, 0);
        let n = images.pixels.size()[0];
        assert_eq!(n, 1000, "the shipped sample");
        for begin in (0..n).step_by(250) {
            let x = scconv_tch::harness::data::normalize(&images.pixels.narrow(0, begin, 250.min(n - begin)));
            let (logits, masks) = form.forward_recording_decisions(&x).unwrap();
            let (d, p) = differing_decisions(&masks, &reference_decisions(model, &x));
            (differing, positions) = (differing + d, positions + p);
            let expected = pytorch_classes.narrow(0, begin, x.size()[0]);
            disagreements += logits.argmax(1, false).ne_tensor(&expected).sum(Kind::Int64).int64_value(&[]);
        }
        println!("{name}: {disagreements} of {n} classes differ from PyTorch's; {differing} of {positions} decisions from the reference mode's");
        assert_eq!(disagreements, 0, "{name}: classes differing from PyTorch's recorded ones");
        assert_eq!(positions == 0, !model.config().sc, "{name}: an SC network records its decisions");
        assert!(
            differing as f64 <= DIFFERING_DECISIONS_PER_POSITION * positions as f64,
            "{name}: {differing}"
        );
    }
}
