//! Setting up a run: the streaming engine, calibration, shards, and the job's inputs
//! (its fingerprint in a work directory).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::infer::{Engine, EngineOptions};
use crate::model::compressed::sha256_files;
use crate::model::{Checkpoint, Tokenizer};

use crate::compress::calib::{self, CalibOptions, Calibration};

use super::options::*;

/// An engine that streams layers (none resident) for sequences up to `len`; the embedding and
/// LM head, now on the GPU, have their mapped pages released.
pub(crate) fn streaming_engine<'a>(
    gpu: &'a Gpu,
    ck: &'a Checkpoint,
    len: usize,
) -> Result<Engine<'a>> {
    let engine = Engine::new(
        gpu,
        ck,
        &EngineOptions {
            resident_bytes: 0,
            max_positions: len,
        },
    )?;
    ck.release(&ck.arch().embed_tokens.name);
    if let Some(h) = &ck.arch().lm_head {
        ck.release(&h.name);
    }
    Ok(engine)
}

/// Calibration sequences from `source`.
pub(crate) fn calibrate(
    engine: &mut Engine<'_>,
    source: &CalibSource,
    copts: &CalibOptions,
    progress: &mut dyn FnMut(&Event),
) -> Result<Calibration> {
    match source {
        CalibSource::Text(paths) => {
            progress(&Event::Calibrating {
                kind: "text",
                done: 0,
                total: copts.samples,
            });
            let dir = engine.checkpoint().dir().to_path_buf();
            let tok = Tokenizer::from_model_dir(&dir)?.ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{} has no tokenizer.json to tokenize --calib text",
                    dir.display()
                ))
            })?;
            let c = calib::from_text(&tok, paths, copts)?;
            progress(&Event::Calibrating {
                kind: "text",
                done: copts.samples,
                total: copts.samples,
            });
            Ok(c)
        }
        CalibSource::SelfGenerated => calib::self_generated(engine, copts, &mut |d, t| {
            progress(&Event::Calibrating {
                kind: "self",
                done: d,
                total: t,
            })
        }),
    }
}

/// The decoder layers shard `i` of `n` compresses: a contiguous, balanced range.
pub fn shard_layers(layers: usize, i: usize, n: usize) -> std::ops::Range<usize> {
    (i * layers / n)..((i + 1) * layers / n)
}

/// What a work directory's job depends on, by name: every option that shapes the output
/// (derived from `CompressOptions` by an exhaustive destructuring, so a new field does not
/// compile until it is either fingerprinted or named here as run control), the source model,
/// the calibration text's content, the saved Hessians' identity, and the adapter (backends
/// round differently: layers of one job come from one adapter, or from the same set of
/// adapters in the same order).
pub(crate) fn job_inputs(
    gpus: &[&Gpu],
    opts: &CompressOptions,
    source_sha256: &str,
    hessians: Option<&str>,
) -> Result<std::collections::BTreeMap<String, String>> {
    let adapter = gpus
        .iter()
        .map(|g| {
            let r = g.report();
            format!(
                "{} ({}, driver {} {})",
                r.name, r.backend, r.driver, r.driver_info
            )
        })
        .collect::<Vec<_>>()
        .join(" + ");
    job_inputs_for(&adapter, opts, source_sha256, hessians)
}

pub(crate) fn job_inputs_for(
    adapter: &str,
    opts: &CompressOptions,
    source_sha256: &str,
    hessians: Option<&str>,
) -> Result<std::collections::BTreeMap<String, String>> {
    let CompressOptions {
        layers,
        allocation,
        sparsity,
        method,
        grid,
        gptq,
        calib_source,
        calib,
        caldera,
        rht,
        // Run control: where the output goes and how this process takes part. Shards of one
        // job differ in `shard`; the Hessians' identity (not their path) is below.
        output: _,
        force: _,
        hessians: _,
        work_dir: _,
        resume: _,
        shard: _,
        // The same layers go into every format: a resumed or sharded job may write another.
        format: _,
        dtype: _,
    } = opts;
    let CalibOptions {
        samples,
        len,
        seed,
        newlines,
        hessians_on,
    } = calib;
    let mut m = std::collections::BTreeMap::new();
    let mut put = |k: &str, v: String| {
        m.insert(k.to_string(), v);
    };
    put("adapter", adapter.into());
    put("pumice", env!("CARGO_PKG_VERSION").into());
    put("source_sha256", source_sha256.into());
    put("method", format!("{method:?}"));
    put("grid", format!("{grid:?}"));
    put("gptq", format!("{gptq:?}"));
    put("caldera", format!("{caldera:?}"));
    put("rht", rht.to_string());
    put("sparsity", format!("{sparsity:?}"));
    put("layers", format!("{layers:?}"));
    put(
        "allocation",
        allocation
            .as_ref()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "none".into()),
    );
    put("seed", seed.to_string());
    match hessians {
        Some(id) => put("calibration", format!("saved Hessians {id}")),
        None => {
            let what = match calib_source {
                CalibSource::SelfGenerated => "self-generated".to_string(),
                CalibSource::Text(paths) => {
                    let files = calib::expand_paths(paths)?;
                    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
                    format!(
                        "text sha256 {}, newlines {newlines:?}",
                        sha256_files(&refs)?
                    )
                }
            };
            put(
                "calibration",
                format!("{what}, {samples} sequences of {len} tokens"),
            );
            // Host (f64) and GPU (compensated f32) sums differ in their last bits.
            put("hessians_on", format!("{hessians_on:?}"));
        }
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::workdir::fingerprint;
    use crate::quant::sparsity::Sparsity;
    use crate::quant::{GptqOptions, Grid, GridKind};

    fn base() -> CompressOptions {
        CompressOptions {
            layers: Vec::new(),
            allocation: None,
            sparsity: Sparsity::Dense,
            method: Method::Gptq,
            grid: Grid::new(4, 128, GridKind::Asymmetric).unwrap(),
            gptq: GptqOptions::default(),
            calib_source: CalibSource::SelfGenerated,
            calib: CalibOptions {
                samples: 8,
                len: 64,
                seed: 0,
                hessians_on: crate::lowrank::fit::Placement::Auto,
                newlines: crate::text::Newlines::Universal,
            },
            caldera: CalderaSettings::default(),
            output: "out".into(),
            force: false,
            rht: false,
            hessians: None,
            work_dir: None,
            resume: false,
            shard: None,
            format: crate::format::FormatKind::Native,
            dtype: None,
        }
    }

    fn fp(o: &CompressOptions) -> String {
        fingerprint(&job_inputs_for("adapter", o, "sha", None).unwrap())
    }

    /// Every option that shapes the output changes the fingerprint (so `--resume` refuses a
    /// changed job); run control does not (shards of one job share it).
    #[test]
    fn every_output_option_changes_the_fingerprint_and_run_control_does_not() {
        type Edit = fn(&mut CompressOptions);
        let edits: Vec<(&str, Edit)> = vec![
            ("layers", |o| {
                let r = o.recipe(0);
                o.layers = vec![r];
            }),
            ("allocation", |o| {
                o.allocation = Some(serde_json::json!({"rule": "x"}))
            }),
            ("sparsity", |o| o.sparsity = Sparsity::TwoFour),
            ("method", |o| o.method = Method::Rtn),
            ("grid", |o| {
                o.grid = Grid::new(3, 128, GridKind::Asymmetric).unwrap()
            }),
            ("gptq.block", |o| o.gptq.block /= 2),
            ("gptq.damp", |o| o.gptq.damp *= 2.0),
            ("gptq.act_order", |o| o.gptq.act_order = !o.gptq.act_order),
            ("calib.samples", |o| o.calib.samples += 1),
            ("calib.len", |o| o.calib.len += 1),
            ("calib.seed", |o| o.calib.seed += 1),
            ("calib.hessians_on", |o| {
                o.calib.hessians_on = crate::lowrank::fit::Placement::Gpu
            }),
            ("caldera.rank", |o| o.caldera.rank = Some(7)),
            ("caldera.outer_iters", |o| o.caldera.outer_iters += 1),
            ("caldera.patience", |o| o.caldera.patience += 1),
            ("caldera.placement", |o| {
                o.caldera.placement = crate::lowrank::fit::Placement::Gpu
            }),
            ("rht", |o| o.rht = !o.rht),
        ];
        let b = fp(&base());
        let mut seen = std::collections::BTreeSet::from([b.clone()]);
        for (name, edit) in edits {
            let mut o = base();
            edit(&mut o);
            let f = fp(&o);
            assert_ne!(f, b, "changing {name} left the fingerprint unchanged");
            assert!(
                seen.insert(f),
                "{name} collides with another option's change"
            );
        }
        // Text calibration also fingerprints newline handling.
        let dir = std::env::temp_dir().join(format!("pumice-fp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.txt"), "calibration text").unwrap();
        let mut t = base();
        t.calib_source = CalibSource::Text(vec![dir.join("a.txt")]);
        let mut raw = t.clone();
        raw.calib.newlines = crate::text::Newlines::Keep;
        assert_ne!(fp(&t), b, "calib_source");
        assert_ne!(fp(&t), fp(&raw), "newlines");
        let before = fp(&t);
        std::fs::write(dir.join("a.txt"), "other calibration text").unwrap();
        assert_ne!(fp(&t), before, "the text's content");
        std::fs::remove_dir_all(&dir).unwrap();
        // Run control leaves it alone.
        let mut o = base();
        o.output = "elsewhere".into();
        o.force = true;
        o.hessians = Some("h".into());
        o.work_dir = Some("w".into());
        o.resume = true;
        o.shard = Some((1, 4));
        o.format = crate::format::FormatKind::Dense;
        o.dtype = Some(crate::format::StoreType::Float(crate::DType::F32));
        assert_eq!(fp(&o), b);
        // And the adapter, model and Hessian identity are inputs too.
        let i = |a: &str, s: &str, h: Option<&str>| {
            fingerprint(&job_inputs_for(a, &base(), s, h).unwrap())
        };
        assert_ne!(i("other", "sha", None), b);
        assert_ne!(i("adapter", "other", None), b);
        assert_ne!(i("adapter", "sha", Some("hid")), b);
    }
}
