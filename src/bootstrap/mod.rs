//! Bootstrapping negatives: image weakening, error injection, BPO records and preference pairs.
//!
//! [`records`] (the BPO record), [`input`] (LLaVA / JSONL readers), [`resume`] (append-only output, shards),
//! [`prompt`] + [`inject`] (error injection through any [`inject::Completer`]: [`http`] for an OpenAI-compatible
//! server, [`local`] for a model folder run in-process), [`weaken`] + [`decode`] (answers of the MLLM to noised
//! images, with the logit mixing of the contrast modes), [`pairs`] + [`pair_rows`] (records → preference pairs in
//! bpo / TRL / LLaMA-Factory layout, and back).

pub mod decode;
pub mod http;
pub mod inject;
pub mod input;
pub mod local;
pub mod pair_rows;
pub mod pairs;
pub mod prompt;
pub mod records;
pub mod resume;
pub mod weaken;

pub use decode::DecodeMode;
pub use http::{Endpoint, HttpCompleter, HttpOptions};
pub use inject::{run_inject, Completer, CompletionOptions, InjectCounts, InjectOptions};
pub use input::{read_input, InputFormat, InputOptions};
pub use local::LocalCompleter;
pub use pair_rows::{Pair, PairFormat};
pub use pairs::{expand, read_pairs, PairOptions, PairStats};
pub use prompt::InjectMode;
pub use records::{Completion, CompletionType, Record};
pub use resume::{process_pending, progress_bar, ResumableWriter, RunCounts, Shard};
pub use weaken::{run_weaken, WeakenCounts, WeakenOptions};
