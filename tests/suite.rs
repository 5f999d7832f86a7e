//! The tiny model answering judged benchmarks for a loopback mock judge (`judge.rs`'s helpers): `bpo eval suite`
//! (every configured benchmark gets its run folder, a re-run reuses answers and the judge's cache, another model
//! may not write into the folder, `bpo eval compare` puts suites side by side), and `llava-bench` / `mmhal`
//! with `--model`.

use std::path::Path;

use serde_json::json;

use crate::bootstrap_http::{Reply, Server};
use crate::util::{args, bpo_env, error_line, ok, read_json, s};
#[test]
fn a_suite_runs_every_configured_benchmark_and_compare_lines_suites_up() {
    let tmp = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let write = |name: &str, text: &str| std::fs::write(tmp.path().join(name), text).unwrap();
    write("pope_random.json", "{\"question_id\": 1, \"image\": \"chelsea.png\", \"text\": \"Is there a cat in the image?\", \"label\": \"yes\"}\n{\"question_id\": 2, \"image\": \"coffee.png\", \"text\": \"Is there a dog in the image?\", \"label\": \"no\"}\n");
    // The official split files each number their questions from 1.
    write("pope_adversarial.json", "{\"question_id\": 1, \"image\": \"coffee.png\", \"text\": \"Is there a cup in the image?\", \"label\": \"yes\"}\n");
    write("gt.jsonl", "{\"image_id\": \"alpha\", \"objects\": [\"person\"]}\n{\"image_id\": \"astronaut\", \"objects\": [\"person\"]}\n");
    let mmvet = json!({"v1_0": {"imagename": "rocket.jpg", "capability": ["rec"], "question": "What is this?", "answer": "a rocket"}});
    write("mm-vet.json", &mmvet.to_string());
    let server = Server::start(20, |_, _| Reply::Text("0.5".into()));
    let images = root.join("images");
    let config = format!(
        "batch_size = 2\n\n[judge]\nurl = \"{}\"\nmodel = \"judge-m\"\nretries = 1\nbackoff = 0.01\n\n[pope]\nquestions = [\"pope_random.json\", \"pope_adversarial.json\"]\nimages = \"{}\"\nmax_new_tokens = 2\n\n\
         [object_halbench]\nimages = \"{}\"\nground_truth = \"gt.jsonl\"\nlimit = 2\nmax_new_tokens = 6\n\n[mmvet]\nquestions = \"mm-vet.json\"\nimages = \"{}\"\nruns = 2\nmax_new_tokens = 4\n",
        server.url,
        s(&images),
        s(&images),
        s(&images)
    );
    write("suite.toml", &config);
    let model = root.join("llava-tiny");
    let suite = |out: &str| {
        args(&[
            "eval",
            "suite",
            "--model",
            s(&model),
            "--config",
            s(&tmp.path().join("suite.toml")),
            "--out",
            s(&tmp.path().join(out)),
        ])
    };
    let stdout = ok(&bpo_env(&suite("base"), &[]));
    let base = tmp.path().join("base");
    for (dir, kind) in [("pope", "pope"), ("object-halbench", "chair"), ("mmvet", "mmvet")] {
        assert_eq!(read_json(&base.join(dir).join("scores.json"))["kind"], kind, "{dir}");
        assert!(base.join(dir).join("answers.jsonl").is_file(), "{dir}");
    }
    assert_eq!(read_json(&base.join("suite.json"))["benchmarks"], json!(["pope", "object-halbench", "mmvet"]));
    assert_eq!(server.count(), 2, "one MM-Vet question graded twice");
    let table = stdout.lines().skip_while(|l| !l.starts_with("model")).collect::<Vec<_>>();
    assert!(table[0].contains("POPE random F1") && table[0].contains("POPE adversarial F1"), "{stdout}");
    assert!(table[0].contains("ObjHal CHAIR_i") && table[0].contains("MM-Vet"), "{stdout}");
    assert_eq!(read_json(&base.join("pope/scores.json"))["overall"]["n"], 3);
    assert!(table[1].starts_with("base") && table[1].contains("50.00"), "{stdout}");

    // Re-running reuses the answers and the judge's cache; another model may not write into this folder.
    let again = bpo_env(&suite("base"), &[]);
    ok(&again);
    assert_eq!(server.count(), 2);
    assert_eq!(String::from_utf8_lossy(&again.stderr).matches("reusing").count(), 3);
    let mut other = suite("base");
    other[3] = "/some/other/model".into();
    assert!(error_line(&bpo_env(&other, &[])).contains("holds a suite of"));

    // A second suite, then the paper's layout: one row per suite.
    ok(&bpo_env(&suite("bpo"), &[]));
    let compare = ok(&bpo_env(&args(&["eval", "compare", s(&base), s(&tmp.path().join("bpo"))]), &[]));
    let lines: Vec<&str> = compare.lines().collect();
    assert_eq!(lines.len(), 3, "{compare}");
    assert!(lines[1].starts_with("base") && lines[2].starts_with("bpo"), "{compare}");
    assert!(error_line(&bpo_env(
        &args(&["eval", "compare", s(&base.join("pope")), s(&base.join("mmvet")), s(&base)]),
        &[]
    ))
    .contains("suite"));
}

#[test]
fn a_model_answers_llava_bench_and_mmhal_before_the_judge() {
    let tmp = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let (model, images) = (root.join("llava-tiny"), root.join("images"));
    let server = Server::start(20, |_, req| {
        let system = req["messages"][0]["role"] == "system";
        Reply::Text(if system { "7 8\nfine".into() } else { "Rating: 4".into() })
    });
    let judge =
        args(&["--judge-url", &server.url, "--judge-model", "j", "--judge-retries", "1", "--judge-backoff", "0.01"]);
    let gen = args(&["--model", s(&model), "--images", s(&images), "--max-new-tokens", "3"]);

    // LLaVA-Bench: two questions on the fixture's photographs; captions keyed by those file names.
    let q = tmp.path().join("q.jsonl");
    std::fs::write(&q, "{\"question_id\": 0, \"image\": \"chelsea.png\", \"text\": \"Describe the cat.\", \"category\": \"detail\"}\n{\"question_id\": 1, \"image\": \"coffee.png\", \"text\": \"What is in the cup?\", \"category\": \"conv\"}\n").unwrap();
    let c = tmp.path().join("c.jsonl");
    std::fs::write(&c, "{\"image\": \"chelsea.png\", \"caption\": \"A cat.\"}\n{\"image\": \"coffee.png\", \"caption\": \"A cup of coffee.\"}\n").unwrap();
    let refs = tmp.path().join("r.jsonl");
    std::fs::write(
        &refs,
        "{\"question_id\": 0, \"text\": \"A tabby cat.\"}\n{\"question_id\": 1, \"text\": \"Coffee.\"}\n",
    )
    .unwrap();
    let out = tmp.path().join("llava");
    let mut a = args(&[
        "eval",
        "llava-bench",
        "--questions",
        s(&q),
        "--context",
        s(&c),
        "--references",
        s(&refs),
        "--out",
        s(&out),
    ]);
    a.extend(gen.clone());
    a.extend(judge.clone());
    ok(&bpo_env(&a, &[]));
    let answers = std::fs::read_to_string(out.join("answers.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(answers.lines().next().unwrap()).unwrap();
    let asked = server.requests.lock().unwrap()[..2].iter().any(|r| {
        let user = r["messages"][1]["content"].as_str().unwrap_or_default();
        user.contains(&format!("[Assistant 2]\n{}\n\n[End of Assistant 2]", first["text"].as_str().unwrap()))
    });
    assert!(asked, "the judge saw the generated answer");
    assert_eq!(read_json(&out.join("scores.json"))["categories"][0]["relative"], 114.3);

    // MMHal-Bench: the image is the file name at the end of image_src; responses.json is the official file.
    let t = tmp.path().join("template.json");
    let records = json!([{"question_type": "attribute", "image_src": "https://x/y/chelsea.png", "image_content": ["Cat"], "question": "What colour is the cat?", "gt_answer": "Brown."}]);
    std::fs::write(&t, records.to_string()).unwrap();
    let out = tmp.path().join("mmhal");
    let mut a = args(&["eval", "mmhal", "--questions", s(&t), "--out", s(&out)]);
    a.extend(gen);
    a.extend(judge);
    ok(&bpo_env(&a, &[]));
    let responses = read_json(&out.join("responses.json"));
    assert_eq!(responses[0]["image_src"], "https://x/y/chelsea.png");
    assert!(responses[0]["model_answer"].is_string());
    assert_eq!(read_json(&out.join("scores.json"))["average_score"], 4.0);
    assert_eq!(server.count(), 3);
}
