//! Bootstrap stage without a model: LLaVA input → error injection through a fake LLM (resume, torn lines,
//! crashes, shards) → pairs in all three layouts and back, and the `bpo pairs` command.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use bpo::bootstrap::{run_inject, Completer, CompletionOptions, InjectMode, InjectOptions};
use bpo::data::pairs::{make_pair_file, read_record_shards};
use bpo::data::{
    expand, read_input, read_pairs, CompletionType, InputOptions, PairFormat, PairOptions, Record, ResumableWriter,
    Shard,
};
use bpo::progress::Silent;
use bpo::{Error, Result};
use clap::ValueEnum;
use serde_json::{json, Value};

/// LLaVA instruct JSON written for these tests: 6 conversations, 9 exchanges, one text-only.
fn llava_fixture(dir: &Path) -> PathBuf {
    let mut samples = Vec::new();
    for i in 0..5 {
        let mut conv = vec![
            json!({"from": "human", "value": format!("<image>\nWhat is in picture {i}?")}),
            json!({"from": "gpt", "value": format!("Picture {i} shows a red bus parked next to a tree.")}),
        ];
        if i % 2 == 0 {
            conv.push(json!({"from": "human", "value": "What color is the bus?"}));
            conv.push(json!({"from": "gpt", "value": format!("The bus in picture {i} is red.")}));
        }
        samples.push(json!({"id": format!("{i:012}"), "image": format!("coco/{i:012}.jpg"), "conversations": conv}));
    }
    samples.push(json!({"id": "text", "conversations": [
        {"from": "human", "value": "Name a fruit."}, {"from": "gpt", "value": "An apple is a fruit."}]}));
    let path = dir.join("llava.json");
    std::fs::write(&path, serde_json::to_string_pretty(&samples).unwrap()).unwrap();
    path
}

/// A fake LLM: answers "{the description} Also a dog." unless told otherwise; can abort after `fail_after`
/// prompts, and logs every prompt.
struct Fake {
    seen: Mutex<Vec<String>>,
    sent: AtomicUsize,
    fail_after: Option<usize>,
    reply: fn(&str) -> Result<String>,
}

impl Fake {
    fn new(reply: fn(&str) -> Result<String>) -> Self {
        Fake { seen: Mutex::new(Vec::new()), sent: AtomicUsize::new(0), fail_after: None, reply }
    }
}

fn add_a_dog(prompt: &str) -> Result<String> {
    let start = prompt.rfind("Description: ").map(|i| i + 13).unwrap_or(0);
    let end = prompt.rfind("\nModified description:").unwrap_or(prompt.len());
    Ok(format!(" {} Also a dog.</s>", &prompt[start..end]))
}

impl Completer for Fake {
    fn complete(&self, prompts: &[String], _opts: &CompletionOptions) -> Result<Vec<Result<String>>> {
        let before = self.sent.fetch_add(prompts.len(), Ordering::SeqCst);
        if self.fail_after.is_some_and(|k| before + prompts.len() > k) {
            return Err(Error::Http("simulated crash".into()));
        }
        self.seen.lock().unwrap().extend(prompts.iter().cloned());
        Ok(prompts.iter().map(|p| (self.reply)(p)).collect())
    }
}

fn input(path: &Path) -> Vec<Record> {
    read_input(path, &InputOptions::default()).unwrap().records
}

/// Ids in an output file, with how often each appears.
fn id_counts(path: &Path) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for r in bpo::jsonl::read::<Record>(path).unwrap() {
        *counts.entry(r.id).or_insert(0) += 1;
    }
    counts
}

fn assert_each_once(path: &Path, records: &[Record]) {
    let counts = id_counts(path);
    assert_eq!(counts.len(), records.len());
    for r in records {
        assert_eq!(counts.get(&r.id), Some(&1), "{}", r.id);
    }
}

fn opts(batch_size: usize) -> InjectOptions {
    InjectOptions { batch_size, ..Default::default() }
}

#[test]
fn inject_description_writes_input_plus_negative() {
    let dir = tempfile::tempdir().unwrap();
    let records = input(&llava_fixture(dir.path()));
    assert_eq!(records.len(), 9);
    let out = dir.path().join("records.jsonl");
    let fake = Fake::new(add_a_dog);
    let (mut w, _) = ResumableWriter::open(&out).unwrap();
    let counts = run_inject(records.clone(), &fake, &opts(4), &mut w, &Silent).unwrap();
    assert_eq!((counts.records.written, counts.added, counts.requests), (9, 9, 9));
    let first = &fake.seen.lock().unwrap()[0];
    assert!(
        first.starts_with("A chat between a curious user") && first.ends_with("Modified description: ASSISTANT:"),
        "{first}"
    );
    let written = bpo::jsonl::read::<Record>(&out).unwrap();
    assert_eq!(written[0].completions[0], records[0].completions[0]);
    assert_eq!(written[0].completions[1].response, "Picture 0 shows a red bus parked next to a tree. Also a dog.");
    assert_eq!((written[0].completions[1].score, &written[0].completions[1].kind), (0.0, &CompletionType::LlmHal));
    // A second run has nothing left to do.
    let again = run_inject(records, &fake, &opts(4), &mut w, &Silent).unwrap();
    assert_eq!((again.records.already_done, again.requests), (9, 0));
}

#[test]
fn cleaning_drops_are_counted_and_failed_requests_retried() {
    let dir = tempfile::tempdir().unwrap();
    let records = input(&llava_fixture(dir.path()));
    let out = dir.path().join("records.jsonl");
    // Picture 0: echo the answer; 1: empty; 2: request fails; 3: unreadable reply; the rest: a real rewrite.
    let fake = Fake::new(|p| {
        if p.contains("Picture 0 shows") {
            Ok(" Picture 0 shows a red bus parked   next to a tree.".into())
        } else if p.contains("Picture 1 shows") {
            Ok(" </s>".into())
        } else if p.contains("Picture 2 shows") {
            Err(Error::Http("connection refused".into()))
        } else if p.contains("Picture 3 shows") {
            Err(Error::invalid("reply has no text"))
        } else {
            add_a_dog(p)
        }
    });
    let (mut w, _) = ResumableWriter::open(&out).unwrap();
    let c = run_inject(records.clone(), &fake, &opts(3), &mut w, &Silent).unwrap();
    assert_eq!((c.identical, c.empty, c.request_failed, c.unparseable, c.added), (1, 1, 1, 1, 5));
    assert_eq!((c.records.written, c.records.failed), (8, 1));
    let failed_id =
        records.iter().find(|r| r.completions[0].response.starts_with("Picture 2 shows")).unwrap().id.clone();
    assert!(!id_counts(&out).contains_key(&failed_id));
    // The next run retries exactly the failed record.
    let fixed = Fake::new(add_a_dog);
    let c = run_inject(records.clone(), &fixed, &opts(3), &mut w, &Silent).unwrap();
    assert_eq!((c.records.already_done, c.records.written, c.requests), (8, 1, 1));
    assert_each_once(&out, &records);
}

#[test]
fn torn_last_line_is_repaired_and_rerun_completes() {
    let dir = tempfile::tempdir().unwrap();
    let records = input(&llava_fixture(dir.path()));
    let out = dir.path().join("records.jsonl");
    let (mut w, _) = ResumableWriter::open(&out).unwrap();
    run_inject(records[..5].to_vec(), &Fake::new(add_a_dog), &opts(2), &mut w, &Silent).unwrap();
    drop(w);
    // Kill mid-write: cut the last line in half.
    let text = std::fs::read_to_string(&out).unwrap();
    let last_start = text[..text.len() - 1].rfind('\n').unwrap() + 1;
    let cut = last_start + (text.len() - last_start) / 2;
    std::fs::write(&out, &text[..cut]).unwrap();
    let (mut w, rep) = ResumableWriter::open(&out).unwrap();
    let torn = rep.torn.expect("torn line detected");
    assert_eq!((rep.lines, torn.line, torn.bytes), (4, 5, (cut - last_start) as u64));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), text[..last_start]);
    let c = run_inject(records.clone(), &Fake::new(add_a_dog), &opts(2), &mut w, &Silent).unwrap();
    assert_eq!((c.records.already_done, c.records.written), (4, 5));
    assert_each_once(&out, &records);
}

#[test]
fn crash_midway_then_rerun_finds_every_id_once() {
    let dir = tempfile::tempdir().unwrap();
    let records = input(&llava_fixture(dir.path()));
    let out = dir.path().join("records.jsonl");
    let crashing = Fake { fail_after: Some(5), ..Fake::new(add_a_dog) };
    let (mut w, _) = ResumableWriter::open(&out).unwrap();
    let err = run_inject(records.clone(), &crashing, &opts(2), &mut w, &Silent).unwrap_err();
    assert!(err.to_string().contains("simulated crash"));
    drop(w);
    let before = bpo::jsonl::read::<Record>(&out).unwrap();
    assert_eq!(before.len(), 4, "two full batches of two were written before the crash");
    let (mut w, rep) = ResumableWriter::open(&out).unwrap();
    assert_eq!((rep.lines, rep.torn), (4, None));
    let c = run_inject(records.clone(), &Fake::new(add_a_dog), &opts(2), &mut w, &Silent).unwrap();
    assert_eq!((c.records.already_done, c.records.written), (4, 5));
    assert_each_once(&out, &records);
    assert_eq!(bpo::jsonl::read::<Record>(&out).unwrap()[..4], before[..], "earlier lines untouched");
}

#[test]
fn shards_cover_every_id_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let records = input(&llava_fixture(dir.path()));
    let mut outs = Vec::new();
    let mut written = 0;
    for i in 1..=3 {
        let out = dir.path().join(format!("shard{i}.jsonl"));
        let shard: Shard = format!("{i}/3").parse().unwrap();
        let (mut w, _) = ResumableWriter::open(&out).unwrap();
        let c =
            run_inject(records.clone(), &Fake::new(add_a_dog), &InjectOptions { shard, ..opts(2) }, &mut w, &Silent)
                .unwrap();
        assert_eq!(c.records.other_shards + c.records.written, records.len());
        written += c.records.written;
        outs.push(out);
    }
    assert_eq!(written, records.len());
    let merged = read_record_shards(&outs).unwrap();
    let mut got: Vec<_> = merged.iter().map(|r| r.id.clone()).collect();
    let mut want: Vec<_> = records.iter().map(|r| r.id.clone()).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
}

#[test]
fn continue_and_qa_modes_build_their_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let records = input(&llava_fixture(dir.path()));
    let out = dir.path().join("cont.jsonl");
    let fake = Fake::new(|_| Ok(" and a yellow taxi.".into()));
    let (mut w, _) = ResumableWriter::open(&out).unwrap();
    let o = InjectOptions { mode: InjectMode::Continue, seed: 3, ..opts(4) };
    run_inject(records.clone(), &fake, &o, &mut w, &Silent).unwrap();
    let seen = fake.seen.lock().unwrap().clone();
    for (rec, (prompt, neg)) in records.iter().zip(seen.iter().zip(bpo::jsonl::read::<Record>(&out).unwrap())) {
        let gt = &rec.completions[0].response;
        assert!(gt.starts_with(prompt.as_str()) && prompt.len() < gt.len(), "raw prefix, no chat wrapper: {prompt:?}");
        assert_eq!(neg.completions[1].response, format!("{prompt} and a yellow taxi."));
    }
    let fake = Fake::new(|_| Ok(" There are two buses.".into()));
    let out = dir.path().join("qa.jsonl");
    let (mut w, _) = ResumableWriter::open(&out).unwrap();
    let o = InjectOptions { mode: InjectMode::Qa, vicuna: false, ..opts(4) };
    run_inject(records[1..2].to_vec(), &fake, &o, &mut w, &Silent).unwrap();
    let prompt = fake.seen.lock().unwrap()[0].clone();
    assert!(
        prompt
            .ends_with("Question: What color is the bus?\nResponse: The bus in picture 0 is red.\nModified response:"),
        "{prompt}"
    );
    assert!(!prompt.starts_with("A chat"));
}

fn records_fixture(dir: &Path) -> PathBuf {
    let rows = vec![
        json!({"id": "a#0", "prompt": "What is on the table?", "image": "coco/1.jpg", "completions": [
            {"response": "A cup.", "score": 1, "type": "gt"},
            {"response": "A cup and a fork.", "score": 0, "type": "llm-hal"},
            {"response": "A plate.", "score": 0, "type": "mllm-hal"}]}),
        json!({"id": "b#0", "prompt": "Name a fruit.", "completions": [
            {"response": "An apple.", "score": 1, "type": "gt"}, {"response": "A carrot.", "score": 0, "type": "llm-hal"}]}),
        json!({"id": "c#0", "prompt": "Long?", "image": "coco/3.jpg", "completions": [
            {"response": "word ".repeat(351), "score": 1, "type": "gt"}, {"response": "no", "score": 0, "type": "llm-hal"}]}),
    ];
    let path = dir.join("records.jsonl");
    bpo::jsonl::write(&path, &rows).unwrap();
    path
}

#[test]
fn pairs_round_trip_in_all_three_formats() {
    let dir = tempfile::tempdir().unwrap();
    let recs = records_fixture(dir.path());
    let (want, _) = expand(&bpo::jsonl::read::<Record>(&recs).unwrap(), &PairOptions::default());
    assert_eq!(want.len(), 3);
    let first_rows = [
        (
            "bpo",
            json!({"id": "a#0/0-1", "prompt": "What is on the table?", "image": "coco/1.jpg", "chosen": "A cup.",
            "rejected": "A cup and a fork.", "chosen_type": "gt", "rejected_type": "llm-hal"}),
        ),
        (
            "trl",
            json!({"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is on the table?"}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "A cup."}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "A cup and a fork."}]}],
            "images": ["coco/1.jpg"]}),
        ),
        (
            "llama-factory",
            json!({"conversations": [{"from": "human", "value": "<image>What is on the table?"}],
            "chosen": {"from": "gpt", "value": "A cup."}, "rejected": {"from": "gpt", "value": "A cup and a fork."},
            "images": ["coco/1.jpg"]}),
        ),
    ];
    for (name, first) in first_rows {
        let out = dir.path().join(format!("{name}.jsonl"));
        let stats = make_pair_file(
            std::slice::from_ref(&recs),
            &out,
            PairFormat::from_str(name, false).unwrap(),
            &PairOptions::default(),
        )
        .unwrap();
        assert_eq!((stats.pairs, stats.records_too_long, stats.ties_skipped), (3, 1, 1));
        let rows = bpo::jsonl::read::<Value>(&out).unwrap();
        assert_eq!(rows[0], first, "{name}");
        let back = read_pairs(&out).unwrap();
        assert_eq!(back.len(), want.len());
        for (b, w) in back.iter().zip(&want) {
            assert_eq!(
                (&b.prompt, &b.image, &b.chosen, &b.rejected),
                (&w.prompt, &w.image, &w.chosen, &w.rejected),
                "{name}"
            );
        }
        if name == "bpo" {
            assert_eq!(back, want, "bpo keeps ids and types");
        }
    }
    // Text-only pair: no image anywhere.
    let text_only = bpo::jsonl::read::<Value>(&dir.path().join("trl.jsonl")).unwrap()[2].clone();
    assert_eq!(text_only["images"], json!([]));
    assert_eq!(text_only["prompt"][0]["content"], json!([{"type": "text", "text": "Name a fruit."}]));
}

fn bpo_cmd(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_bpo")).args(args).output().unwrap()
}

#[test]
fn pairs_command_merges_shards_and_names_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let all = bpo::jsonl::read::<Value>(&records_fixture(dir.path())).unwrap();
    let (a, b) = (dir.path().join("s1.jsonl"), dir.path().join("s2.jsonl"));
    bpo::jsonl::write(&a, &all[..1]).unwrap();
    bpo::jsonl::write(&b, &all[1..]).unwrap();
    let out = dir.path().join("pairs.jsonl");
    let o = bpo_cmd(&[
        "pairs",
        "--records",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--format",
        "llama-factory",
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("records: 3 in, 2 kept") && stdout.contains("1 too long") && stdout.contains("pairs: 3 kept"),
        "{stdout}"
    );
    assert_eq!(read_pairs(&out).unwrap().len(), 3);
    // --max-words 0 lifts the limit.
    let o = bpo_cmd(&[
        "pairs",
        "--records",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--max-words",
        "0",
    ]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("pairs: 4 kept"));
    // The same record in two shards.
    bpo::jsonl::write(&b, &all[..2]).unwrap();
    let o = bpo_cmd(&["pairs", "--records", a.to_str().unwrap(), b.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(stderr.contains("s1.jsonl:1") && stderr.contains("s2.jsonl:1") && stderr.contains("a#0"), "{stderr}");
}
