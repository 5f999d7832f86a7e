//! The records that cross a stage boundary, and their reading and writing: every file one stage writes and
//! another (or another tool) reads. `bootstrap`, `train`, `eval` and the CLI meet here, not in each other.
//!
//! [`answers`] (LLaVA answer rows, as `bpo generate` writes them and the benchmarks read them; where a row came
//! from; the id rules), [`input`] (LLaVA instruct JSON, plain JSONL and BPO records read as [`Record`]s; the `<image>` tag rules),
//! [`records`] (the BPO record and its stable ids), [`pair_rows`] (one preference pair in bpo / TRL /
//! LLaMA-Factory layout, and back), [`pairs`] (records → pairs, pair files → training pairs), [`resume`]
//! (append-only JSONL output keyed by id, shards, and the loop over what is not done yet).

use std::path::{Path, PathBuf};

pub mod answers;
pub mod input;
pub mod pair_rows;
pub mod pairs;
pub mod records;
pub mod resume;

pub use answers::{load_answers, Answer, Origin};
pub use input::{read_input, InputFormat, InputOptions};
pub use pair_rows::{Pair, PairFormat};
pub use pairs::{expand, read_pairs, PairOptions, PairStats};
pub use records::{Completion, CompletionType, Record};
pub use resume::{pending, process_pending, ResumableWriter, RunCounts, Shape, Shard};

/// The file an image path of a data row names: relative to `images` when given, else as written.
pub fn image_path(images: Option<&Path>, rel: &str) -> PathBuf {
    images.map_or_else(|| PathBuf::from(rel), |d| d.join(rel))
}
