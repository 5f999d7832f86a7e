//! Preference and supervised training with LoRA or full fine-tuning: the third stage of BPO.
//!
//! - [`loss`]: DPO-family losses as pure functions of summed log-probabilities (sigmoid, IPO, hinge, robust,
//!   length-normalised, optional SFT term).
//! - [`data`]: pairs and conversations in, tokenised, checked, batched; [`features`]: the frozen tower's cache.
//! - [`dpo`] (`bpo train`) and [`sft`] (`bpo sft`): objectives and their runs; [`setup`]: model and run folder.
//! - [`trainer`]: the loop (accumulation, clipping, schedule, metrics, checkpoints, resume); [`optim`]: in-place
//!   AdamW; [`schedule`]: warm-up + cosine/linear/constant.
//! - [`checkpoint`]: PEFT adapters and checkpoints on disk; [`mod@merge`]: adapter folded into a model folder.
//!
//! ```no_run
//! # fn main() -> bpo::Result<()> {
//! use bpo::progress::Silent;
//! use bpo::train::dpo;
//! # let cfg: dpo::DpoConfig = unimplemented!();
//! let report = dpo::train(&cfg, std::path::Path::new("runs/bpo"), false, None, &mut Silent, &Silent)?;
//! println!("{} steps", report.summary.steps_done);
//! # Ok(()) }
//! ```

pub mod batch;
pub mod checkpoint;
pub mod data;
pub mod dpo;
pub mod features;
pub mod loss;
pub mod merge;
pub mod optim;
pub mod schedule;
pub mod setup;
pub mod sft;
pub mod trainable;
pub mod trainer;

pub use checkpoint::load_adapter;
pub use dpo::{DpoConfig, TrainReport};
pub use loss::{dpo_loss, DpoLoss, LossKind, PairLogps};
pub use merge::merge;
pub use schedule::{Schedule, ScheduleKind};
pub use setup::ModelSetup;
pub use sft::SftConfig;
pub use trainer::{Hooks, LoopConfig, StepLog};
