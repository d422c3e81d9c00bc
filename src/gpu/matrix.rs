//! Row-major matrices on the GPU, split into row blocks that each fit one storage binding.
//!
//! A tensor larger than `max_storage_buffer_binding_size` (128 MiB on lavapipe) cannot be bound
//! whole, so a [`GpuMatrix`] is a list of [`Chunk`]s, each holding whole consecutive rows in
//! its own buffer. Kernels take (chunk, row offset) pairs; see `gemm.rs` for how products over
//! chunked operands are planned.

use crate::dtype::DType;
use crate::error::{Error, Result};

use super::buffer::GpuBuffer;
use super::context::Gpu;

/// One block of whole rows `[row0, row0 + rows)`.
#[derive(Debug)]
pub struct Chunk {
    pub buf: GpuBuffer,
    pub row0: usize,
    pub rows: usize,
}

/// A row-major `rows × cols` matrix stored as f32, f16 or bf16 (16-bit types packed two per
/// 32-bit word, element order = memory order).
#[derive(Debug)]
pub struct GpuMatrix {
    rows: usize,
    cols: usize,
    dtype: DType,
    chunks: Vec<Chunk>,
}

/// How many rows of `cols` elements of `dtype` fit in one binding of `max_binding` bytes.
pub(crate) fn rows_per_chunk(gpu: &Gpu, cols: usize, dtype: DType, what: &str) -> Result<usize> {
    let row_bytes = (cols * dtype.size()) as u64;
    let limit = gpu.caps().max_binding;
    if row_bytes > limit {
        return Err(Error::TooLarge {
            what: format!("one row of {what} ({cols} × {dtype})"),
            bytes: row_bytes,
            limit,
        });
    }
    // Keep element indices within u32 for the kernels.
    let by_bytes = (limit / row_bytes.max(1)) as usize;
    let by_index = (u32::MAX as usize / 2) / cols.max(1);
    let per = by_bytes.min(by_index).max(1);
    // Multiples of 4 rows keep chunk boundaries on the kernels' vector alignment.
    Ok(if per >= 4 { per / 4 * 4 } else { per })
}

/// A row range and, for each matrix, the chunk holding it and the range's first row within it.
pub type Segment<'m> = (std::ops::Range<usize>, Vec<(&'m Chunk, usize)>);

/// Rows per chunk when chunks must hold whole groups of `group` rows.
fn grouped_rows(gpu: &Gpu, cols: usize, dtype: DType, group: usize) -> Result<usize> {
    let per = rows_per_chunk(gpu, cols, dtype, "a matrix")?;
    if group <= 1 {
        return Ok(per);
    }
    if per < group {
        return Err(Error::TooLarge {
            what: format!("a group of {group} rows of {cols} × {dtype}"),
            bytes: (group * cols * dtype.size()) as u64,
            limit: gpu.caps().max_binding,
        });
    }
    Ok(per / group * group)
}

fn chunk_ranges(rows: usize, per: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..rows)
        .step_by(per)
        .map(move |r0| (r0, per.min(rows - r0)))
}

impl GpuMatrix {
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }
    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    /// A zero-filled f32 matrix.
    pub fn zeros(gpu: &Gpu, rows: usize, cols: usize) -> Result<GpuMatrix> {
        Self::alloc(gpu, rows, cols, DType::F32, true)
    }

    /// An f32 matrix with undefined contents (for outputs that will be overwritten).
    pub fn uninit(gpu: &Gpu, rows: usize, cols: usize) -> Result<GpuMatrix> {
        Self::alloc(gpu, rows, cols, DType::F32, false)
    }

    /// An f32 matrix whose chunks hold whole groups of `group` rows (e.g. whole sequences, so
    /// attention never straddles a chunk boundary). Contents undefined.
    pub fn uninit_grouped(gpu: &Gpu, rows: usize, cols: usize, group: usize) -> Result<GpuMatrix> {
        Self::alloc_grouped(gpu, rows, cols, DType::F32, false, group.max(1))
    }

    fn alloc(gpu: &Gpu, rows: usize, cols: usize, dtype: DType, zeroed: bool) -> Result<GpuMatrix> {
        Self::alloc_grouped(gpu, rows, cols, dtype, zeroed, 1)
    }

    /// A copy on the GPU with the same chunking.
    pub fn duplicate(&self, gpu: &Gpu) -> Result<GpuMatrix> {
        let per = self.chunks.first().map_or(1, |c| c.rows.max(1));
        let size = self.dtype.size();
        let out = Self::build(self.rows, self.cols, self.dtype, per, |_, n| {
            gpu.storage((n * self.cols * size) as u64, false)
        })?;
        for (a, b) in self.chunks.iter().zip(&out.chunks) {
            gpu.copy_buffer(&a.buf, &b.buf, (a.rows * self.cols * size) as u64)?;
        }
        Ok(out)
    }

    /// Chunks of `per` rows, each buffer made by `make(first row, rows)`.
    fn build(
        rows: usize,
        cols: usize,
        dtype: DType,
        per: usize,
        mut make: impl FnMut(usize, usize) -> Result<GpuBuffer>,
    ) -> Result<GpuMatrix> {
        let chunks = chunk_ranges(rows, per)
            .map(|(row0, n)| {
                Ok(Chunk {
                    buf: make(row0, n)?,
                    row0,
                    rows: n,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(GpuMatrix {
            rows,
            cols,
            dtype,
            chunks,
        })
    }

    fn alloc_grouped(
        gpu: &Gpu,
        rows: usize,
        cols: usize,
        dtype: DType,
        zeroed: bool,
        group: usize,
    ) -> Result<GpuMatrix> {
        let per = grouped_rows(gpu, cols, dtype, group)?;
        Self::build(rows, cols, dtype, per, |_, n| {
            gpu.storage((n * cols * dtype.size()) as u64, zeroed)
        })
    }

    /// Upload raw little-endian bytes of `dtype` (exactly `rows * cols` elements).
    pub fn from_bytes(
        gpu: &Gpu,
        rows: usize,
        cols: usize,
        dtype: DType,
        bytes: &[u8],
    ) -> Result<GpuMatrix> {
        Self::from_bytes_grouped(gpu, rows, cols, dtype, bytes, 1)
    }

    /// Upload f32 values with chunks holding whole groups of `group` rows.
    pub fn from_f32_grouped(
        gpu: &Gpu,
        rows: usize,
        cols: usize,
        group: usize,
        values: &[f32],
    ) -> Result<GpuMatrix> {
        if values.len() != rows * cols {
            return Err(Error::Shape(format!(
                "{} values given for a {rows}×{cols} matrix",
                values.len()
            )));
        }
        Self::from_bytes_grouped(
            gpu,
            rows,
            cols,
            DType::F32,
            bytemuck::cast_slice(values),
            group,
        )
    }

    fn from_bytes_grouped(
        gpu: &Gpu,
        rows: usize,
        cols: usize,
        dtype: DType,
        bytes: &[u8],
        group: usize,
    ) -> Result<GpuMatrix> {
        let expect = rows * cols * dtype.size();
        if bytes.len() != expect {
            return Err(Error::Shape(format!(
                "{} bytes given for a {rows}×{cols} {dtype} matrix ({expect} expected)",
                bytes.len()
            )));
        }
        let per = grouped_rows(gpu, cols, dtype, group.max(1))?;
        let row_bytes = cols * dtype.size();
        Self::build(rows, cols, dtype, per, |row0, n| {
            gpu.upload(&bytes[row0 * row_bytes..(row0 + n) * row_bytes])
        })
    }

    /// Upload f32 values, stored as `dtype` (rounded to nearest even for 16-bit types).
    pub fn from_f32(
        gpu: &Gpu,
        rows: usize,
        cols: usize,
        dtype: DType,
        values: &[f32],
    ) -> Result<GpuMatrix> {
        if values.len() != rows * cols {
            return Err(Error::Shape(format!(
                "{} values given for a {rows}×{cols} matrix",
                values.len()
            )));
        }
        match dtype {
            DType::F32 => Self::from_bytes(gpu, rows, cols, dtype, bytemuck::cast_slice(values)),
            _ => Self::from_bytes(gpu, rows, cols, dtype, &dtype.encode_f32(values)),
        }
    }

    /// Rows `rows` of an f32 matrix as a new one-chunk f32 matrix (copied on the GPU, after
    /// all work submitted so far).
    pub fn copy_rows(&self, gpu: &Gpu, rows: std::ops::Range<usize>) -> Result<GpuMatrix> {
        let n = rows.len();
        let row_bytes = (self.cols * 4) as u64;
        if self.dtype != DType::F32
            || rows.end > self.rows
            || n as u64 * row_bytes > gpu.caps().max_binding
        {
            return Err(Error::Shape(format!(
                "copy_rows {rows:?} of a {}×{} {} matrix",
                self.rows, self.cols, self.dtype
            )));
        }
        let out = Self::alloc_grouped(gpu, n, self.cols, DType::F32, false, n.max(1))?;
        let Some(dst) = out.chunks.first().map(|c| &c.buf) else {
            return Ok(out);
        };
        for (c, first, count, global) in self.segments(rows.clone()) {
            gpu.copy_region(
                &c.buf,
                first as u64 * row_bytes,
                dst,
                (global - rows.start) as u64 * row_bytes,
                count as u64 * row_bytes,
            )?;
        }
        Ok(out)
    }

    /// The pieces of `rows` (global row indices) as (chunk, first row within the chunk, row
    /// count, first global row).
    pub fn segments(
        &self,
        rows: std::ops::Range<usize>,
    ) -> impl Iterator<Item = (&Chunk, usize, usize, usize)> + '_ {
        self.chunks.iter().filter_map(move |c| {
            let r0 = rows.start.max(c.row0);
            let r1 = rows.end.min(c.row0 + c.rows);
            (r0 < r1).then(|| (c, r0 - c.row0, r1 - r0, r0))
        })
    }

    /// Split `rows` at every chunk boundary of every matrix in `mats`: each returned piece lies
    /// within one chunk of each matrix, given as (chunk, first row within it).
    pub fn common_segments<'m>(
        mats: &[&'m GpuMatrix],
        rows: std::ops::Range<usize>,
    ) -> Vec<Segment<'m>> {
        let mut cuts: Vec<usize> = vec![rows.start, rows.end];
        for m in mats {
            cuts.extend(
                m.chunks
                    .iter()
                    .map(|c| c.row0)
                    .filter(|&r| r > rows.start && r < rows.end),
            );
        }
        cuts.sort_unstable();
        cuts.dedup();
        cuts.windows(2)
            .filter(|w| w[0] < w[1])
            .map(|w| {
                let parts = mats
                    .iter()
                    .map(|m| {
                        let c = m
                            .chunks
                            .iter()
                            .find(|c| c.row0 <= w[0] && w[1] <= c.row0 + c.rows)
                            .expect("cuts include every chunk boundary");
                        (c, w[0] - c.row0)
                    })
                    .collect();
                (w[0]..w[1], parts)
            })
            .collect()
    }

    /// Whether two matrices are split into the same row chunks (elementwise kernels need it).
    pub fn same_layout(&self, other: &GpuMatrix) -> bool {
        self.rows == other.rows
            && self.chunks.len() == other.chunks.len()
            && self
                .chunks
                .iter()
                .zip(&other.chunks)
                .all(|(a, b)| a.row0 == b.row0 && a.rows == b.rows)
    }

    /// Read the whole matrix back as f32.
    pub fn to_f32(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        self.rows_to_f32(gpu, 0..self.rows)
    }

    /// Read rows `rows` back as f32 (straight from the chunks holding them).
    pub fn rows_to_f32(&self, gpu: &Gpu, rows: std::ops::Range<usize>) -> Result<Vec<f32>> {
        if rows.end > self.rows {
            return Err(Error::Shape(format!(
                "rows {rows:?} of a {}×{} matrix",
                self.rows, self.cols
            )));
        }
        let row_bytes = self.cols * self.dtype.size();
        let mut out = Vec::with_capacity(rows.len() * self.cols);
        for (c, first, count, _) in self.segments(rows) {
            // Readbacks start at a multiple of 4 bytes: a 16-bit row may start halfway.
            let start = first * row_bytes;
            let skip = start % 4;
            let len = count * row_bytes;
            let bytes = gpu.read_bytes(&c.buf, (start - skip) as u64, (skip + len) as u64)?;
            self.dtype.decode_f32(&bytes[skip..], &mut out);
        }
        Ok(out)
    }
}
