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
