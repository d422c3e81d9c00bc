//! The opened device: adapter choice, real limits, optional features, error capture, buffer
//! creation and readback.

use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

use super::adapter::{self, AdapterReport, BackendChoice, GpuOptions};
use super::buffer::{size_class, BufferPool, GpuBuffer, MemoryStats};
use super::pipeline::{Kernel, PipelineCache, Spec};
use super::profile::{ProfileReport, Profiler};
use super::tune::{self, TuneMode, Tuning};

/// Limits and capabilities the kernels plan with (the device's real limits, possibly lowered by
/// [`GpuOptions::max_binding_bytes`]).
#[derive(Clone, Debug)]
pub struct Caps {
    /// Largest storage binding, rounded down to 16 bytes.
    pub max_binding: u64,
    pub max_buffer: u64,
    pub max_workgroups_per_dim: u32,
    pub max_invocations: u32,
    pub min_uniform_align: u32,
    pub shader_f16: bool,
    pub subgroups: bool,
    pub timestamps: bool,
    pub subgroup_min: u32,
    pub subgroup_max: u32,
    /// A software rasterizer (lavapipe, llvmpipe, WARP): prefers different tiles.
    pub is_cpu: bool,
    /// Loop iterations one invocation may run in all its loops together before the driver
    /// silently ends them (Mesa's llvmpipe/lavapipe: 65,535), measured when the device opens;
    /// `None` where the probe found no limit. Possibly lowered by
    /// [`GpuOptions::max_loop_iterations`].
    pub loop_limit: Option<u64>,
}

impl Caps {
    /// The subgroup size when the adapter has subgroups of one fixed size (lavapipe: 8).
    pub fn fixed_subgroup(&self) -> Option<u32> {
        (self.subgroups && self.subgroup_min > 1 && self.subgroup_min == self.subgroup_max)
            .then_some(self.subgroup_min)
    }

    /// Iterations a kernel may plan per invocation: 7/8 of the measured limit (a margin for
    /// loops a kernel's estimate does not count), or effectively unlimited.
    pub fn loop_budget(&self) -> u64 {
        match self.loop_limit {
            Some(l) => (l - l / 8).max(64),
            None => 1 << 40,
        }
    }
}

/// An open GPU device with its queue, pipeline cache and buffer pool.
pub struct Gpu {
    _instance: wgpu::Instance,
    _adapter: wgpu::Adapter,
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    report: AdapterReport,
    caps: Caps,
    pipelines: PipelineCache,
    pub(crate) pool: Arc<BufferPool>,
    lost: Arc<Mutex<Option<String>>>,
    uncaptured: Arc<Mutex<Option<String>>>,
    tune_mode: TuneMode,
    tuning: std::sync::OnceLock<Tuning>,
    pub(crate) profiler: Profiler,
    /// GPU timestamps around every dispatch (profiling on and supported).
    profiling: bool,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu({})", self.describe())
    }
}

impl Gpu {
    /// Open the adapter the options select (default: best discrete, integrated, then CPU).
    pub fn new(opts: &GpuOptions) -> Result<Gpu> {
        let backend = opts.backend.unwrap_or(BackendChoice::All);
        let (instance, adapters) = adapter::enumerate(backend);
        let (index, adapter) = adapter::select(adapters, backend, opts.adapter.as_ref())?;
        let report = adapter::report(index, &adapter);

        let wanted =
            wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP | wgpu::Features::TIMESTAMP_QUERY;
        let features = adapter.features() & wanted;
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("pumice"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| Error::RequestDevice {
            adapter: report.name.clone(),
            msg: e.to_string(),
        })?;

        let lost = Arc::new(Mutex::new(None));
        let lost_cb = lost.clone();
        device.set_device_lost_callback(move |reason, msg| {
            // Also fires when the device is dropped; by then no one reads the flag.
            *lost_cb.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("{reason:?}: {msg}"));
        });
        let uncaptured = Arc::new(Mutex::new(None));
        let unc = uncaptured.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let mut slot = unc.lock().unwrap_or_else(|p| p.into_inner());
            if slot.is_none() {
                *slot = Some(e.to_string());
            }
        }));

        let mut max_binding = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        let mut max_buffer = limits.max_buffer_size;
        if let Some(cap) = opts.max_binding_bytes {
            max_binding = max_binding.min(cap.max(256));
            max_buffer = max_buffer.min(cap.max(256));
        }
        let caps = Caps {
            max_binding: max_binding & !15,
            max_buffer,
            max_workgroups_per_dim: limits.max_compute_workgroups_per_dimension,
            max_invocations: limits.max_compute_invocations_per_workgroup,
            min_uniform_align: limits.min_uniform_buffer_offset_alignment,
            shader_f16: features.contains(wgpu::Features::SHADER_F16),
            subgroups: features.contains(wgpu::Features::SUBGROUP),
            timestamps: features.contains(wgpu::Features::TIMESTAMP_QUERY),
            subgroup_min: report.limits.subgroup_min_size,
            subgroup_max: report.limits.subgroup_max_size,
            is_cpu: adapter.get_info().device_type == wgpu::DeviceType::Cpu,
            loop_limit: None,
        };
        let mut gpu = Gpu {
            _instance: instance,
            _adapter: adapter,
            device,
            queue,
            report,
            caps,
            pipelines: PipelineCache::default(),
            pool: Arc::new(BufferPool::default()),
            lost,
            uncaptured,
            tune_mode: opts.tune,
            tuning: std::sync::OnceLock::new(),
            profiler: Profiler::default(),
            profiling: false,
        };
        // Opening the device is not part of a run's profile (the probe's build time either).
        let before = gpu.profiler.snapshot();
        let measured = gpu.probe_loop_limit()?;
        gpu.profiler.restore(before);
        if opts.profile {
            if gpu.caps.timestamps {
                gpu.profiling = true;
            } else {
                tracing::warn!(
                    "{} has no timestamp queries: the profile has build times only",
                    gpu.report.name
                );
            }
        }

        gpu.caps.loop_limit = match (measured, opts.max_loop_iterations) {
            (Some(m), Some(o)) => Some(m.min(o.max(64))),
            (m, o) => m.or(o.map(|o| o.max(64))),
        };
        tracing::debug!(adapter = %gpu.report.name, backend = %gpu.report.backend, caps = ?gpu.caps, "opened GPU");
        Ok(gpu)
    }

    /// Run a loop of 2²⁰ iterations in one invocation and count how many ran.
    fn probe_loop_limit(&self) -> Result<Option<u64>> {
        const PROBE: Kernel = Kernel {
            name: "loop_probe",
            template: include_str!("../../shaders/device/loop_probe.wgsl"),
            expand: None,
        };
        const N: u32 = 1 << 20;
        let pipeline = self.pipeline(&PROBE, &Spec::new())?;
        let out = self.storage(16, true)?;
        let mut b = super::Batch::new(self);
        b.dispatch(pipeline, &[N, 0u32, 0, 0], &[&out], [1, 1, 1])?;
        b.submit()?;
        let bytes = self.read_bytes(&out, 8, 4)?;
        let ran = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        Ok((ran < N).then_some(ran as u64))
    }

    /// Open with options from the environment (`PUMICE_BACKEND`, `PUMICE_ADAPTER`, ...).
    pub fn from_env() -> Result<Gpu> {
        Gpu::new(&GpuOptions::from_env()?)
    }

    pub fn report(&self) -> &AdapterReport {
        &self.report
    }

    pub fn caps(&self) -> &Caps {
        &self.caps
    }

    /// The kernel configurations for this adapter: tuned (or read from the user's cache) at
    /// the first call, under the options' [`TuneMode`]. See [`super::tune`].
    pub fn tuning(&self) -> &Tuning {
        if let Some(t) = self.tuning.get() {
            return t;
        }
        // Two threads may both tune; the first to finish is kept. The tuning's own dispatches
        // and builds are not the run's: the profile forgets them (work another thread records
        // on this adapter meanwhile would be forgotten too; the CLI tunes before any work).
        let before = self.profiler.snapshot();
        let t = tune::for_process(self, self.tune_mode);
        self.profiler.restore(before);
        let _ = self.tuning.set(t);
        self.tuning.get().expect("set above")
    }

    /// "name (backend, type)" for logs and test output.
    pub fn describe(&self) -> String {
        format!(
            "{} ({}, {}, driver {})",
            self.report.name, self.report.backend, self.report.device_type, self.report.driver
        )
    }

    /// "name (backend)": which adapter computed what, in summaries and manifests.
    pub fn label(&self) -> String {
        format!("{} ({})", self.report.name, self.report.backend)
    }

    pub fn memory(&self) -> MemoryStats {
        self.pool.stats()
    }

    pub fn reset_peak_memory(&self) {
        self.pool.reset_peak()
    }

    /// Release idle pooled buffers.
    pub fn trim(&self) {
        self.pool.trim()
    }

    pub fn pipelines_built(&self) -> usize {
        self.pipelines.len()
    }

    /// The compute pipeline for a kernel variant, built on first use and cached.
    pub fn pipeline(&self, kernel: &Kernel, spec: &Spec) -> Result<Arc<wgpu::ComputePipeline>> {
        self.check_health()?;
        self.pipelines
            .get_or_build(&self.device, kernel, spec, &self.profiler)
    }

    /// Whether the first [`Gpu::tuning`] call will time kernels (rather than read the cache).
    pub fn tuning_pending(&self) -> bool {
        self.tuning.get().is_none() && tune::will_measure(self, self.tune_mode)
    }

    /// Whether dispatches are timed on the GPU (see [`super::profile`]).
    pub fn profiling(&self) -> bool {
        self.profiling
    }

    /// GPU time per kernel (when profiling) and pipeline build time per kernel, since the
    /// device opened or the last [`Gpu::reset_profile`].
    pub fn profile(&self) -> ProfileReport {
        self.profiler.report()
    }

    pub fn reset_profile(&self) {
        self.profiler.reset()
    }

    pub(crate) fn kernel_name(&self, p: &Arc<wgpu::ComputePipeline>) -> &'static str {
        self.pipelines.name_of(p)
    }

    /// Fail with a typed error if the device was lost or reported an uncaptured error.
    pub fn check_health(&self) -> Result<()> {
        if let Some(msg) = self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Err(Error::DeviceLost(msg));
        }
        if let Some(msg) = self
            .uncaptured
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            return Err(Error::Gpu {
                op: "an earlier operation".into(),
                msg,
            });
        }
        Ok(())
    }

    /// Run `f` inside validation and out-of-memory error scopes and turn what they catch into
    /// [`Error::Gpu`].
    pub(crate) fn scoped<T>(&self, op: &str, f: impl FnOnce() -> T) -> Result<T> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let val = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let out = f();
        let e1 = pollster::block_on(val.pop());
        let e2 = pollster::block_on(oom.pop());
        if let Some(e) = e1.or(e2) {
            return Err(Error::Gpu {
                op: op.to_string(),
                msg: e.to_string(),
            });
        }
        self.check_health()?;
        Ok(out)
    }

    /// A storage buffer of at least `bytes` (rounded up to 16) from the pool. Contents are
    /// undefined unless `zeroed`.
    pub fn storage(&self, bytes: u64, zeroed: bool) -> Result<GpuBuffer> {
        let usage = wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_DST
            | wgpu::BufferUsages::COPY_SRC;
        let len = bytes.max(4).div_ceil(16) * 16;
        if len > self.caps.max_buffer {
            return Err(Error::TooLarge {
                what: "a storage buffer".into(),
                bytes: len,
                limit: self.caps.max_buffer,
            });
        }
        let buf = self.buffer(len, usage)?;
        if zeroed {
            self.clear(&buf);
        }
        Ok(buf)
    }

    /// Queue zeroing a whole buffer (after all work submitted so far).
    pub fn clear(&self, buf: &GpuBuffer) {
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.clear_buffer(buf.raw(), 0, Some(buf.len()));
        self.queue.submit([enc.finish()]);
    }

    pub(crate) fn buffer(&self, len: u64, usage: wgpu::BufferUsages) -> Result<GpuBuffer> {
        // Classes never exceed the next power of two, but an odd (artificial) limit could be
        // smaller than the class: then allocate exactly.
        let mut class = size_class(len);
        if class > self.caps.max_buffer {
            class = len;
        }
        let raw = match self.pool.take(class, usage) {
            Some(b) => b,
            None => {
                let b = self.scoped("buffer allocation", || {
                    self.device.create_buffer(&wgpu::BufferDescriptor {
                        label: None,
                        size: class,
                        usage,
                        mapped_at_creation: false,
                    })
                })?;
                self.pool.note_created(class);
                b
            }
        };
        Ok(GpuBuffer::new(raw, len, class, usage, self.pool.clone()))
    }

    /// Upload bytes into a new storage buffer (padded with zeros to a multiple of 4 bytes).
    pub fn upload(&self, bytes: &[u8]) -> Result<GpuBuffer> {
        let buf = self.storage(bytes.len() as u64, false)?;
        let whole = bytes.len() / 4 * 4;
        if whole > 0 {
            self.queue.write_buffer(buf.raw(), 0, &bytes[..whole]);
        }
        let mut tail = [0u8; 16];
        let rest = &bytes[whole..];
        tail[..rest.len()].copy_from_slice(rest);
        // Pad up to the 16-byte length so vector loads see zeros, never stale pool data.
        let pad = (buf.len() - whole as u64) as usize;
        if pad > 0 {
            self.queue
                .write_buffer(buf.raw(), whole as u64, &tail[..pad]);
        }
        Ok(buf)
    }

    /// Queue a GPU-side copy of the first `len` bytes of `src` into `dst` (after all work
    /// submitted so far).
    pub fn copy_buffer(&self, src: &GpuBuffer, dst: &GpuBuffer, len: u64) -> Result<()> {
        let len = len.div_ceil(4) * 4;
        if len > src.len() || len > dst.len() {
            return Err(Error::Shape(format!(
                "copy of {len} bytes between buffers of {} and {} bytes",
                src.len(),
                dst.len()
            )));
        }
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(src.raw(), 0, dst.raw(), 0, Some(len));
        self.scoped("buffer copy", || self.queue.submit([enc.finish()]))?;
        Ok(())
    }

    /// Queue a GPU-side copy of `len` bytes from `src` at `src_off` into `dst` at `dst_off`
    /// (offsets and length multiples of 4).
    pub fn copy_region(
        &self,
        src: &GpuBuffer,
        src_off: u64,
        dst: &GpuBuffer,
        dst_off: u64,
        len: u64,
    ) -> Result<()> {
        if !(src_off | dst_off | len).is_multiple_of(4)
            || src_off + len > src.len()
            || dst_off + len > dst.len()
        {
            return Err(Error::Shape(format!(
                "copy of {len} bytes from offset {src_off} of {} to offset {dst_off} of {} bytes",
                src.len(),
                dst.len()
            )));
        }
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(src.raw(), src_off, dst.raw(), dst_off, Some(len));
        self.scoped("buffer copy", || self.queue.submit([enc.finish()]))?;
        Ok(())
    }

    /// Copy `len` bytes at `offset` of a buffer back to the host, waiting for queued work.
    pub fn read_bytes(&self, buf: &GpuBuffer, offset: u64, len: u64) -> Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let padded = len.div_ceil(4) * 4;
        if !offset.is_multiple_of(4) || offset + padded > buf.len() {
            return Err(Error::Shape(format!(
                "readback of {len} bytes at {offset} from a {}-byte buffer",
                buf.len()
            )));
        }
        let staging = self.buffer(
            padded,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        )?;
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(buf.raw(), offset, staging.raw(), 0, Some(padded));
        self.scoped("readback", || self.queue.submit([enc.finish()]))?;
        let (tx, rx) = std::sync::mpsc::channel();
        staging
            .raw()
            .slice(..padded)
            .map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r);
            });
        self.wait()?;
        match rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(Error::Gpu {
                    op: "mapping a readback buffer".into(),
                    msg: e.to_string(),
                })
            }
            Err(_) => return Err(Error::DeviceLost("readback callback never ran".into())),
        }
        let out = {
            let view = staging
                .raw()
                .get_mapped_range(..padded)
                .map_err(|e| Error::Gpu {
                    op: "mapping a readback buffer".into(),
                    msg: format!("{e:?}"),
                })?;
            view[..len as usize].to_vec()
        };
        staging.raw().unmap();
        Ok(out)
    }

    /// Destroy the device as a driver reset would: every later operation fails with
    /// [`Error::DeviceLost`]. For testing error paths.
    #[doc(hidden)]
    pub fn simulate_device_loss(&self) {
        self.device.destroy();
        let _ = self.device.poll(wgpu::PollType::Poll);
    }

    /// Block until all submitted work has finished.
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu {
                op: "waiting for the GPU".into(),
                msg: e.to_string(),
            })?;
        self.check_health()
    }
}
