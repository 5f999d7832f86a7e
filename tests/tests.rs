//! All integration tests compile into one binary (ripgrep-style); each module covers one stage.

/// `bpo eval pope|chair|compare` on small files, and bad inputs.
mod eval;
