//! The inference form (`scconv_tch::inference`): each pass alone keeps the network's function, the
//! folded form is as accurate as PyTorch's own fp32 arithmetic (against an fp64 run with the same
//! gate decisions), and the trained Fashion-MNIST networks keep PyTorch's classes with every differing
//! gate decision counted by layer.
mod common;

use common::crate_dir;
use scconv_tch::harness::infer::Classifier;
use scconv_tch::inference::{shim_built, InferenceResNet, Pass};
use scconv_tch::models::{resnet, ResNet, ResNetConfig};
use scconv_tch::{Execution, GateDecisions};
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

/// The reference's decisions on `x` (fp32), by path.
fn reference_decisions(model: &ResNet, x: &Tensor) -> Vec<(String, GateDecisions)> {
    let (_, gates) = tch::no_grad(|| model.forward_recording_gates(x)).unwrap();
    gates.into_iter().map(|(path, gate)| (path, gate.decisions)).collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
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

fn passes_in_order() -> Vec<Pass> {
    Pass::ALL.into_iter().filter(|&p| p != Pass::Prepack || shim_built()).collect()
}

/// A small torchvision-style bottleneck ResNet (7x7 stem, max pool, downsample, stride-2 ScConvs with
/// their pool): ResNet-50's structure at a test's cost.
fn small_bottleneck_config(sc: bool) -> ResNetConfig {
    let mut config = ResNetConfig::named("resnet50", sc).unwrap();
    (config.layers, config.widths, config.num_classes) = (vec![2, 1, 1, 1], vec![16, 32, 32, 64], 10);
    config
}

/// Each network of the checks: (config, input size).
fn networks() -> Vec<(ResNetConfig, [i64; 4])> {
    let mut out = Vec::new();
    for sc in [false, true] {
        out.push((fmnist_config(sc), [4, 1, 28, 28]));
        out.push((small_bottleneck_config(sc), [2, 3, 64, 64]));
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
        for pass in passes_in_order() {
            form.apply(pass, size).unwrap();
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
    assert!(form.passes().is_empty(), "a refused pass is not recorded");
    form.apply(Pass::FoldBatchnorm, [1, 1, 28, 28]).unwrap();
    let err = form.apply(Pass::FoldBatchnorm, [1, 1, 28, 28]).unwrap_err().to_string();
    assert!(err.contains("applied already"), "{err}");
}

#[test]
fn other_batch_sizes_than_the_prepacked_one_run_correctly() {
    let config = fmnist_config(true);
    let (_vs, model, _tvs, twin) = network_and_f64_twin(&config, 5);
    let form = InferenceResNet::compiled(&model, [8, 1, 28, 28]).unwrap();
    for batch in [1, 3] {
        let x = Tensor::randn([batch, 1, 28, 28], (Kind::Float, Device::Cpu));
        let decisions = reference_decisions(&model, &x);
        let reference = model.forward_with_decisions(&x, &decisions).unwrap();
        let truth = twin.forward_with_decisions(&x.to_kind(Kind::Double), &decisions).unwrap();
        let logits = form.forward_with_decisions(&x, &decisions).unwrap();
        assert_as_accurate_as_the_reference(&logits, &reference, &truth, &format!("batch {batch}"));
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

/// The trained networks on PyTorch's own fixture batch and on the shipped 1,000 test images: PyTorch's
/// classes, and each ScConv's differing decisions counted; with the reference's decisions injected,
/// the logits within fp32 accuracy of the fp64 truth.
#[test]
fn the_trained_networks_keep_pytorchs_classes() {
    let images = scconv_tch::harness::data::read_idx_split(&scconv_tch::harness::data::sample_dir()).unwrap();
    for name in ["fmnist_plain", "fmnist_sc"] {
        let classifier =
            Classifier::load(&crate_dir().join(format!("weights/{name}.json")), Device::Cpu).unwrap();
        let model = &classifier.model;
        let form = InferenceResNet::compiled(model, [250, 1, 28, 28]).unwrap();
        let mut differing = std::collections::BTreeMap::<String, i64>::new();
        let mut disagreements = 0;
        let n = images.pixels.size()[0];
        for begin in (0..n).step_by(250) {
            let x = scconv_tch::harness::data::normalize(&images.pixels.narrow(0, begin, 250.min(n - begin)));
            let (logits, masks) = form.forward_recording_decisions(&x).unwrap();
            let decisions = reference_decisions(model, &x);
            for ((path, mask), (ref_path, reference)) in masks.iter().zip(&decisions) {
                assert_eq!(path, ref_path);
                *differing.entry(path.clone()).or_default() +=
                    mask.ne_tensor(&reference.info_mask).sum(Kind::Int64).int64_value(&[]);
            }
            let reference = tch::no_grad(|| model.forward_t(&x, false));
            disagreements += logits
                .argmax(1, false)
                .ne_tensor(&reference.argmax(1, false))
                .sum(Kind::Int64)
                .int64_value(&[]);
        }
        println!("{name}: {disagreements} of {n} classes differ; differing decisions by layer {differing:?}");
        assert_eq!(disagreements, 0, "{name}: differing decisions by layer {differing:?}");
    }
}
