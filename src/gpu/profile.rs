//! Where GPU time goes, per kernel: GPU timestamps around every dispatch (when the adapter has
//! timestamp queries and profiling is on: `PUMICE_PROFILE=1`), and the time spent building
//! pipelines (always counted: on CPU adapters a shader variant takes up to seconds to compile).
//!
//! With profiling on, each dispatch of a batch is encoded in its own compute pass whose
//! beginning and end write timestamps, and the batch waits for its results — so a profiled run
//! is slower and its wall times are not the unprofiled ones; the per-kernel split is what it
//! is for. Without the feature the GPU times stay empty and a warning says so once.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::Serialize;

/// A copy of a profiler's records (see [`Profiler::snapshot`]).
pub(crate) struct ProfileSnapshot {
    gpu: HashMap<&'static str, (u64, f64)>,
    builds: HashMap<&'static str, (u64, f64)>,
}

/// Totals per kernel name.
#[derive(Default)]
pub(crate) struct Profiler {
    gpu: Mutex<HashMap<&'static str, (u64, f64)>>,
    builds: Mutex<HashMap<&'static str, (u64, f64)>>,
}

/// One kernel's totals.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct KernelTime {
    pub kernel: String,
    /// Dispatches (GPU times) or pipelines built (build times).
    pub count: u64,
    pub seconds: f64,
}

/// What [`super::Gpu::profile`] reports, largest first.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct ProfileReport {
    /// GPU time per kernel from timestamps; empty unless profiling was on and supported.
    pub gpu: Vec<KernelTime>,
    /// Pipeline build (shader compile) time per kernel.
    pub builds: Vec<KernelTime>,
}

impl ProfileReport {
    /// "gemm 12.3 s (4021), hessian 3.1 s (96), ..." for the first `n` kernels of `list`.
    pub fn line(list: &[KernelTime], n: usize) -> String {
        list.iter()
            .take(n)
            .map(|k| format!("{} {:.2} s ({})", k.kernel, k.seconds, k.count))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl Profiler {
    pub(crate) fn add_gpu(&self, kernel: &'static str, seconds: f64) {
        let mut m = self.gpu.lock().unwrap_or_else(|e| e.into_inner());
        let e = m.entry(kernel).or_default();
        e.0 += 1;
        e.1 += seconds;
    }

    pub(crate) fn add_build(&self, kernel: &'static str, seconds: f64) {
        let mut m = self.builds.lock().unwrap_or_else(|e| e.into_inner());
        let e = m.entry(kernel).or_default();
        e.0 += 1;
        e.1 += seconds;
    }

    pub(crate) fn report(&self) -> ProfileReport {
        let list = |m: &Mutex<HashMap<&'static str, (u64, f64)>>| {
            let mut v: Vec<KernelTime> = m
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(k, &(count, seconds))| KernelTime {
                    kernel: k.to_string(),
                    count,
                    seconds,
                })
                .collect();
            v.sort_by(|a, b| {
                b.seconds
                    .total_cmp(&a.seconds)
                    .then(a.kernel.cmp(&b.kernel))
            });
            v
        };
        ProfileReport {
            gpu: list(&self.gpu),
            builds: list(&self.builds),
        }
    }

    /// What has been recorded so far, for [`Profiler::restore`].
    pub(crate) fn snapshot(&self) -> ProfileSnapshot {
        let copy = |m: &Mutex<HashMap<&'static str, (u64, f64)>>| {
            m.lock().unwrap_or_else(|e| e.into_inner()).clone()
        };
        ProfileSnapshot {
            gpu: copy(&self.gpu),
            builds: copy(&self.builds),
        }
    }

    /// Forget everything recorded since `s` was taken.
    pub(crate) fn restore(&self, s: ProfileSnapshot) {
        *self.gpu.lock().unwrap_or_else(|e| e.into_inner()) = s.gpu;
        *self.builds.lock().unwrap_or_else(|e| e.into_inner()) = s.builds;
    }

    pub(crate) fn reset(&self) {
        self.gpu.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.builds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restored_snapshot_forgets_what_came_after() {
        let p = Profiler::default();
        p.add_build("gemm", 1.0);
        let s = p.snapshot();
        p.add_build("gemm", 2.0);
        p.add_build("hessian", 3.0);
        p.restore(s);
        let r = p.report();
        assert_eq!(r.builds.len(), 1);
        assert_eq!((r.builds[0].count, r.builds[0].seconds), (1, 1.0));
    }
}
