//! Hostile input (issue 14): servers that answer 200 with garbage, hang or refuse; images whose header promises
//! gigabytes; model and processor configs with impossible fields; BOMs, bad lines and over-long prompts in every
//! JSONL reader; and a seeded fuzz pass over the JSONL readers, the safetensors header reader and the image
//! decoder. Every case must end in one clear line and a non-zero exit (or an `Err`), never a panic, never a
//! success with a wrong result. The loopback server is `bootstrap_http.rs`'s.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bpo::bootstrap::{CompletionOptions, Endpoint};
use bpo::data::Record;
use bpo::vision::AspectMode;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::bootstrap_http::{completer, prompt_of, Reply, Server};
use crate::util::{bpo, fails_with, fixture, model_copy, s};

fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// The one `error:` line of a failed run (no panic, non-zero exit).
fn error_line(o: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "expected failure, got success; stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(lines.len(), 1, "one error line: {err}");
    lines[0].to_string()
}

// ---------------------------------------------------------------------------------------------------------------
// Servers

/// 200 replies a server must not be trusted with: (name, body, a word the failure must carry).
fn garbage() -> Vec<(&'static str, String, &'static str)> {
    vec![
        ("html", "<html>\n<body>502 Bad Gateway</body>\n</html>".into(), "not JSON"),
        ("malformed", r#"{"choices": [{"text": "A blue"#.into(), "not JSON"),
        ("no choices", r#"{"object": "text_completion"}"#.into(), "no `choices`"),
        ("null text", r#"{"choices": [{"text": null}]}"#.into(), "null"),
        ("empty text", r#"{"choices": [{"text": "  "}]}"#.into(), "empty"),
        ("oversized", format!(r#"{{"choices": [{{"text": "{}"}}]}}"#, "x".repeat(5 << 20)), "larger than"),
    ]
}

#[test]
fn garbage_replies_are_retried_then_fail_the_prompt() {
    for (name, body, needle) in garbage() {
        let server = Server::start(10, move |_, _| Reply::Raw(200, body.clone()));
        let c = completer(&server.url, Endpoint::Completions, 5000, 2);
        let err = c.complete_one("p", &CompletionOptions::default()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, bpo::Error::Http(_)), "{name}: {msg}");
        assert!(msg.contains(needle) && msg.contains("status 200") && msg.contains("3 attempts"), "{name}: {msg}");
        assert!(!msg.contains('\n') && msg.len() < 600, "{name}: one short line: {msg}");
        assert_eq!(server.count(), 3, "{name}: retried");
    }
}

fn llava_data(dir: &Path) -> PathBuf {
    let samples = json!([
        {"id": "1", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "A red bus next to a tree."}]},
        {"id": "2", "image": "b.jpg", "conversations": [{"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "Two cats on a sofa."}]}
    ]);
    write(dir, "llava.json", samples.to_string())
}

fn inject(url: &str, data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut a = vec!["bootstrap", "inject", "--llm-url", url, "--data", s(data), "--out", s(out), "--retries", "0"];
    a.extend_from_slice(extra);
    bpo(&a)
}

/// Run 1 against a garbage server fails both records (nothing written, exit non-zero, the cause named); run 2
/// against a working server writes both with their negatives.
#[test]
fn inject_against_a_garbage_server_writes_nothing_and_a_rerun_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = llava_data(tmp.path());
    for (name, body, needle) in garbage() {
        // Requests 0 and 1 (run 1) get garbage, later ones (run 2) a real answer.
        let server = Server::start(4, move |n, req| {
            if n < 2 {
                Reply::Raw(200, body.clone())
            } else {
                Reply::Text(format!(" A green {}", prompt_of(req).len()))
            }
        });
        let out = tmp.path().join(format!("{}.jsonl", name.replace(' ', "-")));
        let o = inject(&server.url, &data, &out, &["--concurrency", "2"]);
        let line = error_line(&o);
        assert!(line.contains("2 records failed") && line.contains("run the same command again"), "{name}: {line}");
        assert!(line.contains(needle) && line.contains(&server.url), "{name}: the cause is printed: {line}");
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "", "{name}: nothing counted as done");
        let o = inject(&server.url, &data, &out, &["--concurrency", "2"]);
        assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
        let records: Vec<Record> = bpo::jsonl::read(&out).unwrap();
        assert_eq!(records.len(), 2, "{name}");
        assert!(
            records.iter().all(|r| r.completions.len() == 2 && r.completions[1].response.starts_with("A green")),
            "{name}"
        );
        assert_eq!(server.count(), 4);
    }
}

#[test]
fn inject_names_the_cause_of_refusals_hangs_and_missing_servers() {
    let tmp = tempfile::tempdir().unwrap();
    let data = llava_data(tmp.path());
    // 500 then a good answer: one record written, one failed, exit non-zero, status named.
    let server = Server::start(2, |n, _| if n == 0 { Reply::Status(500) } else { Reply::Text(" A green bus.".into()) });
    let out = tmp.path().join("a.jsonl");
    let line = error_line(&inject(&server.url, &data, &out, &["--concurrency", "1"]));
    assert!(line.contains("1 records failed") && line.contains("status 500"), "{line}");
    assert_eq!(bpo::jsonl::read::<Record>(&out).unwrap().len(), 1, "the good record is written");
    // A server that accepts and never answers: the total timeout ends the request.
    let server = Server::start(4, |_, _| Reply::Stall);
    let start = Instant::now();
    let line = error_line(&inject(&server.url, &data, &tmp.path().join("b.jsonl"), &["--timeout-s", "1"]));
    assert!(line.contains("timeout") && line.contains("2 records failed"), "{line}");
    assert!(start.elapsed() < Duration::from_secs(8), "bounded by --timeout-s: {:?}", start.elapsed());
    // Nothing listening.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let line = error_line(&inject(&format!("http://127.0.0.1:{port}"), &data, &tmp.path().join("c.jsonl"), &[]));
    assert!(line.contains("2 records failed") && line.contains(&format!("127.0.0.1:{port}")), "{line}");
    // --help states the default timeout.
    let help = String::from_utf8_lossy(&bpo(&["bootstrap", "inject", "--help"]).stdout).into_owned();
    assert!(help.contains("--timeout-s") && help.contains("[default: 120]"), "{help}");
}

#[test]
fn a_judge_answering_garbage_stops_the_run_and_caches_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let records = write(
        tmp.path(),
        "one.json",
        json!([{"question_type": "attribute", "image_content": ["Cat"], "question": "Q0?", "gt_answer": "A cat.", "model_answer": "A dog."}]).to_string(),
    );
    let server = Server::start(5, |_, _| Reply::Raw(200, "<!DOCTYPE html><title>login</title>".into()));
    let out = tmp.path().join("run");
    let args = ["eval", "mmhal", "--responses", s(&records), "--out", s(&out), "--judge-url", &server.url];
    let mut args = args.to_vec();
    args.extend(["--judge-model", "gpt-4-0314", "--judge-retries", "1", "--judge-backoff", "0.01"]);
    let line = error_line(&bpo(&args));
    assert!(
        line.contains("judge") && line.contains("not JSON") && line.contains("DOCTYPE") && line.contains("2 attempts"),
        "{line}"
    );
    assert_eq!(server.count(), 2);
    let cache = std::fs::read_to_string(out.join("judge-cache.jsonl")).unwrap_or_default();
    assert_eq!(cache, "", "a garbage reply is never cached as an answer");
    assert!(!out.join("scores.json").exists());
}

// ---------------------------------------------------------------------------------------------------------------
// Images

/// A PNG of `w` x `h` grey pixels (compresses to a few hundred bytes whatever the size).
fn png(w: u32, h: u32) -> Vec<u8> {
    let mut bytes = Vec::new();
    let img = image::GrayImage::from_pixel(w, h, image::Luma([128]));
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png).unwrap();
    bytes
}

/// A PNG header (signature + IHDR) claiming `w` x `h`, with no pixel data.
fn png_header(w: u32, h: u32) -> Vec<u8> {
    let mut png = png(1, 1);
    png[16..20].copy_from_slice(&w.to_be_bytes());
    png[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

#[test]
fn bad_images_are_one_line_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let chelsea = std::fs::read(fixture("images/chelsea.png")).unwrap();
    let jpeg = std::fs::read(fixture("images/rocket.jpg")).unwrap();
    let wide = png(60_000, 1); // pads to 3.6 Gpx: refused before the 10 GB square is allocated
    assert!(wide.len() < 2000, "a cheap file: {} bytes", wide.len());
    let cases: Vec<(&str, Vec<u8>, Vec<&str>, &str)> = vec![
        ("wide.png", wide, vec![], "60000x60000"),
        ("tall.png", png(1, 50_000), vec![], "50000x50000"),
        ("huge-header.png", png_header(40_000, 40_000), vec![], "1600000000 pixels"),
        ("limit.png", chelsea.clone(), vec!["--max-image-pixels", "1000"], "451x300 is 135300 pixels"),
        ("limit-pad.png", chelsea.clone(), vec!["--max-image-pixels", "150000"], "451x451 square"),
        ("truncated.png", chelsea[..chelsea.len() / 2].to_vec(), vec![], "truncated.png"),
        ("truncated.jpg", jpeg[..jpeg.len() / 2].to_vec(), vec![], "truncated.jpg"),
        ("garbage.png", b"\x89PNG\r\n\x1a\nnot really".to_vec(), vec![], "garbage.png"),
        ("empty.jpg", Vec::new(), vec![], "empty.jpg"),
        ("text.png", b"hello".to_vec(), vec![], "text.png"),
    ];
    let model = fixture("llava-tiny");
    for (name, bytes, extra, needle) in cases {
        let path = write(tmp.path(), name, bytes);
        let start = Instant::now();
        let mut args =
            vec!["generate", "--model", s(&model), "--image", s(&path), "--prompt", "hi", "--max-new-tokens", "1"];
        args.extend(extra);
        fails_with(&args, &[name, needle]);
        assert!(start.elapsed() < Duration::from_secs(10), "{name}: took {:?}", start.elapsed());
    }
    // The same wide image is fine where it is not padded and the limit allows it.
    let lib = bpo::vision::decode_image(&png(3000, 2), 10_000, AspectMode::Square).unwrap();
    assert_eq!((lib.width(), lib.height()), (3000, 2));
    let err = bpo::vision::decode_image(&png(3000, 2), 10_000, AspectMode::Pad).unwrap_err();
    assert!(err.contains("3000x3000") && err.contains("10000"), "{err}");
}

// ---------------------------------------------------------------------------------------------------------------
// Model and processor configs

/// Sets `pointer` (a JSON pointer) of `dir/config.json` to `value`.
fn set_config(dir: &Path, pristine: &Value, pointer: &str, value: Value) {
    let mut cfg = pristine.clone();
    *cfg.pointer_mut(pointer).unwrap_or_else(|| panic!("{pointer}")) = value;
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
}

#[test]
fn impossible_config_fields_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model_copy("llava-tiny", tmp.path());
    let pristine: Value = serde_json::from_str(&std::fs::read_to_string(m.join("config.json")).unwrap()).unwrap();
    let cases = [
        ("/vision_config/patch_size", json!(0), "vision_config.patch_size"),
        ("/vision_config/patch_size", json!(64), "vision_config.patch_size"),
        ("/vision_config/image_size", json!(0), "vision_config.image_size"),
        ("/vision_config/hidden_size", json!(0), "vision_config.hidden_size"),
        ("/vision_config/num_attention_heads", json!(5), "vision_config.hidden_size"),
        ("/vision_config/num_hidden_layers", json!(0), "vision_config.num_hidden_layers"),
        ("/vision_config/num_channels", json!(4), "vision_config.num_channels"),
        ("/text_config/num_hidden_layers", json!(0), "text_config.num_hidden_layers"),
        ("/text_config/num_attention_heads", json!(0), "text_config.num_attention_heads"),
        ("/text_config/num_key_value_heads", json!(3), "text_config.num_attention_heads"),
        ("/text_config/hidden_size", json!(0), "text_config.hidden_size"),
        ("/text_config/vocab_size", json!(0), "text_config.vocab_size"),
        ("/text_config/max_position_embeddings", json!(0), "text_config.max_position_embeddings"),
        ("/text_config/rms_norm_eps", json!(-1.0), "text_config.rms_norm_eps"),
        ("/vision_feature_layer", json!(4), "vision_feature_layer"),
        ("/vision_feature_layer", json!(-5), "-4..=3"),
        ("/vision_config/patch_size", json!("eight"), "config.json"),
        // An activation bpo does not compute is named, never replaced by another.
        ("/projector_hidden_act", json!("relu"), "projector_hidden_act"),
        ("/vision_config/hidden_act", json!("swish"), "vision_config.hidden_act"),
        ("/text_config/hidden_act", json!("gelu"), "text_config.hidden_act"),
    ];
    for (pointer, value, needle) in cases {
        set_config(&m, &pristine, pointer, value);
        fails_with(
            &["generate", "--model", s(&m), "--prompt", "hi", "--max-new-tokens", "1"],
            &["config.json", needle],
        );
    }
    // The extremes of the range load.
    set_config(&m, &pristine, "/vision_feature_layer", json!(-4));
    let o = bpo(&["generate", "--model", s(&m), "--prompt", "hi", "--max-new-tokens", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn a_missing_or_mismatched_preprocessor_config_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model_copy("llava-tiny", tmp.path());
    let pre = m.join("preprocessor_config.json");
    let good = std::fs::read_to_string(&pre).unwrap();
    let args = ["generate", "--model", s(&m), "--prompt", "hi", "--max-new-tokens", "1"];
    std::fs::remove_file(&pre).unwrap();
    fails_with(&args, &["preprocessor_config.json", "not found", "336x336", "36x36"]);
    std::fs::write(&pre, r#"{"crop_size": 224, "size": 224}"#).unwrap();
    fails_with(&args, &["preprocessor_config.json", "224x224", "36x36"]);
    std::fs::write(&pre, "{\"crop_size\": ").unwrap();
    fails_with(&args, &["preprocessor_config.json"]);
    // A BOM in front of JSON is accepted (Windows editors write one).
    std::fs::write(&pre, format!("\u{feff}{good}")).unwrap();
    let cfg = std::fs::read_to_string(m.join("config.json")).unwrap();
    std::fs::write(m.join("config.json"), format!("\u{feff}{cfg}")).unwrap();
    let o = bpo(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Most memory the runs below may take: their heap and private mappings are capped at this (`RLIMIT_DATA`), so a run
/// that needs more fails its allocation and the test sees it.
const MEMORY_CAP: u64 = 200 << 20;

/// Runs `bpo args` (stdout discarded) with its data memory capped at [`MEMORY_CAP`]; returns its output and wall
/// time. (The cap is exact for the new program; `ru_maxrss` is not, as it counts the parent's pages at the spawn.)
fn capped(args: &[&str]) -> (std::process::Output, Duration) {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_bpo"));
    cmd.args(args).stdout(std::process::Stdio::null());
    // SAFETY: setrlimit is async-signal-safe and only reads the value given.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit { rlim_cur: MEMORY_CAP, rlim_max: MEMORY_CAP };
            match libc::setrlimit(libc::RLIMIT_DATA, &limit) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        });
    }
    let start = Instant::now();
    let out = cmd.output().unwrap();
    (out, start.elapsed())
}

/// Every file bpo reads from a model folder, replaced in turn by a link to a device, a FIFO, a symbolic link loop, a
/// folder and a sparse 1 GB file: each is refused with one line naming it, in under 1 s and 200 MB ([`capped`]). A
/// chat template that loops for ever or writes without end is stopped by its budget.
#[test]
fn a_hostile_model_folder_costs_nothing_before_its_refusal() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model_copy("llava-tiny", tmp.path());
    let files = [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "chat_template.jinja",
        "model.safetensors",
    ];
    type Make = fn(&Path);
    let kinds: [(&str, Make); 6] = [
        ("/dev/zero", |p| std::os::unix::fs::symlink("/dev/zero", p).unwrap()),
        ("/dev/urandom", |p| std::os::unix::fs::symlink("/dev/urandom", p).unwrap()),
        ("a FIFO", |p| {
            let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        }),
        ("a link loop", |p| std::os::unix::fs::symlink(p.file_name().unwrap(), p).unwrap()),
        ("a folder", |p| std::fs::create_dir(p).unwrap()),
        ("1 GB", |p| std::fs::File::create(p).unwrap().set_len(1 << 30).unwrap()),
    ];
    let mut slowest = Duration::ZERO;
    for file in files {
        let path = m.join(file);
        let original = std::fs::read(&path).ok();
        for (kind, make) in &kinds {
            if path.is_dir() {
                std::fs::remove_dir(&path).unwrap();
            } else {
                let _ = std::fs::remove_file(&path);
            }
            make(&path);
            let mut args = vec!["generate", "--model", s(&m), "--prompt", "hi", "--max-new-tokens", "1"];
            if file == "chat_template.jinja" {
                args.extend(["--template", "model"]);
            }
            let (o, took) = capped(&args);
            let line = error_line(&o);
            assert!(o.status.code() == Some(1) && line.contains(file), "{file} as {kind}: {line}");
            assert!(took < Duration::from_secs(1), "{file} as {kind}: {took:?}");
            slowest = slowest.max(took);
        }
        if path.is_dir() {
            std::fs::remove_dir(&path).unwrap();
        } else {
            std::fs::remove_file(&path).unwrap();
        }
        if let Some(bytes) = original {
            std::fs::write(&path, bytes).unwrap();
        }
    }
    eprintln!("hostile model folder: slowest refusal {slowest:?}");

    // Templates that would run for ever or write without end.
    let nested =
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ messages[0].content }}{% endfor %}{% endfor %}";
    let wide = "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}";
    for (template, needle) in [(nested, "instructions"), (wide, "MiB")] {
        std::fs::write(m.join("chat_template.jinja"), template).unwrap();
        let args = ["generate", "--model", s(&m), "--prompt", "hi", "--max-new-tokens", "1", "--template", "model"];
        let (o, took) = capped(&args);
        let line = error_line(&o);
        assert!(line.contains("chat_template.jinja") && line.contains(needle), "{line}");
        assert!(took < Duration::from_secs(3), "{took:?}");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// JSONL readers

const QUESTION: &str = r#"{"question_id": 1, "image": "chelsea.png", "text": "Is there a cat?"}"#;
const RECORD: &str = r#"{"id": "r1", "prompt": "Describe.", "completions": [{"response": "A cat.", "score": 1, "type": "gt"}, {"response": "A dog.", "score": 0, "type": "llm-hal"}]}"#;
const PAIR: &str = r#"{"id": "p1", "prompt": "Describe.", "chosen": "A cat.", "rejected": "A dog."}"#;
const ANSWER: &str = r#"{"question_id": 1, "prompt": "Describe.", "text": "A cat."}"#;
const ANNOTATION: &str = r#"{"image_id": "42", "objects": ["cat"]}"#;

type Reader = fn(&Path) -> bpo::Result<usize>;

/// Every JSONL reader with one valid row, as (name, valid row, reader returning the rows read).
fn readers() -> Vec<(&'static str, &'static str, Reader)> {
    vec![
        ("questions", QUESTION, |p| Ok(bpo::generate::vqa::read_questions(p)?.len())),
        ("records", RECORD, |p| Ok(bpo::data::read_input(p, &Default::default())?.records.len())),
        ("pairs", PAIR, |p| Ok(bpo::data::read_pairs(p)?.len())),
        ("answers", ANSWER, |p| Ok(bpo::eval::load_answers(p)?.len())),
        ("annotations", ANNOTATION, |p| bpo::eval::chair::GroundTruth::from_jsonl(p, chair()).map(|_| 1)),
    ]
}

/// The built-in CHAIR vocabulary, built once.
fn chair() -> &'static bpo::eval::chair::Chair {
    static CHAIR: std::sync::OnceLock<bpo::eval::chair::Chair> = std::sync::OnceLock::new();
    CHAIR.get_or_init(|| bpo::eval::chair::Chair::builtin().unwrap())
}

#[test]
fn every_jsonl_reader_names_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, row, read) in readers() {
        let file = |tag: &str, text: &[u8]| write(tmp.path(), &format!("{name}-{tag}.jsonl"), text);
        // Valid, with a BOM, with blank lines and CRLF: all read.
        for (tag, text) in
            [("ok", format!("{row}\n")), ("bom", format!("\u{feff}{row}\n")), ("crlf", format!("\r\n{row}\r\n\r\n"))]
        {
            assert_eq!(
                read(&file(tag, text.as_bytes())).unwrap_or_else(|e| panic!("{name} {tag}: {e}")),
                1,
                "{name} {tag}"
            );
        }
        let bad: Vec<(&str, Vec<u8>, &str)> = vec![
            ("malformed", format!("{row}\n{{\"id\": oops}}\n").into_bytes(), ":2"),
            ("truncated", format!("{row}\n{}", &row[..row.len() / 2]).into_bytes(), ":2"),
            ("wrong-type", format!("{row}\n[1, 2]\n").into_bytes(), ":2"),
            ("empty-object", format!("{row}\n{{}}\n").into_bytes(), ":2"),
            ("not-utf8", [row.as_bytes(), b"\n{\"id\": \"\xff\xfe\"}\n"].concat(), "jsonl"),
            ("nul", format!("{row}\n\0\0\0\n").into_bytes(), ":2"),
        ];
        for (tag, text, needle) in bad {
            let path = file(tag, &text);
            let err = read(&path).map(|n| format!("read {n} rows")).unwrap_or_else(|e| e.to_string());
            assert!(err.contains(&format!("{name}-{tag}.jsonl")) && err.contains(needle), "{name} {tag}: {err}");
            assert!(!err.contains('\n'), "{name} {tag}: one line: {err}");
        }
        let err = read(&tmp.path().join("absent.jsonl")).unwrap_err().to_string();
        assert!(err.contains("absent.jsonl"), "{name}: {err}");
        let err = read(tmp.path()).unwrap_err().to_string();
        assert!(err.contains(s(tmp.path())), "{name}: a folder: {err}");
    }
}

#[test]
fn a_prompt_longer_than_the_context_names_its_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let long = "red ".repeat(400);
    let q = write(tmp.path(), "q.jsonl", format!("{QUESTION}\n{{\"question_id\": 2, \"text\": \"{long}\"}}\n"));
    let answers = tmp.path().join("a.jsonl");
    let model = fixture("llava-tiny");
    let images = fixture("images");
    let args =
        ["generate", "--model", s(&model), "--questions", s(&q), "--images", s(&images), "--answers", s(&answers)];
    fails_with(&args, &["q.jsonl:2", "context"]);
    assert!(!answers.exists(), "refused before anything is generated or written");
    let d = write(
        tmp.path(),
        "d.jsonl",
        format!("{{\"prompt\": \"hi\", \"response\": \"ok\"}}\n{{\"prompt\": \"{long}\", \"response\": \"ok\"}}\n"),
    );
    fails_with(
        &["score", "--model", s(&model), "--data", s(&d), "--out", s(&tmp.path().join("o.jsonl"))],
        &["d.jsonl:2", "context"],
    );
}

// ---------------------------------------------------------------------------------------------------------------
// Fuzz: random bytes and mutations of valid files. Each input must give `Ok` or `Err`, never a panic; the image
// decoder runs with a small limit, so a header that promises a huge image is refused before it is decoded.

/// `valid` with a few random byte edits (flip, insert, delete, truncate), or plain random bytes.
fn mutate(rng: &mut StdRng, valid: &[u8]) -> Vec<u8> {
    if rng.random_bool(0.15) {
        let n = rng.random_range(0..64);
        return (0..n).map(|_| rng.random()).collect();
    }
    let mut v = valid.to_vec();
    for _ in 0..rng.random_range(1..4) {
        if v.is_empty() {
            break;
        }
        let at = rng.random_range(0..v.len());
        match rng.random_range(0..5) {
            0 => v[at] ^= 1 << rng.random_range(0..8),
            1 => v[at] = rng.random(),
            2 => v.insert(at, *b"{}[]\",:\n\\0".get(rng.random_range(0..11)).unwrap_or(&b'x')),
            3 => {
                v.remove(at);
            }
            _ => v.truncate(at),
        }
    }
    v
}

fn no_panic<T>(what: &str, input: &[u8], f: impl FnOnce() -> T) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(t) => t,
        Err(_) => panic!("{what} panicked on {:?}", String::from_utf8_lossy(input)),
    }
}

#[test]
fn fuzz_jsonl_readers() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(14);
    for (name, row, read) in readers() {
        let valid = format!("{row}\n");
        let path = tmp.path().join(format!("{name}.jsonl"));
        let mut errors = 0;
        for _ in 0..400 {
            let bytes = mutate(&mut rng, valid.as_bytes());
            std::fs::write(&path, &bytes).unwrap();
            if let Err(e) = no_panic(name, &bytes, || read(&path)) {
                errors += 1;
                assert!(e.to_string().contains(&format!("{name}.jsonl")), "{name}: error names the file: {e}");
            }
        }
        assert!(errors > 50, "{name}: the mutations must break something ({errors} errors)");
    }
}

#[test]
fn fuzz_safetensors_header() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::copy(fixture("llama-tiny/config.json"), dir.join("config.json")).unwrap();
    let tensors = [
        (
            "model.norm.weight".to_string(),
            candle_core::Tensor::ones(4, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
        ),
        (
            "lm_head.weight".to_string(),
            candle_core::Tensor::zeros((2, 3), candle_core::DType::F16, &candle_core::Device::Cpu).unwrap(),
        ),
    ];
    let file = dir.join("model.safetensors");
    bpo::model::load::save_safetensors(&file, &tensors).unwrap();
    let valid = std::fs::read(&file).unwrap();
    let header_end = 8 + u64::from_le_bytes(valid[..8].try_into().unwrap()) as usize;
    let mut rng = StdRng::seed_from_u64(14);
    let mut opened = 0;
    for i in 0..600 {
        // Mostly the header (where the lengths and offsets are), sometimes the 8-byte length itself.
        let mut bytes = mutate(&mut rng, &valid[..header_end]);
        if i % 7 == 0 && bytes.len() >= 8 {
            bytes[..8].copy_from_slice(&rng.random::<u64>().to_le_bytes());
        }
        bytes.extend_from_slice(&valid[header_end.min(valid.len())..]);
        std::fs::File::create(&file).unwrap().write_all(&bytes).unwrap();
        let source = no_panic("safetensors header", &bytes, || bpo::model::load::TensorSource::open(dir));
        if let Ok(source) = source {
            opened += 1;
            for name in source.names() {
                let _ = no_panic("safetensors tensor", &bytes, || source.raw(&name, &candle_core::Device::Cpu));
            }
        }
    }
    assert!(opened > 0 && opened < 600, "some mutations open, some fail: {opened}");
}

#[test]
fn fuzz_image_decoder() {
    let mut rng = StdRng::seed_from_u64(14);
    let valid = [
        png(9, 5),
        std::fs::read(fixture("images/tiny.png")).unwrap(),
        std::fs::read(fixture("images/jpeg/gray.jpg")).unwrap(),
        std::fs::read(fixture("images/jpeg/q75_420.jpg")).unwrap(),
    ];
    let limit = 67 * 67; // the padded square of the largest valid input (67x45): a header that claims more is refused
    let (mut decoded, mut refused) = (0, 0);
    for i in 0..1500 {
        let source = &valid[i % valid.len()];
        // Edits near the start hit the header (sizes, markers), where a bomb would be declared.
        let cut = source.len().min(200);
        let mut bytes = mutate(&mut rng, &source[..cut]);
        bytes.extend_from_slice(&source[cut..]);
        let mode = if i % 2 == 0 { AspectMode::Pad } else { AspectMode::Square };
        match no_panic("image decoder", &bytes, || bpo::vision::decode_image(&bytes, limit, mode)) {
            Ok(img) => {
                let side = u64::from(img.width().max(img.height()));
                assert!(u64::from(img.width()) * u64::from(img.height()) <= limit, "{}x{}", img.width(), img.height());
                assert!(mode == AspectMode::Square || side * side <= limit);
                decoded += 1;
            }
            Err(e) if e.contains("over the limit") => refused += 1,
            Err(_) => {}
        }
    }
    assert!(decoded > 100 && refused > 0, "some mutations still decode ({decoded}), some claim too much ({refused})");
}
