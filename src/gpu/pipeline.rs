//! Compute pipelines, built once per (kernel, specialization) and cached.
//!
//! Kernels are WGSL templates under `shaders/`. A specialization is a list of `{{NAME}}` →
//! text substitutions (operand storage types, workgroup sizes, flags); its canonical string is
//! the cache key, so two requests for the same variant share one pipeline.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// A WGSL template with a stable name.
#[derive(Clone, Copy, Debug)]
pub struct Kernel {
    pub name: &'static str,
    pub template: &'static str,
    /// Substitutions generated from the spec's own values (e.g. a register block written out
    /// for its sizes). Run only when the pipeline is built: being a function of the spec,
    /// they need not be part of its key, so a cached variant costs nothing to look up.
    pub expand: Option<Expand>,
}

/// A kernel's generated substitutions (see [`Kernel::expand`]).
pub type Expand = fn(&Spec) -> Result<Vec<(&'static str, String)>>;

/// Substitutions for one variant of a kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Spec {
    pairs: Vec<(String, String)>,
}

impl Spec {
    pub fn new() -> Self {
        Spec::default()
    }

    /// Set `{{key}}` to `value`.
    pub fn set(mut self, key: &str, value: impl ToString) -> Self {
        let value = value.to_string();
        match self.pairs.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.pairs.push((key.to_string(), value)),
        }
        self
    }

    /// The value of `{{key}}` as a number (for [`Kernel::expand`]).
    pub fn number(&self, key: &str) -> Result<u32> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.parse().ok())
            .ok_or_else(|| Error::Shader {
                kernel: self.key(),
                msg: format!("specialization {key} is missing or not a number"),
            })
    }

    /// Canonical, order-independent key. Long values (generated code) appear as a hash, so the
    /// key stays short enough for labels and logs.
    pub fn key(&self) -> String {
        let short = |v: &str| {
            if v.len() <= 24 && !v.contains('\n') {
                v.to_string()
            } else {
                // FNV-1a: stable across runs and platforms.
                let h = v.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                    (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
                });
                format!("#{h:016x}")
            }
        };
        let mut pairs: Vec<_> = self
            .pairs
            .iter()
            .map(|(k, v)| format!("{k}={}", short(v)))
            .collect();
        pairs.sort();
        pairs.join(";")
    }

    /// The template with every placeholder replaced. An unreplaced `{{...}}` is a bug in the
    /// caller and is reported as a shader error naming it.
    pub fn render(&self, kernel: &Kernel) -> Result<String> {
        let mut src = kernel.template.to_string();
        for (k, v) in &self.pairs {
            src = src.replace(&format!("{{{{{k}}}}}"), v);
        }
        if let Some(expand) = kernel.expand {
            for (k, v) in expand(self)? {
                src = src.replace(&format!("{{{{{k}}}}}"), &v);
            }
        }
        if let Some(pos) = src.find("{{") {
            let end = src[pos..]
                .find("}}")
                .map(|e| pos + e + 2)
                .unwrap_or(src.len());
            return Err(Error::Shader {
                kernel: kernel.name.to_string(),
                msg: format!("placeholder {} was not specialized", &src[pos..end]),
            });
        }
        Ok(src)
    }
}

#[derive(Default)]
pub(crate) struct PipelineCache {
    map: Mutex<HashMap<(String, String), Arc<wgpu::ComputePipeline>>>,
    /// Kernel name by pipeline address (profiling).
    names: Mutex<HashMap<usize, &'static str>>,
}

impl PipelineCache {
    pub(crate) fn get_or_build(
        &self,
        device: &wgpu::Device,
        kernel: &Kernel,
        spec: &Spec,
        profiler: &super::profile::Profiler,
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        let key = (kernel.name.to_string(), spec.key());
        if let Some(p) = self.map.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(p.clone());
        }
        let started = std::time::Instant::now();
        let source = spec.render(kernel)?;
        let label = format!("{}[{}]", kernel.name, key.1);
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(&label),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&label),
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: wgpu::PipelineCompilationOptions::default(),
            cache: None,
        });
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(Error::Shader {
                kernel: label,
                msg: err.to_string(),
            });
        }
        let pipeline = Arc::new(pipeline);
        let seconds = started.elapsed().as_secs_f64();
        profiler.add_build(kernel.name, seconds);
        tracing::debug!(kernel = %label, seconds, "built");
        self.names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(Arc::as_ptr(&pipeline) as usize, kernel.name);
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, pipeline.clone());
        Ok(pipeline)
    }

    /// The kernel name of a pipeline this cache built ("?" for any other).
    pub(crate) fn name_of(&self, p: &Arc<wgpu::ComputePipeline>) -> &'static str {
        self.names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(Arc::as_ptr(p) as usize))
            .copied()
            .unwrap_or("?")
    }

    pub(crate) fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: Kernel = Kernel {
        name: "t",
        template: "const A: u32 = {{A}}u; const B = {{B}};",
        expand: None,
    };

    #[test]
    fn spec_key_is_order_independent_and_render_checks() {
        let s1 = Spec::new().set("A", 1).set("B", true);
        let s2 = Spec::new().set("B", true).set("A", 1);
        assert_eq!(s1.key(), s2.key());
        assert_eq!(s1.render(&K).unwrap(), "const A: u32 = 1u; const B = true;");
        let err = Spec::new().set("A", 1).render(&K).unwrap_err().to_string();
        assert!(err.contains("{{B}}"), "{err}");
    }
}
