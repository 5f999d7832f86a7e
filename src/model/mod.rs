//! LLaVA-1.5 in candle: config, CLIP vision tower, projector, Llama decoder, LoRA-ready linears, loading.
//!
//! Reference: transformers' `modeling_llava.py`, `modeling_clip.py`, `modeling_llama.py`. Every forward returns
//! values for all positions and is differentiable in the parts that train (see [`ops`]).

pub mod checkpoint;
pub mod clip;
pub mod config;
pub mod cpu_decode;
#[cfg(feature = "cuda")]
mod cuda_kernels;
pub mod fused;
pub mod generic;
pub mod init;
pub mod linear;
pub mod llama;
pub mod llava;
pub mod load;
pub mod lora;
pub mod ops;
pub mod peft;
pub mod runtime;
pub mod slots;
pub mod vlm;

pub use config::{LlamaConfig, LlavaConfig, ModelConfig};
pub use linear::{Linear, Lora, Pass};
pub use llama::{Cache, Llama};
pub use llava::{Inputs, Model};
pub use load::{load, LoadOptions};
pub use runtime::{set_cpu_threads, Kernels, Runtime};
pub use slots::{SlotCache, StepLayout};
pub use vlm::Vlm;
