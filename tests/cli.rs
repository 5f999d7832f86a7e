//! The `bpo` binary on the tiny fixture model: happy paths of `generate` and `score`, and one clear line plus a
//! non-zero exit for every kind of bad input.

use crate::util::{bpo, fails_with, fixture, model_copy, on_tiny, s, stderr};

#[test]
fn generate_answers_one_prompt_with_an_image() {
    let model = fixture("llava-tiny");
    let image = fixture("images/chelsea.png");
    let o = bpo(&[
        "generate",
        "--model",
        s(&model),
        "--image",
        s(&image),
        "--prompt",
        "What is in the image?",
        "--max-new-tokens",
        "8",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!String::from_utf8_lossy(&o.stdout).trim().is_empty());
}

#[test]
fn generate_writes_an_answer_per_question() {
    let tmp = tempfile::tempdir().unwrap();
    let q = tmp.path().join("q.jsonl");
    std::fs::write(&q, "{\"question_id\": 1, \"image\": \"chelsea.png\", \"text\": \"Is there a cat?\"}\n{\"question_id\": \"b\", \"text\": \"Say hi.\"}\n{\"question_id\": 3, \"image\": \"coffee.png\", \"text\": \"Is there a cup?\"}\n").unwrap();
    let a = tmp.path().join("a.jsonl");
    let o = bpo(&on_tiny("generate --max-new-tokens 4 --batch-size 2", &[("--questions", &q), ("--answers", &a)]));
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: Vec<serde_json::Value> =
        std::fs::read_to_string(&a).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["question_id"], 1);
    assert_eq!(rows[1]["question_id"], "b");
    for key in ["prompt", "text", "answer_id", "model_id", "metadata"] {
        assert!(rows[2].get(key).is_some(), "answer rows carry {key}");
    }
}

#[test]
fn score_matches_transformers_log_probs() {
    let tmp = tempfile::tempdir().unwrap();
    // score-cases.jsonl names images "img0"/"img1": the fixture's reference pixel tensors, not files. Write the
    // text-only case, whose value needs no image, and check it within 1e-3.
    let cases: Vec<serde_json::Value> = std::fs::read_to_string(fixture("score-cases.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let text_only: Vec<&serde_json::Value> = cases.iter().filter(|c| c["image"].is_null()).collect();
    assert!(!text_only.is_empty());
    let data = tmp.path().join("d.jsonl");
    let body: String = text_only
        .iter()
        .map(|c| format!("{}\n", serde_json::json!({"prompt": c["prompt"], "response": c["response"]})))
        .collect();
    std::fs::write(&data, body).unwrap();
    let out = tmp.path().join("o.jsonl");
    let o = bpo(&[
        "score",
        "--model",
        s(&fixture("llava-tiny")),
        "--template",
        "llava-hf",
        "--data",
        s(&data),
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got: Vec<serde_json::Value> =
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for (g, want) in got.iter().zip(&text_only) {
        let (lp, w) = (g["logprob"].as_f64().unwrap(), want["logprob"].as_f64().unwrap());
        assert!((lp - w).abs() < 1e-3, "logprob {lp} vs transformers {w}");
        assert_eq!(g["tokens"], want["tokens"]);
    }
}

#[test]
fn missing_model_folder_is_one_line() {
    fails_with(&["generate", "--model", "/no/such/model", "--prompt", "hi"], &["/no/such/model"]);
}

#[test]
fn unknown_architecture_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model_copy("llama-tiny", tmp.path());
    let cfg = std::fs::read_to_string(m.join("config.json"))
        .unwrap()
        .replace("LlamaForCausalLM", "GPT2LMHeadModel")
        .replace("\"llama\"", "\"gpt2\"");
    std::fs::write(m.join("config.json"), cfg).unwrap();
    fails_with(&["generate", "--model", s(&m), "--prompt", "hi"], &["GPT2LMHeadModel", "config.json"]);
}

#[test]
fn wrong_tensor_shape_names_tensor_and_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model_copy("llama-tiny", tmp.path());
    let cfg = std::fs::read_to_string(m.join("config.json"))
        .unwrap()
        .replace("\"intermediate_size\": 160", "\"intermediate_size\": 200");
    std::fs::write(m.join("config.json"), cfg).unwrap();
    fails_with(&["generate", "--model", s(&m), "--prompt", "hi"], &["mlp", "200", "160"]);
}

#[test]
fn missing_and_corrupt_images_name_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("bad.jpg"), b"not a jpeg").unwrap();
    std::fs::copy(fixture("images/chelsea.png"), tmp.path().join("ok.png")).unwrap();
    let a = tmp.path().join("a.jsonl");
    for (name, needle) in [("gone.png", "gone.png"), ("bad.jpg", "bad.jpg")] {
        let q = tmp.path().join("q.jsonl");
        std::fs::write(&q, format!("{{\"question_id\": 1, \"image\": \"ok.png\", \"text\": \"a\"}}\n{{\"question_id\": 2, \"image\": \"{name}\", \"text\": \"b\"}}\n")).unwrap();
        fails_with(
            &[
                "generate",
                "--model",
                s(&fixture("llava-tiny")),
                "--questions",
                s(&q),
                "--images",
                s(tmp.path()),
                "--answers",
                s(&a),
                "--max-new-tokens",
                "2",
            ],
            &[needle, "q.jsonl:2"],
        );
    }
}

#[test]
fn malformed_jsonl_names_the_line() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("d.jsonl");
    std::fs::write(&d, "{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": oops}\n").unwrap();
    fails_with(
        &["score", "--model", s(&fixture("llava-tiny")), "--data", s(&d), "--out", s(&tmp.path().join("o.jsonl"))],
        &["d.jsonl:2"],
    );
}

#[test]
fn prompt_longer_than_the_context_is_refused() {
    let long = "red ".repeat(400);
    fails_with(&["generate", "--model", s(&fixture("llava-tiny")), "--prompt", &long], &["context"]);
}

#[test]
fn eval_pope_with_a_model_answers_then_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let q = tmp.path().join("coco_pope_adversarial.json");
    std::fs::write(&q, "{\"question_id\": 1, \"image\": \"chelsea.png\", \"text\": \"Is there a cat in the image?\", \"label\": \"yes\"}\n{\"question_id\": 2, \"image\": \"coffee.png\", \"text\": \"Is there a dog in the image?\", \"label\": \"no\"}\n").unwrap();
    let out = tmp.path().join("run");
    let o = bpo(&on_tiny("eval pope --max-new-tokens 3", &[("--questions", &q), ("--out", &out)]));
    assert!(o.status.success(), "{}", stderr(&o));
    let answers = std::fs::read_to_string(out.join("answers.jsonl")).unwrap();
    assert_eq!(answers.lines().count(), 2);
    assert!(answers.contains("Is there a dog in the image?"), "prompts are recorded without the suffix");
    let scores: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("scores.json")).unwrap()).unwrap();
    assert!(scores.to_string().contains("adversarial"), "split from the file name: {scores}");
}

#[test]
fn eval_caption_describes_a_folder_and_scores_chair() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("img");
    std::fs::create_dir_all(&images).unwrap();
    for f in ["chelsea.png", "coffee.png"] {
        std::fs::copy(fixture("images").join(f), images.join(f)).unwrap();
    }
    let gt = tmp.path().join("gt.jsonl");
    std::fs::write(
        &gt,
        "{\"image_id\": \"chelsea\", \"objects\": [\"cat\"]}\n{\"image_id\": \"coffee\", \"objects\": [\"cup\"]}\n",
    )
    .unwrap();
    let out = tmp.path().join("run");
    let o = bpo(&[
        "eval",
        "caption",
        "--model",
        s(&fixture("llava-tiny")),
        "--images",
        s(&images),
        "--ground-truth",
        s(&gt),
        "--out",
        s(&out),
        "--max-new-tokens",
        "6",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let answers: Vec<serde_json::Value> = std::fs::read_to_string(out.join("answers.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(answers.len(), 2);
    // The eight Object HalBench instructions rotate: two images get the first two.
    let prompts = bpo::eval::object_halbench_prompts();
    assert_eq!(answers[0]["prompt"], prompts[0]);
    assert_eq!(answers[1]["prompt"], prompts[1]);
    assert!(out.join("scores.json").exists() && out.join("details.jsonl").exists());
}

/// `bpo bench parity` is what a GPU session runs instead of `cargo test`: it must pass on the CPU, where its
/// generic-path checks are the integration tests' own.
#[test]
fn bench_parity_passes_on_the_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("parity.json");
    let o = bpo(&["bench", "parity", "--device", "cpu", "--fixtures", s(&fixture("")), "--json", s(&json)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["failed"], 0);
    assert_eq!(v["checks"].as_array().unwrap().len(), 10);
}

// A CUDA build has the device; only a CPU build must refuse it.
#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_device_on_a_cpu_build_is_one_clear_line() {
    fails_with(
        &["generate", "--model", s(&fixture("llava-tiny")), "--prompt", "hi", "--device", "cuda"],
        &["built without CUDA", "scripts/build-cuda.sh"],
    );
}

#[test]
fn an_unknown_device_is_one_clear_line() {
    fails_with(
        &["generate", "--model", s(&fixture("llava-tiny")), "--prompt", "hi", "--device", "tpu:0"],
        &["use cpu, cuda or cuda:N"],
    );
}

/// `--template model` renders the folder's own chat template; with the llava-hf one it scores exactly as the
/// built-in `llava-hf` does, and it is what `--prompt-style trl` uses unless --template says otherwise (as in TRL).
#[test]
fn the_model_folders_chat_template_is_rendered() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_copy("llava-tiny", tmp.path());
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("chat/cases.json")).unwrap()).unwrap();
    let chat = serde_json::json!({"chat_template": cases["templates"]["parts"]});
    std::fs::write(model.join("chat_template.json"), chat.to_string()).unwrap();
    let data = tmp.path().join("d.jsonl");
    let rows = [
        serde_json::json!({"prompt": "What is in the picture?", "image": "coffee.png", "response": "A red square."}),
        serde_json::json!({"prompt": "Describe a quiet park.", "response": "A green tree stands next to a bench."}),
    ];
    std::fs::write(&data, rows.iter().map(|r| format!("{r}\n")).collect::<String>()).unwrap();
    let images = fixture("images");
    let score = |extra: &[&str]| -> Vec<serde_json::Value> {
        let out = tmp.path().join(format!("o{}.jsonl", extra.join("_")));
        let mut args =
            vec!["score", "--model", s(&model), "--data", s(&data), "--images", s(&images), "--out", s(&out)];
        args.extend_from_slice(extra);
        let o = bpo(&args);
        assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let builtin = score(&["--template", "llava-hf"]);
    assert_eq!(score(&["--template", "model"]), builtin);
    assert_ne!(score(&["--template", "vicuna-v1"]), builtin, "the template changes the scores");
    assert_eq!(score(&["--prompt-style", "trl"]), score(&["--prompt-style", "trl", "--template", "llava-hf"]));
    // A folder without a template: one line naming the files looked for.
    let (plain, out) = (fixture("llava-tiny"), tmp.path().join("x.jsonl"));
    fails_with(
        &[
            "score",
            "--model",
            s(&plain),
            "--template",
            "model",
            "--data",
            s(&data),
            "--images",
            s(&images),
            "--out",
            s(&out),
        ],
        &["chat_template.jinja", "--template"],
    );
}
