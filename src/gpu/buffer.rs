//! Buffer pool: storage buffers are recycled by size class instead of being created and destroyed
//! for every operation, and the pool keeps the live/peak byte counts that memory reports use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Idle bytes the pool may hold before it starts dropping returned buffers.
const MAX_IDLE_BYTES: u64 = 256 << 20;

/// Round a request up to its size class: 256-byte steps below 4 KiB, then eight classes per
/// power of two (at most 12.5 % slack).
pub(crate) fn size_class(bytes: u64) -> u64 {
    let bytes = bytes.max(16);
    if bytes <= 4096 {
        return bytes.div_ceil(256) * 256;
    }
    let top = 63 - bytes.leading_zeros() as u64; // floor(log2)
    let step = 1u64 << (top - 3);
    bytes.div_ceil(step) * step
}

#[derive(Default, Debug, Clone, Copy)]
pub struct MemoryStats {
    /// Bytes in buffers currently handed out.
    pub live_bytes: u64,
    /// Highest `live_bytes` seen since the device was opened (or the last reset).
    pub peak_bytes: u64,
    /// Bytes held idle in the pool.
    pub idle_bytes: u64,
}

#[derive(Default)]
struct PoolState {
    free: HashMap<(u64, u32), Vec<wgpu::Buffer>>,
    stats: MemoryStats,
}

/// Shared between the [`super::Gpu`] and every [`GpuBuffer`] so buffers can return themselves.
#[derive(Default)]
pub(crate) struct BufferPool {
    state: Mutex<PoolState>,
}

impl BufferPool {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        // A panic while holding the lock cannot leave the counters inconsistent in a way that
        // matters more than losing them, so recover the guard.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn take(&self, class: u64, usage: wgpu::BufferUsages) -> Option<wgpu::Buffer> {
        let mut st = self.lock();
        let buf = st.free.get_mut(&(class, usage.bits()))?.pop()?;
        st.stats.idle_bytes -= class;
        st.stats.live_bytes += class;
        st.stats.peak_bytes = st.stats.peak_bytes.max(st.stats.live_bytes);
        Some(buf)
    }

    pub(crate) fn note_created(&self, class: u64) {
        let mut st = self.lock();
        st.stats.live_bytes += class;
        st.stats.peak_bytes = st.stats.peak_bytes.max(st.stats.live_bytes);
    }

    fn give_back(&self, buf: wgpu::Buffer, class: u64, usage: wgpu::BufferUsages) {
        let mut st = self.lock();
        st.stats.live_bytes -= class;
        // Over the cap the buffer is simply dropped: wgpu frees it once no submitted work
        // uses it any more (destroy() would not wait).
        if st.stats.idle_bytes + class <= MAX_IDLE_BYTES {
            st.stats.idle_bytes += class;
            st.free.entry((class, usage.bits())).or_default().push(buf);
        }
    }

    pub(crate) fn stats(&self) -> MemoryStats {
        self.lock().stats
    }

    pub(crate) fn reset_peak(&self) {
        let mut st = self.lock();
        st.stats.peak_bytes = st.stats.live_bytes;
    }

    /// Drop every idle buffer (e.g. before a large allocation).
    pub(crate) fn trim(&self) {
        let mut st = self.lock();
        st.free.clear();
        st.stats.idle_bytes = 0;
    }
}

/// A GPU buffer borrowed from the pool; returns itself when the last handle is dropped.
///
/// A [`super::Batch`] that binds the buffer holds a handle until it is submitted, so a buffer
/// dropped by its owner while recorded work still needs it is not recycled (and overwritten by a
/// queued upload) before that work is on the queue.
pub struct GpuBuffer {
    inner: Arc<Pooled>,
}

pub(crate) struct Pooled {
    buf: Option<wgpu::Buffer>,
    /// Bytes the caller asked for (what bindings cover).
    len: u64,
    class: u64,
    usage: wgpu::BufferUsages,
    pool: Arc<BufferPool>,
}

impl Pooled {
    pub(crate) fn raw(&self) -> &wgpu::Buffer {
        self.buf.as_ref().expect("buffer present until drop")
    }
    pub(crate) fn len(&self) -> u64 {
        self.len
    }
}

impl GpuBuffer {
    pub(crate) fn new(
        buf: wgpu::Buffer,
        len: u64,
        class: u64,
        usage: wgpu::BufferUsages,
        pool: Arc<BufferPool>,
    ) -> Self {
        GpuBuffer {
            inner: Arc::new(Pooled {
                buf: Some(buf),
                len,
                class,
                usage,
                pool,
            }),
        }
    }

    pub(crate) fn raw(&self) -> &wgpu::Buffer {
        self.inner.raw()
    }

    /// Another handle keeping the buffer out of the pool (for recorded, unsubmitted work).
    pub(crate) fn share(&self) -> Arc<Pooled> {
        self.inner.clone()
    }

    /// Requested length in bytes.
    pub fn len(&self) -> u64 {
        self.inner.len
    }

    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.pool.give_back(buf, self.class, self.usage);
        }
    }
}

impl std::fmt::Debug for GpuBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuBuffer({} bytes)", self.inner.len)
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_bound_waste() {
        assert_eq!(size_class(1), 256);
        assert_eq!(size_class(4096), 4096);
        assert_eq!(size_class(4097), 4608);
        for s in [5000u64, 1 << 20, (1 << 27) - 3, 123_456_789] {
            let c = size_class(s);
            assert!(c >= s && (c - s) as f64 <= 0.125 * s as f64, "{s} -> {c}");
        }
        // A power of two stays itself, so a request at the binding limit never exceeds it.
        assert_eq!(size_class(1 << 27), 1 << 27);
    }
}
