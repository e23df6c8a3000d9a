//! Property-based fuzzing of the readers a user feeds files to: safetensors weights, IDX images, and
//! the ScConv / ResNet config JSON. Inputs are valid files mutated (truncated, bytes overwritten,
//! garbage spliced in, header fields rewritten) or generated from their grammar; the property is that
//! reading returns `Ok` or `Err` and never panics, and that whatever is accepted can be used (loaded into
//! a model, run) without a panic either.
//!
//! `make test` runs `SCCONV_FUZZ_CASES` cases per reader (default 200). A long run:
//! `SCCONV_FUZZ_CASES=20000 cargo test --release --test fuzz_readers`. Failing inputs proptest finds
//! are kept in `tests/fuzz_readers.proptest-regressions` and replayed first on every run.
mod common;

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use scconv_tch::harness::data::idx;
use scconv_tch::models::ResNetConfig;
use scconv_tch::{scconv, weights, ScConvConfig};
use std::path::PathBuf;
use tch::{nn::VarStore, Device, Kind, Tensor};

/// Where proptest keeps the failing inputs it finds (relative to the crate root, the tests' folder).
const REGRESSIONS: &str = "tests/fuzz_readers.proptest-regressions";

fn config() -> ProptestConfig {
    let cases = std::env::var("SCCONV_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(REGRESSIONS))),
        ..ProptestConfig::default()
    }
}

/// One edit of a byte string.
#[derive(Debug, Clone)]
enum Edit {
    Truncate(usize),
    Overwrite(usize, u8),
    Insert(usize, Vec<u8>),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let edit = prop_oneof![
        any::<usize>().prop_map(Edit::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Overwrite(i, b)),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..16)).prop_map(|(i, b)| Edit::Insert(i, b)),
    ];
    proptest::collection::vec(edit, 0..6)
}

fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for edit in edits {
        let len = bytes.len().max(1);
        match edit {
            Edit::Truncate(i) => bytes.truncate(i % len),
            Edit::Overwrite(i, b) if !bytes.is_empty() => bytes[i % len] = *b,
            Edit::Overwrite(..) => {}
            Edit::Insert(i, b) => {
                let at = (i % len).min(bytes.len());
                bytes.splice(at..at, b.iter().copied());
            }
        }
    }
    bytes
}

fn scratch_file(name: &str) -> PathBuf {
    let dir = common::crate_dir().join("target/test-scratch/fuzz");
    std::fs::create_dir_all(&dir).expect("cannot create the fuzz scratch folder");
    // Properties run on parallel threads: one file per thread.
    dir.join(
        format!("{}-{:?}-{name}", std::process::id(), std::thread::current().id()).replace(['(', ')'], ""),
    )
}

/// A small valid safetensors file (the group_num_4 fixture: 8 tensors, 8 KB).
fn safetensors_seed() -> Vec<u8> {
    std::fs::read(common::crate_dir().join("weights/parity/group_num_4.safetensors")).unwrap()
}

/// A safetensors file from a generated header: any dtype name, shape and offsets, with a data section
/// that may or may not be long enough.
fn generated_safetensors() -> impl Strategy<Value = Vec<u8>> {
    let dtype = prop_oneof![
        Just("F32"),
        Just("F16"),
        Just("BF16"),
        Just("F64"),
        Just("I64"),
        Just("U8"),
        Just("BOOL"),
        Just("F8_E4M3"),
        Just("XYZ")
    ];
    let dim = prop_oneof![0u64..5, Just(u32::MAX as u64), Just(u64::MAX / 2), Just(1 << 40)];
    let entry = (dtype, proptest::collection::vec(dim, 0..5), any::<u16>(), any::<u16>());
    (proptest::collection::vec(entry, 0..4), 0usize..256).prop_map(|(entries, data_len)| {
        let mut header = serde_json::Map::new();
        for (i, (dtype, shape, begin, end)) in entries.into_iter().enumerate() {
            let (begin, end) = (begin as usize % 300, end as usize % 300);
            header.insert(
                format!("t{i}"),
                serde_json::json!({ "dtype": dtype, "shape": shape, "data_offsets": [begin, end] }),
            );
        }
        let header = serde_json::to_vec(&header).unwrap();
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&header);
        bytes.extend(std::iter::repeat_n(0x3f, data_len));
        bytes
    })
}

/// Reading must not panic; what is read must load into a store (or be refused) without a panic.
fn check_weights(bytes: &[u8]) {
    let path = scratch_file("w.safetensors");
    std::fs::write(&path, bytes).unwrap();
    if let Ok(tensors) = weights::read(path) {
        let mut vs = VarStore::new(Device::Cpu);
        let _model = scconv(vs.root(), &ScConvConfig { group_num: 4, ..ScConvConfig::new(32) }).unwrap();
        let _ = weights::load_tensors(&mut vs, tensors);
    }
}

/// A small valid `torch.save` archive (the group_num_4 fixture's state dict as a dict of tensors).
fn torch_save_seed() -> Vec<u8> {
    std::fs::read(common::crate_dir().join("weights/parity/group_num_4.pt")).unwrap()
}

/// The seed archive with its `data.pkl` replaced by `pickle` (the storages kept).
fn with_pickle(pickle: &[u8]) -> Vec<u8> {
    archive(pickle, false)
}

/// As `with_pickle`, with zip64 records (`zip64`) or without.
fn archive(pickle: &[u8], zip64: bool) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut source = zip::ZipArchive::new(std::io::Cursor::new(torch_save_seed())).unwrap();
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let stored = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(zip64);
    for i in 0..source.len() {
        let mut entry = source.by_index(i).unwrap();
        let name = entry.name().unwrap().to_string();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).unwrap();
        out.start_file(name.as_str(), stored).unwrap();
        out.write_all(if name.ends_with("data.pkl") { pickle } else { &bytes }).unwrap();
    }
    out.finish().unwrap().into_inner()
}

fn seed_pickle() -> Vec<u8> {
    use std::io::Read;
    let mut source = zip::ZipArchive::new(std::io::Cursor::new(torch_save_seed())).unwrap();
    let name = source.file_names().map(Result::unwrap).find(|n| n.ends_with("data.pkl")).unwrap().to_string();
    let mut bytes = Vec::new();
    source.by_name(&name).unwrap().read_to_end(&mut bytes).unwrap();
    bytes
}

/// As `check_weights`, for a `torch.save` file read by the crate's own reader.
fn check_torch_save(bytes: &[u8]) {
    let path = scratch_file("w.pt");
    std::fs::write(&path, bytes).unwrap();
    if let Ok(tensors) = weights::read(path) {
        let mut vs = VarStore::new(Device::Cpu);
        let _model = scconv(vs.root(), &ScConvConfig { group_num: 4, ..ScConvConfig::new(32) }).unwrap();
        let _ = weights::load_tensors(&mut vs, tensors);
    }
}

/// One pickle opcode with arguments drawn at random: every opcode of protocols 0-5, memo keys and
/// lengths small enough to hit what was stored (and some that lie), nesting and marks.
fn opcode() -> impl Strategy<Value = Vec<u8>> {
    let arg = |op: u8, n: usize| {
        proptest::collection::vec(any::<u8>(), n).prop_map(move |a| [vec![op], a].concat())
    };
    let line =
        |op: u8| "[a-z0-9._]{0,12}".prop_map(move |l| [vec![op], l.into_bytes(), vec![b'\n']].concat());
    let no_arg = proptest::sample::select(
        b"()]}.0122Naelstud\x85\x86\x87\x88\x89\x8f\x90\x91\x93\x94RbQ\x81\x92".to_vec(),
    )
    .prop_map(|op| vec![op]);
    prop_oneof![
        4 => no_arg,
        1 => (0u8..8).prop_map(|k| vec![b'q', k]),
        1 => (0u8..8).prop_map(|k| vec![b'h', k]),
        1 => arg(b'K', 1),
        1 => arg(b'J', 4),
        1 => arg(b'G', 8),
        1 => (0u8..12).prop_flat_map(move |n| arg(0x8a, usize::from(n)).prop_map(move |a| [vec![0x8a, n], a[1..].to_vec()].concat())),
        1 => "[a-zA-Z._]{0,10}".prop_map(|s| [vec![0x8c, s.len() as u8], s.into_bytes()].concat()),
        1 => arg(b'X', 4),
        1 => line(b'I'),
        1 => line(b'p'),
        1 => line(b'g'),
        1 => proptest::sample::select(vec![
            &b"ccollections\nOrderedDict\n"[..],
            b"ctorch._utils\n_rebuild_tensor_v2\n",
            b"ctorch._utils\n_rebuild_tensor_v3\n",
            b"ctorch\nFloatStorage\n",
            b"ctorch.storage\nUntypedStorage\n",
            b"ctorch\nuint16\n",
            b"ctorch\nSize\n",
            b"c__builtin__\nset\n",
            b"cposix\nsystem\n",
        ])
        .prop_map(<[u8]>::to_vec),
    ]
}

/// A pickle generated opcode by opcode: a nesting prefix (up to thousands of opens), random
/// opcodes, then STOP.
fn generated_pickle() -> impl Strategy<Value = Vec<u8>> {
    let nesting = (proptest::sample::select(b"](}".to_vec()), 0usize..5000).prop_map(|(op, n)| vec![op; n]);
    (nesting, proptest::collection::vec(opcode(), 0..64))
        .prop_map(|(open, ops)| [&b"\x80\x02"[..], &open, &ops.concat(), b"."].concat())
}

/// A zip archive (no comment) with its end record moved into zip64 end records, as a writer does
/// past 65,535 entries or 4 GiB: the zip64 end of central directory, its locator, and an end record
/// whose counts and offsets say "see zip64".
fn with_zip64_end(mut bytes: Vec<u8>) -> Vec<u8> {
    let end = bytes.split_off(bytes.len() - 22);
    let le16 = |at: usize| u64::from(u16::from_le_bytes([end[at], end[at + 1]]));
    let le32 = |at: usize| u64::from(u32::from_le_bytes(end[at..at + 4].try_into().unwrap()));
    let (entries, cd_size, cd_offset) = (le16(10), le32(12), le32(16));
    let zip64_end = bytes.len() as u64;
    bytes.extend(0x0606_4b50u32.to_le_bytes());
    bytes.extend(44u64.to_le_bytes());
    bytes.extend([45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    for field in [entries, entries, cd_size, cd_offset] {
        bytes.extend(field.to_le_bytes());
    }
    bytes.extend(0x0706_4b50u32.to_le_bytes());
    bytes.extend(0u32.to_le_bytes());
    bytes.extend(zip64_end.to_le_bytes());
    bytes.extend(1u32.to_le_bytes());
    bytes.extend(0x0605_4b50u32.to_le_bytes());
    bytes.extend([0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0]);
    bytes
}

/// The seed archive with zip64 records, bytes of its last 120 (the end records: entry counts, sizes,
/// offsets, the locator) overwritten.
fn mutated_zip64() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec((0usize..120, any::<u8>()), 1..8).prop_map(|edits| {
        let mut bytes = with_zip64_end(archive(&seed_pickle(), true));
        let len = bytes.len();
        for (from_end, b) in edits {
            bytes[len - 1 - from_end] = b;
        }
        bytes
    })
}

/// A valid IDX image file (3 images of 4x5) and a label file.
fn idx_seed() -> Vec<u8> {
    let mut bytes = vec![0, 0, 8, 3, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0, 5];
    bytes.extend((0..60).map(|i| i as u8));
    bytes
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// Parsing must not panic; an accepted image file must make a readable split with matching labels.
fn check_idx(bytes: &[u8], gzipped: bool) {
    let dir = scratch_file("idx");
    std::fs::create_dir_all(&dir).unwrap();
    let images = if gzipped { gzip(bytes) } else { bytes.to_vec() };
    std::fs::write(dir.join("t10k-images-idx3-ubyte"), images).unwrap();
    let _ = idx::parse(bytes);
    if let Ok(array) = idx::read(&dir.join("t10k-images-idx3-ubyte")) {
        let n = array.dims.first().copied().unwrap_or(0).min(1 << 16);
        let mut labels = vec![0, 0, 8, 1];
        labels.extend((n as u32).to_be_bytes());
        labels.extend(std::iter::repeat_n(1u8, n));
        std::fs::write(dir.join("t10k-labels-idx1-ubyte"), labels).unwrap();
        let split = scconv_tch::harness::data::read_idx_split(&dir);
        // Accepted images of the split's shape (n x h x w, n >= 1) with matching labels must read.
        if array.dims.len() == 3 && (1..=1 << 16).contains(&array.dims[0]) {
            assert!(split.is_ok(), "{:?}: {:?}", array.dims, split.err());
        }
    }
}

/// Config JSON from the grammar: the reference's keys (and a stray one) with values of any JSON type,
/// including huge and negative numbers.
fn config_json() -> impl Strategy<Value = String> {
    let number = prop_oneof![-3i64..70, Just(1i64 << 40), Just(i64::MAX), Just(i64::MIN), Just(1 << 20),]
        .prop_map(|v| serde_json::json!(v));
    let value = prop_oneof![
        number,
        (-2.0f64..2.0).prop_map(|v| serde_json::json!(v)),
        Just(serde_json::json!("64")),
        Just(serde_json::json!(null)),
        Just(serde_json::json!([1, 2])),
        Just(serde_json::json!(1e300)),
    ];
    let key = prop_oneof![
        Just("op_channel"),
        Just("group_num"),
        Just("gate_treshold"),
        Just("alpha"),
        Just("squeeze_radio"),
        Just("group_size"),
        Just("group_kernel_size"),
        Just("squeeze_ratio"),
    ];
    proptest::collection::vec((key, value), 0..8).prop_map(|pairs| {
        let map: serde_json::Map<String, serde_json::Value> =
            pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        serde_json::Value::Object(map).to_string()
    })
}

/// Parsing and validation must not panic; an accepted config small enough to try must build and run.
fn check_config(text: &str) {
    let Ok(config) = serde_json::from_str::<ScConvConfig>(text) else { return };
    if config.validate().is_err() || config.op_channel > 256 || config.group_kernel_size > 9 {
        return;
    }
    let vs = VarStore::new(Device::Cpu);
    let model = scconv(vs.root(), &config).expect("a validated config builds");
    let x = Tensor::randn([1, config.op_channel, 4, 4], (Kind::Float, Device::Cpu));
    // A config `validate()` accepted runs: an error here is a gap in `validate()`.
    let run = tch::no_grad(|| model.try_forward(&x));
    assert!(run.is_ok(), "{config:?} validated but does not run: {:?}", run.err());
}

fn resnet_json() -> impl Strategy<Value = String> {
    let list = proptest::collection::vec(prop_oneof![-1i64..4, Just(1 << 40)], 0..5);
    let widths = proptest::collection::vec(prop_oneof![-1i64..80, Just(1 << 40)], 0..5);
    (any::<bool>(), list, widths, -1i64..12, -1i64..4, any::<bool>(), any::<bool>()).prop_map(
        |(basic, layers, widths, classes, channels, sc, small)| {
            serde_json::json!({
                "block": if basic { "basic" } else { "bottleneck" },
                "layers": layers, "widths": widths, "num_classes": classes,
                "in_channels": channels, "sc": sc, "small_input": small,
            })
            .to_string()
        },
    )
}

fn check_resnet(text: &str) {
    let Ok(config) = serde_json::from_str::<ResNetConfig>(text) else { return };
    if config.validate().is_err()
        || config.widths.iter().any(|&w| w > 256)
        || config.layers.iter().sum::<i64>() > 8
    {
        return;
    }
    let vs = VarStore::new(Device::Cpu);
    let model = scconv_tch::models::resnet(vs.root(), &config).expect("a validated config builds");
    // An input that stays even down to the last stage (a stride-2 ScConv's pool needs even sizes, a
    // documented input error): 4 pixels there, times 2 per stage, times 4 for the stem and max pool.
    let stem = if config.small_input { 0 } else { 2 };
    let side = 4i64 << (config.widths.len() + stem);
    let x = Tensor::randn([1, config.in_channels, side, side], (Kind::Float, Device::Cpu));
    let run = tch::no_grad(|| model.try_forward(&x));
    assert!(run.is_ok(), "{config:?} validated but does not run on {side}x{side}: {:?}", run.err());
}

/// `validate()` accepting a config means the block builds and runs: 400 configs drawn (fixed seed) from
/// small values of every setting, every version and fuse, so that many validate (the JSON grammar above
/// rarely produces a valid one); each accepted one runs on a 1 x C x 5 x 5 input, and at least 100 do.
#[test]
fn every_config_validate_accepts_builds_and_runs() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut pick = |n: usize| {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) as usize % n
    };
    let mut accepted = 0;
    for _ in 0..400 {
        let variant = scconv_tch::Variant::ALL[pick(4)];
        let config = ScConvConfig {
            op_channel: [2, 4, 6, 8, 12, 16, 24, 32, 48, 64][pick(10)],
            group_num: [1, 2, 3, 4, 8, 16][pick(6)],
            alpha: [0.1, 0.25, 0.5, 0.75, 0.9][pick(5)],
            squeeze_radio: [1, 2, 3, 4][pick(4)],
            group_size: [1, 2, 4][pick(3)],
            group_kernel_size: [1, 3, 5][pick(3)],
            fuse: [scconv_tch::Fuse::Global, scconv_tch::Fuse::Paper][pick(2)],
            torch_gn: variant != scconv_tch::Variant::V20230727 && pick(2) == 1,
            ..ScConvConfig::for_variant(2, variant)
        };
        if config.validate().is_err() {
            continue;
        }
        accepted += 1;
        let vs = VarStore::new(Device::Cpu);
        let model = scconv(vs.root(), &config).expect("a validated config builds");
        let x = Tensor::randn([1, config.op_channel, 5, 5], (Kind::Float, Device::Cpu));
        let run = tch::no_grad(|| model.try_forward(&x));
        assert!(run.is_ok(), "{config:?} validated but does not run: {:?}", run.err());
    }
    println!("{accepted} of 400 drawn configs validated, each built and ran");
    assert!(accepted >= 100, "only {accepted} of 400 drawn configs validated");
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn mutated_safetensors_never_panic(edits in edits()) {
        check_weights(&apply(safetensors_seed(), &edits));
    }

    #[test]
    fn generated_safetensors_headers_never_panic(bytes in generated_safetensors()) {
        check_weights(&bytes);
    }

    #[test]
    fn mutated_torch_save_archives_never_panic(edits in edits()) {
        check_torch_save(&apply(torch_save_seed(), &edits));
    }

    #[test]
    fn mutated_pickles_in_a_valid_archive_never_panic(edits in edits()) {
        check_torch_save(&with_pickle(&apply(seed_pickle(), &edits)));
    }

    #[test]
    fn generated_pickles_never_panic(pickle in generated_pickle()) {
        check_torch_save(&with_pickle(&pickle));
    }

    #[test]
    fn mutated_zip64_end_records_never_panic(bytes in mutated_zip64()) {
        check_torch_save(&bytes);
    }

    #[test]
    fn mutated_idx_files_never_panic(edits in edits(), gzipped in any::<bool>()) {
        check_idx(&apply(idx_seed(), &edits), gzipped);
    }

    #[test]
    fn idx_headers_with_any_sizes_never_panic(rank in 0u8..6, sizes in proptest::collection::vec(any::<u32>(), 0..6), data in 0usize..64) {
        let mut bytes = vec![0, 0, 8, rank];
        for s in sizes { bytes.extend(s.to_be_bytes()); }
        bytes.extend(std::iter::repeat_n(7u8, data));
        check_idx(&bytes, false);
    }

    #[test]
    fn scconv_config_json_never_panics(text in config_json()) {
        check_config(&text);
    }

    #[test]
    fn resnet_config_json_never_panics(text in resnet_json()) {
        check_resnet(&text);
    }
}

/// The crashers found so far, kept as plain tests.
#[test]
fn found_idx_sizes_whose_product_overflows() {
    // rank 3 with the sizes read from the data bytes: 0x07070707^3 overflows usize.
    let mut bytes = vec![0, 0, 8, 3];
    bytes.extend(std::iter::repeat_n(7u8, 12));
    let err = idx::parse(&bytes).unwrap_err();
    assert!(err.contains("overflow"), "{err}");
}

/// The zip64 fuzzer's seed has what it mutates (zip64 end records) and reads unmutated.
#[test]
fn the_zip64_seed_has_zip64_end_records() {
    let bytes = with_zip64_end(archive(&seed_pickle(), true));
    let has = |magic: [u8; 4]| bytes.windows(4).any(|w| w == magic);
    assert!(has([0x50, 0x4b, 0x06, 0x06]) && has([0x50, 0x4b, 0x06, 0x07]), "no zip64 end records");
    let path = scratch_file("zip64.pt");
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(weights::read(&path).unwrap().len(), 8);
}
