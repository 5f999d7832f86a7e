//! Faults on the evaluation surface (issue 26), as a new user meets them: a judge cache that is really an input or
//! some other file (refused, unchanged), stdout closed by `| head -1` (the work finishes, the files are there, exit
//! 0), settings out of range through the command line and `suite.toml` (exit 2 naming the flag or key and the
//! range, before any model loads), a suite whose later benchmark has a bad file (refused before the first runs),
//! two runs on one folder, splits that share a name, judge URLs with a query string, API keys that cannot be sent,
//! `Retry-After`, and the smaller messages. The mock judge is `bootstrap_http.rs`'s loopback server.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::bootstrap_http::{Reply, Server};
use crate::util::{args, bpo_env, error_line, fixture, ok, s};

/// What a command writes: its output (a folder or a file) and the files in it.
type Written = Option<(PathBuf, Vec<&'static str>)>;

fn judge_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/judge").join(name)
}

/// One MMHal-Bench record with its answer, as a one-line JSON file without a trailing newline (the shape that
/// was once "repaired" into a judge cache).
fn responses(dir: &Path) -> PathBuf {
    let path = dir.join("responses.json");
    let record = json!([{"question_type": "attribute", "image_content": ["Cat"], "question": "Q0?", "gt_answer": "A cat.", "model_answer": "A dog."}]);
    std::fs::write(&path, record.to_string()).unwrap();
    path
}

fn mmhal(url: &str, responses: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = args(&["eval", "mmhal", "--responses", s(responses), "--out", s(out), "--judge-url", url]);
    a.extend(args(&["--judge-model", "j", "--judge-retries", "2"]));
    if !extra.iter().any(|e| e.starts_with("--judge-backoff")) {
        a.extend(args(&["--judge-backoff", "0.01"]));
    }
    a.extend(args(extra));
    a
}

/// The one `error:` line of a failed run (other lines may say what was read), with no panic.
fn the_error(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && !err.contains("panicked"), "{:?}: {err}", o.status);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    lines[0].to_string()
}

fn judge_server(max: usize) -> Server {
    Server::start(max, |_, req| {
        let system = req["messages"][0]["role"] == "system";
        Reply::Text(if system { "7 8\nfine".into() } else { "Rating: 4".into() })
    })
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(s(path)).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// What a path is now (bytes of a file, or its kind), to check that a refused run left it alone.
fn snapshot(path: &Path) -> String {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_fifo() => "fifo".into(),
        Ok(m) if m.is_dir() => format!("dir with {} entries", std::fs::read_dir(path).unwrap().count()),
        Ok(m) if m.file_type().is_char_device() => "char device".into(),
        Ok(_) => String::from_utf8_lossy(&std::fs::read(path).unwrap()).into_owned(),
        Err(_) => "absent".into(),
    }
}

#[test]
fn a_judge_cache_that_is_not_one_is_refused_and_left_as_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let records = responses(dir);
    let server = judge_server(10);
    let file = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let hard = dir.join("hard.json");
    std::fs::hard_link(&records, &hard).unwrap();
    let folder = dir.join("folder");
    std::fs::create_dir(&folder).unwrap();
    let fifo = dir.join("fifo");
    mkfifo(&fifo);
    let answers = std::fs::read_to_string(judge_fixture("llava-answers.jsonl")).unwrap();
    let cases: Vec<(&str, PathBuf, &str)> = vec![
        ("the responses file", records.clone(), "is also an input"),
        ("a hard link to it", hard, "is also an input"),
        ("another one-line JSON", file("copy.json", &std::fs::read_to_string(&records).unwrap()), "judge cache"),
        ("an answers JSONL", file("answers.jsonl", &answers), "judge cache"),
        (
            "pretty JSON",
            file("mm-vet.json", &std::fs::read_to_string(judge_fixture("mm-vet.json")).unwrap()),
            "judge cache",
        ),
        ("a torn line that is not a cache's", file("torn.jsonl", "{\"question_id\": 3, \"te"), "judge cache"),
        ("a cache line missing its reply", file("short.jsonl", "{\"key\": \"0a\", \"model\": \"j\"}\n"), "`reply`"),
        ("a folder", folder, "is a folder"),
        ("a FIFO", fifo, "is a FIFO"),
        ("a device", PathBuf::from("/dev/null"), "is a character device"),
    ];
    for (what, cache, needle) in cases {
        let before = snapshot(&cache);
        let out = dir.join(format!("run-{}", what.replace(' ', "-")));
        let start = Instant::now();
        let o = bpo_env(&mmhal(&server.url, &records, &out, &["--judge-cache", s(&cache)]), &[]);
        let line = error_line(&o);
        assert!(line.contains(needle) && line.contains(cache.file_name().unwrap().to_str().unwrap()), "{what}: {line}");
        assert!(start.elapsed() < Duration::from_secs(5), "{what}: no wait on a FIFO: {:?}", start.elapsed());
        assert_eq!(snapshot(&cache), before, "{what}: left as it was");
        assert!(!out.join("scores.json").exists(), "{what}");
    }
    assert_eq!(server.count(), 0, "nothing was asked");

    // A cache bpo wrote, torn by a kill, is repaired and reused.
    let cache = dir.join("cache.jsonl");
    ok(&bpo_env(&mmhal(&server.url, &records, &dir.join("a"), &["--judge-cache", s(&cache)]), &[]));
    let whole = std::fs::read_to_string(&cache).unwrap();
    std::fs::write(&cache, format!("{whole}{{\"key\":\"0123")).unwrap();
    let o = bpo_env(&mmhal(&server.url, &records, &dir.join("b"), &["--judge-cache", s(&cache)]), &[]);
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("cut a torn last line"));
    assert_eq!(std::fs::read_to_string(&cache).unwrap(), whole);
    assert_eq!(server.count(), 1, "the second run was answered from the cache");
}

#[test]
fn other_appenders_refuse_files_they_did_not_write() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model = fixture("llava-tiny");
    let images = fixture("images");
    let questions = dir.join("q.jsonl");
    std::fs::write(&questions, "{\"question_id\": 1, \"image\": \"chelsea.png\", \"text\": \"Is there a cat?\"}\n")
        .unwrap();
    let pairs = dir.join("pairs.jsonl");
    std::fs::write(&pairs, "{\"id\": \"p\", \"prompt\": \"q\", \"chosen\": \"a\", \"rejected\": \"b\"}").unwrap();
    let other_q = dir.join("other.jsonl");
    std::fs::write(&other_q, "{\"question_id\": 7, \"text\": \"Hi\", \"model_id\": \"llava-tiny\"}\n").unwrap();
    let prompts = dir.join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"id\": \"r\", \"prompt\": \"What is it?\", \"image\": \"chelsea.png\", \"answer\": \"A cat.\"}\n",
    )
    .unwrap();
    let cases: Vec<(Vec<&str>, &Path, &str)> = vec![
        (
            vec!["generate", "--model", s(&model), "--questions", s(&questions), "--answers", s(&other_q)],
            &other_q,
            "answers file",
        ),
        (
            vec!["bootstrap", "weaken", "--model", s(&model), "--data", s(&prompts), "--images", s(&images)],
            &pairs,
            "BPO records file",
        ),
    ];
    for (mut a, target, needle) in cases {
        let before = snapshot(target);
        a.extend(if a[0] == "generate" { vec!["--max-new-tokens", "2"] } else { vec!["--out", s(target)] });
        let line = the_error(&bpo_env(&args(&a), &[]));
        assert!(line.contains(needle) && line.contains(":1"), "{a:?}: {line}");
        assert_eq!(snapshot(target), before, "{a:?}");
    }
}

/// Runs `bpo args` with stdout a pipe nobody reads: closed from the start (`closed`), or after the first line, as
/// `| head -1` does. Returns the output with stderr.
fn piped(a: &[String], closed: bool) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bpo"));
    cmd.args(a).env_remove("OPENAI_API_KEY").stderr(Stdio::piped());
    if closed {
        let mut fds = [0; 2];
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both descriptors were just made by pipe(2) and are owned here.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        drop(read);
        cmd.stdout(Stdio::from(write));
        return cmd.output().unwrap();
    }
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn a_closed_stdout_stops_nothing_and_loses_no_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let server = Server::start(200, |_, req| {
        let system = req["messages"][0]["role"] == "system";
        let mmvet = crate::bootstrap_http::prompt_of(req).starts_with("Compare the ground truth");
        Reply::Text(if system {
            "7 8\nfine".into()
        } else if mmvet {
            "0.5".into()
        } else {
            "Rating: 4".into()
        })
    });
    let judge = ["--judge-url", &server.url, "--judge-model", "j", "--judge-retries", "1", "--judge-backoff", "0.01"];
    let pope_q = dir.join("coco_pope_random.json");
    std::fs::write(&pope_q, "{\"question_id\": 1, \"text\": \"Is there a cat?\", \"label\": \"yes\", \"image\": \"chelsea.png\"}\n{\"question_id\": 2, \"text\": \"Is there a dog?\", \"label\": \"no\", \"image\": \"coffee.png\"}\n").unwrap();
    let pope_a = dir.join("pope-answers.jsonl");
    std::fs::write(&pope_a, "{\"question_id\": 1, \"text\": \"Yes\"}\n{\"question_id\": 2, \"text\": \"No\"}\n")
        .unwrap();
    let gt = dir.join("gt.jsonl");
    std::fs::write(&gt, "{\"image_id\": \"1\", \"objects\": [\"cat\"]}\n").unwrap();
    let caps = dir.join("caps.jsonl");
    std::fs::write(&caps, "{\"question_id\": 1, \"image_id\": 1, \"text\": \"A cat and a dog on a sofa.\"}\n").unwrap();
    let records = dir.join("records.jsonl");
    std::fs::write(&records, "{\"id\": \"a\", \"prompt\": \"Q\", \"completions\": [{\"response\": \"A cup.\", \"score\": 1, \"type\": \"gt\"}, {\"response\": \"A fork.\", \"score\": 0, \"type\": \"llm-hal\"}]}\n").unwrap();
    let suite_toml = dir.join("suite.toml");
    let images = fixture("images");
    std::fs::write(
        &suite_toml,
        format!("[pope]\nquestions = [\"coco_pope_random.json\"]\nimages = \"{}\"\nmax_new_tokens = 2\n", s(&images)),
    )
    .unwrap();
    let model = fixture("llava-tiny");
    let llava = |n: &str| judge_fixture(&format!("llava-{n}.jsonl"));
    let mmhal_r = responses(dir);
    // (command, its output (folder or file) and the files in it, or nothing to check).
    let cases = |k: usize| -> Vec<(Vec<String>, Written)> {
        let out = |name: &str| dir.join(format!("{name}-{k}"));
        let with = |base: &[&str], extra: &[&str]| args(&[base, extra].concat());
        let run_files = vec!["scores.json", "details.jsonl"];
        vec![
            (
                with(
                    &["eval", "pope", "--answers", s(&pope_a), "--questions", s(&pope_q), "--out", s(&out("pope"))],
                    &[],
                ),
                Some((out("pope"), run_files.clone())),
            ),
            (
                with(
                    &["eval", "chair", "--answers", s(&caps), "--ground-truth", s(&gt), "--out", s(&out("chair"))],
                    &[],
                ),
                Some((out("chair"), run_files.clone())),
            ),
            (
                with(&["eval", "mmhal", "--responses", s(&mmhal_r), "--out", s(&out("mmhal"))], &judge),
                Some((out("mmhal"), vec!["scores.json", "judge-cache.jsonl"])),
            ),
            (
                with(
                    &["eval", "mmvet", "--questions", s(&judge_fixture("mm-vet.json")), "--runs", "1"],
                    &[&["--answers", s(&judge_fixture("mmvet-results.json")), "--out", s(&out("mmvet"))][..], &judge]
                        .concat(),
                ),
                Some((out("mmvet"), run_files.clone())),
            ),
            (
                with(
                    &["eval", "llava-bench", "--questions", s(&llava("questions")), "--context", s(&llava("context"))],
                    &[
                        &["--references", s(&llava("references")), "--answers", s(&llava("answers"))][..],
                        &["--out", s(&out("llava"))],
                        &judge,
                    ]
                    .concat(),
                ),
                Some((out("llava"), run_files.clone())),
            ),
            (
                with(
                    &["eval", "suite", "--model", s(&model), "--config", s(&suite_toml), "--out", s(&out("suite"))],
                    &[],
                ),
                Some((out("suite"), vec!["suite.json", "pope/scores.json", "pope/answers.jsonl"])),
            ),
            (with(&["eval", "compare", s(&dir.join("pope-0")), s(&out("pope"))], &[]), None),
            (args(&["bench", "eval", "--pope", "20", "--captions", "4", "--words", "8", "--repeats", "1"]), None),
            (
                with(&["pairs", "--records", s(&records), "--out", s(&out("pairs.jsonl"))], &[]),
                Some((out("pairs.jsonl"), vec![])),
            ),
            (with(&["generate", "--model", s(&model), "--prompt", "Hi", "--max-new-tokens", "3"], &[]), None),
        ]
    };
    for (k, closed) in [(0, true), (1, false)] {
        let how = if closed { "stdout closed" } else { "stdout closed after a line" };
        for (a, written) in cases(k) {
            let o = piped(&a, closed);
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(o.status.success() && !err.contains("panicked"), "{a:?}, {how}: {:?} {err}", o.status);
            if let Some((out, files)) = written {
                assert!(out.exists(), "{a:?}, {how}: {} was written", out.display());
                for f in files {
                    assert!(out.join(f).is_file(), "{a:?}, {how}: {}/{f} was written", out.display());
                }
            }
        }
    }
}

#[test]
fn settings_out_of_range_are_usage_errors_whichever_door() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let records = responses(dir);
    let server = judge_server(10);
    let out = dir.join("run");
    let model = fixture("llava-tiny");
    let q = dir.join("q.jsonl");
    std::fs::write(&q, "{\"question_id\": 1, \"text\": \"Hi\"}\n").unwrap();
    let answers = dir.join("a.jsonl");
    let mmvet = args(&[
        "eval",
        "mmvet",
        "--questions",
        s(&judge_fixture("mm-vet.json")),
        "--answers",
        s(&judge_fixture("mmvet-results.json")),
        "--out",
        s(&out),
        "--judge-url",
        &server.url,
        "--judge-model",
        "j",
    ]);
    let generate = args(&["generate", "--model", s(&model), "--questions", s(&q), "--answers", s(&answers)]);
    let inject = args(&["bootstrap", "inject", "--data", "r.jsonl", "--out", "o.jsonl", "--llm-url", &server.url]);
    let cases: Vec<(Vec<String>, &str, &str)> = vec![
        (mmhal(&server.url, &records, &out, &["--judge-backoff", "1e308"]), "--judge-backoff", "[0, 30]"),
        (mmhal(&server.url, &records, &out, &["--judge-backoff", "nan"]), "--judge-backoff", "[0, 30]"),
        (mmhal(&server.url, &records, &out, &["--judge-backoff=-1"]), "--judge-backoff", "[0, 30]"),
        (mmhal(&server.url, &records, &out, &["--judge-timeout", "0"]), "--judge-timeout", "[1, 86400]"),
        (
            mmhal(&server.url, &records, &out, &["--judge-timeout", "18446744073709551615"]),
            "--judge-timeout",
            "[1, 86400]",
        ),
        (mmhal(&server.url, &records, &out, &["--judge-concurrency", "0"]), "--judge-concurrency", "at least 1"),
        ([&mmvet[..], &args(&["--runs", "0"])].concat(), "--runs", "at least 1"),
        ([&generate[..], &args(&["--stop", ""])].concat(), "--stop", "must not be empty"),
        ([&inject[..], &args(&["--stop", ""])].concat(), "--stop", "must not be empty"),
        ([&inject[..], &args(&["--timeout-s", "0"])].concat(), "--timeout-s", "[1, 86400]"),
        ([&generate[..], &args(&["--max-new-tokens", "18446744073709551615"])].concat(), "max_new_tokens", "context"),
        ([&generate[..], &args(&["--max-new-tokens", "256"])].concat(), "max_new_tokens", "context of 256"),
    ];
    for (a, name, range) in cases {
        let o = bpo_env(&a, &[]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{name}: {err}");
        assert!(err.contains(name) && err.contains(range) && !err.contains("panicked"), "{name} {range}: {err}");
    }
    assert!(!answers.exists() && !out.join("scores.json").exists());
    assert_eq!(server.count(), 0);

    // suite.toml: the same ranges, the key named, before the model (which does not exist here) is looked at.
    let toml = dir.join("suite.toml");
    let pope = "[pope]\nquestions = [\"q.jsonl\"]\n";
    let judge = format!("[judge]\nurl = \"{}\"\nmodel = \"j\"\n", server.url);
    let mm = "[mmvet]\nquestions = \"q.jsonl\"\n";
    let rows: Vec<(String, &str)> = vec![
        (format!("batch_size = 0\n{pope}"), "batch_size = 0: must be at least 1"),
        (format!("{pope}max_new_tokens = 0\n"), "[pope] max_new_tokens = 0: must be at least 1"),
        (format!("{judge}{mm}runs = 0\n"), "[mmvet] runs = 0: must be at least 1"),
        (format!("{judge}concurrency = 0\n{mm}"), "[judge] concurrency = 0: must be at least 1"),
        (format!("{judge}backoff = 1e308\n{mm}"), "[judge] backoff = 1e308: must be a number of seconds in [0, 30]"),
        (format!("{judge}backoff = nan\n{mm}"), "[judge] backoff = NaN"),
        (format!("{judge}backoff = -1.0\n{mm}"), "[judge] backoff = -1.0"),
        (format!("{judge}timeout = 0\n{mm}"), "[judge] timeout = 0: must be a whole number of seconds in [1, 86400]"),
        ("[object_halbench]\nimages = \".\"\nground_truth = \"q.jsonl\"\nlimit = 0\n".into(), "[object_halbench] limit = 0"),
        (format!("{judge}[llava_bench]\nquestions = \"q.jsonl\"\ncontext = \"q.jsonl\"\nreferences = \"q.jsonl\"\nmax_new_tokens = 0\n"), "[llava_bench] max_new_tokens = 0"),
    ];
    for (text, needle) in rows {
        std::fs::write(&toml, &text).unwrap();
        let o = bpo_env(
            &args(&["eval", "suite", "--model", "/no/such/model", "--config", s(&toml), "--out", s(&dir.join("s"))]),
            &[],
        );
        let line = error_line(&o);
        assert_eq!(o.status.code(), Some(2), "{text}: {line}");
        assert!(line.contains("suite.toml") && line.contains(needle), "{text}: {line}");
    }
    assert!(!dir.join("s").exists(), "refused before the suite folder is made");

    // The library checks the same ranges.
    let params = bpo::generate::SamplingParams { stop: vec![String::new()], ..Default::default() };
    assert!(matches!(params.validate(), Err(bpo::Error::Range(m)) if m.contains("must not be empty")));
    let params = bpo::generate::SamplingParams { max_new_tokens: 0, ..Default::default() };
    assert!(matches!(params.validate(), Err(bpo::Error::Range(m)) if m.contains("at least 1")));
    let opts = bpo::eval::judge::JudgeOptions {
        url: server.url.clone(),
        model: "j".into(),
        api_key: None,
        concurrency: 0,
        retries: 0,
        backoff: Duration::ZERO,
        timeout: Duration::from_secs(1),
        cache: dir.join("c.jsonl"),
        inputs: vec![],
    };
    assert!(
        matches!(bpo::eval::judge::Judge::open(&opts).err(), Some(bpo::Error::Range(m)) if m.contains("at least 1"))
    );
}

fn suite(dir: &Path, toml: &str, out: &str) -> Output {
    let path = dir.join("suite.toml");
    std::fs::write(&path, toml).unwrap();
    bpo_env(
        &args(&[
            "eval",
            "suite",
            "--model",
            s(&fixture("llava-tiny")),
            "--config",
            s(&path),
            "--out",
            s(&dir.join(out)),
        ]),
        &[],
    )
}

#[test]
fn a_suite_reads_every_input_before_its_first_benchmark() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let server = judge_server(4);
    let images = fixture("images");
    std::fs::write(
        dir.join("pope_random.json"),
        "{\"question_id\": 1, \"image\": \"chelsea.png\", \"text\": \"Is there a cat?\", \"label\": \"yes\"}\n",
    )
    .unwrap();
    std::fs::create_dir(dir.join("sub")).unwrap();
    std::fs::copy(dir.join("pope_random.json"), dir.join("sub/pope_random.json")).unwrap();
    std::fs::write(dir.join("broken.json"), "{\"v1_0\": {\"imagename\": ").unwrap();
    let pope = format!("[pope]\nquestions = [\"pope_random.json\"]\nimages = \"{}\"\nmax_new_tokens = 2\n", s(&images));
    let judge = format!("[judge]\nurl = \"{}\"\nmodel = \"j\"\n", server.url);
    let cases: Vec<(String, Vec<&str>)> = vec![
        (format!("{judge}{pope}[mmvet]\nquestions = \"missing.json\"\n"), vec!["[mmvet] questions", "missing.json"]),
        (format!("{judge}{pope}[mmvet]\nquestions = \"broken.json\"\n"), vec!["[mmvet]", "broken.json"]),
        (format!("{judge}{pope}[mmhal]\nquestions = \"pope_random.json\"\nimages = \"pope_random.json\"\n"), vec!["[mmhal] images", "not a folder"]),
        (format!("{judge}{pope}[llava_bench]\nquestions = \"pope_random.json\"\ncontext = \"nope.jsonl\"\nreferences = \"pope_random.json\"\n"), vec!["[llava_bench] context", "nope.jsonl"]),
        (format!("[pope]\nquestions = [\"sub/pope_random.json\", \"pope_random.json\"]\nimages = \"{}\"\n", s(&images)), vec!["[pope]", "both name split \"random\""]),
    ];
    for (i, (toml, needles)) in cases.iter().enumerate() {
        let out = format!("s{i}");
        let line = error_line(&suite(dir, toml, &out));
        assert!(needles.iter().all(|n| line.contains(n)), "{toml}: {line}");
        assert!(!dir.join(&out).join("pope").exists(), "{toml}: POPE did not run first");
    }
    assert_eq!(server.count(), 0);

    // A 50 MB question is refused at once, without being tokenised.
    let big = dir.join("big.jsonl");
    std::fs::write(&big, format!("{{\"question_id\": 1, \"text\": \"{}\"}}\n", "cat ".repeat(50 << 18))).unwrap();
    let answers = dir.join("a.jsonl");
    let start = Instant::now();
    let o = bpo_env(
        &args(&["generate", "--model", s(&fixture("llava-tiny")), "--questions", s(&big), "--answers", s(&answers)]),
        &[],
    );
    let line = error_line(&o);
    assert!(line.contains("big.jsonl:1") && line.contains("cannot fit the model's context"), "{line}");
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    assert!(!answers.exists());
}

#[test]
fn races_merges_urls_and_keys_are_not_silent() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let records = responses(dir);
    let server = judge_server(10);
    let me = format!("bpo process {}", std::process::id());

    // Two runs on one folder: the second stops, naming the first (here this test holds the lock).
    let out = dir.join("run");
    std::fs::create_dir(&out).unwrap();
    let held = bpo::output::Lock::dir(&out).unwrap();
    let pope_q = dir.join("p2.jsonl");
    std::fs::write(&pope_q, "{\"question_id\": 1, \"text\": \"Is there a cat?\", \"label\": \"yes\"}\n").unwrap();
    let pope_a = dir.join("answers.jsonl");
    std::fs::write(&pope_a, "{\"question_id\": 1, \"text\": \"Yes\"}\n").unwrap();
    for a in [
        mmhal(&server.url, &records, &out, &["--judge-cache", s(&dir.join("other-cache.jsonl"))]),
        args(&["eval", "pope", "--answers", s(&pope_a), "--questions", s(&pope_q), "--out", s(&out)]),
    ] {
        let line = error_line(&bpo_env(&a, &[]));
        assert!(line.contains("run") && line.contains(&me), "{line}");
    }
    drop(held);
    assert_eq!(server.count(), 0);

    // Two split files with one name.
    std::fs::create_dir(dir.join("sub")).unwrap();
    std::fs::copy(&pope_q, dir.join("sub/p2.jsonl")).unwrap();
    let a = args(&["eval", "pope", "--answers", s(&pope_a), "--questions", s(&dir.join("sub/p2.jsonl")), s(&pope_q)]);
    let line = error_line(&bpo_env(&a, &[]));
    assert!(line.contains("sub/p2.jsonl") && line.contains("both name split \"p2\""), "{line}");

    // A query string stays after the path.
    let url = format!("{}/v1?api-version=2024-02-01", server.url);
    ok(&bpo_env(&mmhal(&url, &records, &dir.join("q"), &[]), &[]));
    assert_eq!(server.paths.lock().unwrap().clone(), vec!["/v1/chat/completions?api-version=2024-02-01".to_string()]);

    // Keys that cannot be sent are named (never printed) before any request.
    let key = |value: &OsStr| {
        Command::new(env!("CARGO_BIN_EXE_bpo"))
            .args(mmhal(&server.url, &records, &dir.join("k"), &[]))
            .env("OPENAI_API_KEY", value)
            .output()
            .unwrap()
    };
    for (value, needle) in
        [(OsStr::from_bytes(b"sk-\xff\xfe"), "not valid UTF-8"), (OsStr::new("sk-abc\nX: y"), "control character")]
    {
        let line = error_line(&key(value));
        assert!(line.contains("OPENAI_API_KEY") && line.contains(needle) && !line.contains("sk-"), "{line}");
    }
    assert_eq!(server.count(), 1);
    ok(&key(OsStr::new("  sk-good \n")));
    assert_eq!(server.auth.lock().unwrap().last().cloned().flatten().as_deref(), Some("Bearer sk-good"));
}

#[test]
fn retry_after_is_honoured_on_429_and_503() {
    let tmp = tempfile::tempdir().unwrap();
    let records = responses(tmp.path());
    for (status, header, value, least) in
        [(429, "Retry-After", "1", Duration::from_secs(1)), (503, "retry-after-ms", "400", Duration::from_millis(400))]
    {
        let server = Server::start(4, move |n, _| {
            if n == 0 {
                Reply::Headers(status, vec![(header, value.to_string())], "{\"error\": \"slow down\"}".into())
            } else {
                Reply::Text("Rating: 4".into())
            }
        });
        let start = Instant::now();
        ok(&bpo_env(&mmhal(&server.url, &records, &tmp.path().join(format!("r{status}")), &[]), &[]));
        let took = start.elapsed();
        assert!(took >= least && took < least + Duration::from_secs(5), "{status}: waited {took:?} (back-off 10 ms)");
        assert_eq!(server.count(), 2);
    }
}

#[test]
fn smaller_messages_say_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let records = responses(dir);
    let server = judge_server(4);
    // An --out folder that is a file.
    let file = dir.join("out-file");
    std::fs::write(&file, "x").unwrap();
    let line = error_line(&bpo_env(&mmhal(&server.url, &records, &file, &[]), &[]));
    assert!(line.contains("out-file: is a file; an output folder must be a folder"), "{line}");
    // compare: a suite with a run, and a folder that is neither.
    let pope_q = dir.join("coco_pope_random.json");
    std::fs::write(
        &pope_q,
        "{\"question_id\": 1, \"text\": \"Is there a cat?\", \"label\": \"yes\", \"image\": \"chelsea.png\"}\n",
    )
    .unwrap();
    let toml = format!(
        "[pope]\nquestions = [\"coco_pope_random.json\"]\nimages = \"{}\"\nmax_new_tokens = 2\n",
        s(&fixture("images"))
    );
    ok(&suite(dir, &toml, "base"));
    let (base, run) = (dir.join("base"), dir.join("base/pope"));
    let line = error_line(&bpo_env(&args(&["eval", "compare", s(&base), s(&run)]), &[]));
    assert!(line.contains("is a suite folder (suite.json)") && line.contains("base/pope is not"), "{line}");
    let line = error_line(&bpo_env(&args(&["eval", "compare", s(&run), s(dir)]), &[]));
    assert!(line.contains("neither a run folder") && !line.contains("No such file"), "{line}");
    // A suite folder of another model or adapter names it without Rust's `None`.
    let other = args(&[
        "eval",
        "suite",
        "--model",
        s(&fixture("llava-tiny")),
        "--adapter",
        s(dir),
        "--config",
        s(&dir.join("suite.toml")),
        "--out",
        s(&base),
    ]);
    let line = error_line(&bpo_env(&other, &[]));
    assert!(
        line.contains("holds a suite of") && line.contains("without an adapter") && !line.contains("None"),
        "{line}"
    );
}
