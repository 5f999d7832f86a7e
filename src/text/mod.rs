//! Tokenisation and chat templates: strings in, token ids out, and the one place where BOS, EOS and the
//! `<image>` expansion are decided.
//!
//! Conventions (LLaVA's own trainer, the default; see [`PromptStyle`]):
//! - a prompt is `BOS + template(prompt)`, with each `<image>` placeholder expanded to exactly as many image-token
//!   ids as the vision tower yields features;
//! - a response is `encode(response) + EOS` (llava-hf's chat template appends no `</s>`; bpo appends it so the model
//!   learns to stop);
//! - text is encoded without the tokenizer's own special-token post-processing, so the rules above are the only ones.
//!
//! [`PromptStyle::Trl`] reproduces TRL's vision DPO batches instead: no BOS, no EOS, response encoded as `" {text} "`.

pub mod chat;
pub mod template;
pub mod tokenizer;

pub use chat::ChatTemplate;
pub use template::{Chat, PromptStyle, Template};
pub use tokenizer::Tokenizer;
