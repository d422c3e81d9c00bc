//! The layers' input Hessians of the model as tuned, for rounding its factors against the
//! inputs they see (train/output.rs): one forward walk over the layers, one stream held.

use crate::error::Result;
use crate::gpu::{GpuBuffer, GpuMatrix};
use crate::model::LinearKind;

use super::TrainModel;

/// A forward over calibration sequences, one layer at a time, for the layers' input Hessians
/// ([`TrainModel::input_hessians`]).
pub struct HessianWalk {
    /// The stream entering layer `layer`.
    x: GpuMatrix,
    pos: GpuBuffer,
    t: usize,
    layer: usize,
}

impl TrainModel<'_> {
    /// Start a walk over the layers of the model as tuned on `tokens` (sequences of `t`) that
    /// yields each layer's input Hessians in turn ([`next_input_hessians`]
    /// (Self::next_input_hessians)): one forward per layer, one stream held.
    pub fn input_hessians(&self, tokens: &[u32], t: usize) -> Result<HessianWalk> {
        let (x, pos) = self.stream_start(tokens, t)?;
        Ok(HessianWalk {
            x,
            pos,
            t,
            layer: 0,
        })
    }

    /// H = XᵀX of every linear's input in the walk's next layer, by linear (the kinds that
    /// share an input share H); the walk moves past the layer.
    pub fn next_input_hessians(
        &self,
        walk: &mut HessianWalk,
    ) -> Result<Vec<(LinearKind, std::rc::Rc<Vec<f64>>)>> {
        let gpu = self.gpu();
        let (out, acts) = self.layer_forward(walk.layer, &walk.x, &walk.pos, walk.t)?;
        walk.x = out;
        walk.layer += 1;
        let h = |m: &GpuMatrix| -> Result<std::rc::Rc<Vec<f64>>> {
            crate::compress::pipeline::accumulate_hessian(
                gpu,
                m.cols(),
                std::slice::from_ref(m),
                crate::lowrank::fit::Placement::Auto,
            )
            .map(std::rc::Rc::new)
        };
        let (h1, a, h2, act) = (h(&acts.h1)?, h(&acts.a)?, h(&acts.h2)?, h(&acts.act)?);
        Ok(vec![
            (LinearKind::QProj, h1.clone()),
            (LinearKind::KProj, h1.clone()),
            (LinearKind::VProj, h1),
            (LinearKind::OProj, a),
            (LinearKind::GateProj, h2.clone()),
            (LinearKind::UpProj, h2),
            (LinearKind::DownProj, act),
        ])
    }
}
