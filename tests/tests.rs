//! All integration tests compile into one binary (ripgrep-style); each module covers one stage.
mod vision;
