//! Stage-by-stage progress on stderr: one bar per running stage, then one line per finished stage with its time.
//! Seeds that run side by side each have their own [`Stages`], drawing into one shared set of bars.

use std::io::Write;
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar};

const BAR: &str = "{msg:<34} [{bar:30}] {pos}/{len} {elapsed}<{eta} {prefix}";

/// Shows (or hides) the pipeline's stages and records how long each took.
pub struct Stages {
    show: bool,
    bars: MultiProgress,
    /// Prepended to stage names in `timings` (e.g. "seed 1: ").
    pub prefix: String,
    pub timings: Vec<(String, f64)>,
}

/// A running stage.
pub struct Stage {
    name: String,
    bar: ProgressBar,
    start: Instant,
}

impl Stages {
    pub fn new(show: bool) -> Self {
        Stages { show, bars: MultiProgress::new(), prefix: String::new(), timings: Vec::new() }
    }

    /// Stages of their own (timings, `prefix`) drawn with this one's bars: for a seed running beside others.
    pub fn child(&self, prefix: &str) -> Self {
        Stages { show: self.show, bars: self.bars.clone(), prefix: prefix.to_string(), timings: Vec::new() }
    }

    /// Starts a stage of `total` units (0: a spinner).
    pub fn start(&self, name: &str, total: usize) -> Stage {
        let bar = match (self.show, total) {
            (false, _) => ProgressBar::hidden(),
            (true, 0) => ProgressBar::new_spinner().with_style(crate::progress::style("{spinner} {msg} {elapsed}")),
            (true, n) => crate::progress::styled(n as u64, BAR),
        };
        let bar = if self.show { self.bars.add(bar) } else { bar };
        bar.set_message(format!("{}{name}", self.prefix));
        Stage { name: name.to_string(), bar, start: Instant::now() }
    }

    /// Ends a stage: prints its line (with `note`) and records its time.
    pub fn finish(&mut self, stage: Stage, note: &str) {
        let secs = stage.start.elapsed().as_secs_f64();
        stage.bar.finish_and_clear();
        let name = format!("{}{}", self.prefix, stage.name);
        self.note(&format!("  {name:<34} {secs:>6.1}s  {note}"));
        self.timings.push((name, secs));
    }

    /// A line of its own (a heading or a cache hit).
    pub fn note(&self, text: &str) {
        if self.show {
            // A closed stderr (`bpo demo 2>&1 | head`) loses the line, never the run.
            self.bars.suspend(|| {
                let _ = writeln!(std::io::stderr(), "{text}");
            });
        }
    }
}

impl Stage {
    pub fn inc(&self, n: usize) {
        self.bar.inc(n as u64);
    }
    /// One training step done, of `total`: shows the latest loss beside the bar.
    pub fn loss(&self, total: usize, loss: f64) {
        if self.bar.length() != Some(total as u64) {
            self.bar.set_length(total as u64);
            self.bar.set_style(crate::progress::style(BAR));
        }
        self.bar.set_prefix(format!("loss {loss:.3}"));
        self.bar.inc(1);
    }
}
