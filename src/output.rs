//! The one way bpo writes what the user asked for: every output file and folder goes through here.
//!
//! - [`write_with`] (and [`write_bytes`]) replace a file atomically: the content goes to a temporary file in the
//!   target's folder, is fsynced and renamed over the target, so a reader (or a kill) never sees half a file.
//!   A symbolic link is followed: the link stays a link and its target gets the new content. A target that
//!   exists and is not a regular file (a folder, a FIFO, a device) is refused with one line.
//! - [`check`] runs the same checks before the long work starts, and also that the target's folder exists and
//!   is writable and that the output is none of the command's inputs, by file identity (device and inode), so
//!   a hard link or a symbolic link to an input is caught as well as the same name.
//! - [`create_dir`] makes an output folder and [`write_dir`] fills one under a temporary name and renames it
//!   whole; a link to a folder is followed, anything else that is not a folder is refused.
//! - [`open_append`] opens an append-only output (resumable records, caches), which cannot be renamed, with
//!   the same rules for links and non-regular files.
//! - [`Lock`] is the advisory lock one long-running writer holds on its output for as long as it runs, so a
//!   second process on the same output stops with one line naming the holder instead of interleaving lines.

use std::ffi::OsString;
use std::fs::{File, FileType, Metadata, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::{bail, Error, Result};

/// Follows symbolic links in the last component of `path` (a dangling one too) to the path really written.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    let mut p = path.to_path_buf();
    for _ in 0..40 {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = std::fs::read_link(&p).map_err(|e| Error::io(&p, e))?;
                // A relative link is relative to the folder holding it; `join` keeps an absolute one as it is.
                p = p.parent().map_or_else(|| target.clone(), |dir| dir.join(&target));
            }
            Ok(_) => return Ok(p),
            Err(e) if is_absent(&e) => return Ok(p),
            Err(e) => return Err(Error::io(&p, e)),
        }
    }
    bail!("{}: too many levels of symbolic links", path.display())
}

/// Nothing there: not found, or a parent is not a folder (the caller then names the parent).
fn is_absent(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR)
}

/// What a file type is, in words, for a refusal.
pub(crate) fn kind(t: FileType) -> &'static str {
    if t.is_file() {
        "a file"
    } else if t.is_dir() {
        "a folder"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "neither a file nor a folder"
    }
}

/// `path`, and where its link leads if it is one, for messages.
fn shown(path: &Path, real: &Path) -> String {
    if path == real {
        path.display().to_string()
    } else {
        format!("{} (-> {})", path.display(), real.display())
    }
}

/// What is at `path` (links followed); `None` when nothing is (see [`is_absent`]).
fn existing(path: &Path) -> Result<Option<Metadata>> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(Some(m)),
        Err(e) if is_absent(&e) => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// The file an output named `path` really is: links resolved, refused if it exists and is not a regular file.
pub fn target_file(path: &Path) -> Result<PathBuf> {
    let real = resolve(path)?;
    match existing(&real)? {
        Some(m) if !m.is_file() => {
            bail!("{}: is {}; an output must be a regular file", shown(path, &real), kind(m.file_type()))
        }
        _ => Ok(real),
    }
}

/// The folder an output folder named `path` really is: links resolved, refused if it exists and is not a folder.
pub fn target_dir(path: &Path) -> Result<PathBuf> {
    let real = resolve(path)?;
    match existing(&real)? {
        Some(m) if !m.is_dir() => {
            bail!("{}: is {}; an output folder must be a folder", shown(path, &real), kind(m.file_type()))
        }
        _ => Ok(real),
    }
}

/// The folder a file `real` is written in (`.` for a bare name).
fn folder_of(real: &Path) -> PathBuf {
    match real.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Whether `a` and `b` are the same file or folder (device and inode, links followed).
pub fn same_file(a: &Path, b: &Path) -> bool {
    std::fs::metadata(a).is_ok_and(|a| std::fs::metadata(b).is_ok_and(|b| same_inode(&a, &b)))
}

fn same_inode(a: &Metadata, b: &Metadata) -> bool {
    a.dev() == b.dev() && a.ino() == b.ino()
}

/// Checks an output file before the work that fills it: a regular file or nothing (links followed), none of
/// `inputs` (by identity), and a folder that exists and takes a new file (tried with a probe file).
pub fn check(path: &Path, inputs: &[&Path]) -> Result<()> {
    let real = target_file(path)?;
    refuse_inputs(path, inputs)?;
    probe_folder(path, &folder_of(&real))
}

/// Like [`check`] for an output folder: a folder or nothing (links followed), none of `inputs`, and a parent
/// that takes a new entry. The folder itself is not created.
pub fn check_dir(path: &Path, inputs: &[&Path]) -> Result<()> {
    let real = target_dir(path)?;
    refuse_inputs(path, inputs)?;
    match existing(&real)? {
        Some(_) => probe_folder(path, &real),
        None => probe_folder(path, &first_existing_ancestor(&real)),
    }
}

fn first_existing_ancestor(path: &Path) -> PathBuf {
    path.ancestors()
        .skip(1)
        .map(|a| if a.as_os_str().is_empty() { Path::new(".") } else { a })
        .find(|a| a.exists())
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

fn refuse_inputs(path: &Path, inputs: &[&Path]) -> Result<()> {
    match inputs.iter().find(|input| same_file(path, input)) {
        Some(input) => {
            bail!("{}: is also an input ({}); write the output somewhere else", path.display(), input.display())
        }
        None => Ok(()),
    }
}

/// Creates and removes a file in `dir`: the only test of writability that also holds for root and read-only mounts.
fn probe_folder(path: &Path, dir: &Path) -> Result<()> {
    match existing(dir)? {
        Some(m) if m.is_dir() => {}
        Some(_) => bail!("{}: {} is not a folder", path.display(), dir.display()),
        None => bail!("{}: folder {} does not exist", path.display(), dir.display()),
    }
    let probe = dir.join(format!(".bpo-probe-{}", std::process::id()));
    match OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(_) => std::fs::remove_file(&probe).map_err(|e| Error::io(&probe, e)),
        Err(e) => bail!("{}: cannot write in {}: {e}", path.display(), dir.display()),
    }
}

/// `<prefix><name of real><suffix>` in the folder of `real`.
fn beside(real: &Path, prefix: &str, suffix: &str) -> PathBuf {
    let mut name = OsString::from(prefix);
    name.push(real.file_name().unwrap_or_default());
    name.push(suffix);
    folder_of(real).join(name)
}

/// Replaces the file `path` atomically: `fill` writes the content to the temporary path it is given, which is
/// then fsynced and renamed over the target (see the module doc for links and non-regular targets).
pub fn write_with(path: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let real = target_file(path)?;
    // Hidden and unique to this process, so two writers never share one.
    let tmp = beside(&real, ".", &format!(".{}.tmp", std::process::id()));
    let done = fill(&tmp)
        .and_then(|()| keep_permissions(&real, &tmp))
        .and_then(|()| File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| Error::io(&tmp, e)))
        .and_then(|()| std::fs::rename(&tmp, &real).map_err(|e| Error::io(path, e)));
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done?;
    sync_folder(&folder_of(&real))
}

/// Gives the new file `tmp` the permissions of the file `real` it replaces, if there is one.
fn keep_permissions(real: &Path, tmp: &Path) -> Result<()> {
    match existing(real)? {
        Some(m) => std::fs::set_permissions(tmp, m.permissions()).map_err(|e| Error::io(tmp, e)),
        None => Ok(()),
    }
}

/// [`write_with`] for content already in memory.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |tmp| std::fs::write(tmp, bytes).map_err(|e| Error::io(tmp, e)))
}

/// Writes `value` as pretty-printed JSON (and a final newline) through [`write_with`].
pub fn write_json<T: serde::Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::parse(path, None, e))?;
    write_bytes(path, (text + "\n").as_bytes())
}

/// Makes the rename of an entry of `dir` durable.
fn sync_folder(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(|e| Error::io(dir, e))
}

/// Creates the output folder `path` (and its parents); a link to a folder is followed, a non-folder refused.
pub fn create_dir(path: &Path) -> Result<()> {
    let real = target_dir(path)?;
    std::fs::create_dir_all(&real).map_err(|e| Error::io(path, e))
}

/// Fills the folder `path` atomically: `fill` writes into a sibling `<name>.tmp`, which then replaces the
/// folder in one rename. A failed fill leaves the previous folder as it was.
pub fn write_dir(path: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let real = target_dir(path)?;
    let tmp = beside(&real, "", ".tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    fill(&tmp)?;
    if real.exists() {
        std::fs::remove_dir_all(&real).map_err(|e| Error::io(path, e))?;
    }
    std::fs::rename(&tmp, &real).map_err(|e| Error::io(path, e))?;
    sync_folder(&folder_of(&real))
}

/// Opens (or creates) an append-only output; links are followed and a non-regular target refused (before it
/// is opened, so a FIFO cannot block).
pub fn open_append(path: &Path) -> Result<File> {
    let real = target_file(path)?;
    OpenOptions::new().create(true).append(true).open(&real).map_err(|e| Error::io(path, e))
}

/// An advisory lock (`flock`) on an output, held until dropped: a second process asking for it is refused
/// with one line naming the holder's pid, which the lock file holds. The lock file (`<file>.lock` beside an
/// output file, `<folder>/.lock` in an output folder) is removed on drop; one left by a killed process is
/// harmless, as the lock died with it.
#[derive(Debug)]
pub struct Lock {
    path: PathBuf,
    _file: File,
}

impl Lock {
    /// Locks the output file `path` (through `<resolved path>.lock`).
    pub fn file(path: &Path) -> Result<Lock> {
        Lock::take(&beside(&target_file(path)?, "", ".lock"), path)
    }

    /// Locks the output folder `path` (through `<path>/.lock`); the folder must exist.
    pub fn dir(path: &Path) -> Result<Lock> {
        Lock::take(&target_dir(path)?.join(".lock"), path)
    }

    fn take(lock: &Path, output: &Path) -> Result<Lock> {
        loop {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(lock)
                .map_err(|e| Error::io(lock, e))?;
            // SAFETY: flock on a file descriptor we own; it only reads its arguments.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::WouldBlock {
                    return Err(Error::io(lock, err));
                }
                let pid = std::fs::read_to_string(lock).ok().and_then(|s| s.trim().parse::<u32>().ok());
                let holder = pid.map_or_else(|| "another bpo process".to_string(), |p| format!("bpo process {p}"));
                bail!(
                    "{}: {holder} is writing this output (lock {}); wait for it to finish or stop it",
                    output.display(),
                    lock.display()
                );
            }
            // The previous holder may have removed the lock file between our open and our flock: then the
            // lock we hold is on a file nobody else will open, so take the new one.
            if !file.metadata().is_ok_and(|a| std::fs::metadata(lock).is_ok_and(|b| same_inode(&a, &b))) {
                continue;
            }
            file.set_len(0).and_then(|()| writeln!(file, "{}", std::process::id())).map_err(|e| Error::io(lock, e))?;
            return Ok(Lock { path: lock.to_path_buf(), _file: file });
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // Removed while still held (the file closes after this), so no one can lock the old file in between.
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_through_a_link_and_keeps_it() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("real.txt");
        std::fs::write(&target, "old").unwrap();
        let link = tmp.path().join("link.txt");
        std::os::unix::fs::symlink("real.txt", &link).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_bytes(&link, b"new").unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "new");
        assert_eq!(std::fs::metadata(&target).unwrap().permissions().mode() & 0o777, 0o640, "the mode is kept");
        // A dangling link creates its target.
        let dangling = tmp.path().join("dangling");
        std::os::unix::fs::symlink("made.txt", &dangling).unwrap();
        write_bytes(&dangling, b"x").unwrap();
        assert_eq!(std::fs::read_to_string(tmp.path().join("made.txt")).unwrap(), "x");
        let names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 4, "no temporary file left: {names:?}");
    }

    #[test]
    fn refuses_folders_fifos_and_inputs() {
        let tmp = tempfile::tempdir().unwrap();
        let err = write_bytes(tmp.path(), b"x").unwrap_err().to_string();
        assert!(err.contains("is a folder"), "{err}");
        let fifo = tmp.path().join("fifo");
        assert_eq!(unsafe { libc::mkfifo(std::ffi::CString::new(fifo.to_str().unwrap()).unwrap().as_ptr(), 0o600) }, 0);
        assert!(open_append(&fifo).unwrap_err().to_string().contains("is a FIFO"));
        assert!(check(&fifo, &[]).unwrap_err().to_string().contains("is a FIFO"));
        let input = tmp.path().join("in.jsonl");
        std::fs::write(&input, "{}\n").unwrap();
        let hard = tmp.path().join("hard.jsonl");
        std::fs::hard_link(&input, &hard).unwrap();
        let err = check(&hard, &[&input]).unwrap_err().to_string();
        assert!(err.contains("is also an input"), "{err}");
        check(&tmp.path().join("new.jsonl"), &[&input]).unwrap();
        let err = check(&tmp.path().join("no/such/out.jsonl"), &[]).unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");
        let err = check(&input.join("out.jsonl"), &[]).unwrap_err().to_string();
        assert!(err.contains("not a folder"), "{err}");
        assert!(write_dir(&input, |_| Ok(())).unwrap_err().to_string().contains("must be a folder"));
    }

    #[test]
    fn atomic_dir_replaces_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("checkpoint-1");
        write_dir(&dir, |d| std::fs::write(d.join("a"), "1").map_err(|e| Error::io(d, e))).unwrap();
        write_dir(&dir, |d| std::fs::write(d.join("b"), "2").map_err(|e| Error::io(d, e))).unwrap();
        assert!(!dir.join("a").exists() && dir.join("b").exists());
        assert!(!tmp.path().join("checkpoint-1.tmp").exists());
        // A failed fill leaves the previous folder intact.
        assert!(write_dir(&dir, |_| Err(Error::invalid("boom"))).is_err());
        assert!(dir.join("b").exists());
    }

    #[test]
    fn a_second_lock_names_the_holder_and_the_first_is_released_on_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out.jsonl");
        let first = Lock::file(&out).unwrap();
        let err = Lock::file(&out).unwrap_err().to_string();
        assert!(err.contains(&format!("bpo process {}", std::process::id())) && err.contains("out.jsonl"), "{err}");
        drop(first);
        assert!(!tmp.path().join("out.jsonl.lock").exists());
        let _again = Lock::file(&out).unwrap();
        let _dir = Lock::dir(tmp.path()).unwrap();
        assert!(Lock::dir(tmp.path()).is_err());
    }
}
