//! Reading the crate's JSON files (configs, training records, fixture manifests) with one error shape,
//! bounded before anything is built: a file larger than `MAX_JSON_BYTES` is refused unread, and the
//! text is parsed straight into the typed struct (never into a generic value first), so a huge array
//! where a number belongs fails at its first bracket, and a key given twice is refused by name.
use crate::error::ScConvError;
use serde::de::DeserializeOwned;
use std::io::Read;
use std::path::Path;

/// The largest JSON file read: 1 MiB, 34 times the largest real one (a training record with its
/// 10,000 predictions, 30 kB); a config is a few hundred bytes.
pub const MAX_JSON_BYTES: u64 = 1 << 20;

/// Reads and parses `path`; a missing file and a field serde rejects both name the file.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T, ScConvError> {
    let error = |reason: String| ScConvError::WeightsFile { path: path.display().to_string(), reason };
    let file = std::fs::File::open(path).map_err(|e| error(e.to_string()))?;
    let mut text = String::new();
    file.take(MAX_JSON_BYTES + 1).read_to_string(&mut text).map_err(|e| error(e.to_string()))?;
    if text.len() as u64 > MAX_JSON_BYTES {
        return Err(error(format!(
            "larger than {MAX_JSON_BYTES} bytes, the most a config or record may be (the largest real one, \
             a training record, is 30 kB)"
        )));
    }
    // Every file the crate reads is a JSON object; serde would also take an array for a struct
    // (`[64]` as `{"op_channel": 64}`).
    match text.trim_start().chars().next() {
        Some('{') => {}
        first => return Err(error(format!("expected a JSON object {{...}}, found {}", kind_of(first)))),
    }
    serde_json::from_str(&text).map_err(|e| error(e.to_string()))
}

fn kind_of(first: Option<char>) -> &'static str {
    match first {
        None => "an empty file",
        Some('[') => "an array",
        Some('"') => "a string",
        Some('-' | '0'..='9') => "a number",
        Some('t' | 'f') => "a boolean",
        Some('n') => "null",
        Some(_) => "something else",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Small {
        a: i64,
    }

    fn parse(text: &str) -> String {
        let path = std::env::temp_dir().join(format!("scconv-json-{}.json", std::process::id()));
        std::fs::write(&path, text).unwrap();
        let result = read::<Small>(&path).map(|s| format!("{s:?}")).unwrap_or_else(|e| e.to_string());
        let _ = std::fs::remove_file(&path);
        result
    }

    #[test]
    fn objects_only_keys_once_and_bounded() {
        assert_eq!(parse(r#" {"a": 1}"#), "Small { a: 1 }");
        assert!(parse("[1]").contains("found an array"), "{}", parse("[1]"));
        assert!(parse("").contains("found an empty file"));
        let twice = parse(r#"{"a": 1, "a": 2}"#);
        assert!(twice.contains("duplicate field `a`"), "{twice}");
        let huge = format!(r#"{{"a": [{}]}}"#, "1,".repeat(600_000));
        assert!(parse(&huge).contains("larger than 1048576 bytes"), "{}", &parse(&huge)[..100]);
    }
}
