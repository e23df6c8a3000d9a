//! Stability under load: memory stays flat over 10,000 forward passes, repeated runs are bit-identical,
//! and one loaded model serves several threads with the single-threaded outputs.
//! (tch tensors are `Send` but not `Sync`, so a Rust module moves between threads but is not shared;
//! the exported TorchScript module, `CModule`, is `Send + Sync` and is what concurrent callers share.)
mod common;

use common::{crate_dir, scratch_dir};
use scconv_tch::export;
use scconv_tch::harness::infer::Classifier;
use std::sync::Arc;
use tch::{nn::ModuleT, CModule, Device, Kind, Tensor};

fn classifier() -> Classifier {
    Classifier::load(&crate_dir().join("weights/fmnist_sc.json"), Device::Cpu).unwrap()
}

/// Resident memory in bytes, from /proc/self/statm (pages x 4096).
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    statm.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4096
}

/// Set in the child process that runs the passes alone.
const MEMORY_CHILD: &str = "SCCONV_STABILITY_MEMORY_CHILD";

/// The 10,000 passes run in a child process of this test binary that runs only this test, so the
/// resident memory measured is theirs alone, not that of the tests running beside it in this process.
#[test]
fn ten_thousand_forward_passes_keep_memory_flat() {
    if std::env::var_os(MEMORY_CHILD).is_some() {
        return measure_memory_over_ten_thousand_passes();
    }
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "ten_thousand_forward_passes_keep_memory_flat",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(MEMORY_CHILD, "1")
        .output()
        .expect("cannot run this test binary as a child");
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    println!("{text}");
    assert!(output.status.success(), "the child failed:\n{text}");
    assert!(
        text.contains("growth over the next 9,000") && text.contains("1 passed"),
        "the child ran the passes:\n{text}"
    );
}

fn measure_memory_over_ten_thousand_passes() {
    let c = classifier();
    let x = Tensor::randn([1, 1, 28, 28], (Kind::Float, Device::Cpu));
    let mut after_warmup = 0;
    tch::no_grad(|| {
        for i in 0..10_000 {
            let _ = c.model.try_forward(&x).unwrap();
            if i == 999 {
                after_warmup = resident_bytes();
            }
        }
    });
    let growth = resident_bytes() as i64 - after_warmup as i64;
    println!(
        "resident memory after 1,000 passes {} MB, growth over the next 9,000: {} KB",
        after_warmup >> 20,
        growth >> 10
    );
    // Bound: 16 MB, far below one leaked activation set per pass (9,000 x ~100 KB = 900 MB).
    assert!(growth < 16 << 20, "resident memory grew by {growth} bytes over 9,000 passes");
}

#[test]
fn repeated_runs_are_bit_identical() {
    let c = classifier();
    let x = Tensor::randn([16, 1, 28, 28], (Kind::Float, Device::Cpu));
    let first = tch::no_grad(|| c.model.try_forward(&x)).unwrap();
    for _ in 0..50 {
        assert!(tch::no_grad(|| c.model.try_forward(&x)).unwrap().equal(&first));
    }
}

#[test]
fn one_exported_model_serves_four_threads_with_the_single_threaded_outputs() {
    let mut c = classifier();
    let model = &c.model;
    let example = Tensor::zeros([1, 1, 28, 28], (Kind::Float, Device::Cpu));
    let module = export::trace(&mut c.vs, &example, |x| model.forward_t(x, false)).unwrap();
    let path = scratch_dir("stability").join("fmnist_sc.pt");
    export::save(&module, &path, true).unwrap();
    let shared = Arc::new(CModule::load(&path).unwrap());

    let inputs: Vec<Tensor> =
        (0..4).map(|_| Tensor::randn([8, 1, 28, 28], (Kind::Float, Device::Cpu))).collect();
    let expected: Vec<Tensor> =
        inputs.iter().map(|x| tch::no_grad(|| c.model.try_forward(x)).unwrap()).collect();
    let handles: Vec<_> = inputs
        .into_iter()
        .map(|x| {
            let module = Arc::clone(&shared);
            std::thread::spawn(move || {
                (0..25).map(|_| tch::no_grad(|| module.forward_ts(&[&x])).unwrap()).collect::<Vec<_>>()
            })
        })
        .collect();
    for (handle, expected) in handles.into_iter().zip(&expected) {
        for output in handle.join().expect("a worker thread panicked") {
            assert!(output.equal(expected), "a concurrent output differs from the single-threaded one");
        }
    }
}
