//! Bootstrapping negatives: image weakening and error injection, written as BPO records ([`crate::data`]).
//!
//! [`prompt`] + [`inject`] (error injection through any [`inject::Completer`]: [`http`] for an OpenAI-compatible
//! server, [`local`] for a model folder run in-process), [`weaken`] + [`decode`] (answers of the MLLM to noised
//! images, with the logit mixing of the contrast modes). The records, their readers, resuming and pairing are in
//! [`crate::data`].

pub mod decode;
pub mod http;
pub mod inject;
pub mod local;
pub mod prompt;
pub mod weaken;

pub use decode::DecodeMode;
pub use http::{Endpoint, HttpCompleter, HttpOptions};
pub use inject::{run_inject, Completer, CompletionOptions, InjectCounts, InjectOptions};
pub use local::LocalCompleter;
pub use prompt::InjectMode;
pub use weaken::{run_weaken, WeakenCounts, WeakenOptions};
