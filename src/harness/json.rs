//! Reading the crate's JSON files (configs, training records, fixture manifests) with one error shape.
use crate::error::ScConvError;
use serde::de::DeserializeOwned;
use std::path::Path;

/// Reads and parses `path`; a missing file and a field serde rejects both name the file.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T, ScConvError> {
    let error = |reason: String| ScConvError::WeightsFile { path: path.display().to_string(), reason };
    let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| error(e.to_string()))
}
