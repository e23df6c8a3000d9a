//! The CRU fuse's global pooling in a channels-last ScConv step: the per-channel means of `Y1`,
//! `PWC2(low)` and `low`, side by side in one `(N, C1 + C2 + C3, 1, 1)` tensor, in one call where
//! libtorch's operations make four (three poolings, then their concatenation). At batch 1 a libtorch
//! call costs more than its arithmetic (docs/speed.md, "Batch 1: the per-call cost").
//!
//! The parts are fp32 or bf16 (the native bf16 form's branches), each read exactly.
//!
//! Each mean is summed in f64 and rounded once, so it is within half an fp32 ulp of the exact mean
//! (libtorch's fp32 reduction sums in fp32 in its own order: a few ulps). A change of rounding, not of
//! meaning: the step stays within the form's bound. The partial sums are cut at fixed positions and
//! added in a fixed order, so the result does not depend on the number of threads.
use super::channels_last_sru::is_channels_last;
use super::elements::{stored, Stored, Value};
use crate::fast::welford::SharedOut;
use crate::inference::parallel_for;
use tch::{Device, Kind, Tensor};

/// Values one task sums (a chunk of positions, all of one tensor's channels).
const TASK_ELEMENTS: usize = 1 << 14;

/// The means over height and width of `parts` (each fp32 or bf16, dense channels-last, on the CPU,
/// with the same batch and spatial size), concatenated along channels as `(N, sum of C, 1, 1)` fp32;
/// `None` where a part is not so (the caller pools with libtorch).
pub(crate) fn channel_means(parts: &[&Tensor]) -> Option<Tensor> {
    let [n, _, h, w] = <[i64; 4]>::try_from(parts.first()?.size()).ok()?;
    let fits = |t: &&Tensor| {
        matches!(t.kind(), Kind::Float | Kind::BFloat16) && t.device() == Device::Cpu && is_channels_last(t)
    };
    if !parts.iter().all(|t| fits(t) && t.size()[0] == n && t.size()[2..] == [h, w]) {
        return None;
    }
    let channels: Vec<usize> = parts.iter().map(|t| t.size()[1] as usize).collect();
    let total: usize = channels.iter().sum();
    let (n, positions) = (n as usize, (h * w) as usize);
    if positions == 0 || total == 0 {
        return None; // libtorch's mean of nothing (NaN), as libtorch says it
    }
    // One chunk length for every part (the widest's), so tasks index simply: (sample, part, chunk).
    let chunk = (TASK_ELEMENTS / channels.iter().copied().max()?.max(1)).max(1);
    let chunks = positions.div_ceil(chunk);
    let count = parts.len();
    let tasks = n * count * chunks;
    // Task t's partial sums start at offset[t]; a task's channels follow its part.
    let offsets: Vec<usize> = (0..tasks)
        .scan(0, |next, t| {
            let at = *next;
            *next += channels[t / chunks % count];
            Some(at)
        })
        .collect();
    let mut partial = vec![0f64; offsets.last()? + channels[count - 1]];
    let shared = SharedOut(partial.as_mut_ptr());
    // SAFETY: every part is a dense channels-last fp32 or bf16 CPU tensor alive for this function,
    // read as (N, H, W, C); each task writes only its own partial sums.
    unsafe {
        let inputs: Vec<Stored> = parts.iter().map(|t| stored(t)).collect::<Option<_>>()?;
        parallel_for(tasks, 1, |range| {
            for task in range {
                let (sample, part, first) = (task / chunks / count, task / chunks % count, task % chunks);
                let c = channels[part];
                let rows = first * chunk..((first + 1) * chunk).min(positions);
                let range = (sample * positions + rows.start) * c..(sample * positions + rows.end) * c;
                let sums = shared.slice(offsets[task], c);
                match inputs[part] {
                    Stored::F32(data) => sum_rows(&data[range], sums),
                    Stored::Bf16(data) => sum_rows(&data[range], sums),
                }
            }
        });
    }
    let mut means = Vec::with_capacity(n * total);
    for sample in 0..n {
        for (part, &c) in channels.iter().enumerate() {
            let first_task = (sample * count + part) * chunks;
            for channel in 0..c {
                let sum: f64 = (0..chunks).map(|k| partial[offsets[first_task + k] + channel]).sum();
                means.push((sum / positions as f64) as f32);
            }
        }
    }
    Some(Tensor::from_slice(&means).view([n as i64, total as i64, 1, 1]))
}

/// `out[c] += sum over rows of data[row * C + c]` in f64, `C = out.len()`: each column summed from zero
/// in row order, then added to `out` (so, where `out` starts at zero, as every caller's does, the
/// same bits as adding each row into `out`).
pub(crate) fn sum_rows<V: Value>(data: &[V], out: &mut [f64]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { sum_rows_avx2(data, out) };
    }
    sum_rows_portable(data, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_rows_avx2<V: Value>(data: &[V], out: &mut [f64]) {
    sum_rows_portable(data, out) // the same loop, vectorised four f64 at a time
}

#[inline(always)]
fn sum_rows_portable<V: Value>(data: &[V], out: &mut [f64]) {
    // Blocks of 16 channels, then of 8, each summed down all rows with its sums in registers (a
    // loop over all `C` sums kept in memory waits on a load and a store per value), then the rest.
    // Every sum adds its column's values in row order, from zero, then into `out`.
    let c = out.len();
    let (sixteens, eights) = (c / 16 * 16, c / 8 * 8);
    for first in (0..sixteens).step_by(16) {
        sum_block::<V, 16>(data, c, first, &mut out[first..first + 16]);
    }
    for first in (sixteens..eights).step_by(8) {
        sum_block::<V, 8>(data, c, first, &mut out[first..first + 8]);
    }
    if eights < c {
        let mut lanes = [0f64; 8]; // fewer than 8 channels left: one more pass over the rows
        for row in data.chunks_exact(c) {
            for (lane, &v) in lanes.iter_mut().zip(&row[eights..]) {
                *lane += v.value() as f64;
            }
        }
        for (sum, lane) in out[eights..].iter_mut().zip(lanes) {
            *sum += lane;
        }
    }
}

/// `sums[i] += sum over rows of data[row * c + first + i]`, `i < B`.
#[inline(always)]
fn sum_block<V: Value, const B: usize>(data: &[V], c: usize, first: usize, sums: &mut [f64]) {
    let mut lanes = [0f64; B];
    for row in data.chunks_exact(c) {
        let values: &[V; B] = row[first..first + B].try_into().expect("B channels");
        for (lane, &v) in lanes.iter_mut().zip(values) {
            *lane += v.value() as f64;
        }
    }
    for (sum, lane) in sums.iter_mut().zip(lanes) {
        *sum += lane;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn channels_last(shape: [i64; 4], offset: f64) -> Tensor {
        super::super::channels_last_sru::to_channels_last(
            &(Tensor::randn(shape, (Kind::Float, Device::Cpu)) + offset),
        )
    }

    /// libtorch's f64 mean rounded to fp32, side by side as the kernel writes them.
    fn f64_means(parts: &[&Tensor]) -> Tensor {
        let means: Vec<Tensor> = parts
            .iter()
            .map(|t| t.to_kind(Kind::Double).mean_dim(&[2i64, 3][..], true, Kind::Double))
            .collect();
        Tensor::cat(&means, 1).to_kind(Kind::Float)
    }

    #[test]
    fn the_means_are_the_f64_means_rounded_once_in_one_or_many_chunks() {
        tch::manual_seed(0);
        // Batch 1 and 3; fewer positions than a task, and many (several chunks per part); an offset.
        for (n, size, offset) in [(1, 28, 0.0), (3, 5, 0.0), (2, 56, 1000.0)] {
            let y1 = channels_last([n, 64, size, size], offset);
            let head = channels_last([n, 24, size, size], offset);
            let low = channels_last([n, 8, size, size], -offset);
            let parts = [&y1, &head, &low];
            let means = channel_means(&parts).expect("channels-last fp32 parts");
            assert_eq!(means.size(), [n, 96, 1, 1]);
            let expected = f64_means(&parts);
            // Summation orders differ (ours in chunks, libtorch's its own) but both are f64: the
            // fp32 roundings agree except, rarely, at a tie within f64's error.
            let ulp = expected.abs() * f64::from(f32::EPSILON);
            let off = (&means - &expected).abs() - ulp;
            assert!(
                off.max().double_value(&[]) <= 0.0,
                "n {n} size {size}: more than one ulp from the f64 mean"
            );
            // libtorch's own fp32 pooling is a few ulps away at most.
            let libtorch = Tensor::cat(&parts.map(|t| t.adaptive_avg_pool2d([1, 1])), 1);
            let largest = expected.abs().max().double_value(&[]);
            let diff = (&means - &libtorch).abs().max().double_value(&[]);
            assert!(
                diff <= 8.0 * f64::from(f32::EPSILON) * largest,
                "n {n} size {size}: {diff} from libtorch's"
            );
        }
    }

    /// bf16 parts (the native bf16 form's branches) beside fp32 ones: the means of their exact values,
    /// as of the same values held in fp32.
    #[test]
    fn bf16_parts_are_read_exactly() {
        let y1 = channels_last([2, 64, 9, 9], 3.0);
        let head = channels_last([2, 24, 9, 9], 0.0).to_kind(Kind::BFloat16);
        let low = channels_last([2, 8, 9, 9], -3.0).to_kind(Kind::BFloat16);
        let means = channel_means(&[&y1, &head, &low]).expect("fp32 and bf16 parts");
        let (head32, low32) = (head.to_kind(Kind::Float), low.to_kind(Kind::Float));
        assert!(super::super::channels_last_sru::is_channels_last(&head32));
        assert!(means.equal(&channel_means(&[&y1, &head32, &low32]).unwrap()));
    }

    /// The blocked sums add each column in row order from zero, as adding each row into zeroed sums
    /// does: the same bits, for every channel count (blocks of 16, of 8, and a rest of fewer).
    #[test]
    fn the_row_sums_are_the_row_by_row_sums_bit_for_bit() {
        for channels in [1, 5, 8, 13, 24, 37] {
            let data =
                Vec::<f32>::try_from(Tensor::randn([50 * channels as i64], (Kind::Float, Device::Cpu)) * 1e3)
                    .unwrap();
            let mut ours = vec![0f64; channels];
            sum_rows(&data, &mut ours);
            let mut expected = vec![0f64; channels];
            for row in data.chunks_exact(channels) {
                for (sum, &v) in expected.iter_mut().zip(row) {
                    *sum += v as f64;
                }
            }
            assert_eq!(ours, expected, "{channels} channels");
        }
    }

    #[test]
    fn other_layouts_and_kinds_are_left_to_libtorch() {
        let cl = channels_last([1, 8, 4, 4], 0.0);
        let nchw = Tensor::randn([1, 8, 4, 4], (Kind::Float, Device::Cpu));
        assert!(channel_means(&[&cl, &nchw]).is_none());
        assert!(channel_means(&[&cl.to_kind(Kind::Double)]).is_none());
        let other_size = channels_last([1, 8, 2, 2], 0.0);
        assert!(channel_means(&[&cl, &other_size]).is_none());
        assert!(channel_means(&[&cl]).is_some());
    }
}
