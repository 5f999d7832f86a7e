//! Hallucination evaluation: POPE and CHAIR / Object HalBench, computed exactly as the official scripts, and
//! the judged benchmarks MM-Vet ([`mmvet`]), LLaVA-Bench in the wild ([`llava_bench`]) and MMHal-Bench
//! ([`mmhal`]) through an LLM judge ([`judge`]) with the official prompts and score parsing.
//!
//! [`Benchmark::run`] is the one way to run any of them: answers from a file, from an earlier run's folder or from
//! a model through the generation engine ([`answer`]), a judge where needed, an output folder; typed
//! [`report::Scores`] back. `bpo eval`, `bpo eval suite` ([`plan`]) and the demo all call it.
//!
//! Scoring works on in-memory rows, so a generation loop can score its answers without writing files:
//! [`pope::score`] takes [`pope::PopeQuestion`]s and [`Answer`]s; [`chair::Chair::score`] takes
//! [`chair::Caption`]s and a [`chair::GroundTruth`]. File loading lives beside them ([`pope::load_questions`],
//! [`load_answers`], [`inputs`]) and every loaded row remembers its file and line, so errors found while
//! scoring (duplicate ids, unknown images) still point at the line. [`report`] writes a run folder
//! (`scores.json` + `details.jsonl`), renders terminal tables and compares two runs.

pub mod answer;
pub mod benchmark;
pub mod captions;
pub mod chair;
pub mod inputs;
pub mod judge;
pub mod llava_bench;
pub mod mmhal;
pub mod mmvet;
pub mod plan;
pub mod pope;
pub mod pynum;
pub mod report;
pub mod run;
pub mod suite;
pub mod synth;
pub mod words;

pub use crate::data::answers::{load_answers, Answer, Origin};
pub use benchmark::Benchmark;
pub use run::{Answers, Context};

/// The eight Object HalBench description instructions (RLHF-V, Table 6), one per line; use them verbatim.
pub const OBJECT_HALBENCH_PROMPTS: &str = include_str!("../../data/object-halbench/prompts.txt");

/// [`OBJECT_HALBENCH_PROMPTS`] as a list.
pub fn object_halbench_prompts() -> Vec<&'static str> {
    OBJECT_HALBENCH_PROMPTS.lines().map(str::trim).filter(|l| !l.is_empty()).collect()
}

/// `num / den`, or 0 with a warning when `den` is 0 (the official scripts divide by zero and crash).
pub(crate) fn ratio(num: usize, den: usize, what: &str, warnings: &mut Vec<String>) -> f64 {
    if den == 0 {
        warnings.push(format!("{what} is 0/0, reported as 0"));
        0.0
    } else {
        num as f64 / den as f64
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn eight_object_halbench_prompts_ship_with_the_binary() {
        let prompts = super::object_halbench_prompts();
        assert_eq!(prompts.len(), 8);
        assert_eq!(prompts[0], "Provide a thorough description of the given image.");
    }
}
