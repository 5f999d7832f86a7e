//! What long library runs tell their caller while they work. Every long function takes an [`Events`] sink as
//! `events: &dyn Events` and reports to it: stages (with their length when known), progress within the running
//! stage, training steps and lines for the user. [`Silent`] shows nothing; [`Recorder`] keeps what it was told
//! (for tests and embedders); with the `progress` feature (on in the `bpo` binary) [`Bars`] draws indicatif bars on
//! stderr. The demo's multi-seed view is one more implementation (`demo::progress`).

use std::sync::Mutex;

use serde_json::{Map, Value};

/// Receives what a run reports. Every method does nothing by default. A sink is shared by the threads of one run
/// (a judge's workers advance the same stage), hence `Sync` and `&self`.
pub trait Events: Sync {
    /// A stage begins: `len` units of work (`None`: of unknown length, e.g. reading annotations). The function
    /// that starts a stage ends it; stages do not overlap.
    fn stage(&self, _name: &str, _len: Option<u64>) {}
    /// `n` more units of the running stage are done.
    fn advance(&self, _n: u64) {}
    /// One training step of the running stage is done, with its metrics under TRL's names (`loss`,
    /// `rewards/accuracies`, ...).
    fn step(&self, _metrics: &Map<String, Value>) {
        self.advance(1)
    }
    /// The running stage is over.
    fn end_stage(&self) {}
    /// A line for the user: what a run skipped, a warning (starting `warning: `), what a judge cost.
    fn message(&self, _line: &str) {}
}

/// Shows nothing. (The trainer's `Hooks` are implemented for it too: no control, nothing reported.)
#[derive(Debug, Clone, Copy, Default)]
pub struct Silent;

impl Events for Silent {}

/// One thing a run reported, as [`Recorder`] keeps it.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Stage(String, Option<u64>),
    Advance(u64),
    Step(Map<String, Value>),
    EndStage,
    Message(String),
}

/// Keeps every event in order.
#[derive(Debug, Default)]
pub struct Recorder(Mutex<Vec<Event>>);

impl Recorder {
    /// Everything reported so far.
    pub fn events(&self) -> Vec<Event> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The lines reported so far.
    pub fn messages(&self) -> Vec<String> {
        let lines = self.events().into_iter().filter_map(|e| match e {
            Event::Message(line) => Some(line),
            _ => None,
        });
        lines.collect()
    }

    /// Units advanced (steps included) in the stages called `name`.
    pub fn done_in(&self, name: &str) -> u64 {
        let mut inside = false;
        let mut done = 0;
        for e in self.events() {
            match e {
                Event::Stage(s, _) => inside = s == name,
                Event::EndStage => inside = false,
                Event::Advance(n) if inside => done += n,
                Event::Step(_) if inside => done += 1,
                _ => {}
            }
        }
        done
    }

    fn push(&self, e: Event) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(e)
    }
}

impl Events for Recorder {
    fn stage(&self, name: &str, len: Option<u64>) {
        self.push(Event::Stage(name.to_string(), len))
    }
    fn advance(&self, n: u64) {
        self.push(Event::Advance(n))
    }
    fn step(&self, metrics: &Map<String, Value>) {
        self.push(Event::Step(metrics.clone()))
    }
    fn end_stage(&self) {
        self.push(Event::EndStage)
    }
    fn message(&self, line: &str) {
        self.push(Event::Message(line.to_string()))
    }
}

/// The look of every bar: `template` with `=> ` as its fill (the default style if the template does not parse).
#[cfg(feature = "progress")]
pub fn style(template: &str) -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template(template)
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// An indicatif bar of `total` steps on stderr, drawn with `template`.
#[cfg(feature = "progress")]
pub fn styled(total: u64, template: &str) -> indicatif::ProgressBar {
    indicatif::ProgressBar::new(total).with_style(style(template))
}

/// Draws each stage as an indicatif bar on stderr (`{msg}` in the template is the stage's name), a stage of
/// unknown length as a spinner, a training step's loss (and reward accuracy) beside the stage's name, and prints
/// messages above the bar.
#[cfg(feature = "progress")]
pub struct Bars {
    template: String,
    /// A finished bar stays drawn (spinners never do).
    keep: bool,
    running: Mutex<Option<(String, indicatif::ProgressBar)>>,
}

#[cfg(feature = "progress")]
impl Bars {
    /// Bars drawn with `template`; `keep`: a finished bar stays on screen.
    pub fn new(template: &str, keep: bool) -> Self {
        Bars { template: template.to_string(), keep, running: Mutex::new(None) }
    }

    fn with_bar(&self, f: impl FnOnce(&str, &indicatif::ProgressBar)) {
        if let Some((name, bar)) = &*self.running.lock().unwrap_or_else(|e| e.into_inner()) {
            f(name, bar)
        }
    }
}

#[cfg(feature = "progress")]
impl Events for Bars {
    fn stage(&self, name: &str, len: Option<u64>) {
        let bar = match len {
            Some(len) => styled(len, &self.template),
            None => {
                let spinner = indicatif::ProgressBar::new_spinner();
                spinner.enable_steady_tick(std::time::Duration::from_millis(120));
                spinner
            }
        };
        bar.set_message(name.to_string());
        let old = self.running.lock().unwrap_or_else(|e| e.into_inner()).replace((name.to_string(), bar));
        if let Some((_, old)) = old {
            old.finish_and_clear();
        }
    }
    fn advance(&self, n: u64) {
        self.with_bar(|_, bar| bar.inc(n))
    }
    fn step(&self, metrics: &Map<String, Value>) {
        self.with_bar(|name, bar| {
            let get = |key: &str| metrics.get(key).and_then(Value::as_f64);
            let acc = get("rewards/accuracies").map(|a| format!(" acc {a:.2}")).unwrap_or_default();
            bar.set_message(format!("{name}: loss {:.4}{acc}", get("loss").unwrap_or(f64::NAN)));
            bar.inc(1);
        })
    }
    fn end_stage(&self) {
        if let Some((_, bar)) = self.running.lock().unwrap_or_else(|e| e.into_inner()).take() {
            match self.keep && bar.length().is_some() {
                true => bar.finish(),
                false => bar.finish_and_clear(),
            }
        }
    }
    fn message(&self, line: &str) {
        use std::io::Write;
        // A closed stderr (`bpo ... 2>&1 | head`) loses the line, never the run.
        let print = || drop(writeln!(std::io::stderr(), "{line}"));
        match &*self.running.lock().unwrap_or_else(|e| e.into_inner()) {
            Some((_, bar)) => bar.suspend(print),
            None => print(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorder_counts_the_units_of_each_stage() {
        let r = Recorder::default();
        r.stage("a", Some(3));
        r.advance(2);
        r.advance(1);
        r.end_stage();
        r.stage("b", None);
        r.step(&Map::new());
        r.message("hi");
        r.end_stage();
        r.advance(5);
        assert_eq!((r.done_in("a"), r.done_in("b"), r.done_in("c")), (3, 1, 0));
        assert_eq!(r.messages(), ["hi"]);
        assert_eq!(r.events()[0], Event::Stage("a".into(), Some(3)));
    }

    #[cfg(feature = "progress")]
    #[test]
    fn bars_show_the_running_stage_and_a_steps_loss() {
        let bars = Bars::new("{msg} {pos}/{len}", true);
        bars.advance(1); // no stage: nothing to move
        bars.stage("training", Some(5));
        bars.advance(2);
        let metrics: Map<String, Value> = serde_json::from_str(r#"{"loss": 0.5, "rewards/accuracies": 0.75}"#).unwrap();
        bars.step(&metrics);
        {
            let running = bars.running.lock().unwrap();
            let (name, bar) = running.as_ref().expect("a running stage");
            assert_eq!((name.as_str(), bar.position(), bar.length()), ("training", 3, Some(5)));
            assert_eq!(bar.message(), "training: loss 0.5000 acc 0.75");
        }
        bars.end_stage();
        assert!(bars.running.lock().unwrap().is_none());
    }
}
