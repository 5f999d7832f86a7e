//! `bpo demo`: the whole BPO pipeline on a synthetic world with a language prior.

pub mod data;
pub mod render;
pub mod world;
pub mod bootstrap;
pub mod eval;
pub mod model;
