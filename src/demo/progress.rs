//! Stage-by-stage progress on stderr: one bar per running stage, then one line per finished stage with its time.
//! Seeds that run side by side each have their own [`Stages`], drawing into one shared set of bars. A running
//! [`Stage`] is the [`Events`] sink of the library calls the demo makes inside it.

use std::io::Write;
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget};
use serde_json::{Map, Value};

use crate::progress::Events;

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
    /// Started with its length: the library stages run inside it add up on its bar (an evaluation's benchmarks).
    /// Otherwise each library stage of known length takes the bar over (a training run's reference pass, then its
    /// steps).
    sized: bool,
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
        let bar = match total {
            0 => ProgressBar::new_spinner().with_style(crate::progress::style("{spinner} {msg} {elapsed}")),
            n => crate::progress::styled(n as u64, BAR),
        };
        match self.show {
            true => drop(self.bars.add(bar.clone())),
            false => bar.set_draw_target(ProgressDrawTarget::hidden()),
        }
        bar.set_message(format!("{}{name}", self.prefix));
        Stage { name: name.to_string(), bar, start: Instant::now(), sized: total > 0 }
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

/// What the library reports inside a stage moves its bar; the stage's own line is printed when it finishes, and
/// the library's messages are not shown (the demo prints its own summary lines).
impl Events for Stage {
    fn stage(&self, _name: &str, len: Option<u64>) {
        if let (false, Some(len)) = (self.sized, len) {
            self.bar.set_length(len);
            self.bar.set_position(0);
            self.bar.set_style(crate::progress::style(BAR));
        }
    }
    fn advance(&self, n: u64) {
        self.bar.inc(n);
    }
    /// Shows the latest loss beside the bar.
    fn step(&self, metrics: &Map<String, Value>) {
        let loss = metrics.get("loss").and_then(Value::as_f64).unwrap_or(f64::NAN);
        self.bar.set_prefix(format!("loss {loss:.3}"));
        self.bar.inc(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_of_unknown_length_shows_each_library_stage_and_a_sized_one_adds_them_up() {
        let stages = Stages::new(false);
        let train = stages.start("train", 0);
        train.stage("reference log-probs", Some(4));
        train.advance(4);
        train.stage("training", Some(3));
        let metrics: Map<String, Value> = serde_json::from_str(r#"{"loss": 0.25}"#).unwrap();
        (0..3).for_each(|_| train.step(&metrics));
        assert_eq!((train.bar.position(), train.bar.length()), (3, Some(3)));
        assert_eq!(train.bar.prefix(), "loss 0.250");
        let eval = stages.start("evaluate", 10);
        for n in [4, 6] {
            eval.stage("answering", Some(n));
            eval.advance(n);
        }
        assert_eq!((eval.bar.position(), eval.bar.length()), (10, Some(10)));
    }
}
