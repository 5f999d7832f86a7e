//! What the integration tests share (as ripgrep's tests have one place for it): the fixtures, the binary, paths as
//! arguments, and the checks every command-line test makes of a failure (one `error:` line, no panic).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// `tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A path as a command-line argument.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Owned arguments from string slices.
pub fn args(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|p| p.to_string()).collect()
}

/// A command line on the tiny fixture model: `words` split at spaces (the subcommand and its plain options), then
/// `--model` and `--images` from the fixtures, then each `(flag, path)`.
pub fn on_tiny(words: &str, paths: &[(&str, &Path)]) -> Vec<String> {
    let mut a: Vec<String> = words.split_whitespace().map(String::from).collect();
    a.extend(args(&["--model", s(&fixture("llava-tiny")), "--images", s(&fixture("images"))]));
    for (flag, path) in paths {
        a.extend(args(&[flag, s(path)]));
    }
    a
}

/// Runs the `bpo` binary.
pub fn bpo<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bpo")).args(args).output().expect("bpo runs")
}

/// Runs the `bpo` binary with `env` set and `OPENAI_API_KEY` removed (so a key in the caller's environment never
/// reaches a test's mock server).
pub fn bpo_env(args: &[String], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bpo"));
    cmd.args(args).env_remove("OPENAI_API_KEY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("bpo runs")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The standard output of a run that must have succeeded.
pub fn ok(o: &Output) -> String {
    assert!(o.status.success(), "bpo failed: {}", stderr(o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The single `error: ...` line of a run that must have failed, and nothing else on stderr.
pub fn error_line(o: &Output) -> String {
    assert!(!o.status.success(), "expected failure: {}", String::from_utf8_lossy(&o.stdout));
    let err = stderr(o);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one error line: {err:?}");
    assert!(lines[0].starts_with("error: ") && !err.contains("panicked"), "{err}");
    lines[0].to_string()
}

/// Runs `bpo args`, expects failure with exactly one error line containing every `needle` (other stderr lines,
/// such as warnings, are allowed), and no panic.
pub fn fails_with<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S], needles: &[&str]) {
    let o = bpo(args);
    let err = stderr(&o);
    assert!(!o.status.success(), "expected failure for {args:?}, got success; stderr: {err}");
    assert!(!err.contains("panicked"), "panic for {args:?}: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(lines.len(), 1, "one error line expected for {args:?}, got: {err}");
    for n in needles {
        assert!(lines[0].contains(n), "error for {args:?} should mention {n:?}: {}", lines[0]);
    }
}

/// A copy of a fixture model folder that a test may edit.
pub fn model_copy(name: &str, tmp: &Path) -> PathBuf {
    let dst = tmp.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

pub fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}
