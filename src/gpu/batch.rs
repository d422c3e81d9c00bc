//! Recording many dispatches into one submission.
//!
//! A [`Batch`] collects dispatches (pipeline, storage buffers, a small uniform parameter block,
//! workgroup counts). On [`Batch::submit`] all parameter blocks go into one uniform buffer, the
//! bind groups are created against it, and every dispatch is encoded into a single compute pass
//! and submitted once. wgpu inserts the barriers between dispatches that touch the same buffer.

use std::num::NonZeroU64;
use std::sync::Arc;

use crate::error::{Error, Result};

use super::buffer::{GpuBuffer, Pooled};
use super::context::Gpu;

struct Dispatch {
    pipeline: Arc<wgpu::ComputePipeline>,
    /// Buffers bound at bindings 1.. in order (binding 0 is the uniform block); the handles
    /// keep them out of the pool until the batch is submitted.
    storage: Vec<Arc<Pooled>>,
    params: std::ops::Range<usize>,
    workgroups: [u32; 3],
}

/// Dispatches waiting to be submitted together.
pub struct Batch<'g> {
    gpu: &'g Gpu,
    dispatches: Vec<Dispatch>,
    params: Vec<u8>,
}

impl<'g> Batch<'g> {
    pub fn new(gpu: &'g Gpu) -> Self {
        Batch {
            gpu,
            dispatches: Vec::new(),
            params: Vec::new(),
        }
    }

    pub fn gpu(&self) -> &'g Gpu {
        self.gpu
    }

    pub fn len(&self) -> usize {
        self.dispatches.len()
    }

    pub fn is_empty(&self) -> bool {
        self.dispatches.is_empty()
    }

    /// Queue one dispatch. `params` is the kernel's uniform block (binding 0); `storage` are the
    /// buffers at bindings 1, 2, ... in order, each bound over its requested length.
    pub fn dispatch<P: bytemuck::Pod>(
        &mut self,
        pipeline: Arc<wgpu::ComputePipeline>,
        params: &P,
        storage: &[&GpuBuffer],
        workgroups: [u32; 3],
    ) -> Result<()> {
        let max = self.gpu.caps().max_workgroups_per_dim;
        if workgroups.iter().any(|&w| w > max) {
            return Err(Error::Shape(format!(
                "dispatch of {workgroups:?} workgroups exceeds the device limit of {max} per dimension"
            )));
        }
        if workgroups.contains(&0) {
            return Ok(());
        }
        let align = self.gpu.caps().min_uniform_align.max(16) as usize;
        let start = self.params.len().div_ceil(align) * align;
        self.params.resize(start, 0);
        self.params.extend_from_slice(bytemuck::bytes_of(params));
        let end = self.params.len();
        // Uniform bindings must be a multiple of 16 bytes.
        self.params
            .resize(start + (end - start).div_ceil(16) * 16, 0);
        let end = self.params.len();
        self.dispatches.push(Dispatch {
            pipeline,
            storage: storage.iter().map(|b| b.share()).collect(),
            params: start..end,
            workgroups,
        });
        Ok(())
    }

    /// Encode everything into one compute pass and submit it. Does not wait for completion.
    pub fn submit(self) -> Result<()> {
        if self.dispatches.is_empty() {
            return Ok(());
        }
        let gpu = self.gpu;
        let device = &gpu.device;
        let uniform = gpu.buffer(
            self.params.len() as u64,
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        )?;
        gpu.queue.write_buffer(uniform.raw(), 0, &self.params);
        gpu.scoped("kernel submission", || -> Result<()> {
            let groups: Vec<wgpu::BindGroup> = self
                .dispatches
                .iter()
                .map(|d| {
                    let layout = d.pipeline.get_bind_group_layout(0);
                    let mut entries = vec![wgpu::BindGroupEntry {
                        binding: 0,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: uniform.raw(),
                            offset: d.params.start as u64,
                            size: NonZeroU64::new((d.params.end - d.params.start) as u64),
                        }),
                    }];
                    for (i, buf) in d.storage.iter().enumerate() {
                        entries.push(wgpu::BindGroupEntry {
                            binding: i as u32 + 1,
                            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                buffer: buf.raw(),
                                offset: 0,
                                size: NonZeroU64::new(buf.len()),
                            }),
                        });
                    }
                    device.create_bind_group(&wgpu::BindGroupDescriptor {
                        label: None,
                        layout: &layout,
                        entries: &entries,
                    })
                })
                .collect();
            if gpu.profiling() {
                return self.submit_timed(&groups);
            }
            let mut enc = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("batch"),
            });
            {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("batch"),
                    timestamp_writes: None,
                });
                for (d, g) in self.dispatches.iter().zip(&groups) {
                    pass.set_pipeline(&d.pipeline);
                    pass.set_bind_group(0, g, &[]);
                    pass.dispatch_workgroups(d.workgroups[0], d.workgroups[1], d.workgroups[2]);
                }
            }
            gpu.queue.submit([enc.finish()]);
            Ok(())
        })?
    }

    /// Profiling: each dispatch in its own pass between two timestamps, the batch waited for
    /// and each dispatch's GPU time added to its kernel's total.
    fn submit_timed(&self, groups: &[wgpu::BindGroup]) -> Result<()> {
        let gpu = self.gpu;
        let device = &gpu.device;
        // Two queries per dispatch, at most QUERY_SET_MAX_QUERIES per set.
        let per_set = (wgpu::QUERY_SET_MAX_QUERIES / 2) as usize;
        let ns_per_tick = gpu.queue.get_timestamp_period() as f64;
        for (start, chunk) in self
            .dispatches
            .chunks(per_set)
            .enumerate()
            .map(|(i, c)| (i * per_set, c))
        {
            let n = chunk.len() as u32;
            let set = device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("profile"),
                ty: wgpu::QueryType::Timestamp,
                count: 2 * n,
            });
            let bytes = 16 * n as u64;
            let resolve = device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profile resolve"),
                size: bytes,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            let read = device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profile read"),
                size: bytes,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let mut enc = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("batch (profiled)"),
            });
            for (i, d) in chunk.iter().enumerate() {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("dispatch"),
                    timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                        query_set: &set,
                        beginning_of_pass_write_index: Some(2 * i as u32),
                        end_of_pass_write_index: Some(2 * i as u32 + 1),
                    }),
                });
                pass.set_pipeline(&d.pipeline);
                pass.set_bind_group(0, &groups[start + i], &[]);
                pass.dispatch_workgroups(d.workgroups[0], d.workgroups[1], d.workgroups[2]);
            }
            enc.resolve_query_set(&set, 0..2 * n, &resolve, 0);
            enc.copy_buffer_to_buffer(&resolve, 0, &read, 0, bytes);
            gpu.queue.submit([enc.finish()]);
            let (tx, rx) = std::sync::mpsc::channel();
            read.slice(..).map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r);
            });
            gpu.wait()?;
            match rx.recv() {
                Ok(Ok(())) => {}
                _ => {
                    return Err(Error::Gpu {
                        op: "reading profile timestamps".into(),
                        msg: "mapping failed".into(),
                    })
                }
            }
            {
                let data = read.slice(..).get_mapped_range().map_err(|e| Error::Gpu {
                    op: "reading profile timestamps".into(),
                    msg: format!("{e:?}"),
                })?;
                let ticks: &[u64] = bytemuck::cast_slice(&data);
                for (i, d) in chunk.iter().enumerate() {
                    let dt = ticks[2 * i + 1].saturating_sub(ticks[2 * i]) as f64 * ns_per_tick;
                    gpu.profiler
                        .add_gpu(gpu.kernel_name(&d.pipeline), dt * 1e-9);
                }
            }
            read.unmap();
        }
        Ok(())
    }
}
