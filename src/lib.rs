//! bpo: Bootstrapped Preference Optimization for multimodal LLMs (Pi et al., ECCV 2024, arXiv 2403.08730).
//!
//! The modules follow the pipeline: [`model`] (LLaVA-1.5: CLIP, projector, Llama, LoRA, loading), [`vision`]
//! (image preprocessing, diffusion-noise weakening), [`text`] (tokenizer, chat templates), [`generate`]
//! (sampling with a KV cache), [`bootstrap`] (negatives), [`data`] (the records and files between stages),
//! [`train`] (losses, trainer), [`eval`] (POPE, CHAIR, judged benchmarks), [`rounds`] (the stages in rounds, iterative DPO), [`demo`] (the synthetic world). Stages
//! talk through files a user can read, all written through [`output`] (atomic replace, links followed, inputs and
//! non-regular targets refused, one lock per output).

#[cfg(feature = "bench")]
pub mod bench;
pub mod bootstrap;
pub mod data;
#[cfg(feature = "demo")]
pub mod demo;
#[cfg(feature = "bench")]
pub mod device_check;
pub mod error;
pub mod eval;
pub mod generate;
pub mod hash;
#[cfg(feature = "http")]
pub mod http;
pub mod jsonl;
#[cfg(feature = "bench")]
pub mod memory;
pub mod model;
pub mod output;
pub mod progress;
pub mod range;
pub mod rounds;
pub mod score;
#[cfg(feature = "serve")]
pub mod serve;
pub mod text;
pub mod train;
pub mod vision;

pub use error::{Error, Result};
