//! The library's one error type. Every variant names what went wrong and where (file, line, tensor), so the
//! CLI can print it as one line and exit non-zero; the library itself never panics on user input.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file or folder could not be read or written.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A file exists but its content is not what it should be (bad JSON, missing field, ...).
    #[error("{path}{}: {msg}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Parse { path: PathBuf, line: Option<usize>, msg: String },
    /// The checkpoint does not match its config (missing tensor, wrong shape, unknown architecture).
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    /// An image could not be decoded.
    #[error("image {path}: {msg}")]
    Image { path: PathBuf, msg: String },
    /// The caller asked for something the inputs cannot give (prompt too long, bad option value, ...).
    #[error("{0}")]
    Invalid(String),
    /// A setting outside its range, from a config file or a library caller (the CLI's flags are checked by clap):
    /// the message names the setting as its source spells it, the value and the range ([`crate::range`]). The
    /// CLI exits with status 2 for it, as for a flag out of range.
    #[error("{0}")]
    Range(String),
    /// Training produced a NaN or infinite loss, gradient norm or weight and stopped (the message names the step,
    /// the quantity and the last checkpoint).
    #[error("{0}")]
    NonFinite(String),
    /// A request to an external server failed.
    #[error("{0}")]
    Http(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    pub fn parse(path: impl Into<PathBuf>, line: Option<usize>, msg: impl std::fmt::Display) -> Self {
        Error::Parse { path: path.into(), line, msg: msg.to_string() }
    }
    pub fn invalid(msg: impl std::fmt::Display) -> Self {
        Error::Invalid(msg.to_string())
    }
}

/// Shorthand for `Err(Error::Invalid(format!(..)))`.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::error::Error::Invalid(format!($($arg)*))) };
}
