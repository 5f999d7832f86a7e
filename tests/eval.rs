//! `bpo eval ...` end to end: POPE and CHAIR runs on small hand-written files, run comparison, and bad
//! inputs that must fail with one clear line naming the file and line.

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::util::{bpo, error_line, s, stderr};

/// A finished run's status and output as text.
struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn run_bpo(args: &[&str]) -> Run {
    let out: Output = bpo(args);
    Run { ok: out.status.success(), stdout: String::from_utf8_lossy(&out.stdout).into_owned(), stderr: stderr(&out) }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs bpo expecting failure; returns the single stderr line.
fn fails(args: &[&str]) -> String {
    error_line(&bpo(args))
}

fn scores(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("scores.json")).unwrap()).unwrap()
}

const POPE_QUESTIONS: &str = r#"{"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?", "label": "yes"}
{"question_id": 2, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a dog in the image?", "label": "no"}
{"question_id": 3, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a person in the image?", "label": "yes"}
{"question_id": 4, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a car in the image?", "label": "no"}
"#;

// Out of order, string ids, one unanswered question (4) and one answer without a question (9).
const POPE_ANSWERS: &str = r#"{"question_id": "3", "prompt": "", "text": "Yes, there is a person.", "answer_id": "a", "model_id": "m", "metadata": {}}
{"question_id": "1", "prompt": "", "text": "Yes", "answer_id": "b", "model_id": "m", "metadata": {}}
{"question_id": "2", "prompt": "", "text": "There is no dog.", "answer_id": "c", "model_id": "m", "metadata": {}}
{"question_id": "9", "prompt": "", "text": "No", "answer_id": "d", "model_id": "m", "metadata": {}}
"#;

#[test]
fn pope_joins_by_id_and_writes_a_run_folder() {
    let dir = tempfile::tempdir().unwrap();
    let q = write(dir.path(), "coco_pope_adversarial.json", POPE_QUESTIONS);
    let a = write(dir.path(), "answers.jsonl", POPE_ANSWERS);
    let out = dir.path().join("run");
    let run = run_bpo(&["eval", "pope", "--answers", s(&a), "--questions", s(&q), "--out", s(&out)]);
    assert!(run.ok, "{}", run.stderr);
    assert!(run.stdout.contains("adversarial"), "{}", run.stdout);
    assert!(run.stdout.contains("unanswered questions: 1 (ids: 4)"), "{}", run.stdout);
    assert!(run.stderr.contains("warning: 1 question(s) have no answer"), "{}", run.stderr);
    let v = scores(&out);
    assert_eq!(v["kind"], "pope");
    assert_eq!(v["splits"][0]["split"], "adversarial");
    assert_eq!(v["overall"]["accuracy"], 1.0);
    assert_eq!(v["overall"]["n"], 3);
    assert_eq!(v["orphan_answers"]["ids"][0], "9");
    let details = std::fs::read_to_string(out.join("details.jsonl")).unwrap();
    assert_eq!(details.lines().count(), 3);
}

#[test]
fn pope_positional_pairs_by_order_and_compare_shows_the_difference() {
    let dir = tempfile::tempdir().unwrap();
    let q = write(dir.path(), "coco_pope_random.json", POPE_QUESTIONS);
    let a = write(dir.path(), "answers.jsonl", POPE_ANSWERS);
    let (by_id, pos) = (dir.path().join("by_id"), dir.path().join("pos"));
    assert!(run_bpo(&["eval", "pope", "--answers", s(&a), "--questions", s(&q), "--out", s(&by_id)]).ok);
    let run = run_bpo(&["eval", "pope", "--answers", s(&a), "--questions", s(&q), "--positional", "--out", s(&pos)]);
    assert!(run.ok, "{}", run.stderr);
    // Positional: q1<-"Yes, there is a person." (yes, tp), q2<-"Yes" (fp), q3<-"There is no dog." (fn),
    // q4<-"No" (tn): accuracy 2/4.
    assert_eq!(scores(&pos)["overall"]["accuracy"], 0.5);
    assert_eq!(scores(&pos)["id_mismatches"], 4);
    let cmp = run_bpo(&["eval", "compare", s(&by_id), s(&pos)]);
    assert!(cmp.ok, "{}", cmp.stderr);
    let line = cmp.stdout.lines().find(|l| l.starts_with("random/accuracy")).unwrap();
    assert!(line.contains("100.00") && line.contains("50.00") && line.contains("-50.00"), "{line}");
}

#[test]
fn pope_bad_files_name_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let q = write(dir.path(), "q.jsonl", POPE_QUESTIONS);
    let a = write(dir.path(), "a.jsonl", "{\"question_id\": 1, \"text\": \"Yes\"}\n{\"text\": \"No\"}\n");
    let err = fails(&["eval", "pope", "--answers", s(&a), "--questions", s(&q)]);
    assert!(err.contains("a.jsonl:2:") && err.contains("missing field `question_id`"), "{err}");

    let a =
        write(dir.path(), "a.jsonl", "{\"question_id\": 1, \"text\": \"Yes\"}\n\n{\"question_id\": 2, \"text\": \n");
    let err = fails(&["eval", "pope", "--answers", s(&a), "--questions", s(&q)]);
    assert!(err.contains("a.jsonl:3:"), "{err}");

    let dup =
        write(dir.path(), "dup.jsonl", &format!("{POPE_QUESTIONS}{{\"question_id\": \"2\", \"label\": \"no\"}}\n"));
    let a = write(dir.path(), "a.jsonl", POPE_ANSWERS);
    let err = fails(&["eval", "pope", "--answers", s(&a), "--questions", s(&dup)]);
    assert!(
        err.contains("dup.jsonl:5: duplicate question_id \"2\" (first seen at") && err.contains("dup.jsonl:2)"),
        "{err}"
    );

    let a = write(
        dir.path(),
        "a.jsonl",
        "{\"question_id\": 1, \"text\": \"Yes\"}\n{\"question_id\": 1, \"text\": \"No\"}\n",
    );
    let err = fails(&["eval", "pope", "--answers", s(&a), "--questions", s(&q)]);
    assert!(err.contains("a.jsonl:2: duplicate answer for question_id \"1\""), "{err}");

    let bad = write(dir.path(), "bad.jsonl", "{\"question_id\": 1, \"label\": \"maybe\"}\n");
    let err = fails(&["eval", "pope", "--answers", s(&a), "--questions", s(&bad)]);
    assert!(err.contains("bad.jsonl:1:") && err.contains("maybe"), "{err}");

    let err = fails(&["eval", "pope", "--answers", s(&dir.path().join("none.jsonl")), "--questions", s(&q)]);
    assert!(err.contains("none.jsonl"), "{err}");
}

const CHAIR_ANSWERS: &str = r#"{"question_id": "q1", "prompt": "Describe.", "text": "A man and his dogs sit on a sofa next to a cat.", "answer_id": "a", "model_id": "m", "metadata": {}}
{"question_id": "q2", "prompt": "Describe.", "text": "A white toilet seat next to the sink.", "answer_id": "b", "model_id": "m", "metadata": {}}
"#;

const CHAIR_QUESTIONS: &str = r#"{"question_id": "q1", "image": "COCO_val2014_000000000042.jpg", "text": "Describe."}
{"question_id": "q2", "image": "COCO_val2014_000000000073.jpg", "text": "Describe."}
"#;

#[test]
fn chair_with_ground_truth_file_and_questions() {
    let dir = tempfile::tempdir().unwrap();
    let a = write(dir.path(), "answers.jsonl", CHAIR_ANSWERS);
    let q = write(dir.path(), "questions.jsonl", CHAIR_QUESTIONS);
    let gt = write(dir.path(), "gt.jsonl", "{\"image_id\": 42, \"objects\": [\"person\", \"dogs\", \"couch\"]}\n{\"image_id\": \"73\", \"objects\": [\"toilet\", \"sink\"]}\n");
    let out = dir.path().join("run");
    let run = run_bpo(&[
        "eval",
        "chair",
        "--answers",
        s(&a),
        "--questions",
        s(&q),
        "--ground-truth",
        s(&gt),
        "--out",
        s(&out),
    ]);
    assert!(run.ok, "{}", run.stderr);
    assert!(run.stdout.contains("CHAIR_s (%)"), "{}", run.stdout);
    let v = scores(&out);
    assert_eq!(v["kind"], "chair");
    // q1: man, dog, sofa, cat (cat hallucinated); q2: toilet, sink.
    assert_eq!((v["mentions"].as_u64(), v["hallucinated_mentions"].as_u64()), (Some(6), Some(1)));
    assert_eq!(v["chair_s"], 0.5);
    let details = std::fs::read_to_string(out.join("details.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(details.lines().next().unwrap()).unwrap();
    assert_eq!(first["hallucinated"][0]["word"], "cat");
    assert_eq!(first["image_id"], "42");
}

#[test]
fn chair_reads_coco_annotations() {
    let dir = tempfile::tempdir().unwrap();
    let coco = dir.path().join("coco");
    std::fs::create_dir(&coco).unwrap();
    write(
        &coco,
        "instances_val2014.json",
        r#"{"images": [{"id": 42}, {"id": 73}, {"id": 5}],
        "annotations": [{"image_id": 42, "category_id": 1, "segmentation": [[1, 2]], "bbox": [0, 0, 1, 1]},
                        {"image_id": 42, "category_id": 18}, {"image_id": 73, "category_id": 70}],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 70, "name": "toilet"}]}"#,
    );
    // The sofa and the sink come from reference captions; image 5's caption is not asked for.
    write(
        &coco,
        "captions_val2014.json",
        r#"{"images": [{"id": 42}, {"id": 73}],
        "annotations": [{"image_id": 42, "id": 1, "caption": "A man and a dog on a couch."},
                        {"image_id": 73, "id": 2, "caption": "A bathroom sink."},
                        {"image_id": 5, "id": 3, "caption": "A cat."}]}"#,
    );
    let a = write(dir.path(), "answers.jsonl", CHAIR_ANSWERS);
    let q = write(dir.path(), "questions.jsonl", CHAIR_QUESTIONS);
    let out = dir.path().join("run");
    let run =
        run_bpo(&["eval", "chair", "--answers", s(&a), "--questions", s(&q), "--coco", s(&coco), "--out", s(&out)]);
    assert!(run.ok, "{}", run.stderr);
    let v = scores(&out);
    assert_eq!((v["mentions"].as_u64(), v["hallucinated_mentions"].as_u64()), (Some(6), Some(1)));
    assert_eq!(v["object_recall"], 1.0);
}

#[test]
fn chair_bad_files_name_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let gt = write(dir.path(), "gt.jsonl", "{\"image_id\": 42, \"objects\": [\"dog\"]}\n");
    let a = write(dir.path(), "a.jsonl", "{\"question_id\": 1, \"text\": \"a dog\", \"image_id\": 42}\n{\"question_id\": 2, \"text\": \"a cat\", \"image\": \"x/COCO_val2014_000000000099.jpg\"}\n");
    let err = fails(&["eval", "chair", "--answers", s(&a), "--ground-truth", s(&gt)]);
    assert!(
        err.contains("a.jsonl:2: image \"99\" has no ground truth in ground truth") && err.contains("gt.jsonl"),
        "{err}"
    );

    let bad_gt = write(
        dir.path(),
        "bad_gt.jsonl",
        "{\"image_id\": 42, \"objects\": [\"dog\"]}\n{\"image_id\": 42, \"objects\": [\"cat\"]}\n",
    );
    let err = fails(&["eval", "chair", "--answers", s(&a), "--ground-truth", s(&bad_gt)]);
    assert!(err.contains("bad_gt.jsonl:2: duplicate image_id \"42\""), "{err}");

    let q = write(dir.path(), "q.jsonl", "{\"question_id\": 1, \"image\": \"a.jpg\"}\n");
    let a = write(
        dir.path(),
        "a.jsonl",
        "{\"question_id\": 1, \"text\": \"a dog\"}\n{\"question_id\": 7, \"text\": \"a dog\"}\n",
    );
    let err = fails(&["eval", "chair", "--answers", s(&a), "--questions", s(&q), "--ground-truth", s(&gt)]);
    assert!(err.contains("a.jsonl:2: question_id \"7\" is not in the questions file"), "{err}");

    let empty_dir = tempfile::tempdir().unwrap();
    let err = fails(&["eval", "chair", "--answers", s(&a), "--coco", s(empty_dir.path())]);
    assert!(err.contains("no instances_*.json"), "{err}");
}

#[test]
fn chair_synonyms_option_replaces_the_list() {
    let dir = tempfile::tempdir().unwrap();
    let syn = write(dir.path(), "shapes.txt", "circle, ring\nsquare, box\n");
    let gt = write(dir.path(), "gt.jsonl", "{\"image_id\": 1, \"objects\": [\"rings\"]}\n");
    let a = write(dir.path(), "a.jsonl", "{\"question_id\": 1, \"text\": \"Two circles and a box near a dog.\"}\n");
    let out = dir.path().join("run");
    let run = run_bpo(&[
        "eval",
        "chair",
        "--answers",
        s(&a),
        "--ground-truth",
        s(&gt),
        "--synonyms",
        s(&syn),
        "--out",
        s(&out),
    ]);
    assert!(run.ok, "{}", run.stderr);
    let v = scores(&out);
    assert_eq!((v["mentions"].as_u64(), v["hallucinated_mentions"].as_u64()), (Some(2), Some(1)));
}
