//! Progress for long nodes: an indicatif bar with rate and ETA on a terminal, periodic tracing
//! lines otherwise (logs of batch jobs stay readable).

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    total: u64,
    done: u64,
    started: Instant,
    last_log: Instant,
}

const LOG_EVERY: Duration = Duration::from_secs(10);

impl Progress {
    /// `already` items were finished by an earlier, interrupted run.
    pub fn new(label: &str, total: u64, already: u64, terminal: bool) -> Progress {
        let bar = terminal.then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>12} [{bar:30}] {pos}/{len} {per_sec} eta {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(label.to_string());
            bar.set_position(already);
            bar.reset_eta();
            bar
        });
        Progress {
            bar,
            label: label.to_string(),
            total,
            done: already,
            started: Instant::now(),
            last_log: Instant::now(),
        }
    }

    pub fn advance(&mut self, n: u64) {
        self.done += n;
        if let Some(bar) = &self.bar {
            bar.inc(n);
        } else if self.last_log.elapsed() >= LOG_EVERY || self.done == self.total {
            let rate = self.done as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
            tracing::info!("{}: {}/{} ({rate:.1}/s)", self.label, self.done, self.total);
            self.last_log = Instant::now();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
