//! Where a forward pass spends its time, by section (`bench --profile`): off unless a caller enables it
//! on its thread, when each instrumented section (the 3x3 convs, the SRU, the CRU's parts, ...) adds its
//! wall time (after synchronising CUDA) to a per-name total. The cost when off: one thread-local read.
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Instant;
use tch::Device;

type Totals = BTreeMap<&'static str, (f64, usize)>;

thread_local! {
    static PROFILE: RefCell<Option<(Device, Totals)>> = const { RefCell::new(None) };
}

fn sync(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}

/// Runs `f` as section `name`, timing it when profiling is on.
pub(crate) fn scope<T>(name: &'static str, f: impl FnOnce() -> T) -> T {
    let Some(device) = PROFILE.with(|p| p.borrow().as_ref().map(|(device, _)| *device)) else {
        return f();
    };
    sync(device);
    let start = Instant::now();
    let out = f();
    sync(device);
    let ms = start.elapsed().as_secs_f64() * 1e3;
    PROFILE.with(|p| {
        if let Some((_, totals)) = p.borrow_mut().as_mut() {
            let entry = totals.entry(name).or_default();
            entry.0 += ms;
            entry.1 += 1;
        }
    });
    out
}

/// Starts collecting on this thread (work on `device`), dropping earlier totals.
pub fn enable(device: Device) {
    PROFILE.with(|p| *p.borrow_mut() = Some((device, Totals::new())));
}

/// Stops collecting; the totals per section: (name, milliseconds, calls).
pub fn finish() -> Vec<(&'static str, f64, usize)> {
    let totals = PROFILE.with(|p| p.borrow_mut().take()).map(|(_, totals)| totals).unwrap_or_default();
    totals.into_iter().map(|(name, (ms, calls))| (name, ms, calls)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_timed_only_while_enabled() {
        scope("before", || ());
        enable(Device::Cpu);
        for _ in 0..3 {
            scope("sleep", || std::thread::sleep(std::time::Duration::from_millis(2)));
        }
        let totals = finish();
        assert_eq!(totals.len(), 1, "{totals:?}");
        let (name, ms, calls) = totals[0];
        assert_eq!((name, calls), ("sleep", 3));
        assert!(ms >= 6.0, "{ms}");
        scope("after", || ());
        assert!(finish().is_empty());
    }
}
