//! The Rust side of `make bench-peers` (`scripts/bench_peers.py`): builds and loads the networks once,
//! then times or runs them on request, so that the peers (in the driver's Python process) and every
//! mode of this crate are timed in interleaved rounds, each in a warm, long-running process, as a
//! serving process would run them.
//!
//! One request per line on stdin, one JSON answer per line on stdout:
//! - `load NAME CONFIG.json WEIGHTS.safetensors|-` builds the network of a training record (or a
//!   `ResNetConfig` JSON) with those weights (`-`: the random ones the driver exported instead);
//! - `compile NAME N C H W [PASSES]`: the inference form for inputs of that size, with every pass or
//!   the comma-separated ones given, in order (`fold-batchnorm,fuse-epilogues,tile-batch,pool-first,
//!   prepack,own-primitives,channels-last,fuse-squeezes,fuse-gwc-pwc1`, `Pass`'s names);
//! - `compile-bf16 NAME N C H W [PRECISION [PASSES]]`: the bf16 inference form (`Precision::Bf16`, or
//!   the precision named, `bf16-onednn` or `bf16-emulated`; every pass, or the ones given as for
//!   `compile`, `bf16` among them); the answer names its arithmetic (native, or emulated and why);
//! - `run NAME MODE INPUT.safetensors OUTPUT.safetensors`: the logits of tensor `input`, as `logits`;
//! - `time NAME MODE N C H W WARMUP RUNS`: milliseconds of each timed forward on a random input;
//! - `profile NAME MODE N C H W WARMUP RUNS`: as `time`, then milliseconds per forward in each section
//!   (`bench --profile`'s sections: the 3x3 convolutions, the SRU, the CRU's parts, ...) over RUNS more
//!   forwards, timed section by section;
//! - `allocator`: which malloc libtorch's tensors come from in this process, and the oneDNN version of
//!   the forms' own convolution primitives (null: libtorch's calls);
//! - `decisions NAME INPUT.safetensors [MODE]`: an inference form's (MODE `inference`, the default, or
//!   `inference-bf16`) differing gate decisions by layer.
//!
//! MODE is `reference`, `fast`, `inference` or `inference-bf16`.
//!
//! ```sh
//! cargo run --release --example bench_worker
//! ```
use scconv_tch::harness::infer::{differences_on, Decider};
use scconv_tch::inference::{InferenceResNet, Precision};
use scconv_tch::models::{resnet, ResNet, ResNetConfig};
use scconv_tch::{weights, Execution};
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::time::Instant;
use tch::nn::{ModuleT, VarStore};
use tch::{Device, Kind, Tensor};

// The CLI's allocator (mimalloc, overriding malloc for libtorch too), so the benchmark times what the
// CLI runs.
#[path = "../src/commands/allocator.rs"]
mod allocator;

type Error = Box<dyn std::error::Error>;

/// A network in its four modes: `exact` switches between reference and fast; the forms borrow a
/// second copy (leaked: the worker lives as long as the benchmark).
struct Network {
    exact: ResNet,
    _vs: VarStore,
    shared: &'static ResNet,
    form: Option<InferenceResNet<'static>>,
    form_bf16: Option<InferenceResNet<'static>>,
}

fn build(config_path: &str, weights_path: &str) -> Result<(VarStore, ResNet), Error> {
    let text = std::fs::read_to_string(config_path)?;
    let value: serde_json::Value = serde_json::from_str(&text)?;
    let config: ResNetConfig = serde_json::from_value(value.get("config").cloned().unwrap_or(value))?;
    tch::manual_seed(0);
    let mut vs = VarStore::new(Device::Cpu);
    let model = resnet(vs.root(), &config)?;
    if weights_path != "-" {
        weights::load(&mut vs, weights_path)?;
    }
    Ok((vs, model))
}

impl Network {
    fn load(config: &str, weights: &str) -> Result<Network, Error> {
        let (vs, exact) = build(config, weights)?;
        let (shared_vs, shared) = build(config, weights)?;
        Box::leak(Box::new(shared_vs));
        Ok(Network { exact, _vs: vs, shared: Box::leak(Box::new(shared)), form: None, form_bf16: None })
    }

    fn form(&self, mode: &str) -> Result<&InferenceResNet<'static>, Error> {
        let form = match mode {
            "inference" => self.form.as_ref(),
            "inference-bf16" => self.form_bf16.as_ref(),
            other => return Err(format!("{other} is not an inference form").into()),
        };
        form.ok_or_else(|| format!("compile the {mode} form first").into())
    }

    fn forward(&mut self, mode: &str, x: &Tensor) -> Result<Tensor, Error> {
        Ok(match mode {
            "reference" | "fast" => {
                let execution = if mode == "fast" { Execution::Fast } else { Execution::Reference };
                if self.exact.config().sc {
                    self.exact.set_scconv_execution(execution)?;
                }
                tch::no_grad(|| self.exact.forward_t(x, false))
            }
            "inference" | "inference-bf16" => self.form(mode)?.try_forward(x)?,
            other => return Err(format!("unknown mode {other}").into()),
        })
    }
}

fn size(words: &[&str]) -> Result<[i64; 4], Error> {
    let v: Vec<i64> = words.iter().map(|w| w.parse()).collect::<Result<_, _>>()?;
    Ok(v.try_into().map_err(|_| "four sizes")?)
}

/// The tensor `input` of a safetensors file.
fn read_input(path: &str) -> Result<Tensor, Error> {
    let tensors = Tensor::read_safetensors(path)?;
    Ok(tensors.into_iter().find(|(k, _)| k == "input").ok_or("no `input`")?.1)
}

/// The inference form of `precision` with the comma-separated passes of `list`, in order.
fn form_with_passes<'a>(
    model: &'a ResNet,
    precision: Precision,
    size: [i64; 4],
    list: &str,
) -> Result<InferenceResNet<'a>, Error> {
    let mut form = InferenceResNet::with_precision(model, precision)?;
    for pass in list.split(',').filter(|p| !p.is_empty()) {
        form.apply(serde_json::from_value(serde_json::json!(pass))?, size)?;
    }
    Ok(form)
}

/// Milliseconds of each of `runs` forwards of `x`, after `warmup` untimed ones.
fn time_forwards(
    n: &mut Network,
    mode: &str,
    x: &Tensor,
    warmup: usize,
    runs: usize,
) -> Result<Vec<f64>, Error> {
    for _ in 0..warmup {
        drop(n.forward(mode, x)?);
    }
    let mut ms = Vec::new();
    for _ in 0..runs {
        let start = Instant::now();
        drop(n.forward(mode, x)?);
        ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    Ok(ms)
}

fn network<'a>(networks: &'a mut HashMap<String, Network>, name: &str) -> Result<&'a mut Network, Error> {
    networks.get_mut(name).ok_or_else(|| format!("no network {name}").into())
}

fn handle(networks: &mut HashMap<String, Network>, line: &str) -> Result<serde_json::Value, Error> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["allocator"] => Ok(serde_json::json!({"allocator": allocator::describe(),
            "own_onednn": scconv_tch::inference::own_onednn_version()})),
        ["load", name, config, weights] => {
            networks.insert(name.to_string(), Network::load(config, weights)?);
            Ok(serde_json::json!({"ok": true}))
        }
        ["compile", name, n_, c, h, w, passes @ ..] => {
            let n = network(networks, name)?;
            let size = size(&[n_, c, h, w])?;
            n.form = Some(match passes {
                [] => InferenceResNet::compiled(n.shared, size)?,
                [list] => form_with_passes(n.shared, Precision::Fp32, size, list)?,
                _ => return Err("compile NAME N C H W [PASS,PASS,...]".into()),
            });
            let passes = n.form.as_ref().map(|f| f.passes().to_vec());
            Ok(serde_json::json!({"ok": true, "passes": passes}))
        }
        ["compile-bf16", name, n_, c, h, w, rest @ ..] => {
            let n = network(networks, name)?;
            let size = size(&[n_, c, h, w])?;
            let (precision, passes): (Precision, _) = match rest {
                [] => (Precision::Bf16, None),
                [named] => (serde_json::from_value(serde_json::json!(named))?, None),
                [named, list] => (serde_json::from_value(serde_json::json!(named))?, Some(list)),
                _ => return Err("compile-bf16 NAME N C H W [PRECISION [PASS,PASS,...]]".into()),
            };
            let form = match passes {
                None => InferenceResNet::compiled_with(n.shared, size, precision)?,
                Some(list) => form_with_passes(n.shared, precision, size, list)?,
            };
            let answer = serde_json::json!({"ok": true, "passes": form.passes(), "arithmetic": form.arithmetic().describe(),
                "native": form.arithmetic() == &scconv_tch::inference::Arithmetic::Bf16Native});
            n.form_bf16 = Some(form);
            Ok(answer)
        }
        ["run", name, mode, input, output] => {
            let n = network(networks, name)?;
            let x = read_input(input)?;
            let logits = n.forward(mode, &x)?;
            Tensor::write_safetensors(&[("logits", &logits)], output)?;
            Ok(serde_json::json!({"ok": true}))
        }
        ["time", name, mode, rest @ ..] if rest.len() == 6 => {
            let n = network(networks, name)?;
            let x = Tensor::randn(size(&rest[..4])?, (Kind::Float, Device::Cpu));
            let (warmup, runs): (usize, usize) = (rest[4].parse()?, rest[5].parse()?);
            Ok(serde_json::json!({"ms": time_forwards(n, mode, &x, warmup, runs)?}))
        }
        ["profile", name, mode, rest @ ..] if rest.len() == 6 => {
            let n = network(networks, name)?;
            let x = Tensor::randn(size(&rest[..4])?, (Kind::Float, Device::Cpu));
            let (warmup, runs): (usize, usize) = (rest[4].parse()?, rest[5].parse()?);
            let ms = time_forwards(n, mode, &x, warmup, runs)?;
            scconv_tch::profile::enable(Device::Cpu);
            let profiled = (0..runs).try_for_each(|_| n.forward(mode, &x).map(drop));
            let sections = scconv_tch::profile::finish();
            profiled?;
            let per_forward: Vec<_> = sections
                .iter()
                .map(|(section, total, _)| serde_json::json!([section, total / runs.max(1) as f64]))
                .collect();
            Ok(serde_json::json!({"ms": ms, "sections": per_forward}))
        }
        ["decisions", name, input, mode @ ..] if mode.len() <= 1 => {
            let n = network(networks, name)?;
            let x = read_input(input)?;
            let form = n.form(mode.first().copied().unwrap_or("inference"))?;
            let layers: Vec<_> = differences_on(n.shared, Decider::Form(form), &x)?
                .layers
                .into_iter()
                .map(|(layer, differing, positions)| {
                    serde_json::json!({"layer": layer, "differing": differing, "positions": positions})
                })
                .collect();
            Ok(serde_json::json!({"layers": layers}))
        }
        _ => Err(format!("unknown request: {line}").into()),
    }
}

fn main() -> Result<(), Error> {
    allocator::keep_freed_memory();
    tch::set_num_threads(std::env::var("THREADS").ok().and_then(|t| t.parse().ok()).unwrap_or(2));
    let mut networks = HashMap::new();
    let stdout = std::io::stdout();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let answer =
            handle(&mut networks, &line).unwrap_or_else(|e| serde_json::json!({"error": e.to_string()}));
        let mut out = stdout.lock();
        writeln!(out, "{answer}")?;
        out.flush()?;
    }
    Ok(())
}
