//! Reading the crate's JSON files (configs, training records, fixture manifests) with one error shape.
use crate::error::ScConvError;
use serde::de::DeserializeOwned;
use std::path::Path;

/// Reads and parses `path`; a missing file and a field serde rejects both name the file.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T, ScConvError> {
    let error = |reason: String| ScConvError::WeightsFile { path: path.display().to_string(), reason };
    let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
    // Every file the crate reads is a JSON object; serde would also take an array for a struct
    // (`[64]` as `{"op_channel": 64}`).
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| error(e.to_string()))?;
    if !value.is_object() {
        return Err(error(format!("expected a JSON object {{...}}, found {}", kind_of(&value))));
    }
    serde_json::from_value(value).map_err(|e| error(e.to_string()))
}

fn kind_of(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Null => "null",
        serde_json::Value::Object(_) => "an object",
    }
}
