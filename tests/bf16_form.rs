//! The bf16 inference form (`Precision::Bf16`): native only where the CPU has bf16 units (emulated,
//! saying why, elsewhere), its cast pass in its place among the passes, and the trained Fashion-MNIST
//! networks as accurate as PyTorch's own CPU bf16 autocast, every differing class and gate decision
//! counted.
mod common;

use common::crate_dir;
use common::trained::{differing_decisions, f64_twin, max_abs_diff, pytorch_batch, reference_decisions};
use scconv_tch::harness::infer::Classifier;
use scconv_tch::inference::{
    bf16_support, cpu_bf16_flags, onednn_bf16_support, Arithmetic, InferenceResNet, Pass, Precision,
};
use scconv_tch::models::ResNet;
use tch::{Device, Kind, Tensor};

/// One rounding to bf16, relative (8 significant bits).
const BF16_ROUNDING: f64 = 1.0 / 256.0;

fn trained(name: &str) -> Classifier {
    Classifier::load(&crate_dir().join(format!("weights/{name}.json")), Device::Cpu).unwrap()
}

/// The CPU's bf16 flags as the kernel lists them (`/proc/cpuinfo`, what `lscpu` shows).
fn proc_cpuinfo_bf16_flags() -> Vec<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags")).expect("a flags line");
    flags.split_whitespace().filter(|f| ["avx512_bf16", "amx_bf16"].contains(f)).map(String::from).collect()
}

/// On a CPU without `avx512_bf16` and `amx_bf16` the bf16 form runs emulated and says why; with them
/// (and libtorch's oneDNN agreeing) natively. The flags are cpuid's, as the kernel reports them.
#[test]
fn the_bf16_form_is_native_exactly_where_the_cpu_has_bf16_units() {
    let mut ours = cpu_bf16_flags();
    ours.sort();
    let mut kernels = proc_cpuinfo_bf16_flags();
    kernels.sort();
    assert_eq!(ours, kernels, "cpuid's bf16 flags against /proc/cpuinfo's");
    let classifier = trained("fmnist_sc");
    let form = InferenceResNet::compiled_with(&classifier.model, [4, 1, 28, 28], Precision::Bf16).unwrap();
    // Every pass (the seed's ScConv version has the channels-last kernel).
    assert_eq!(form.passes(), Pass::all_for(Precision::Bf16).as_slice());
    println!("{}: {}", kernels.join(" "), form.arithmetic().describe());
    match bf16_support() {
        Ok(()) => assert_eq!(form.arithmetic(), &Arithmetic::Bf16Native),
        Err(why) => {
            assert_eq!(form.arithmetic(), &Arithmetic::Bf16Emulated { why: why.clone() });
            if kernels.is_empty() {
                assert_eq!(why, "this CPU has neither avx512_bf16 nor amx_bf16");
            }
        }
    }
    let emulated = InferenceResNet::compiled_with(&classifier.model, [4, 1, 28, 28], Precision::Bf16Emulated);
    assert!(matches!(emulated.unwrap().arithmetic(), Arithmetic::Bf16Emulated { .. }));
}

#[test]
fn the_bf16_pass_casts_a_bf16_form_after_fold_and_before_prepack() {
    let classifier = trained("fmnist_sc");
    let size = [2, 1, 28, 28];
    let mut fp32 = InferenceResNet::new(&classifier.model).unwrap();
    fp32.apply(Pass::FoldBatchnorm, size).unwrap();
    let err = fp32.apply(Pass::Bf16, size).unwrap_err().to_string();
    assert!(err.contains("this one is fp32"), "{err}");

    let mut form = InferenceResNet::with_precision(&classifier.model, Precision::Bf16Emulated).unwrap();
    let err = form.apply(Pass::Bf16, size).unwrap_err().to_string();
    assert!(err.contains("folded first"), "{err}");
    form.apply(Pass::FoldBatchnorm, size).unwrap();
    form.apply(Pass::Prepack, size).unwrap();
    let probe = Tensor::randn(size, (Kind::Float, Device::Cpu));
    let before = form.try_forward(&probe).unwrap();
    let err = form.apply(Pass::Bf16, size).unwrap_err().to_string();
    assert!(err.contains("before prepack"), "{err}");
    assert_eq!(form.passes(), &[Pass::FoldBatchnorm, Pass::Prepack]);
    assert!(form.try_forward(&probe).unwrap().equal(&before), "a refused cast changes no step");

    // The pool first makes its pooled GWC in the form's precision: after the cast.
    let mut early = InferenceResNet::with_precision(&classifier.model, Precision::Bf16Emulated).unwrap();
    early.apply(Pass::FoldBatchnorm, size).unwrap();
    let err = early.apply(Pass::PoolFirst, size).unwrap_err().to_string();
    assert!(err.contains("after the bf16 pass"), "{err}");
    early.apply(Pass::Bf16, size).unwrap();
    early.apply(Pass::PoolFirst, size).unwrap();

    // Fold then cast alone (no fuse, no prepack): the logits are the bf16 form's already.
    let mut cast = InferenceResNet::with_precision(&classifier.model, Precision::Bf16Emulated).unwrap();
    cast.apply(Pass::FoldBatchnorm, size).unwrap();
    cast.apply(Pass::Bf16, size).unwrap();
    let compiled = InferenceResNet::compiled_with(&classifier.model, size, Precision::Bf16Emulated).unwrap();
    let x = Tensor::randn(size, (Kind::Float, Device::Cpu));
    let decisions = reference_decisions(&classifier.model, &x);
    let (a, b) = (
        cast.forward_with_decisions(&x, &decisions).unwrap(),
        compiled.forward_with_decisions(&x, &decisions).unwrap(),
    );
    let scale = a.abs().max().double_value(&[]);
    assert!(max_abs_diff(&a, &b) <= 4.0 * BF16_ROUNDING * scale, "{} vs {scale}", max_abs_diff(&a, &b));
    assert!(
        !a.equal(&classifier.model.forward_with_decisions(&x, &decisions).unwrap()),
        "cast changed nothing"
    );
}

/// Differing decisions allowed against the reference mode: 0.5% of the positions (measured 0.21%
/// emulated on the 1,000 shipped images: bf16 moves `z` by ~1e-2 of its scale, 100x fp32's).
const DIFFERING_DECISIONS_PER_POSITION: f64 = 5e-3;

/// Classes agreeing with PyTorch's fp32 on the 1,000 shipped images, at least (a floor: kernels differ
/// by instruction set; measured emulated on AVX2: SC 993, plain 999).
const AGREEING_CLASSES_FLOOR: i64 = 990;

#[test]
fn the_trained_networks_in_bf16_are_as_accurate_as_pytorchs_bf16_autocast() {
    hold_to_pytorchs_bf16_accuracy(Precision::Bf16);
}

/// The native form's code on oneDNN's bf16 kernels (`Precision::Bf16OneDnn`), held to the same bound
/// and floors, and to the emulated form's logits: wherever libtorch's oneDNN takes bf16 without the
/// CPU's bf16 units (AVX-512 CPUs, where oneDNN emulates them; with the units `Precision::Bf16` is that
/// form already). Where libtorch refuses bf16 (AVX2), the form runs emulated and says why.
#[test]
fn the_native_forms_code_computes_the_emulated_forms_numbers() {
    let arithmetic = Arithmetic::for_precision(Precision::Bf16OneDnn);
    println!("{}: {}", proc_cpuinfo_bf16_flags().join(" "), arithmetic.describe());
    match (onednn_bf16_support(), bf16_support()) {
        (Err(why), _) => {
            assert_eq!(arithmetic, Arithmetic::Bf16Emulated { why });
            return;
        }
        (Ok(()), Ok(())) => {
            assert_eq!(arithmetic, Arithmetic::for_precision(Precision::Bf16), "bf16 units: the same form");
            return;
        }
        (Ok(()), Err(_)) => assert_eq!(arithmetic, Arithmetic::Bf16Native),
    }
    for (name, native) in hold_to_pytorchs_bf16_accuracy(Precision::Bf16OneDnn) {
        let classifier = trained(name);
        let batch = pytorch_batch(name, &classifier.model);
        let form =
            InferenceResNet::compiled_with(&classifier.model, [250, 1, 28, 28], Precision::Bf16Emulated)
                .unwrap();
        let emulated = form.forward_with_decisions(&batch.input, &batch.decisions).unwrap();
        let rounding = emulated.abs().max().double_value(&[]) * BF16_ROUNDING;
        let diff = max_abs_diff(&native, &emulated);
        println!("{name}: native against emulated {diff:.3e}, one bf16 rounding of the largest logit {rounding:.3e}");
        assert!(
            diff <= NATIVE_AGAINST_EMULATED_ROUNDINGS * rounding,
            "{name}: {diff:e} against {rounding:e}"
        );
    }
}

/// The native and the emulated form's logits (same decisions) differ by at most this many bf16
/// roundings of the largest logit: they differ only in the order of the fp32 sums, which can tip an
/// activation's rounding to bf16 by one step, and that step travels to the logits.
const NATIVE_AGAINST_EMULATED_ROUNDINGS: f64 = 1.0;

/// The trained networks in bf16 on PyTorch's fixture batch, with PyTorch's fp32 decisions injected:
/// logits off the fp64 truth (the fp64 twin with the same decisions) by at most twice what PyTorch's
/// CPU bf16 autocast is off with the same decisions, plus one bf16 rounding of the largest logit. On
/// the 1,000 shipped test images: classes agreeing with PyTorch's recorded ones above a floor, the
/// differing gate decisions against the reference mode counted by layer and bounded.
/// Returns each network's logits on PyTorch's batch (its decisions injected).
fn hold_to_pytorchs_bf16_accuracy(precision: Precision) -> Vec<(&'static str, Tensor)> {
    let images = scconv_tch::harness::data::read_idx_split(&scconv_tch::harness::data::sample_dir()).unwrap();
    let mut on_pytorchs_batch = Vec::new();
    for name in ["fmnist_plain", "fmnist_sc"] {
        let classifier = trained(name);
        let model = &classifier.model;
        let form = InferenceResNet::compiled_with(model, [250, 1, 28, 28], precision).unwrap();
        let batch = pytorch_batch(name, model);
        let (_twin_vs, twin) = f64_twin(&classifier.vs, model.config());
        let truth =
            twin.forward_with_decisions(&batch.input.to_kind(Kind::Double), &batch.decisions).unwrap();
        let logits = form.forward_with_decisions(&batch.input, &batch.decisions).unwrap();
        let (ours, pytorch) =
            (max_abs_diff(&logits, &truth), max_abs_diff(&batch.logits_bf16_autocast, &truth));
        let rounding = truth.abs().max().double_value(&[]) * BF16_ROUNDING;
        println!(
            "{name} ({}), PyTorch's batch: bf16 form off by {ours:.3e}, PyTorch's bf16 autocast by {pytorch:.3e}, one bf16 rounding of the largest logit {rounding:.3e}",
            form.arithmetic().describe()
        );
        assert!(ours <= 2.0 * pytorch + rounding, "{name}: {ours:e} against PyTorch's {pytorch:e}");

        let pytorch_classes = Tensor::from_slice(&classifier.record.test_predictions);
        let n = images.pixels.size()[0];
        assert_eq!(n, 1000, "the shipped sample");
        let (mut agreeing, mut layers) = (0, Vec::<(String, i64, i64)>::new());
        for begin in (0..n).step_by(250) {
            let x = scconv_tch::harness::data::normalize(&images.pixels.narrow(0, begin, 250));
            let (logits, masks) = form.forward_recording_decisions(&x).unwrap();
            let expected = pytorch_classes.narrow(0, begin, 250);
            agreeing += logits.argmax(1, false).eq_tensor(&expected).sum(Kind::Int64).int64_value(&[]);
            let reference = reference_decisions(model, &x);
            for i in 0..masks.len() {
                let (differing, made) = differing_decisions(&masks[i..=i], &reference[i..=i]);
                match layers.get_mut(i) {
                    Some(layer) => (layer.1, layer.2) = (layer.1 + differing, layer.2 + made),
                    None => layers.push((masks[i].0.clone(), differing, made)),
                }
            }
        }
        println!("{name}: {agreeing} of {n} classes agree with PyTorch's fp32");
        for (path, differing, made) in &layers {
            println!("    {path:<18} {differing:>8} of {made} gate decisions differ from the reference mode");
            assert!(
                *differing as f64 <= DIFFERING_DECISIONS_PER_POSITION * *made as f64,
                "{name} {path}: {differing} of {made}"
            );
        }
        assert_eq!(layers.is_empty(), !model.config().sc, "{name}: an SC network records its decisions");
        assert!(agreeing >= AGREEING_CLASSES_FLOOR, "{name}: {agreeing} of {n} classes agree with PyTorch's");
        on_pytorchs_batch.push((name, logits));
    }
    on_pytorchs_batch
}

/// Networks whose stride-2 ScConvs pool (the random `sc_small_pooled_32px` and `sc_resnet50_64px` of
/// `parity/generate_model_fixtures.py`, made here with PyTorch's bf16 autocast logits): the bf16 form
/// with the pool moved before the CRU, and without, held to the trained networks' bound on PyTorch's
/// batch with its decisions injected (twice PyTorch's bf16 autocast error against the fp64 twin, plus
/// one bf16 rounding of the largest logit); the pass taking effect (other roundings, other logits);
/// and, where libtorch's oneDNN takes bf16, the native form's code computing the emulated form's
/// numbers with the pool first too.
#[test]
fn networks_whose_scconvs_pool_are_as_accurate_in_bf16_with_the_pool_first() {
    use scconv_tch::harness::model_parity::ModelCaseSpec;
    use scconv_tch::harness::parity::Manifest;
    let dir = common::scratch_dir("bf16-pooled-networks");
    let status = std::process::Command::new(common::python())
        .arg(crate_dir().join("parity/generate_model_fixtures.py"))
        .args(["--out".as_ref(), dir.as_os_str()])
        .args(["--cases", "random", "--only", "sc_small_pooled_32px,sc_resnet50_64px"])
        .status()
        .expect("cannot start the Python model fixture generator");
    assert!(status.success(), "generate_model_fixtures.py failed ({status})");
    let manifest = Manifest::<ModelCaseSpec>::read(&dir).unwrap();
    assert_eq!(manifest.cases.len(), 2);
    let native = matches!(Arithmetic::for_precision(Precision::Bf16OneDnn), Arithmetic::Bf16Native);
    for case in &manifest.cases {
        let mut vs = tch::nn::VarStore::new(Device::Cpu);
        let model = scconv_tch::models::resnet(vs.root(), &case.config).unwrap();
        scconv_tch::weights::load(&mut vs, dir.join(&case.state_dict)).unwrap();
        let batch = common::trained::pytorch_batch_from(&dir.join(&case.tensors), &case.name, &model);
        let (_twin_vs, twin) = f64_twin(&vs, model.config());
        let truth =
            twin.forward_with_decisions(&batch.input.to_kind(Kind::Double), &batch.decisions).unwrap();
        let pytorch = max_abs_diff(&batch.logits_bf16_autocast, &truth);
        let rounding = truth.abs().max().double_value(&[]) * BF16_ROUNDING;
        let size = <[i64; 4]>::try_from(batch.input.size()).unwrap();
        let mut logits = Vec::new();
        let precisions = if native {
            vec![Precision::Bf16Emulated, Precision::Bf16OneDnn]
        } else {
            vec![Precision::Bf16Emulated]
        };
        for precision in precisions {
            for pool_first in [true, false] {
                let form = bf16_form(&model, size, precision, pool_first);
                let ours = form.forward_with_decisions(&batch.input, &batch.decisions).unwrap();
                let off = max_abs_diff(&ours, &truth);
                println!(
                    "{} ({}, pool first {pool_first}): off by {off:.3e}, PyTorch's bf16 autocast by {pytorch:.3e}, one bf16 rounding of the largest logit {rounding:.3e}",
                    case.name,
                    form.arithmetic().describe()
                );
                assert!(
                    off <= 2.0 * pytorch + rounding,
                    "{} {precision:?}, pool first {pool_first}: {off:e}",
                    case.name
                );
                logits.push(ours);
            }
            let n = logits.len();
            assert!(
                !logits[n - 2].equal(&logits[n - 1]),
                "{} {precision:?}: the pool first took effect",
                case.name
            );
        }
        if native {
            for (emulated, native) in [(&logits[0], &logits[2]), (&logits[1], &logits[3])] {
                let diff = max_abs_diff(native, emulated);
                let rounding = emulated.abs().max().double_value(&[]) * BF16_ROUNDING;
                assert!(
                    diff <= NATIVE_AGAINST_EMULATED_ROUNDINGS * rounding,
                    "{}: {diff:e} against {rounding:e}",
                    case.name
                );
            }
        }
    }
}

/// The bf16 form of `precision` with every pass of `Pass::all_for`, or all but the pool first.
fn bf16_form(model: &ResNet, size: [i64; 4], precision: Precision, pool_first: bool) -> InferenceResNet<'_> {
    if pool_first {
        let form = InferenceResNet::compiled_with(model, size, precision).unwrap();
        assert!(form.passes().contains(&Pass::PoolFirst), "the bf16 forms move the pool first");
        return form;
    }
    let mut form = InferenceResNet::with_precision(model, precision).unwrap();
    for pass in Pass::all_for(precision).into_iter().filter(|&p| p != Pass::PoolFirst) {
        if !matches!(pass, Pass::TileBatch | Pass::Prepack | Pass::OwnPrimitives)
            || scconv_tch::inference::shim_built()
        {
            form.apply(pass, size).unwrap();
        }
    }
    form
}
