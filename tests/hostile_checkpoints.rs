//! The `torch.save` reader against the hostile corpus of issue 18, written now by
//! `parity/write_hostile_checkpoints.py` (the big files too: streams that inflate to a GB, 100 MB
//! archives whose directories lie, a pickle of 12M opcodes): nesting a million deep, memo and DUP
//! doubling, zip64 records declaring terabytes, bombs, huge values in errors, third-party panics, a
//! storage typed two ways, every value `torch.load(weights_only=True)` reads, prefix hints, keys that
//! would mislead a terminal.
//!
//! Each file goes through the CLI in a child process under a 4 GiB address-space limit, so a reader
//! that allocates what a file declares fails alone instead of taking the machine: a file that loads
//! exits 0, a refused one prints one `error:` line (what the case says it must name), and either ends
//! within 10 s of CPU time (its own, from `wait4`'s rusage, so a job beside it cannot make it flake;
//! `RLIMIT_CPU` ends a runaway reader) with a peak memory under 1 GiB above the plain state dict's. A
//! child still running after `WALL_KILL` is killed and fails the test instead of hanging it. The files PyTorch loads
//! load through the library bit-identical to what PyTorch's own load gave.
mod common;

use common::{bin, crate_dir, python, scratch_dir};
use scconv_tch::weights::{self, LoadOptions};
use scconv_tch::{scconv, ScConvConfig};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tch::{nn::VarStore, Device, Tensor};

#[derive(Deserialize)]
struct Manifest {
    config: ScConvConfig,
    cases: Vec<Case>,
}

#[derive(Deserialize, Clone)]
struct Case {
    name: String,
    file: String,
    select: Option<String>,
    expect: String,
    class: String,
    says: Option<String>,
    pytorch: String,
}

/// The corpus, written once per test run.
fn corpus() -> &'static (PathBuf, Manifest) {
    static CORPUS: OnceLock<(PathBuf, Manifest)> = OnceLock::new();
    CORPUS.get_or_init(|| {
        let dir = scratch_dir("hostile-checkpoints");
        let status = Command::new(python())
            .arg(crate_dir().join("parity/write_hostile_checkpoints.py"))
            .args(["--out".as_ref(), dir.as_os_str()])
            .stderr(Stdio::null())
            .status()
            .expect("cannot start parity/write_hostile_checkpoints.py");
        assert!(status.success(), "parity/write_hostile_checkpoints.py failed");
        let manifest =
            serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
        (dir, manifest)
    })
}

/// Held by the tests that read the big files, so that the CLI's runs are timed and measured without
/// this binary's other tests reading a 1.2M-deep nesting beside them on the same two cores.
static BIG_FILES: std::sync::Mutex<()> = std::sync::Mutex::new(());

const ADDRESS_SPACE: u64 = 4 << 30;
const MAX_CPU: Duration = Duration::from_secs(10);
/// The kernel's backstop: SIGXCPU a little past the bound, so the bound itself is judged from rusage.
const CPU_LIMIT_SECONDS: u64 = 12;
/// Generous: only a reader stuck without using CPU (or a machine stalled) gets here.
const WALL_KILL: Duration = Duration::from_secs(180);
const MAX_GROWTH_KIB: i64 = 1 << 20;
const LONGEST_LINE: usize = 800;

/// What one CLI run did.
struct Run {
    code: Option<i32>,
    /// The signal that ended it, if one did (SIGXCPU: past `CPU_LIMIT_SECONDS`).
    signal: Option<i32>,
    stderr: String,
    /// User plus system time, all its threads.
    cpu: Duration,
    /// Killed at `WALL_KILL`.
    hung: bool,
    peak_kib: i64,
}

/// `scconv-tch export` of the case's file, in a child limited to `ADDRESS_SPACE`, its own peak
/// resident memory read from `wait4`.
#[allow(clippy::zombie_processes)] // wait4 reaps the child (`Child::wait` cannot report its rusage)
fn export(dir: &Path, config: &Path, case: &Case) -> Run {
    let mut command = Command::new(bin());
    command.args(["export", "--scconv", config.to_str().unwrap(), "--force", "--out"]);
    command.arg(dir.join(format!("{}.module.pt", case.name))).arg("--weights").arg(dir.join(&case.file));
    if let Some(select) = &case.select {
        command.args(["--select", select]);
    }
    let stderr_path = dir.join(format!("{}.stderr", case.name));
    command.stdout(Stdio::null()).stderr(std::fs::File::create(&stderr_path).unwrap());
    common::limit_address_space(&mut command, ADDRESS_SPACE);
    common::limit(&mut command, libc::RLIMIT_CPU, CPU_LIMIT_SECONDS, CPU_LIMIT_SECONDS + 2);
    let start = Instant::now();
    let child = command.spawn().unwrap();
    let pid = child.id() as i32;
    let (mut status, mut usage) = (0, unsafe { std::mem::zeroed::<libc::rusage>() });
    let mut hung = false;
    loop {
        // SAFETY: polls our own child; `status` and `usage` are valid for writes.
        let reaped = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        assert!(reaped >= 0, "wait4 failed");
        if reaped == pid {
            break;
        }
        if start.elapsed() > WALL_KILL && !hung {
            hung = true;
            // SAFETY: our own child, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    let signal = libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status));
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let cpu = time(usage.ru_utime) + time(usage.ru_stime);
    Run { code, signal, stderr, cpu, hung, peak_kib: usage.ru_maxrss }
}

/// Why a run broke the case's promises, or `None`.
fn broken(case: &Case, run: &Run, baseline_kib: i64) -> Option<String> {
    let lines: Vec<&str> = run.stderr.trim_end().lines().collect();
    let shape = match case.expect.as_str() {
        "loads" if run.code == Some(0) => None,
        "loads" => Some("it should load".to_string()),
        _ if !matches!(run.code, Some(1 | 2)) => {
            Some(format!("exit {:?} (signal {:?}), not a refusal", run.code, run.signal))
        }
        _ if lines.len() != 1 || !lines[0].starts_with("error:") => Some(format!("{} lines", lines.len())),
        _ if lines[0].len() > LONGEST_LINE => Some(format!("an error line of {} bytes", lines[0].len())),
        _ if case.says.as_ref().is_some_and(|s| !lines[0].contains(s.as_str())) => {
            Some(format!("the error does not say {:?}", case.says.as_ref().unwrap()))
        }
        _ => None,
    };
    let growth = run.peak_kib - baseline_kib;
    let bounds = if run.hung {
        Some(format!("still running after {} s of wall-clock time: killed", WALL_KILL.as_secs()))
    } else if run.cpu > MAX_CPU || run.signal == Some(libc::SIGXCPU) {
        Some(format!("{:.1} s of CPU time (signal {:?})", run.cpu.as_secs_f64(), run.signal))
    } else if growth > MAX_GROWTH_KIB {
        Some(format!("peak memory {} MiB above the plain file's", growth >> 10))
    } else {
        None
    };
    let why: Vec<String> = shape.into_iter().chain(bounds).collect();
    (!why.is_empty()).then(|| {
        let stderr: String = run.stderr.chars().take(300).collect();
        format!("{} ({}): {} [stderr: {stderr:?}]", case.name, case.class, why.join("; "))
    })
}

#[test]
fn every_file_of_the_corpus_keeps_the_readers_promises_through_the_cli() {
    let (dir, manifest) = corpus();
    let _alone = BIG_FILES.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let config = dir.join("config.json");
    std::fs::write(&config, serde_json::to_string(&manifest.config).unwrap()).unwrap();
    let plain = manifest.cases.iter().find(|c| c.name == "plain").expect("the corpus has a plain case");
    let baseline = export(dir, &config, plain);
    assert_eq!(baseline.code, Some(0), "the plain state dict: {}", baseline.stderr);
    let failures: Vec<String> = manifest
        .cases
        .iter()
        .filter_map(|case| broken(case, &export(dir, &config, case), baseline.peak_kib))
        .collect();
    assert!(manifest.cases.len() >= 40, "the corpus has {} cases", manifest.cases.len());
    assert!(
        failures.is_empty(),
        "{} of {} cases broke a promise:\n{}",
        failures.len(),
        manifest.cases.len(),
        failures.join("\n")
    );
}

/// The tensors PyTorch's `torch.load(weights_only=True)` gave for the case (or, for the files PyTorch
/// refuses that we read, the plain state dict every file holds).
fn expected(dir: &Path, case: &Case) -> BTreeMap<String, Tensor> {
    let own = dir.join(format!("{}.expected.safetensors", case.name));
    let file = if own.exists() { own } else { dir.join("plain.expected.safetensors") };
    Tensor::read_safetensors(file).unwrap().into_iter().collect()
}

#[test]
fn every_loadable_file_loads_bit_identical_to_pytorch() {
    let (dir, manifest) = corpus();
    let _alone = BIG_FILES.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut checked = 0;
    for case in manifest.cases.iter().filter(|c| c.expect == "loads") {
        if case.pytorch == "loads" {
            assert!(dir.join(format!("{}.expected.safetensors", case.name)).exists(), "{}", case.name);
        }
        let mut vs = VarStore::new(Device::Cpu);
        let _block = scconv(vs.root(), &manifest.config).unwrap();
        let options = LoadOptions { select: case.select.clone(), strict: true };
        let report = weights::load_with(&mut vs, dir.join(&case.file), &options)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let expected = expected(dir, case);
        assert_eq!(report.loaded.len(), expected.len(), "{}", case.name);
        for (key, variable) in vs.variables() {
            let want = &expected[&key];
            assert_eq!(variable.size(), want.size(), "{}: {key}", case.name);
            let same = variable.to_kind(want.kind()).equal(want);
            assert!(same, "{}: {key} differs from what PyTorch loaded", case.name);
        }
        checked += 1;
    }
    assert!(checked >= 30, "only {checked} loadable cases");
}

/// The selection of a tensor the model cannot use (a dtype tch lacks, a quantized tensor) is
/// refused naming the key; unselected, the same tensors are skipped (the cases above).
#[test]
fn a_tensor_the_reader_cannot_read_is_refused_by_key_only_when_selected() {
    let (dir, manifest) = corpus();
    for (file, what) in [
        ("uint16_tensor.pt", "uint16"),
        ("qtensor.pt", "a quantized tensor"),
        ("sparse.pt", "a sparse tensor"),
    ] {
        let mut vs = VarStore::new(Device::Cpu);
        let _block = scconv(vs.root(), &manifest.config).unwrap();
        let options = LoadOptions { select: None, strict: true };
        let err = weights::load_with(&mut vs, dir.join(file), &options).unwrap_err().to_string();
        assert!(err.contains("unexpected keys: ") && err.contains("extra"), "{file}: {err}");
        let read = weights::read(dir.join(file)).unwrap_err().to_string();
        assert!(read.contains("tensor extra") && read.contains(what), "{file}: {read}");
    }
}
