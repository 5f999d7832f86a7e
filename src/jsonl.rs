//! JSON Lines I/O shared by every stage: reading with file:line errors, writing one record per line.

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use serde::{de::DeserializeOwned, Serialize};

use crate::{Error, Result};

/// Reads every non-blank line of `path` as a `T`. A malformed line fails with its file and 1-based line number.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    Ok(read_numbered(path)?.into_iter().map(|(_, row)| row).collect())
}

/// Like [`read`], but keeps each row's 1-based line number, for later errors that must point at a line. A UTF-8
/// byte-order mark before the first line (as Windows editors write) is skipped.
pub fn read_numbered<T: DeserializeOwned>(path: &Path) -> Result<Vec<(usize, T)>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| Error::io(path, e))?;
        let line = if i == 0 { strip_bom(&line) } else { &line };
        if line.trim().is_empty() {
            continue;
        }
        out.push((i + 1, serde_json::from_str(line).map_err(|e| Error::parse(path, Some(i + 1), e))?));
    }
    Ok(out)
}

/// The whole text of `path`, without a leading UTF-8 byte-order mark.
pub fn read_text(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    Ok(match text.strip_prefix(BOM) {
        Some(rest) => rest.to_string(),
        None => text,
    })
}

/// [`read_text`] of a file that may be absent: `None` when it does not exist; any other failure is an error.
pub fn read_text_if_exists(path: &Path) -> Result<Option<String>> {
    match read_text(path) {
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => Ok(None),
        other => other.map(Some),
    }
}

/// `text` without a leading UTF-8 byte-order mark.
pub fn strip_bom(text: &str) -> &str {
    text.strip_prefix(BOM).unwrap_or(text)
}

/// The byte-order mark some editors put at the start of a UTF-8 file; JSON parsers refuse it.
pub const BOM: &str = "\u{feff}";

/// Writes `rows` to `path` (replacing it) through [`crate::output::write_with`]: a temporary file and a rename,
/// so a reader never sees half a file.
pub fn write<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    crate::output::write_with(path, |tmp| {
        let file = std::fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        let mut w = BufWriter::new(file);
        for row in rows {
            let line = serde_json::to_string(row).map_err(|e| Error::parse(path, None, e))?;
            writeln!(w, "{line}").map_err(|e| Error::io(tmp, e))?;
        }
        w.flush().map_err(|e| Error::io(tmp, e))
    })
}
