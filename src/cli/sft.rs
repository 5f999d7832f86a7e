//! `bpo sft`: supervised training on LLaVA conversation data (the demo pre-trains its tiny model with it).

use std::path::PathBuf;

use anyhow::Context;
use bpo::progress::Silent;
use bpo::train::{ModelSetup, SftConfig};

use super::train::{catch_stop_signals, finish, CommonArgs, STOP};
use super::{bars, ModelArgs};

/// Options of the subcommand (its help text is on the `Command` variant).
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Conversations: LLaVA instruct JSON (array) or one sample per line.
    #[arg(long)]
    data: PathBuf,
    /// Folder the samples' image paths are relative to.
    #[arg(long)]
    images: Option<PathBuf>,
    /// Run folder to write (or to continue with --resume); locked while the run writes it, as in `bpo train`.
    #[arg(long)]
    out: PathBuf,
    /// With --full, train the CLIP vision tower too (LLaVA-1.5 keeps its pretrained tower frozen; a tower trained
    /// from scratch, like the demo's, has to learn to see). Features are then encoded every step, not cached.
    #[arg(long)]
    train_vision: bool,
    #[command(flatten)]
    common: CommonArgs,
}

pub fn run(a: Args) -> anyhow::Result<std::process::ExitCode> {
    let cfg = SftConfig {
        setup: ModelSetup { train_vision: a.train_vision, ..a.common.setup(&a.model)? },
        data: a.data.clone(),
        images: a.images.clone(),
        max_length: a.common.max_length,
        feature_cache_mb: a.common.feature_cache_mb,
        optim: a.common.optim(2e-5, 1),
    };
    catch_stop_signals();
    let report = bpo::train::sft::train(&cfg, &a.out, a.common.resume, Some(&STOP), &mut Silent, &bars())
        .with_context(|| format!("training into {}", a.out.display()))?;
    Ok(finish(&report, &a.out))
}
