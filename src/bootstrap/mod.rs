//! Bootstrapping negatives: image weakening and error injection, written as BPO records ([`crate::data`]).
//!
//! [`prompt`] + [`inject`] (error injection through any [`inject::Completer`]: `server` for an OpenAI-compatible
//! server through `crate::http` (feature `http`), [`local`] for a model folder run in-process), [`weaken`] +
//! [`decode`] (answers of the MLLM to noised images, with the logit mixing of the contrast modes). The records, their readers, resuming and pairing are in
//! [`crate::data`].

pub mod decode;
pub mod inject;
pub mod local;
pub mod prompt;
#[cfg(feature = "http")]
pub mod server;
pub mod weaken;

#[cfg(feature = "http")]
pub use crate::http::{Endpoint, HttpCompleter, HttpOptions};
pub use decode::DecodeMode;
pub use inject::{run_inject, Completer, CompletionOptions, InjectCounts, InjectOptions};
pub use local::LocalCompleter;
pub use prompt::InjectMode;
pub use weaken::{run_weaken, WeakenCounts, WeakenOptions};
