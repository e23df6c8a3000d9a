//! The batch tile: how many images the inference form runs through the network at once
//! ([`Pass::TileBatch`](super::Pass::TileBatch)).
//!
//! Each image's arithmetic is independent of the others' in the form (BatchNorm folded; the SRU's
//! statistics, the fuse's pooling and the head are per image), so a batch may run as tiles of a few
//! images each, every tile through the whole network before the next. Measured on a 2-core AVX2 VM
//! (docs/speed.md, "Tiling the batch"): the Fashion-MNIST plain form takes 0.44 ms an image at batch
//! 256, where each activation (25.7 MB) no longer fits the caches, and 0.40 at batches of 6-24; batches
//! of fewer than about 8 images pay the calls' fixed cost instead (the SC network 0.76 ms an image at
//! batch 1, 0.29 at 8).

/// The fewest images a tile holds: below it the calls' fixed cost outweighs what the caches save (the
/// Fashion-MNIST SC form 0.34 ms an image at batch 5, 0.29 at 8; SC-ResNet-50 39.2 ms at 1, 36.6 at 8).
pub(crate) const MIN_TILE: i64 = 8;

/// The tile for a batch of `batch` images whose largest activation takes `bytes_per_image` bytes an
/// image, run by `threads` threads on cores with `l2_bytes` of L2 cache each: as many images as keep
/// that activation within the threads' L2 caches together, at least [`MIN_TILE`]; `None` where that is
/// the whole batch (nothing to tile).
pub(crate) fn tile_for(batch: i64, bytes_per_image: i64, threads: i64, l2_bytes: i64) -> Option<i64> {
    let fits = (l2_bytes * threads.max(1)) / bytes_per_image.max(1);
    let tile = fits.max(MIN_TILE);
    (tile < batch).then_some(tile)
}

/// The batch sizes a tiled batch of `batch` images runs: full tiles, and the rest where the tile does
/// not divide it.
pub(crate) fn tile_sizes(batch: i64, tile: Option<i64>) -> Vec<i64> {
    match tile {
        Some(t) if t < batch => std::iter::once(t).chain(Some(batch % t).filter(|r| *r > 0)).collect(),
        _ => vec![batch],
    }
}

/// One core's L2 cache in bytes, as Linux describes cpu0's caches (`/sys/devices/system/cpu/cpu0/
/// cache/index*/`: `level` 2, `type` Unified or Data); `None` where it does not.
pub(crate) fn l2_bytes_per_core() -> Option<i64> {
    let caches = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").ok()?;
    caches.flatten().find_map(|entry| {
        let read = |name: &str| std::fs::read_to_string(entry.path().join(name)).ok();
        let level = read("level")?;
        let kind = read("type")?;
        (level.trim() == "2" && kind.trim() != "Instruction").then(|| parse_cache_size(&read("size")?))?
    })
}

/// `512K`, `2048K`, `1M` or a plain byte count, as sysfs writes cache sizes.
fn parse_cache_size(text: &str) -> Option<i64> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, ""),
    };
    let scale = match unit {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        _ => return None,
    };
    digits.parse::<i64>().ok().map(|n| n * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    const L2: i64 = 512 << 10;

    #[test]
    fn a_tile_keeps_its_largest_activation_within_the_threads_l2_caches() {
        // Fashion-MNIST: 32 x 28 x 28 fp32 = 100,352 bytes an image; two cores of 512 KB hold 10.
        assert_eq!(tile_for(256, 100_352, 2, L2), Some(10));
        assert_eq!(tile_for(256, 100_352, 1, L2), Some(MIN_TILE), "5 fit one core: the floor");
        // bf16 halves the bytes, doubling the images.
        assert_eq!(tile_for(256, 50_176, 2, L2), Some(20));
    }

    #[test]
    fn no_tile_where_it_would_be_the_whole_batch_or_below_the_floor() {
        assert_eq!(tile_for(10, 100_352, 2, L2), None);
        assert_eq!(tile_for(1, 100_352, 2, L2), None);
        // ResNet-50: 256 x 56 x 56 fp32 is 3.2 MB an image, more than the caches: the floor.
        assert_eq!(tile_for(8, 3_211_264, 2, L2), None);
        assert_eq!(tile_for(64, 3_211_264, 2, L2), Some(MIN_TILE));
        assert_eq!(tile_for(9, 3_211_264, 2, L2), Some(MIN_TILE));
    }

    #[test]
    fn a_batch_runs_full_tiles_and_its_rest() {
        assert_eq!(tile_sizes(256, Some(10)), vec![10, 6]);
        assert_eq!(tile_sizes(80, Some(10)), vec![10]);
        assert_eq!(tile_sizes(7, Some(10)), vec![7]);
        assert_eq!(tile_sizes(256, None), vec![256]);
    }

    #[test]
    fn cache_sizes_read_as_sysfs_writes_them() {
        assert_eq!(parse_cache_size("512K\n"), Some(512 << 10));
        assert_eq!(parse_cache_size("2048K"), Some(2 << 20));
        assert_eq!(parse_cache_size("1M"), Some(1 << 20));
        assert_eq!(parse_cache_size("32768"), Some(32768));
        assert_eq!(parse_cache_size("big"), None);
        assert_eq!(parse_cache_size("12Q"), None);
    }

    #[test]
    fn this_machines_l2_cache_is_found_on_linux() {
        if std::path::Path::new("/sys/devices/system/cpu/cpu0/cache/index2").exists() {
            let l2 = l2_bytes_per_core().expect("sysfs describes an L2 cache");
            assert!((64 << 10..=64 << 20).contains(&l2), "{l2} bytes");
        }
    }
}
