//! Faults around outputs: `--out` that is a link, a FIFO, a folder or one of the inputs; an output folder that
//! cannot be written (refused before the work); two processes on one output (the second refused, the holder
//! named); and `kill -9` at a seeded random point of `bootstrap weaken` and `generate --answers`, whose rerun
//! must hold exactly what an uninterrupted run holds.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bpo::output::Lock;
use serde_json::{json, Value};

use crate::util::{bpo, fails_with, fixture, s};

fn write_lines(path: &Path, rows: &[Value]) -> PathBuf {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

/// Two BPO records (one pair each) for `bpo pairs`, the quickest command with an input and an output.
fn records(dir: &Path) -> PathBuf {
    let rows = ["a", "b"].map(|id| {
        json!({"id": id, "prompt": "What is it?", "completions": [
            {"response": "A cup.", "score": 1, "type": "gt"}, {"response": "A fork.", "score": 0, "type": "llm-hal"}]})
    });
    write_lines(&dir.join("records.jsonl"), &rows)
}

/// `n` plain-JSONL prompts over a fixture image, for `bootstrap weaken`.
fn prompts(dir: &Path, n: usize) -> PathBuf {
    let rows: Vec<Value> = (0..n).map(|i| json!({"id": format!("r{i}"), "prompt": format!("What is in picture {i}?"), "image": "chelsea.png", "answer": "A cat."})).collect();
    write_lines(&dir.join("prompts.jsonl"), &rows)
}

/// `n` questions in LLaVA's model_vqa format, for `generate --answers`.
fn questions(dir: &Path, n: usize) -> PathBuf {
    let rows: Vec<Value> = (0..n)
        .map(|i| json!({"question_id": i, "image": "coffee.png", "text": format!("Is there a cup {i}?")}))
        .collect();
    write_lines(&dir.join("questions.jsonl"), &rows)
}

fn weaken_args(data: &Path, out: &Path, tokens: &str) -> Vec<String> {
    let (model, images) = (fixture("llava-tiny"), fixture("images"));
    ["bootstrap", "weaken", "--model", s(&model), "--data", s(data), "--images", s(&images), "--out", s(out)]
        .into_iter()
        .chain(["--max-new-tokens", tokens, "--batch-size", "1", "--temperature", "1", "--seed", "3"])
        .map(String::from)
        .collect()
}

fn generate_args(questions: &Path, answers: &Path) -> Vec<String> {
    let (model, images) = (fixture("llava-tiny"), fixture("images"));
    ["generate", "--model", s(&model), "--questions", s(questions), "--images", s(&images), "--answers", s(answers)]
        .into_iter()
        .chain(["--max-new-tokens", "8", "--batch-size", "4", "--temperature", "0.9", "--seed", "5"])
        .map(String::from)
        .collect()
}

fn run_ok(args: &[String]) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = bpo(&args);
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

fn fails(args: &[String], needles: &[&str]) {
    fails_with(&args.iter().map(String::as_str).collect::<Vec<_>>(), needles);
}

#[test]
fn out_through_a_symbolic_link_writes_its_target_and_keeps_the_link() {
    let tmp = tempfile::tempdir().unwrap();
    let recs = records(tmp.path());
    let real = tmp.path().join("real.jsonl");
    std::fs::write(&real, "old\n").unwrap();
    let link = tmp.path().join("link.jsonl");
    std::os::unix::fs::symlink("real.jsonl", &link).unwrap();
    let o = bpo(&["pairs", "--records", s(&recs), "--out", s(&link)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link stays a link");
    assert_eq!(std::fs::read_to_string(&real).unwrap().lines().count(), 2, "its target holds the pairs");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 3, "no temporary or lock file left: {left:?}");
}

#[test]
fn a_fifo_or_a_folder_as_output_is_refused_and_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let recs = records(tmp.path());
    let fifo = tmp.path().join("fifo");
    let c = std::ffi::CString::new(s(&fifo)).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let folder = tmp.path().join("folder");
    std::fs::create_dir(&folder).unwrap();
    let linked = tmp.path().join("to-fifo");
    std::os::unix::fs::symlink(&fifo, &linked).unwrap();
    fails_with(&["pairs", "--records", s(&recs), "--out", s(&fifo)], &["fifo", "is a FIFO"]);
    fails_with(&["pairs", "--records", s(&recs), "--out", s(&linked)], &["to-fifo", "is a FIFO"]);
    fails_with(&["pairs", "--records", s(&recs), "--out", s(&folder)], &["folder", "is a folder"]);
    // Append-mode outputs too (a FIFO opened for reading would block forever).
    fails(&weaken_args(&prompts(tmp.path(), 2), &fifo, "4"), &["is a FIFO"]);
    fails(&generate_args(&questions(tmp.path(), 2), &folder), &["is a folder"]);
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo(), "the FIFO is still a FIFO");
    assert!(folder.is_dir() && std::fs::read_dir(&folder).unwrap().next().is_none(), "the folder is untouched");
}

#[test]
fn an_output_that_is_an_input_is_refused_by_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let recs = records(tmp.path());
    let before = std::fs::read(&recs).unwrap();
    let hard = tmp.path().join("hard.jsonl");
    std::fs::hard_link(&recs, &hard).unwrap();
    let soft = tmp.path().join("soft.jsonl");
    std::os::unix::fs::symlink(&recs, &soft).unwrap();
    for out in [&recs, &hard, &soft] {
        fails_with(&["pairs", "--records", s(&recs), "--out", s(out)], &["is also an input", "records.jsonl"]);
    }
    let q = questions(tmp.path(), 2);
    fails(&generate_args(&q, &q), &["is also an input"]);
    fails_with(
        &["score", "--model", s(&fixture("llava-tiny")), "--data", s(&hard), "--out", s(&recs)],
        &["is also an input"],
    );
    assert_eq!(std::fs::read(&recs).unwrap(), before, "the input is unchanged");
}

#[test]
fn an_unwritable_output_folder_is_refused_before_the_work() {
    let tmp = tempfile::tempdir().unwrap();
    // Line 2 is bad: an output checked only after reading (or computing) would report line 2 instead.
    let data = tmp.path().join("data.jsonl");
    std::fs::write(&data, "{\"prompt\": \"q\", \"response\": \"a\"}\n{\"prompt\": \"q\"}\n").unwrap();
    let model = fixture("llava-tiny");
    let missing = tmp.path().join("no/such/folder/out.jsonl");
    fails_with(&["score", "--model", s(&model), "--data", s(&data), "--out", s(&missing)], &["does not exist"]);
    let under_a_file = data.join("out.jsonl");
    fails_with(&["score", "--model", s(&model), "--data", s(&data), "--out", s(&under_a_file)], &["is not a folder"]);
    // generate checks before loading the model: a model that does not exist is not reached.
    let q = questions(tmp.path(), 2);
    fails_with(
        &["generate", "--model", s(&tmp.path().join("nomodel")), "--questions", s(&q), "--answers", s(&missing)],
        &["does not exist"],
    );
    // A read-only folder (root writes anyway, so only checked for other users).
    if unsafe { libc::geteuid() } != 0 {
        use std::os::unix::fs::PermissionsExt;
        let ro = tmp.path().join("ro");
        std::fs::create_dir(&ro).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        fails_with(
            &["score", "--model", s(&model), "--data", s(&data), "--out", s(&ro.join("o.jsonl"))],
            &["cannot write in"],
        );
    }
}

#[test]
fn duplicate_question_ids_are_refused_with_their_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let q = write_lines(
        &tmp.path().join("q.jsonl"),
        &[
            json!({"question_id": 1, "text": "a"}),
            json!({"question_id": 2, "text": "b"}),
            json!({"question_id": "1", "text": "c"}),
        ],
    );
    fails(&generate_args(&q, &tmp.path().join("a.jsonl")), &["q.jsonl:3", "repeats line 1"]);
    assert!(!tmp.path().join("a.jsonl").exists());
}

#[test]
fn a_second_writer_on_the_same_output_is_refused_naming_the_holder() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.jsonl");
    // A real second process: the first weakens long enough for the second to start meanwhile.
    let mut first = Command::new(env!("CARGO_BIN_EXE_bpo"))
        .args(weaken_args(&prompts(tmp.path(), 300), &out, "32"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lock = tmp.path().join("out.jsonl.lock");
    let pid = first.id().to_string();
    let t0 = Instant::now();
    while std::fs::read_to_string(&lock).map_or(true, |t| t.trim() != pid) {
        assert!(
            first.try_wait().unwrap().is_none() && t0.elapsed() < Duration::from_secs(30),
            "the first run never took its lock"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let second = weaken_args(&prompts(tmp.path(), 300), &out, "32");
    fails(&second, &["out.jsonl", &format!("bpo process {pid}")]);
    assert!(first.try_wait().unwrap().is_none(), "the first run was still writing when the second was refused");
    first.kill().unwrap();
    first.wait().unwrap();
    let lines = std::fs::read_to_string(&out).unwrap();
    let ids: Vec<Value> = lines.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["id"].clone()).collect();
    let unique: std::collections::HashSet<String> = ids.iter().map(Value::to_string).collect();
    assert_eq!(unique.len(), ids.len(), "no id twice");

    // Every other long writer takes its lock the same way; here this test process holds it.
    let me = format!("bpo process {}", std::process::id());
    let answers = tmp.path().join("answers.jsonl");
    let held = Lock::file(&answers).unwrap();
    fails(&generate_args(&questions(tmp.path(), 2), &answers), &["answers.jsonl", &me]);
    drop(held);
    let run = tmp.path().join("run");
    std::fs::create_dir(&run).unwrap();
    let _held = Lock::dir(&run).unwrap();
    for cmd in ["train", "sft"] {
        fails_with(
            &[cmd, "--model", s(&fixture("llava-tiny")), "--data", s(&answers), "--out", s(&run)],
            &["run", &me],
        );
    }
}

/// splitmix64: a seeded generator, so a failing kill point can be replayed from the seed in the message.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n.max(1)
    }
}

/// The seed of the kill points: `BPO_FAULT_SEED` if set, else the clock (printed with any failure).
fn fault_seed() -> u64 {
    std::env::var("BPO_FAULT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64
    })
}

/// The rows of a JSONL output by `key`, failing on an id written twice.
fn rows_by_key(path: &Path, key: &str, why: &str) -> HashMap<String, Value> {
    let mut rows = HashMap::new();
    for line in std::fs::read_to_string(path).unwrap().lines() {
        let row: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{why}: bad line {line:?}: {e}"));
        let id = row[key].to_string();
        assert!(rows.insert(id.clone(), row).is_none(), "{why}: {key} {id} written twice");
    }
    rows
}

/// Runs the long command `args(out)` uninterrupted, then again into another file killed with SIGKILL at a seeded
/// random point (after a random number of its lines, plus a random few milliseconds) and restarted, and checks
/// that the kill fell inside the run and that the restarted output holds exactly the uninterrupted one's rows,
/// each once, keeping what was there.
fn kill_restart_matches(dir: &Path, key: &str, seed: u64, args: impl Fn(&Path) -> Vec<String>) {
    let whole = dir.join("whole.jsonl");
    run_ok(&args(&whole));
    let want = rows_by_key(&whole, key, "uninterrupted");
    let mut rng = Rng(seed);
    // At least one line, at most half of them, so the kill falls inside the run and the rerun has work left.
    let (lines, extra_ms) = (1 + rng.below(want.len() as u64 / 2), rng.below(20));
    let why = format!("seed {seed} (BPO_FAULT_SEED): killed after {lines} lines + {extra_ms} ms");
    let out = dir.join("killed.jsonl");
    let mut child = Command::new(env!("CARGO_BIN_EXE_bpo"))
        .args(args(&out))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while std::fs::read_to_string(&out).map_or(0, |t| t.matches('\n').count()) < lines as usize
        && t0.elapsed() < Duration::from_secs(60)
    {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(extra_ms));
    child.kill().ok(); // SIGKILL
    child.wait().unwrap();
    let before = std::fs::read_to_string(&out).unwrap_or_default();
    let done = before.matches('\n').count();
    assert!(done >= 1 && done < want.len(), "{why}: the killed run had written {done} of {} lines", want.len());
    run_ok(&args(&out));
    let after = std::fs::read_to_string(&out).unwrap();
    let kept = before.rfind('\n').map_or(0, |i| i + 1);
    assert_eq!(after[..kept], before[..kept], "{why}: lines written before the kill are untouched");
    assert_eq!(rows_by_key(&out, key, &why), want, "{why}: nothing lost, duplicated or changed");
    assert!(!dir.join("killed.jsonl.lock").exists(), "{why}: the finished run removed its lock file");
}

#[test]
fn bootstrap_weaken_killed_at_a_random_point_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prompts(tmp.path(), 24);
    kill_restart_matches(tmp.path(), "id", fault_seed(), |out| weaken_args(&data, out, "12"));
}

#[test]
fn generate_answers_killed_at_a_random_point_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let q = questions(tmp.path(), 24);
    kill_restart_matches(tmp.path(), "question_id", fault_seed(), |out| generate_args(&q, out));
    // Resuming with another model would mix its answers with the first model's: refused.
    let other = tmp.path().join("other-model");
    std::os::unix::fs::symlink(fixture("llava-tiny"), &other).unwrap();
    let mut args = generate_args(&q, &tmp.path().join("whole.jsonl"));
    args[2] = s(&other).to_string();
    fails(&args, &["whole.jsonl:1", "llava-tiny", "other-model"]);
}
