//! `bpo demo`: the whole BPO pipeline on a synthetic world with a language prior, from nothing to a report.
//!
//! Per seed: generate the world ([`world`], [`render`], [`data`]); pre-train a tiny LLaVA's language model on
//! the text-only corpus, then the whole model on the grounded instruction data ([`train`]; cached under
//! `models/` by a hash of its recipe); bootstrap negatives from weakened images and by `continue`-mode
//! injection ([`bootstrap`]); train LoRA adapters with DPO on three pair sets (both negatives, weakening only,
//! injection only) and, as the paper's control, with plain SFT on the chosen answers; evaluate every model with
//! POPE and CHAIR ([`eval`]); then, unless `--paper-only`, two more rows after BPO (a second round from its
//! merged model, and BPO with mDPO's image-side terms: [`recipe::PAST_ROWS`]). Then one report over all seeds
//! ([`report`], [`plot`], [`pipeline`]).
//!
//! Layout of `--out DIR`:
//! ```text
//! models/sft-<hash>/          the SFT model (llava-hf folder), reused by any run with the same recipe
//! seed-<s>/world/             corpus, instruction data, images, POPE/CHAIR files, tokenizer
//! seed-<s>/bootstrap/         records (raw and length-matched), pair files, chosen.json
//! seed-<s>/bootstrap-round-2/ the same from the BPO row's merged model (row "BPO, round 2")
//! seed-<s>/runs/<row>/        adapter/ (the trainer's run folder: PEFT adapter, metrics.jsonl), model/ (merged)
//! seed-<s>/eval/<row>/        pope/ and chair/ (answers.jsonl, scores.json, details.jsonl)
//! report/                     report.html, plots/*.png, results.json, table.txt
//! ```

pub mod bootstrap;
pub mod conversation;
pub mod data;
pub mod eval;
pub mod model;
pub mod negatives;
pub mod pipeline;
pub mod plot;
pub mod progress;
pub mod recipe;
pub mod render;
pub mod report;
pub mod summary;
pub mod train;
pub mod world;

pub use pipeline::{run, DemoSummary};
pub use recipe::{DemoOptions, Recipe};
