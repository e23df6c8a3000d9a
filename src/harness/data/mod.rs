//! Image data for the networks: Fashion-MNIST IDX files and PNG folders, normalised as in training.
pub mod idx;

use crate::error::ScConvError;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// Fashion-MNIST's mean and std, as `scripts/train.py` uses them: `(x / 255 - MEAN) / STD`.
pub const MEAN: f64 = 0.2860;
pub const STD: f64 = 0.3530;

/// Where Debian's `dataset-fashion-mnist` puts the files.
pub const DEBIAN_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// The shipped sample: the first 1,000 Fashion-MNIST test images and labels.
pub fn sample_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("weights").join("fashion-mnist-sample")
}

/// Grayscale images (N, 28, 28) as bytes, and their labels when known.
#[derive(Debug)]
pub struct Images {
    pub pixels: Tensor,
    pub labels: Option<Vec<i64>>,
    pub names: Vec<String>,
}

/// `(x / 255 - MEAN) / STD`, as (N, 1, H, W) floats. The order of operations is the training script's.
pub fn normalize(pixels_u8: &Tensor) -> Tensor {
    ((pixels_u8.to_kind(Kind::Float) / 255.0 - MEAN) / STD).unsqueeze(1)
}

/// The test split of an IDX folder: `t10k-images-idx3-ubyte[.gz]` and `t10k-labels-idx1-ubyte[.gz]`,
/// or any `*images*` / `*labels*` pair in it (the shipped sample).
pub fn read_idx_split(dir: &Path) -> Result<Images, ScConvError> {
    let images = idx::read(&find(dir, "images")?)?;
    let labels = idx::read(&find(dir, "labels")?)?;
    let [n, h, w] = images.dims[..] else {
        return Err(ScConvError::InvalidInput(format!("images IDX must be 3-d, got {:?}", images.dims)));
    };
    if n == 0 {
        return Err(ScConvError::InvalidInput(format!("{}: the IDX files hold no images", dir.display())));
    }
    if labels.dims != [n] {
        return Err(ScConvError::InvalidInput(format!("{n} images but labels of shape {:?}", labels.dims)));
    }
    let pixels = Tensor::from_slice(&images.data).view([n as i64, h as i64, w as i64]);
    let names = (0..n).map(|i| format!("#{i}")).collect();
    Ok(Images { pixels, labels: Some(labels.data.iter().map(|&l| l as i64).collect()), names })
}

fn find(dir: &Path, what: &str) -> Result<PathBuf, ScConvError> {
    let error = |reason: String| ScConvError::WeightsFile { path: dir.display().to_string(), reason };
    let entries = std::fs::read_dir(dir).map_err(|e| error(e.to_string()))?;
    let mut matches: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.contains(what) && !n.starts_with("train"))
        })
        .filter(|p| p.metadata().is_ok_and(|m| m.is_file()))
        .collect();
    // IDX-named files (`t10k-images-idx3-ubyte[.gz]`) before any other file that mentions `what`.
    let not_idx_named = |p: &PathBuf| !p.file_name().is_some_and(|n| n.to_string_lossy().contains("-idx"));
    matches.sort_by_key(|p| (not_idx_named(p), p.clone()));
    matches.into_iter().next().ok_or_else(|| error(format!("no test {what} IDX file in it")))
}

/// Every `.png` in `dir` (sorted by name) as 28x28 grayscale: converted to luma and resized if needed.
pub fn read_png_folder(dir: &Path, size: u32) -> Result<Images, ScConvError> {
    let error =
        |path: &Path, reason: String| ScConvError::WeightsFile { path: path.display().to_string(), reason };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| error(dir, e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")))
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(error(dir, "no .png files in it".into()));
    }
    // A FIFO or a device named *.png would block or never end: only regular files are opened.
    if let Some(special) = paths.iter().find(|p| !p.metadata().is_ok_and(|m| m.is_file())) {
        return Err(error(special, "is not a regular file".into()));
    }
    let mut data = Vec::with_capacity(paths.len() * (size * size) as usize);
    for path in &paths {
        let image = image::open(path).map_err(|e| error(path, e.to_string()))?.into_luma8();
        let image = if image.dimensions() == (size, size) {
            image
        } else {
            image::imageops::resize(&image, size, size, image::imageops::FilterType::Triangle)
        };
        data.extend_from_slice(image.as_raw());
    }
    let pixels = Tensor::from_slice(&data).view([paths.len() as i64, size as i64, size as i64]);
    let names = paths.iter().map(|p| p.display().to_string()).collect();
    Ok(Images { pixels, labels: None, names })
}
