//! JSON Lines I/O shared by every stage: reading with file:line errors, writing one record per line.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
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

/// Largest file bpo reads whole from a model or adapter folder (config, tokenizer, processor, chat template):
/// twice the largest `tokenizer.json` published (Gemma 3's, 33 MB).
pub const MAX_FOLDER_FILE_BYTES: u64 = 64 << 20;

/// Opens a file that a model or adapter folder ships, for reading: `None` when nothing is there. Only a regular
/// file (a link to one is followed) of at most `max` bytes is opened: a device, a FIFO (never waited on), a
/// socket or a bigger file is refused with one line naming it before a byte is read, so that a hostile folder
/// costs nothing. Weights, which are memory-mapped, pass `u64::MAX`.
pub fn open_folder_file(path: &Path, max: u64) -> Result<Option<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let refuse = |m: &std::fs::Metadata| -> Result<()> {
        if !m.is_file() {
            crate::bail!(
                "{}: is {}; a model folder's files must be regular files",
                path.display(),
                crate::output::kind(m.file_type())
            );
        }
        if m.len() > max {
            crate::bail!(
                "{}: {} bytes, more than the {} MiB bpo reads from a model folder file",
                path.display(),
                m.len(),
                max >> 20
            );
        }
        Ok(())
    };
    match std::fs::metadata(path) {
        Ok(m) => refuse(&m)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    }
    // Checked again on what was opened (the path may have changed in between); O_NONBLOCK so that a FIFO put
    // there meanwhile does not block the open.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    refuse(&file.metadata().map_err(|e| Error::io(path, e))?)?;
    Ok(Some(file))
}

/// The text of a file a model or adapter folder ships ([`open_folder_file`] with [`MAX_FOLDER_FILE_BYTES`]),
/// without a byte-order mark; `None` when it does not exist.
pub fn read_folder_file(path: &Path) -> Result<Option<String>> {
    let Some(file) = open_folder_file(path, MAX_FOLDER_FILE_BYTES)? else { return Ok(None) };
    let mut bytes = Vec::new();
    file.take(MAX_FOLDER_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > MAX_FOLDER_FILE_BYTES {
        crate::bail!("{}: grew past {} MiB while being read", path.display(), MAX_FOLDER_FILE_BYTES >> 20);
    }
    let mut text = String::from_utf8(bytes).map_err(|e| Error::parse(path, None, format!("not UTF-8: {e}")))?;
    if text.starts_with(BOM) {
        text.drain(..BOM.len());
    }
    Ok(Some(text))
}

/// [`read_folder_file`] of a file that must be there.
pub fn read_folder_file_required(path: &Path) -> Result<String> {
    read_folder_file(path)?.ok_or_else(|| Error::io(path, std::io::Error::from_raw_os_error(libc::ENOENT)))
}

/// Reads a JSON file (a config, a run's state or scores) as a `T`, bounded like [`read_folder_file`]; a missing
/// file, a bad one or one of another shape fails naming the file.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = read_folder_file_required(path)?;
    serde_json::from_str(&text).map_err(|e| Error::parse(path, None, e))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_files_must_be_small_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str| dir.path().join(name);
        std::fs::write(file("ok.json"), "\u{feff}{}").unwrap();
        assert_eq!(read_folder_file(&file("ok.json")).unwrap().as_deref(), Some("{}"));
        assert_eq!(read_folder_file(&file("absent.json")).unwrap(), None);
        let fifo = std::ffi::CString::new(file("fifo.json").to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        std::os::unix::fs::symlink("/dev/zero", file("zero.json")).unwrap();
        std::os::unix::fs::symlink("loop.json", file("loop.json")).unwrap();
        std::fs::create_dir(file("folder.json")).unwrap();
        // Sparse: a gigabyte that costs no disk.
        std::fs::File::create(file("huge.json")).unwrap().set_len(1 << 30).unwrap();
        std::fs::write(file("latin1.json"), b"{\"a\": \"\xe9\"}").unwrap();
        for (name, needle) in [
            ("fifo.json", "is a FIFO"),
            ("zero.json", "is a character device"),
            ("loop.json", "symbolic links"),
            ("folder.json", "is a folder"),
            ("huge.json", "1073741824 bytes, more than the 64 MiB"),
            ("latin1.json", "not UTF-8"),
        ] {
            let err = read_folder_file(&file(name)).unwrap_err().to_string();
            assert!(err.contains(name) && err.contains(needle), "{name}: {err}");
        }
        // Weights may be big, but must be regular files too.
        assert!(open_folder_file(&file("huge.json"), u64::MAX).unwrap().is_some());
        assert!(open_folder_file(&file("fifo.json"), u64::MAX).is_err());
    }
}
