//! Edge-LLM's voting at inference: the model's head and every stored exit (its own RMSNorm and
//! LM head on the residual stream after `depth` layers) each give a softmax; per token the
//! element-wise maximum of them, renormalized, is the prediction. On the GPU the vote is kept as
//! logits (log max_e softmax(z_e), [`ops::vote`]) so evaluation's statistics and sampling read
//! it as they read a model's logits.

use std::ops::Range;

use crate::error::{Error, Result};
use crate::gpu::ops;
use crate::gpu::{gemm_rows, Batch, GemmOp, GpuMatrix};
use crate::model::exits::Exits;

use super::{Engine, KvCache};
use crate::infer::weights::{check_finite, upload};

/// One exit on the GPU.
pub(crate) struct ExitWeights {
    depth: usize,
    norm: GpuMatrix,
    head: GpuMatrix,
}

/// The normed hidden states of a batch at the model's head and at every loaded exit
/// (shallowest first), row for row.
pub struct ExitStates {
    pub last: GpuMatrix,
    pub exits: Vec<GpuMatrix>,
}

impl<'a> Engine<'a> {
    /// Upload `exits` (stored with the model or an adapter) for voting.
    pub fn load_exits(&mut self, exits: &Exits) -> Result<()> {
        self.exits = exits
            .depths()
            .iter()
            .map(|&d| self.upload_exit(exits, d))
            .collect::<Result<_>>()?;
        self.exit_alone = false;
        Ok(())
    }

    /// Upload the one exit of `exits` after `depth` layers and predict from it alone (the
    /// model's own head left out): what that exit scores by itself.
    pub fn load_exit_alone(&mut self, exits: &Exits, depth: usize) -> Result<()> {
        exits.check_depth(depth)?;
        self.exits = vec![self.upload_exit(exits, depth)?];
        self.exit_alone = true;
        Ok(())
    }

    fn upload_exit(&self, exits: &Exits, depth: usize) -> Result<ExitWeights> {
        let c = self.ck.config();
        let (n, h) = (exits.norm(depth), exits.head(depth));
        check_finite(&n)?;
        check_finite(&h)?;
        Ok(ExitWeights {
            depth,
            norm: upload(self.gpu, &n, 1, c.hidden_size)?,
            head: upload(self.gpu, &h, c.vocab_size, c.hidden_size)?,
        })
    }

    /// Depths of the exits loaded for voting.
    pub fn exit_depths(&self) -> Vec<usize> {
        self.exits.iter().map(|e| e.depth).collect()
    }

    /// A copy of the stream `x` when `l` is an exit's depth (the observer of a forward pass).
    fn capture(&self, l: usize, x: &GpuMatrix, into: &mut Vec<GpuMatrix>) -> Result<()> {
        if self.exits.iter().any(|e| e.depth == l) {
            into.push(x.duplicate(self.gpu)?);
        }
        Ok(())
    }

    /// Each captured stream through its exit's norm (grouped by `group` rows like the final
    /// norm's output).
    fn exit_normed(&self, streams: Vec<GpuMatrix>, group: usize) -> Result<Vec<GpuMatrix>> {
        let c = self.ck.config();
        if streams.len() != self.exits.len() {
            return Err(Error::Shape(format!(
                "{} streams captured for {} exits",
                streams.len(),
                self.exits.len()
            )));
        }
        let mut b = Batch::new(self.gpu);
        let mut out = Vec::with_capacity(streams.len());
        for (x, e) in streams.iter().zip(&self.exits) {
            let y = GpuMatrix::uninit_grouped(self.gpu, x.rows(), c.hidden_size, group)?;
            ops::rms_norm(&mut b, x, &e.norm, c.rms_norm_eps as f32, &y)?;
            out.push(y);
        }
        b.submit()?;
        Ok(out)
    }

    /// [`hidden_states`](Self::hidden_states) at the model's head and at every loaded exit.
    pub fn exit_hidden_states(&mut self, tokens: &[u32], seq_len: usize) -> Result<ExitStates> {
        let mut streams = Vec::new();
        let last = self.hidden_states_observed(tokens, seq_len, &mut |e, l, x| {
            e.capture(l, x, &mut streams)
        })?;
        Ok(ExitStates {
            last,
            exits: self.exit_normed(streams, seq_len)?,
        })
    }

    /// [`extend`](Self::extend) (one sequence) with the new rows' states at every loaded exit.
    pub fn extend_exits(&mut self, cache: &mut KvCache, tokens: &[u32]) -> Result<ExitStates> {
        if cache.nseq != 1 {
            return Err(Error::InvalidArgument(
                "extend_exits: one sequence only".into(),
            ));
        }
        let mut streams = Vec::new();
        let last =
            self.extend_observed(cache, tokens, &mut |e, l, x| e.capture(l, x, &mut streams))?;
        let n = last.rows();
        Ok(ExitStates {
            last,
            exits: self.exit_normed(streams, n)?,
        })
    }

    /// The vote of the model's head and every loaded exit for a block of rows, as logits
    /// [rows.len(), vocab]: log max_e softmax(z_e) (softmax of it is the renormalized vote);
    /// after [`load_exit_alone`](Self::load_exit_alone), that exit's log-softmax.
    pub fn voted_logits(&self, states: &ExitStates, rows: Range<usize>) -> Result<GpuMatrix> {
        let v = self.ck.config().vocab_size;
        let out = GpuMatrix::uninit(self.gpu, rows.len(), v)?;
        // Each head's logits are formed in turn into one scratch block.
        let z = GpuMatrix::uninit(self.gpu, rows.len(), v)?;
        let own = (!self.exit_alone).then_some((&states.last, self.head()));
        let heads = own.into_iter().chain(
            states
                .exits
                .iter()
                .zip(&self.exits)
                .map(|(h, e)| (h, &e.head)),
        );
        for (i, (h, head)) in heads.enumerate() {
            let mut b = Batch::new(self.gpu);
            gemm_rows(&mut b, h, rows.clone(), head, GemmOp::NT, &z, 0, false)?;
            ops::vote(&mut b, &z, &out, i == 0)?;
            b.submit()?;
        }
        Ok(out)
    }
}
