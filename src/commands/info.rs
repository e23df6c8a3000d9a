//! `scconv-tch info`: parameters and multiply-adds.
use anyhow::{bail, Result};
use scconv_tch::harness::infer::ModelRecord;
use scconv_tch::harness::json;
use scconv_tch::info;
use scconv_tch::models::ResNetConfig;
use scconv_tch::ScConvConfig;
use std::path::Path;
use std::process::ExitCode;

pub fn run_info(
    config: Option<&Path>,
    channels: Option<i64>,
    positions: i64,
    json: bool,
) -> Result<ExitCode> {
    let config = match (config, channels) {
        (Some(path), _) => json::read::<ScConvConfig>(path)?,
        (None, Some(c)) => ScConvConfig::new(c),
        (None, None) => bail!("give --scconv CONFIG.json or --channels C"),
    };
    config.validate().map_err(scconv_tch::ScConvError::from)?;
    let layers = info::scconv_costs(&config);
    let (total, plain) = (info::total(&layers), info::conv3x3_cost(config.op_channel));
    if json {
        let value = serde_json::json!({ "config": config, "positions": positions, "layers": layers,
            "total": total, "conv3x3": plain, "convention": "MACs of convolutions per output position" });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("ScConv {config:?}, {positions} output positions");
    println!("{:<14} {:>12} {:>16}", "layer", "parameters", "multiply-adds");
    for l in layers.iter().chain([&total, &plain]) {
        println!("{:<14} {:>12} {:>16}", l.name, l.parameters, l.macs_per_position * positions);
    }
    println!(
        "ScConv / conv3x3: {:.3}x the parameters, {:.3}x the multiply-adds",
        total.parameters as f64 / plain.parameters as f64,
        total.macs_per_position as f64 / plain.macs_per_position as f64
    );
    println!("multiply-adds: convolutions only (FLOPs ~ 2x); GroupNorm, gate, softmax, pooling and element-wise work, O(C) per position, are not counted");
    Ok(ExitCode::SUCCESS)
}

/// The network of a trained record (its config).
pub fn run_record_info(record: &Path, size: Option<i64>, json: bool) -> Result<ExitCode> {
    run_network_info(&ModelRecord::read(record)?.config, size, json)
}

pub fn run_network_info(config: &ResNetConfig, size: Option<i64>, json: bool) -> Result<ExitCode> {
    config.validate()?;
    let side = size.unwrap_or(if config.small_input { 28 } else { 224 });
    let rows = info::network_costs(config, side, side);
    let sum = |f: fn(&info::NetworkRow) -> i64| rows.iter().map(f).sum::<i64>();
    let totals = [sum(|r| r.parameters), sum(|r| r.macs), sum(|r| r.plain_parameters), sum(|r| r.plain_macs)];
    if json {
        let value = serde_json::json!({ "config": config, "input": [side, side], "rows": rows, "totals": totals,
            "convention": "MACs of convolutions and linear layers for one image" });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("network on one {side}x{side} image; SC columns: this config, plain: its twin with 3x3 convs");
    println!(
        "{:<22} {:>12} {:>15} {:>12} {:>15}",
        "layer", "parameters", "multiply-adds", "plain params", "plain MACs"
    );
    for r in &rows {
        println!(
            "{:<22} {:>12} {:>15} {:>12} {:>15}",
            r.name, r.parameters, r.macs, r.plain_parameters, r.plain_macs
        );
    }
    println!("{:<22} {:>12} {:>15} {:>12} {:>15}", "total", totals[0], totals[1], totals[2], totals[3]);
    println!(
        "against plain: {:.3}x the parameters, {:.3}x the multiply-adds",
        totals[0] as f64 / totals[2] as f64,
        totals[1] as f64 / totals[3] as f64
    );
    println!("multiply-adds: convolutions and linear layers (FLOPs ~ 2x); an ScConv replacing a stride-2 conv runs at the input resolution, then pools");
    Ok(ExitCode::SUCCESS)
}
