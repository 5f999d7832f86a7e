//! `bpo pairs`: BPO record files (shards of one run) → one preference-pair file.

use std::path::PathBuf;

use anyhow::Context;
use bpo::data::pairs::make_pair_file;
use bpo::data::{PairFormat, PairOptions};
use clap::Args;

/// Arguments of `bpo pairs` (help text on the `Command::Pairs` variant).
#[derive(Args)]
pub struct PairsArgs {
    /// BPO record files (JSONL); shards of one run are merged. An id found twice is an error.
    #[arg(long, num_args = 1.., required = true)]
    records: Vec<PathBuf>,
    /// Output pair file (JSONL), replaced atomically (a link is followed; an input is refused as output).
    #[arg(long)]
    out: PathBuf,
    /// Layout: bpo ({id, prompt, image, chosen, rejected, chosen_type, rejected_type}), trl (vision
    /// conversational rows for TRL's DPOTrainer) or llama-factory (sharegpt ranking rows).
    #[arg(long, default_value = "bpo")]
    format: PairFormat,
    /// Drop a record if any of its responses has more whitespace-separated words than this; 0 = no limit.
    #[arg(long, default_value_t = 350)]
    max_words: usize,
}

impl PairsArgs {
    /// The layout and the options.
    pub(super) fn options(&self) -> (PairFormat, PairOptions) {
        (self.format, PairOptions { max_words: (self.max_words > 0).then_some(self.max_words) })
    }
}

pub fn run(args: PairsArgs) -> anyhow::Result<()> {
    let inputs: Vec<&std::path::Path> = args.records.iter().map(PathBuf::as_path).collect();
    bpo::output::check(&args.out, &inputs)?;
    let (format, opts) = args.options();
    let stats = make_pair_file(&args.records, &args.out, format, &opts)
        .with_context(|| format!("making pairs into {}", args.out.display()))?;
    outln!("{stats}");
    outln!("wrote {} pairs to {}", stats.pairs, args.out.display());
    Ok(())
}
