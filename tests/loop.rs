//! `bpo loop` on the tiny model: two rounds of weaken → inject → pairs → train → merge → eval end to end (round 2
//! starts from round 1's merged model), a run killed with SIGKILL at a point drawn from a seeded generator and
//! started again ends with the same files as the uninterrupted run, and bad configs fail with one line.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::json;

use crate::util::{bpo, fails_with, fixture, ok, read_json, s, stderr};

const STAGES: [&str; 6] = ["weaken", "inject", "pairs", "train", "merge", "eval"];
const IMAGES: [&str; 4] = ["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg"];

/// The data (LLaVA instruct JSON), the POPE questions and the Object HalBench ground truth of a loop, and its
/// config with `extra` appended; returns the config's path.
fn setup(dir: &Path, extra: &str) -> PathBuf {
    let rows: Vec<_> = (0..8)
        .map(|i| {
            json!({"id": format!("img{i}"), "image": IMAGES[i % IMAGES.len()], "conversations": [
                {"from": "human", "value": format!("<image>\nWhat is in picture {i}?")},
                {"from": "gpt", "value": format!("Picture {i} shows a red bus parked next to a green tree.")}]})
        })
        .collect();
    std::fs::write(dir.join("data.json"), serde_json::to_string(&rows).unwrap()).unwrap();
    let pope = "{\"question_id\": 1, \"image\": \"chelsea.png\", \"text\": \"Is there a cat in the image?\", \"label\": \"yes\"}\n\
                {\"question_id\": 2, \"image\": \"coffee.png\", \"text\": \"Is there a dog in the image?\", \"label\": \"no\"}\n";
    std::fs::write(dir.join("pope_random.json"), pope).unwrap();
    let gt = "{\"image_id\": \"alpha\", \"objects\": [\"person\"]}\n{\"image_id\": \"astronaut\", \"objects\": [\"person\"]}\n";
    std::fs::write(dir.join("gt.jsonl"), gt).unwrap();
    let (model, images) = (fixture("llava-tiny"), fixture("images"));
    let config = format!(
        "rounds = 2\nmodel = \"{}\"\ndata = \"data.json\"\nimages = \"{}\"\n\n\
         [weaken]\nmax_new_tokens = 6\ntemperature = 1.0\nseed = 3\nbatch_size = 3\n\n\
         [inject]\nmode = \"continue\"\nmax_tokens = 8\nseed = 1\nbatch = 3\n\n\
         [train]\nlora_rank = 4\nlora_alpha = 8\nbatch_size = 4\nlr = 1e-3\nepochs = 1\nsave_steps = 1\n\n\
         [eval]\nbatch_size = 4\n\n[eval.pope]\nquestions = [\"pope_random.json\"]\nimages = \"{}\"\nmax_new_tokens = 2\n\n\
         [eval.object_halbench]\nimages = \"{}\"\nground_truth = \"gt.jsonl\"\nlimit = 2\nmax_new_tokens = 6\n{extra}",
        s(&model),
        s(&images),
        s(&images),
        s(&images)
    );
    let path = dir.join("loop.toml");
    std::fs::write(&path, config).unwrap();
    path
}

/// The stage start lines a loop prints (`round R/N: STAGE`).
fn starts(err: &str) -> Vec<String> {
    let start = |l: &str| {
        let rest = l.strip_prefix("round ").and_then(|r| r.split_once(": "));
        rest.is_some_and(|(n, stage)| n.contains('/') && STAGES.contains(&stage))
    };
    err.lines().filter(|l| start(l)).map(String::from).collect()
}

/// The files a finished loop must have equal, byte for byte, in any two runs of the same config: pairs, the
/// adapters and merged weights, the answers and scores of every evaluation, the table; records files as sets of
/// lines (records are written in the order they finish).
fn outputs(out: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = vec!["rounds.txt".to_string()];
    for r in 0..=2 {
        for bench in ["pope", "object-halbench"] {
            for f in ["answers.jsonl", "scores.json", "details.jsonl"] {
                files.push(format!("round-{r}/eval/{bench}/{f}"));
            }
        }
        if r > 0 {
            for f in ["pairs.jsonl", "train/adapter_model.safetensors", "train/projector.safetensors"] {
                files.push(format!("round-{r}/{f}"));
            }
            files.push(format!("round-{r}/model/model.safetensors"));
        }
    }
    let mut got: Vec<(String, Vec<u8>)> = files
        .into_iter()
        .map(|f| (f.clone(), std::fs::read(out.join(&f)).unwrap_or_else(|e| panic!("{f}: {e}"))))
        .collect();
    for r in 1..=2 {
        for f in ["weaken.jsonl", "records.jsonl"] {
            let text = std::fs::read_to_string(out.join(format!("round-{r}/{f}"))).unwrap();
            let mut lines: Vec<&str> = text.lines().collect();
            lines.sort_unstable();
            got.push((format!("round-{r}/{f} (sorted)"), lines.join("\n").into_bytes()));
        }
    }
    got
}

/// splitmix64: the test's seeded draws.
fn draw(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[test]
fn two_rounds_end_to_end_and_a_killed_run_ends_with_the_same_files() {
    let tmp = tempfile::tempdir().unwrap();
    let config = setup(tmp.path(), "");
    let whole = tmp.path().join("whole");
    let o = bpo(&["loop", "--config", s(&config), "--out", s(&whole)]);
    let stdout = ok(&o);
    let all = starts(&stderr(&o));
    let want: Vec<String> = std::iter::once("round 0/2: eval".to_string())
        .chain((1..=2).flat_map(|r| STAGES.map(|st| format!("round {r}/2: {st}"))))
        .collect();
    assert_eq!(all, want, "every stage of every round, in order");

    // One table across rounds (round 0: the starting model), as `bpo eval compare` prints suites.
    let table = std::fs::read_to_string(whole.join("rounds.txt")).unwrap();
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 4, "{table}");
    assert!(rows[0].starts_with("model") && rows[0].contains("POPE random F1") && rows[0].contains("ObjHal CHAIR_s"));
    for (r, row) in rows[1..].iter().enumerate() {
        assert!(row.starts_with(&format!("round {r} ")), "{table}");
    }
    assert!(stdout.contains(&table), "{stdout}");
    // Round 2 bootstraps from, trains on and is measured against round 1's merged model.
    let round = |r: usize| whole.join(format!("round-{r}"));
    assert_eq!(read_json(&round(2).join("train/train_config.json"))["model"], json!(s(&round(1).join("model"))));
    assert_eq!(read_json(&round(1).join("train/train_config.json"))["model"], json!(s(&fixture("llava-tiny"))));
    assert_eq!(read_json(&round(2).join("eval/suite.json"))["model"], json!(s(&round(2).join("model"))));
    assert_eq!(read_json(&round(2).join("done.json"))["stages"], json!(STAGES));
    let weights = |dir: &Path| std::fs::read(dir.join("model.safetensors")).unwrap();
    assert_ne!(weights(&round(1).join("model")), weights(&fixture("llava-tiny")), "round 1 trained");
    assert_ne!(weights(&round(2).join("model")), weights(&round(1).join("model")), "round 2 trained further");
    let records = bpo::jsonl::read::<bpo::data::Record>(&round(1).join("records.jsonl")).unwrap();
    assert_eq!(records.len(), 8);
    let kinds = |r: &bpo::data::Record| r.completions.iter().map(|c| c.kind.as_str().to_string()).collect::<Vec<_>>();
    assert!(records.iter().all(|r| kinds(r).contains(&"mllm-hal".to_string())), "weaken negatives");
    assert!(records.iter().any(|r| kinds(r).contains(&"llm-hal".to_string())), "inject negatives");

    // Finished: running it again does nothing and prints the same table.
    let again = bpo(&["loop", "--config", s(&config), "--out", s(&whole)]);
    assert!(ok(&again).contains(&table));
    assert!(starts(&stderr(&again)).is_empty(), "{}", stderr(&again));

    // Killed (SIGKILL) in every stage, after its start line and a delay drawn from a seeded generator, then started
    // again: the stages recorded done are skipped, at most the interrupted one is done again, and the files end as
    // those of the uninterrupted run. (The whole loop takes about a second here, so the delays are short.)
    let reference = outputs(&whole);
    let mut state = 29;
    let mut killed = 0;
    for k in 1..=want.len() {
        let delay = std::time::Duration::from_millis(draw(&mut state) % 30);
        let at = format!("`{}` + {delay:?}", want[k - 1]);
        let parts = tmp.path().join(format!("parts-{k}"));
        let (running, last) = kill_after(&config, &parts, k, delay);
        killed += usize::from(running);
        let o = bpo(&["loop", "--config", s(&config), "--out", s(&parts)]);
        ok(&o);
        let resumed = starts(&stderr(&o));
        let first = want.iter().position(|l| Some(l) == resumed.first()).unwrap_or(want.len());
        eprintln!("killed in {at} (running: {running}) during stage {last}; the restart began at stage {}", first + 1);
        if running {
            // At most the stage that was running when the kill came is done again.
            assert!(first + 1 == last || first == last, "killed in {at} during stage {last}: restart at {first}");
        }
        assert_eq!(resumed, want[first..], "killed in {at}: every later stage ran once");
        for ((name, x), (_, y)) in reference.iter().zip(&outputs(&parts)) {
            assert!(x == y, "{name} differs after a kill in {at}");
        }
    }
    assert!(killed >= want.len() / 2, "only {killed} of {} kills found the loop still running", want.len());
}

/// Starts `bpo loop`, waits for its `k`-th stage start line and `delay`, and kills it with SIGKILL. Returns whether
/// it was still running, and how many stages it had started.
fn kill_after(config: &Path, out: &Path, k: usize, delay: std::time::Duration) -> (bool, usize) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bpo"))
        .args(["loop", "--config", s(config), "--out", s(out)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = 0;
    while seen < k {
        let line = lines.next().expect("the loop prints every stage").unwrap();
        seen += starts(&line).len();
    }
    std::thread::sleep(delay);
    let running = child.try_wait().unwrap().is_none();
    child.kill().unwrap();
    child.wait().unwrap();
    (running, seen + lines.map(|l| starts(&l.unwrap()).len()).sum::<usize>())
}

#[test]
fn bad_configs_fail_with_one_line_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    for (extra, needles) in [
        ("\n[pairs]\nmax_wordz = 3\n", &["[pairs]", "max_wordz", "--max-wordz"][..]),
        ("\n[pairs]\nout = \"x.jsonl\"\n", &["[pairs]", "out", "set by the loop"]),
        ("\n[pairs]\nmax_words = -1\n", &["[pairs]", "-1"]),
    ] {
        let config = setup(tmp.path(), extra);
        fails_with(&["loop", "--config", s(&config), "--out", s(&out)], needles);
    }
    let config = setup(tmp.path(), "");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("lora_rank = 4", "lora_rank = 0")).unwrap();
    let o = bpo(&["loop", "--config", s(&config), "--out", s(&out)]);
    assert_eq!(o.status.code(), Some(2), "a value out of its range is a usage error: {}", stderr(&o));
    assert!(stderr(&o).contains("[train]") && stderr(&o).contains("at least 1"), "{}", stderr(&o));
    std::fs::write(&config, text.replace("rounds = 2", "roundz = 2")).unwrap();
    fails_with(&["loop", "--config", s(&config), "--out", s(&out)], &["roundz"]);
    assert!(!out.exists(), "nothing written for a config that cannot run");
}

#[test]
fn next_adapter_trains_the_last_adapter_further_and_other_settings_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let config = setup(tmp.path(), "");
    let text = std::fs::read_to_string(&config).unwrap();
    // No evaluation: the loop still runs its rounds, without a table.
    let text = text[..text.find("[eval]").unwrap()].replace("rounds = 2", "rounds = 2\nnext = \"adapter\"");
    std::fs::write(&config, &text).unwrap();
    let out = tmp.path().join("out");
    ok(&bpo(&["loop", "--config", s(&config), "--out", s(&out)]));
    let round = |r: usize| out.join(format!("round-{r}"));
    let cfg = read_json(&round(2).join("train/train_config.json"));
    assert_eq!(cfg["model"], json!(s(&fixture("llava-tiny"))), "trained on the starting model");
    assert_eq!(cfg["init_adapter"], json!(s(&round(1).join("train"))), "from round 1's adapter");
    assert!(round(2).join("train/ref_logps.jsonl").is_file(), "the reference is the starting policy, computed once");
    assert!(!round(0).exists() && !out.join("rounds.txt").exists(), "nothing to evaluate");
    let weights = |dir: &Path| std::fs::read(dir.join("model.safetensors")).unwrap();
    assert_ne!(weights(&round(2).join("model")), weights(&round(1).join("model")));

    // More rounds continue a finished loop; other settings are refused, naming what differs.
    std::fs::write(&config, text.replace("rounds = 2", "rounds = 3")).unwrap();
    let o = bpo(&["loop", "--config", s(&config), "--out", s(&out)]);
    ok(&o);
    assert!(starts(&stderr(&o)).iter().all(|l| l.starts_with("round 3/3: ")), "{}", stderr(&o));
    assert_eq!(read_json(&round(3).join("train/train_config.json"))["init_adapter"], json!(s(&round(2).join("train"))));
    std::fs::write(&config, text.replace("lr = 1e-3", "lr = 2e-3")).unwrap();
    fails_with(&["loop", "--config", s(&config), "--out", s(&out)], &["other settings", "train.lr"]);
}
