//! PyTorch files as people save them, written now by `parity/write_checkpoints.py` and read natively:
//! `torch.save(model.state_dict())` of every reference version, a nested training checkpoint, a
//! DataParallel state dict, half / bfloat16 / double weights; and what is refused, with what it says:
//! a whole pickled model, a pickle asking for a function, a prefix that selects nothing, truncated files.
mod common;

use common::{bin, crate_dir, python, scratch_dir};
use scconv_tch::weights::{self, LoadOptions};
use scconv_tch::{scconv, ScConv, ScConvConfig, ScConvError};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use tch::{nn::VarStore, Device, Tensor};

/// The files, written once per test run.
fn files() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = scratch_dir("checkpoints");
        let status = Command::new(python())
            .arg(crate_dir().join("parity/write_checkpoints.py"))
            .args(["--out".as_ref(), dir.as_os_str()])
            .status()
            .expect("cannot start parity/write_checkpoints.py");
        assert!(status.success(), "parity/write_checkpoints.py failed");
        dir
    })
}

fn config(version: &str) -> ScConvConfig {
    let manifest: BTreeMap<String, ScConvConfig> =
        serde_json::from_str(&std::fs::read_to_string(files().join("manifest.json")).unwrap()).unwrap();
    manifest[version].clone()
}

fn block(config: &ScConvConfig) -> (VarStore, ScConv) {
    let vs = VarStore::new(Device::Cpu);
    let block = scconv(vs.root(), config).unwrap();
    (vs, block)
}

/// The block's output on the recorded input equals PyTorch's, bit for bit (same CPU kernels).
fn assert_matches_pytorch(block: &ScConv, expected: &str) {
    let recorded: HashMap<String, Tensor> =
        Tensor::read_safetensors(files().join(expected)).unwrap().into_iter().collect();
    let y = tch::no_grad(|| block.try_forward(&recorded["input"])).unwrap();
    let worst = (&y - &recorded["output"]).abs().max().double_value(&[]);
    assert_eq!(worst, 0.0, "{expected}: max |Rust - PyTorch| = {worst:e}");
}

fn load_error(config: &ScConvConfig, file: &Path, options: &LoadOptions) -> String {
    let (mut vs, _block) = block(config);
    weights::load_with(&mut vs, file, options).expect_err("must be refused").to_string()
}

#[test]
fn a_torch_save_state_dict_of_every_version_loads_and_matches_pytorch() {
    for version in ["2023-07-27", "2023-09-12", "2023-09-14", "2023-10-19"] {
        let (mut vs, block) = block(&config(version));
        weights::load(&mut vs, files().join(format!("state_dict_{version}.pt"))).unwrap();
        assert_matches_pytorch(&block, &format!("expected_{version}.safetensors"));
    }
}

#[test]
fn a_training_checkpoint_loads_its_model_part_with_select() {
    let config = config("2023-10-19");
    let file = files().join("checkpoint.pt");
    let err = load_error(&config, &file, &LoadOptions::default());
    assert!(err.contains("under the prefix `model.`") && err.contains("--select model."), "{err}");
    let (mut vs, block) = block(&config);
    let options = LoadOptions { select: Some("model.".into()), ..LoadOptions::default() };
    let report = weights::load_with(&mut vs, &file, &options).unwrap();
    assert_eq!(report.loaded.len(), 8, "{report:?}");
    assert!(report.unexpected.is_empty());
    assert_matches_pytorch(&block, "expected_checkpoint.safetensors");
    // The whole file, keys flattened: the optimizer's tensors are there as well.
    let keys: Vec<String> = weights::read(&file).unwrap().into_iter().map(|(k, _)| k).collect();
    assert!(keys.contains(&"model.SRU.gn.weight".to_string()), "{keys:?}");
    assert!(keys.iter().any(|k| k.starts_with("optimizer.state.")), "{keys:?}");
}

#[test]
fn a_dataparallel_state_dict_says_which_prefix_to_select() {
    let config = config("2023-10-19");
    let file = files().join("dataparallel.pt");
    let err = load_error(&config, &file, &LoadOptions::default());
    assert!(err.contains("under the prefix `module.`"), "{err}");
    let (mut vs, block) = block(&config);
    let options = LoadOptions { select: Some("module.".into()), strict: true };
    weights::load_with(&mut vs, &file, &options).unwrap();
    assert_matches_pytorch(&block, "expected_checkpoint.safetensors"); // saved after the same step
}

#[test]
fn unused_keys_are_reported_not_fatal_when_not_strict() {
    let config = config("2023-10-19");
    let (mut vs, block) = block(&config);
    let file = files().join("checkpoint.pt");
    let options = LoadOptions { select: None, strict: false };
    let err = weights::load_with(&mut vs, &file, &options).unwrap_err().to_string();
    assert!(err.contains("missing keys"), "missing keys stay fatal: {err}");
    // A state dict with extra entries: select the model and keep the optimizer out of it by strictness.
    let options = LoadOptions { select: Some("model.".into()), strict: false };
    let report = weights::load_with(&mut vs, &file, &options).unwrap();
    assert!(report.unexpected.is_empty() && report.loaded.len() == 8);
    let everything = LoadOptions { select: Some("".into()), strict: false };
    let err = weights::load_with(&mut vs, &file, &everything).unwrap_err().to_string();
    assert!(err.contains("missing keys"), "{err}");
    assert_matches_pytorch(&block, "expected_checkpoint.safetensors");

    // A state dict with two keys the block has no variable for (a head, an EMA copy): loaded without
    // them when not strict, and both reported; refused naming them when strict.
    let mut tensors = weights::read(files().join("state_dict_2023-10-19.pt")).unwrap();
    tensors.push(("head.weight".into(), Tensor::ones([10, 32], (tch::Kind::Float, Device::Cpu))));
    tensors.push(("ema.SRU.gn.weight".into(), Tensor::ones([32], (tch::Kind::Float, Device::Cpu))));
    let extra = scratch_dir("checkpoints-extra").join("extra_keys.safetensors");
    Tensor::write_safetensors(&tensors, &extra).unwrap();
    let (mut vs, fresh) = self::block(&config);
    let report = weights::load_with(&mut vs, &extra, &LoadOptions { select: None, strict: false }).unwrap();
    assert_eq!(report.unexpected, ["ema.SRU.gn.weight", "head.weight"], "{report:?}");
    assert_eq!(report.loaded.len(), 8, "{report:?}");
    assert_matches_pytorch(&fresh, "expected_2023-10-19.safetensors");
    let strict = load_error(&config, &extra, &LoadOptions { select: None, strict: true });
    assert!(strict.contains("unexpected keys") && strict.contains("head.weight"), "{strict}");
}

#[test]
fn half_bfloat16_and_double_weights_convert_as_copy_does() {
    for name in ["half", "bfloat16", "double"] {
        let (mut vs, block) = block(&config("2023-10-19"));
        weights::load(&mut vs, files().join(format!("{name}.pt"))).unwrap();
        assert_matches_pytorch(&block, &format!("expected_{name}.safetensors"));
    }
}

#[test]
fn a_whole_pickled_model_and_a_foreign_global_are_refused_by_name() {
    let config = config("2023-10-19");
    let err = load_error(&config, &files().join("whole_model.pt"), &LoadOptions::default());
    assert!(err.contains("pickled Python object of class `reference_scconv_2023_10_19.ScConv`"), "{err}");
    assert!(!err.contains("is cut at"), "a refused global is not a cut pickle: {err}");
    assert!(err.contains(".state_dict(), \"state_dict.pt\")"), "{err}");
    let err = load_error(&config, &files().join("foreign_global.pt"), &LoadOptions::default());
    assert!(err.contains("asks for `posix.system`") && err.contains("refused"), "{err}");
}

#[test]
fn a_prefix_that_selects_nothing_lists_the_keys_there_are() {
    let options = LoadOptions { select: Some("backbone.".into()), strict: true };
    let err = load_error(&config("2023-10-19"), &files().join("checkpoint.pt"), &options);
    assert!(err.contains("no key starts with `backbone.`"), "{err}");
    assert!(err.contains("model.") && err.contains("optimizer."), "{err}");
}

#[test]
fn truncated_archives_are_errors_at_every_cut() {
    let whole = std::fs::read(files().join("state_dict_2023-07-27.pt")).unwrap();
    let dir = scratch_dir("checkpoints-truncated");
    let cuts: Vec<usize> = (0..64).map(|i| i * whole.len() / 64).collect();
    for cut in cuts {
        let file = dir.join(format!("cut_{cut}.pt"));
        std::fs::write(&file, &whole[..cut]).unwrap();
        let result = weights::read(&file);
        assert!(matches!(result, Err(ScConvError::WeightsFile { .. })), "cut at {cut}: {result:?}");
    }
}

#[test]
fn the_cli_exports_from_a_checkpoint_with_select_and_explains_a_prefix() {
    let dir = scratch_dir("checkpoints-cli");
    let cfg = dir.join("config.json");
    std::fs::write(&cfg, serde_json::to_string(&config("2023-10-19")).unwrap()).unwrap();
    let export = |extra: &[&str]| {
        Command::new(bin())
            .args(["export", "--scconv", cfg.to_str().unwrap(), "--out", dir.join("b.pt").to_str().unwrap()])
            .args(["--force", "--weights"])
            .args(extra)
            .output()
            .unwrap()
    };
    let checkpoint = files().join("checkpoint.pt");
    let ok = export(&[checkpoint.to_str().unwrap(), "--select", "model."]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let dataparallel = files().join("dataparallel.pt");
    let refused = export(&[dataparallel.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--select module.") && stderr.lines().count() == 1, "{stderr}");
    assert!(stderr.len() < 1200, "the message stays short: {} characters: {stderr}", stderr.len());
}

/// Through the CLI: each version's `torch.save(model.state_dict())` exported to TorchScript, which
/// then gives PyTorch's output on the recorded input.
#[test]
fn the_cli_exports_every_version_from_its_torch_save_state_dict() {
    let dir = scratch_dir("checkpoints-cli-versions");
    for version in ["2023-07-27", "2023-09-12", "2023-09-14", "2023-10-19"] {
        let cfg = dir.join(format!("{version}.json"));
        std::fs::write(&cfg, serde_json::to_string(&config(version)).unwrap()).unwrap();
        let module = dir.join(format!("{version}.pt"));
        let state_dict = files().join(format!("state_dict_{version}.pt"));
        let output = Command::new(bin())
            .args(["export", "--scconv", cfg.to_str().unwrap(), "--weights", state_dict.to_str().unwrap()])
            .args(["--out", module.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(output.status.success(), "{version}: {}", String::from_utf8_lossy(&output.stderr));
        let recorded: HashMap<String, Tensor> =
            Tensor::read_safetensors(files().join(format!("expected_{version}.safetensors")))
                .unwrap()
                .into_iter()
                .collect();
        let exported = tch::CModule::load(&module).unwrap();
        let y = tch::no_grad(|| exported.forward_ts(&[&recorded["input"]])).unwrap();
        let worst = (&y - &recorded["output"]).abs().max().double_value(&[]);
        assert_eq!(worst, 0.0, "{version}: the exported module differs from PyTorch by {worst:e}");
    }
}

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A file whose unrelated tensor declares 4 GiB of data (a sparse file: no disk used): its keys are
/// checked against the model first, and only the model's tensors are read.
#[test]
fn only_the_tensors_the_model_takes_are_read() {
    let dir = scratch_dir("checkpoints-sparse");
    let source = scconv_tch::harness::parity::committed_fixtures().join("group_num_4.safetensors");
    let tensors: BTreeMap<String, Tensor> = weights::read(&source).unwrap().into_iter().collect();
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (key, t) in &tensors {
        let bytes: Vec<u8> =
            Vec::<f32>::try_from(t.flatten(0, -1)).unwrap().iter().flat_map(|v| v.to_le_bytes()).collect();
        header.insert(key.clone(), serde_json::json!({"dtype": "F32", "shape": t.size(), "data_offsets": [data.len(), data.len() + bytes.len()]}));
        data.extend(bytes);
    }
    let junk = 4u64 << 30;
    header.insert("unrelated.huge".into(), serde_json::json!({"dtype": "U8", "shape": [junk], "data_offsets": [data.len() as u64, data.len() as u64 + junk]}));
    let header = serde_json::to_vec(&header).unwrap();
    let file = dir.join("sparse.safetensors");
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(&header);
    bytes.extend(&data);
    std::fs::write(&file, &bytes).unwrap();
    std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(bytes.len() as u64 + junk).unwrap();

    let config = ScConvConfig { group_num: 4, ..ScConvConfig::new(32) };
    let err = load_error(&config, &file, &LoadOptions::default());
    assert!(err.contains("unexpected keys: unrelated.huge"), "{err}");
    let before = peak_rss_kib();
    let (mut vs, _block) = block(&config);
    let report = weights::load_with(&mut vs, &file, &LoadOptions { select: None, strict: false }).unwrap();
    assert_eq!((report.loaded.len(), report.unexpected.clone()), (8, vec!["unrelated.huge".to_string()]));
    let grown_mib = (peak_rss_kib().saturating_sub(before)) / 1024;
    assert!(grown_mib < 512, "peak memory grew by {grown_mib} MiB: the unrelated tensor was read");
}

/// Every entry's CRC-32 is checked as it is read (issue 29; PyTorch 2.11's `torch.load` checks none): a
/// byte flipped in a storage is an error naming the entry and the tensors on it, one flipped in the
/// pickle names data.pkl; an archive written with `set_crc32_options(False)` (every stored CRC 0) loads.
#[test]
fn a_corrupt_archive_is_refused_by_its_crc_and_one_without_crcs_loads() {
    let config = config("2023-10-19");
    let err = load_error(&config, &files().join("corrupt_storage.pt"), &LoadOptions::default());
    assert!(err.contains("do not match the archive's CRC-32") && err.contains("data/0"), "{err}");
    assert!(err.contains("tensors on it: "), "{err}");
    let err = load_error(&config, &files().join("corrupt_pickle.pt"), &LoadOptions::default());
    assert!(err.contains("do not match the archive's CRC-32") && err.contains("data.pkl"), "{err}");

    let no_crc = files().join("no_crc32.pt");
    let mut archive = zip::ZipArchive::new(std::fs::File::open(&no_crc).unwrap()).unwrap();
    for i in 0..archive.len() {
        let entry = archive.by_index(i).unwrap();
        assert_eq!(entry.crc32(), 0, "{:?}: written without a CRC", entry.name());
    }
    let (mut vs, block) = block(&config);
    weights::load(&mut vs, &no_crc).unwrap();
    assert_matches_pytorch(&block, "expected_checkpoint.safetensors");
}
