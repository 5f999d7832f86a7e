//! [`Benchmark`]: every benchmark bpo runs, behind one entry point. [`Benchmark::run`] takes the answers (an
//! answers file's rows, rows saved by an earlier run, or a model that answers first through the generation
//! engine), a [`Context`] (the judge where the benchmark needs one, the output folder, the events sink) and
//! returns typed [`Scores`], having written the run folder. `bpo eval`, `bpo eval suite` and the demo all evaluate
//! through it.
//!
//! A new benchmark is one file in `src/eval/` (its inputs as a struct implementing [`Bench`], its report with a
//! [`Scores`] variant) and one variant here.

use std::path::Path;

use super::captions::Captions;
use super::llava_bench::LlavaBench;
use super::mmhal::MmHal;
use super::mmvet::MmVet;
use super::pope::Pope;
use super::report::{write_run, Scores};
use super::run::{Answers, Bench, Context, Rows, ANSWERS_FILE};
use crate::data::answers::Answer;
use crate::progress::Events;
use crate::{jsonl, output, Result};

/// A benchmark with its inputs loaded.
pub enum Benchmark {
    Pope(Pope),
    /// CHAIR on captions; Object HalBench when a model describes images with its eight instructions.
    Captions(Captions),
    MmVet(MmVet),
    LlavaBench(LlavaBench),
    MmHal(MmHal),
}

/// `$body` with `$b` bound to the benchmark inside any variant.
macro_rules! each {
    ($self:expr, $b:ident => $body:expr) => {
        match $self {
            Benchmark::Pope($b) => $body,
            Benchmark::Captions($b) => $body,
            Benchmark::MmVet($b) => $body,
            Benchmark::LlavaBench($b) => $body,
            Benchmark::MmHal($b) => $body,
        }
    };
}

impl Benchmark {
    /// Scores `answers` (answering first when they come from a model) and writes the run folder when `ctx` has
    /// one: `scores.json`, `details.jsonl`, and `answers.jsonl` when a model answered.
    pub fn run(&self, answers: Answers, ctx: &Context) -> Result<Scores> {
        each!(self, b => run(b, answers, ctx).map(|(report, _)| report.into()))
    }

    /// Reads an answers file in the benchmark's format.
    pub fn read_answers(&self, path: &Path, events: &dyn Events) -> Result<Vec<Answer>> {
        each!(self, b => b.read_answers(path, events))
    }
}

/// Runs `bench` on `answers` and writes the run folder (`scores.json`, `details.jsonl`) when the context has one;
/// returns the report and the details. [`Benchmark::run`] is this for any benchmark.
pub fn run<B: Bench>(bench: &B, answers: Answers, ctx: &Context) -> Result<(B::Report, Vec<B::Detail>)>
where
    B::Report: Clone + Into<Scores>,
{
    let rows = match answers {
        Answers::Given { rows, from } => Rows { rows, from, given: true },
        Answers::Saved(rows) => Rows { rows, from: "the saved answers".into(), given: false },
        Answers::Model { vlm, how } => {
            let rows = bench.answer(vlm, &how, ctx.events)?;
            if let Some(dir) = ctx.out {
                output::create_dir(dir)?;
                jsonl::write(&dir.join(ANSWERS_FILE), &rows)?;
            }
            Rows { rows, from: "the generated answers".into(), given: false }
        }
    };
    let (report, details) = bench.score(rows, ctx)?;
    if let Some(dir) = ctx.out {
        write_run(dir, &report.clone().into(), &details)?;
    }
    Ok((report, details))
}
