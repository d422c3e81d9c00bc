//! Progress for long runs: a bar on a terminal, plain periodic lines otherwise (logs, CI,
//! headless jobs). Always on stderr, so stdout stays clean for results and JSON.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    what: &'static str,
    unit: &'static str,
    total: u64,
    start: Instant,
    last_line: Instant,
    done: u64,
}

/// Interval between plain progress lines.
const LINE_EVERY: Duration = Duration::from_secs(5);

impl Progress {
    pub fn new(what: &'static str, total: u64, unit: &'static str) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} [{bar:40}] {pos}/{len} {msg} ({elapsed} elapsed, ETA {eta})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_prefix(what);
            b.set_message(unit);
            b
        });
        Progress {
            bar,
            what,
            unit,
            total,
            start: Instant::now(),
            last_line: Instant::now(),
            done: 0,
        }
    }

    pub fn set(&mut self, done: u64) {
        self.done = done;
        match &self.bar {
            Some(b) => b.set_position(done),
            None => {
                if self.last_line.elapsed() >= LINE_EVERY || done == self.total {
                    self.last_line = Instant::now();
                    let el = self.start.elapsed().as_secs_f64();
                    let eta = if done > 0 {
                        el / done as f64 * (self.total - done) as f64
                    } else {
                        f64::NAN
                    };
                    let _ = writeln!(
                        std::io::stderr(),
                        "{}: {done}/{} {} ({:.0}%), {el:.0} s elapsed, ETA {eta:.0} s",
                        self.what,
                        self.total,
                        self.unit,
                        100.0 * done as f64 / self.total.max(1) as f64
                    );
                }
            }
        }
    }

    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// Where a long command's events go: on a terminal (and without `--json`), progress bars or
/// plain lines on stderr; otherwise one JSON object per line on stdout — progress with the
/// fraction done, elapsed time and ETA, finished layers, notes — ending with a summary or an
/// error object. Human-readable notes always go to stderr.
pub struct Reporter {
    json: bool,
    start: Instant,
    calib: Option<Progress>,
    bar: Option<Progress>,
    /// When the quantize stage started and how much was done then (resumed runs).
    stage: Option<(Instant, usize)>,
}

/// Whether JSON lines are being written: errors are then reported as a JSON line too.
static JSON_MODE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn json_mode() -> bool {
    JSON_MODE.load(std::sync::atomic::Ordering::Relaxed)
}

/// One JSON object as one line on stdout, flushed (a reader may be waiting for it).
pub fn emit_json(v: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

impl Reporter {
    /// `json`: the command's --json flag; stdout that is not a terminal implies it.
    pub fn new(json: bool) -> Reporter {
        let json = json || !std::io::stdout().is_terminal();
        JSON_MODE.store(json, std::sync::atomic::Ordering::Relaxed);
        Reporter {
            json,
            start: Instant::now(),
            calib: None,
            bar: None,
            stage: None,
        }
    }

    pub fn json(&self) -> bool {
        self.json
    }

    /// Emit `fields` as an event of kind `event` with the time elapsed since the start.
    pub fn emit(&self, event: &str, fields: serde_json::Value) {
        if !self.json {
            return;
        }
        let mut o = serde_json::Map::new();
        o.insert("event".into(), event.into());
        if let serde_json::Value::Object(f) = fields {
            o.extend(f);
        }
        o.insert(
            "elapsed_s".into(),
            serde_json::json!(round3(self.start.elapsed().as_secs_f64())),
        );
        emit_json(&serde_json::Value::Object(o));
    }

    /// The final object (JSON mode), `summary` merged into `{"event": "summary"}`.
    pub fn summary(&self, summary: serde_json::Value) {
        self.emit("summary", summary);
    }

    /// End a command: the summary object in JSON mode, otherwise `human` (the readable
    /// summary on stdout).
    pub fn conclude(
        &mut self,
        summary: serde_json::Value,
        human: impl FnOnce() -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        self.finish();
        if self.json {
            self.summary(summary);
            Ok(())
        } else {
            human()
        }
    }

    pub fn note(&self, msg: &str) {
        let _ = writeln!(std::io::stderr(), "note: {msg}");
        self.emit("note", serde_json::json!({ "message": msg }));
    }

    pub fn on(&mut self, e: &pumice::compress::pipeline::Event) {
        use pumice::compress::pipeline::Event;
        match e {
            Event::Calibrating { kind, done, total } => {
                if self.json {
                    let el = self.start.elapsed().as_secs_f64();
                    self.emit(
                        "progress",
                        serde_json::json!({
                            "stage": "calibration", "kind": kind, "done": done, "total": total,
                            "fraction": frac(*done, *total), "eta_s": eta(el, *done, *total, 0),
                        }),
                    );
                    return;
                }
                let b = self.calib.get_or_insert_with(|| {
                    let self_gen = *kind == "self";
                    Progress::new(
                        if self_gen {
                            "calibration (self-generated: sampling from the model)"
                        } else {
                            "calibration (text)"
                        },
                        *total as u64,
                        if self_gen {
                            "sampling steps"
                        } else {
                            "sequences"
                        },
                    )
                });
                b.set(*done as u64);
            }
            Event::Matrix {
                layer,
                name,
                done,
                total,
                relative_error,
            } => {
                let (t0, d0) = *self.stage.get_or_insert((Instant::now(), done - 1));
                if self.json {
                    let el = t0.elapsed().as_secs_f64();
                    self.emit(
                        "progress",
                        serde_json::json!({
                            "stage": "quantize", "layer": layer, "matrix": name, "done": done,
                            "total": total, "fraction": frac(*done, *total),
                            "relative_error": relative_error, "eta_s": eta(el, *done, *total, d0),
                        }),
                    );
                    return;
                }
                if let Some(mut c) = self.calib.take() {
                    c.finish();
                }
                self.bar
                    .get_or_insert_with(|| Progress::new("quantizing", *total as u64, "matrices"))
                    .set(*done as u64);
            }
            Event::Layer {
                layer,
                done,
                total,
                seconds,
            } => self.emit(
                "layer",
                serde_json::json!({
                    "layer": layer, "done": done, "total": total, "seconds": round3(*seconds),
                }),
            ),
            Event::Note(msg) => self.note(msg),
            Event::Writing => {
                if let Some(mut b) = self.bar.take() {
                    b.finish();
                }
                self.emit("stage", serde_json::json!({ "stage": "write" }));
            }
        }
    }

    pub fn finish(&mut self) {
        for p in [self.calib.take(), self.bar.take()].into_iter().flatten() {
            let mut p = p;
            p.finish();
        }
    }
}

fn frac(done: usize, total: usize) -> f64 {
    round3(done as f64 / total.max(1) as f64)
}

/// Seconds left at the rate since the stage started (`d0` done then); null before any progress.
fn eta(elapsed: f64, done: usize, total: usize, d0: usize) -> Option<f64> {
    let rate_done = done.saturating_sub(d0);
    (rate_done > 0).then(|| round3(elapsed / rate_done as f64 * total.saturating_sub(done) as f64))
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
