//! Incremental decoding and logits: KV caches (one sequence or several in lockstep),
//! extending them token by token, and the LM head in row blocks.

use std::ops::Range;

use crate::error::{Error, Result};
use crate::gpu::ops;
use crate::gpu::{gemm_rows, Batch, GemmOp, GpuMatrix};

use super::{CacheView, Engine, KvCache};

impl<'a> Engine<'a> {
    /// Rows of logits formed at once by callers of [`logits`](Self::logits): a block of at
    /// most 64 MiB of f32 logits.
    pub fn logit_block_rows(&self) -> usize {
        ((64usize << 20) / (self.ck.config().vocab_size * 4)).max(1)
    }

    /// Logits [rows.len(), vocab] of a block of rows of normed hidden states.
    pub fn logits(&self, hidden: &GpuMatrix, rows: Range<usize>) -> Result<GpuMatrix> {
        let v = self.ck.config().vocab_size;
        let z = GpuMatrix::uninit(self.gpu, rows.len(), v)?;
        let mut b = Batch::new(self.gpu);
        let head = self.head();
        gemm_rows(&mut b, hidden, rows, head, GemmOp::NT, &z, 0, false)?;
        b.submit()?;
        Ok(z)
    }

    /// An empty KV cache for one sequence of up to `capacity` positions.
    pub fn new_cache(&mut self, capacity: usize) -> Result<KvCache> {
        self.new_batch_cache(1, capacity)
    }

    /// An empty KV cache for `nseq` sequences decoded in lockstep, `capacity` positions each.
    pub fn new_batch_cache(&mut self, nseq: usize, capacity: usize) -> Result<KvCache> {
        let c = self.ck.config();
        if capacity > self.rope.positions() {
            return Err(Error::InvalidArgument(format!(
                "a cache of {capacity} positions exceeds the {} this engine was built for",
                self.rope.positions()
            )));
        }
        let nseq = nseq.max(1);
        let rows = capacity * nseq;
        let kd = c.num_kv_heads * c.head_dim;
        let layers = (0..c.num_layers)
            .map(|_| {
                // One chunk each (group = all rows): attention reads the cache as one binding.
                Ok((
                    GpuMatrix::uninit_grouped(self.gpu, rows, kd, rows)?,
                    GpuMatrix::uninit_grouped(self.gpu, rows, kd, rows)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let positions: Vec<u32> = (0..rows).map(|r| (r / nseq) as u32).collect();
        Ok(KvCache {
            layers,
            positions: ops::upload_u32(self.gpu, &positions)?,
            nseq,
            len: 0,
            capacity,
        })
    }

    /// Append `tokens` to a one-sequence cache and return the normed hidden states of the new
    /// tokens ([tokens.len(), hidden]; the last row predicts the next token).
    pub fn extend(&mut self, cache: &mut KvCache, tokens: &[u32]) -> Result<GpuMatrix> {
        if cache.nseq != 1 {
            return Err(Error::InvalidArgument(
                "extend: use extend_batch for a batch cache".into(),
            ));
        }
        self.extend_impl(cache, tokens)
    }

    /// Append one token to each sequence of a batch cache (`tokens[b]` to sequence b); returns
    /// the normed hidden states [nseq, hidden].
    pub fn extend_batch(&mut self, cache: &mut KvCache, tokens: &[u32]) -> Result<GpuMatrix> {
        if tokens.len() != cache.nseq {
            return Err(Error::Shape(format!(
                "{} tokens for {} sequences",
                tokens.len(),
                cache.nseq
            )));
        }
        self.extend_impl(cache, tokens)
    }

    fn extend_impl(&mut self, cache: &mut KvCache, tokens: &[u32]) -> Result<GpuMatrix> {
        self.extend_observed(cache, tokens, &mut |_, _, _| Ok(()))
    }

    /// [`extend`](Self::extend) or [`extend_batch`](Self::extend_batch), calling
    /// `observe(engine, l, x)` with the new rows' stream entering decoder layer l (and
    /// `num_layers` with the stream leaving the last).
    pub(crate) fn extend_observed(
        &mut self,
        cache: &mut KvCache,
        tokens: &[u32],
        observe: &mut dyn FnMut(&Self, usize, &GpuMatrix) -> Result<()>,
    ) -> Result<GpuMatrix> {
        let c = self.ck.config().clone();
        let n = tokens.len();
        let steps = n / cache.nseq;
        if n == 0 {
            return Err(Error::InvalidArgument("no tokens to append".into()));
        }
        if cache.len + steps > cache.capacity {
            return Err(Error::InvalidArgument(format!(
                "the sequence would reach {} tokens, past the cache of {}",
                cache.len + steps,
                cache.capacity
            )));
        }
        self.validate_ids(tokens)?;
        let gpu = self.gpu;
        let ids = ops::upload_u32(gpu, tokens)?;
        let positions: Vec<u32> = (0..n)
            .map(|r| (cache.len + r / cache.nseq) as u32)
            .collect();
        let pos = ops::upload_u32(gpu, &positions)?;
        // One group: x is a single chunk like the cache rows it writes.
        let x = GpuMatrix::uninit_grouped(gpu, n, c.hidden_size, n)?;
        let mut b = Batch::new(gpu);
        ops::embed(&mut b, &ids, &self.embed, &x)?;
        b.submit()?;
        for l in 0..c.num_layers {
            observe(self, l, &x)?;
            self.load_layer(l)?;
            let w = self.layers[l].as_ref().expect("just loaded");
            let (k, v) = &cache.layers[l];
            let view = CacheView {
                k,
                v,
                positions: &cache.positions,
                start: cache.len,
                nseq: cache.nseq,
            };
            self.layer(w, &x, &pos, n, Some(view))?;
            if !self.resident {
                self.layers[l] = None;
                self.ck.release_layer(l);
            }
        }
        cache.len += steps;
        observe(self, c.num_layers, &x)?;
        let y = GpuMatrix::uninit_grouped(gpu, n, c.hidden_size, n)?;
        let mut b = Batch::new(gpu);
        ops::rms_norm(&mut b, &x, &self.final_norm, c.rms_norm_eps as f32, &y)?;
        b.submit()?;
        Ok(y)
    }
}
