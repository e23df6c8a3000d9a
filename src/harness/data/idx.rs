//! IDX files (the MNIST / Fashion-MNIST format), gzipped or not. `tch::vision::mnist` reads only
//! uncompressed files with fixed names; Debian ships Fashion-MNIST gzipped.
use crate::error::ScConvError;
use flate2::read::GzDecoder;
use std::io::Read;
use std::path::Path;

/// An IDX array of unsigned bytes: its dimensions and data, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Reads `path`; the gzip magic bytes mean gzipped. The header is read and checked first, then
/// exactly the data it announces: a gzip bomb or a wrong header costs no more than the header says.
pub fn read(path: &Path) -> Result<IdxArray, ScConvError> {
    let error = |reason: String| ScConvError::WeightsFile { path: path.display().to_string(), reason };
    let open = || std::fs::File::open(path).map_err(|e| error(e.to_string()));
    let mut magic = [0u8; 2];
    let gzipped = open()?.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b];
    let stream: Box<dyn Read> = if gzipped { Box::new(GzDecoder::new(open()?)) } else { Box::new(open()?) };
    read_stream(stream).map_err(error)
}

/// The header (checked as `parse` does), then the data it announces, and nothing more.
fn read_stream(mut stream: impl Read) -> Result<IdxArray, String> {
    let mut head = Vec::new();
    stream.by_ref().take(4).read_to_end(&mut head).map_err(|e| e.to_string())?;
    let rank = if head.len() == 4 { head[3] as u64 } else { 0 };
    stream.by_ref().take(4 * rank).read_to_end(&mut head).map_err(|e| e.to_string())?;
    let (dims, count) = header(&head)?;
    let mut data = Vec::new();
    stream.take(count as u64 + 1).read_to_end(&mut data).map_err(|e| e.to_string())?;
    check_length(&dims, count, data.len())?;
    Ok(IdxArray { dims, data })
}

/// Parses the IDX layout: two zero bytes, type 0x08 (unsigned byte), the rank, big-endian u32 sizes.
pub fn parse(bytes: &[u8]) -> Result<IdxArray, String> {
    let (dims, count) = header(bytes)?;
    let data = &bytes[4 + 4 * dims.len()..];
    check_length(&dims, count, data.len())?;
    Ok(IdxArray { dims, data: data.to_vec() })
}

/// The dimensions and element count of the header at the start of `bytes` (magic and sizes).
fn header(bytes: &[u8]) -> Result<(Vec<usize>, usize), String> {
    if bytes.len() < 4 {
        return Err(format!("not an IDX file: {} bytes, shorter than the 4-byte magic number", bytes.len()));
    }
    let [0, 0, kind, rank, ..] = *bytes else {
        return Err(format!(
            "not an IDX file: magic number {:02x?} does not start with two zero bytes",
            &bytes[..4]
        ));
    };
    if kind != 0x08 {
        return Err(format!("IDX element type 0x{kind:02x} is not unsigned byte (0x08)"));
    }
    let size_bytes = bytes.get(4..4 + 4 * rank as usize).ok_or("IDX header is truncated")?;
    let dims: Vec<usize> =
        size_bytes.chunks(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize).collect();
    // Checked: a header can claim sizes whose product overflows (found by tests/fuzz_readers.rs).
    let count = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("IDX dimensions {dims:?} overflow: no file holds that many bytes"))?;
    Ok((dims, count))
}

fn check_length(dims: &[usize], count: usize, found: usize) -> Result<(), String> {
    if found != count {
        let found = if found > count { "more".to_string() } else { found.to_string() };
        return Err(format!("IDX dimensions {dims:?} need {count} bytes of data, the file has {found}"));
    }
    Ok(())
}

/// Writes an unsigned-byte IDX array, gzipped (used to cut the shipped sample from the full set).
pub fn write_gz(path: &Path, array: &IdxArray) -> std::io::Result<()> {
    use flate2::{write::GzEncoder, Compression};
    use std::io::Write;
    let mut encoder = GzEncoder::new(std::fs::File::create(path)?, Compression::best());
    encoder.write_all(&[0, 0, 0x08, array.dims.len() as u8])?;
    for &d in &array.dims {
        encoder.write_all(&(d as u32).to_be_bytes())?;
    }
    encoder.write_all(&array.data)?;
    encoder.finish().map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_small_array_and_round_trips_through_gzip() {
        let array = IdxArray { dims: vec![2, 3], data: vec![1, 2, 3, 4, 5, 6] };
        let path = std::env::temp_dir().join(format!("idx-test-{}.gz", std::process::id()));
        write_gz(&path, &array).unwrap();
        assert_eq!(read(&path).unwrap(), array);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn rejects_wrong_type_and_truncated_data() {
        assert!(parse(&[0, 0, 0x0d, 1, 0, 0, 0, 1, 0, 0, 0, 0]).unwrap_err().contains("not unsigned byte"));
        assert!(parse(&[0, 0, 0x08, 1, 0, 0, 0, 3, 7]).unwrap_err().contains("need 3 bytes"));
        assert!(parse(&[0, 0]).unwrap_err().contains("shorter than the 4-byte magic number"));
        assert!(parse(&[0x1f, 0x8b, 8, 0, 1, 2]).unwrap_err().contains("does not start with two zero bytes"));
    }
}
