//! fp16 and bf16 inference on the CPU: a VarStore converted to the dtype, in the reference mode and
//! both fast executions, against PyTorch's `.half()` / `.bfloat16()` module on fixtures it writes
//! fresh here (same kernels: zero flipped decisions), and layered against the fp32 module.
mod common;

use common::{crate_dir, fresh_seed, python, scratch_dir};
use scconv_tch::harness::half_parity::{run_all, table};
use std::process::Command;
use tch::Device;

#[test]
fn half_precision_blocks_match_pytorch_converted_modules_on_the_cpu() {
    let dir = scratch_dir("half-cpu");
    let seed = fresh_seed();
    let status = Command::new(python())
        .arg(crate_dir().join("parity/generate_half_fixtures.py"))
        .args(["--out".as_ref(), dir.as_os_str()])
        .args(["--seed", &seed.to_string(), "--device", "cpu"])
        .status()
        .expect("cannot start parity/generate_half_fixtures.py");
    assert!(status.success(), "generate_half_fixtures.py failed for seed {seed}");
    let reports = run_all(&dir, Device::Cpu).unwrap();
    let table = table(&reports);
    println!("seed {seed}\n{table}");
    assert_eq!(reports.len(), 9 * 2 * 3, "every case, dtype and execution");
    assert!(reports.iter().all(|r| r.passed()), "seed {seed}:\n{table}");
}
