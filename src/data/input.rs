//! Source data for bootstrapping, read into [`Record`]s whose only completion is the ground truth (or, for
//! existing BPO records, all completions so far, so that more negatives can be added).
//!
//! Formats ([`InputFormat`]), told apart by content unless one is named:
//! - LLaVA instruct JSON: a JSON array of `{id, image?, conversations: [{from, value}]}` (also accepted one
//!   sample per line). Every human turn followed by a gpt turn becomes one record: the prompt is the human text
//!   with the `<image>` tag and its newline removed, the ground truth the gpt text. `from` may also be
//!   `user`/`assistant`; `system` turns are ignored; a last human turn with no answer is skipped and counted.
//! - plain JSONL: `{"prompt", "image"?, "answer", "id"?}` one per line; `id` is used as the record id verbatim.
//! - BPO records JSONL (`{"id", "prompt", "image"?, "completions"}`).
//!
//! Ids follow [`super::records`]; a repeated id from a LLaVA or plain source gets `~2`, `~3`, ... in file order
//! (so the renaming is the same on every run); a repeated id among BPO records is an error.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;

use serde::de::{SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use super::records::{content_id, turn_id, Completion, Record};
use crate::{jsonl, Error, Result};

/// Which reader to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum InputFormat {
    /// Look at the content: `[` first means LLaVA JSON; otherwise the first line's keys decide
    /// (`conversations` → LLaVA, `completions` → records, `answer` → plain JSONL).
    #[default]
    Auto,
    Llava,
    Jsonl,
    #[cfg_attr(feature = "clap", value(alias = "bpo"))]
    Records,
}

#[derive(Debug, Clone, Default)]
pub struct InputOptions {
    /// Reader to use; `Auto` detects it from the content.
    pub format: InputFormat,
    /// LLaVA only: keep the first human/gpt exchange of each conversation, drop the rest.
    pub first_turn_only: bool,
}

/// What [`read_input`] found.
#[derive(Debug, Clone)]
pub struct Input {
    pub records: Vec<Record>,
    /// The reader actually used (never `Auto`).
    pub format: InputFormat,
    /// Records whose id repeated an earlier one and got a `~n` suffix.
    pub renamed_duplicates: usize,
    /// LLaVA human turns without an answer.
    pub unanswered_turns: usize,
}

/// Reads `path` into records. Errors name the file and the line, or for a JSON array the element index.
pub fn read_input(path: &Path, opts: &InputOptions) -> Result<Input> {
    let format = match opts.format {
        InputFormat::Auto => detect(path)?,
        f => f,
    };
    let (mut records, unanswered_turns) = match format {
        InputFormat::Llava => read_llava(path, opts.first_turn_only)?,
        InputFormat::Jsonl => (read_plain(path)?, 0),
        _ => (read_records(path)?, 0),
    };
    let renamed_duplicates = rename_duplicates(&mut records);
    Ok(Input { records, format, renamed_duplicates, unanswered_turns })
}

/// Decides the format from the first non-blank content of `path`.
pub fn detect(path: &Path) -> Result<InputFormat> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| Error::io(path, e))?;
        let line = if i == 0 { jsonl::strip_bom(&line) } else { &line };
        let trimmed = line.trim_start();
        if trimmed.is_empty() {
            continue;
        }
        if trimmed.starts_with('[') {
            return Ok(InputFormat::Llava);
        }
        let v: Value = serde_json::from_str(line).map_err(|e| Error::parse(path, Some(i + 1), e))?;
        let has = |k: &str| v.get(k).is_some();
        return Ok(if has("completions") {
            InputFormat::Records
        } else if has("conversations") {
            InputFormat::Llava
        } else if has("answer") {
            InputFormat::Jsonl
        } else {
            return Err(Error::parse(
                path,
                Some(i + 1),
                "cannot tell the format: no `conversations`, `answer` or `completions` key; name it with --format",
            ));
        });
    }
    Err(Error::parse(path, None, "file is empty"))
}

/// One sample of LLaVA's instruct JSON (`{id, image?, conversations: [{from, value}]}`); training reads it too.
#[derive(Deserialize)]
pub(crate) struct LlavaSample {
    #[serde(default)]
    pub id: Option<Value>,
    #[serde(default)]
    pub image: Option<String>,
    pub conversations: Vec<Turn>,
}

#[derive(Deserialize)]
pub(crate) struct Turn {
    pub from: String,
    pub value: String,
}

#[derive(Deserialize)]
struct PlainRow {
    #[serde(default)]
    id: Option<Value>,
    prompt: String,
    #[serde(default)]
    image: Option<String>,
    answer: String,
}

/// LLaVA JSON array (streamed element by element) or LLaVA samples one per line.
fn read_llava(path: &Path, first_turn_only: bool) -> Result<(Vec<Record>, usize)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = BufReader::new(file);
    if reader.fill_buf().map_err(|e| Error::io(path, e))?.starts_with(jsonl::BOM.as_bytes()) {
        reader.consume(jsonl::BOM.len());
    }
    let first = loop {
        let buf = reader.fill_buf().map_err(|e| Error::io(path, e))?;
        match buf.iter().position(|b| !b.is_ascii_whitespace()) {
            Some(p) => break Some(buf[p]),
            None if buf.is_empty() => break None,
            None => {
                let n = buf.len();
                reader.consume(n);
            }
        }
    };
    let mut out = Vec::new();
    let mut unanswered = 0;
    if first == Some(b'[') {
        let mut failure = None;
        let mut visitor =
            LlavaArray { first_turn_only, out: &mut out, unanswered: &mut unanswered, failure: &mut failure };
        let mut de = serde_json::Deserializer::from_reader(reader);
        let parsed = serde::Deserializer::deserialize_seq(&mut de, &mut visitor).and_then(|_| de.end());
        if let Err(e) = parsed {
            return Err(Error::parse(path, None, failure.unwrap_or_else(|| e.to_string())));
        }
    } else {
        for (line, sample) in jsonl::read_numbered::<LlavaSample>(path)? {
            unanswered +=
                sample_records(sample, first_turn_only, &mut out).map_err(|m| Error::parse(path, Some(line), m))?;
        }
    }
    Ok((out, unanswered))
}

/// Serde visitor over the top-level array: converts each element as it arrives, so a large file is never held
/// as a `Value` tree. On a bad element it records "element {i}: ..." in `failure`.
struct LlavaArray<'a> {
    first_turn_only: bool,
    out: &'a mut Vec<Record>,
    unanswered: &'a mut usize,
    failure: &'a mut Option<String>,
}

impl<'de> Visitor<'de> for &mut LlavaArray<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON array of LLaVA samples")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        let mut index = 0usize;
        loop {
            let sample = match seq.next_element::<LlavaSample>() {
                Ok(Some(s)) => s,
                Ok(None) => return Ok(()),
                Err(e) => {
                    *self.failure = Some(format!("element {index}: {e}"));
                    return Err(e);
                }
            };
            match sample_records(sample, self.first_turn_only, self.out) {
                Ok(n) => *self.unanswered += n,
                Err(m) => {
                    *self.failure = Some(format!("element {index}: {m}"));
                    return Err(serde::de::Error::custom("bad sample"));
                }
            }
            index += 1;
        }
    }
}

/// Appends one record per human/gpt exchange of `sample`; returns how many human turns had no answer.
fn sample_records(
    sample: LlavaSample,
    first_turn_only: bool,
    out: &mut Vec<Record>,
) -> std::result::Result<usize, String> {
    let source_id = sample.id.as_ref().map(id_string);
    let name = source_id.as_deref().map(|s| format!(" (id {s:?})")).unwrap_or_default();
    let mut question: Option<String> = None;
    let mut turn = 0;
    for (k, t) in sample.conversations.into_iter().enumerate() {
        match t.from.as_str() {
            "system" => {}
            "human" | "user" if question.is_none() => question = Some(strip_image_tag(&t.value)),
            "gpt" | "assistant" => {
                let Some(prompt) = question.take() else {
                    return Err(format!("conversation turn {k}{name}: a `{}` turn with no question before it", t.from));
                };
                if !first_turn_only || turn == 0 {
                    let id = match &source_id {
                        Some(s) => turn_id(s, turn),
                        None => content_id(&prompt, sample.image.as_deref(), &t.value),
                    };
                    out.push(Record {
                        id,
                        prompt,
                        image: sample.image.clone(),
                        completions: vec![Completion::gt(t.value)],
                    });
                }
                turn += 1;
            }
            "human" | "user" => return Err(format!("conversation turn {k}{name}: two questions in a row")),
            other => return Err(format!("conversation turn {k}{name}: unknown speaker {other:?}")),
        }
    }
    Ok(usize::from(question.is_some()))
}

/// Removes LLaVA's `<image>` placeholder together with the newline that separates it from the text.
pub fn strip_image_tag(text: &str) -> String {
    text.replace("<image>\n", "").replace("\n<image>", "").replace("<image>", "").trim().to_string()
}

fn id_string(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn read_plain(path: &Path) -> Result<Vec<Record>> {
    let rows = jsonl::read::<PlainRow>(path)?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let id = match &r.id {
                Some(v) => id_string(v),
                None => content_id(&r.prompt, r.image.as_deref(), &r.answer),
            };
            Record { id, prompt: r.prompt, image: r.image, completions: vec![Completion::gt(r.answer)] }
        })
        .collect())
}

fn read_records(path: &Path) -> Result<Vec<Record>> {
    let rows = jsonl::read_numbered::<Record>(path)?;
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (line, r) in &rows {
        if let Some(first) = seen.insert(&r.id, *line) {
            return Err(Error::parse(path, Some(*line), format!("id {:?} already used on line {first}", r.id)));
        }
    }
    Ok(rows.into_iter().map(|(_, r)| r).collect())
}

/// Gives every repeated id a `~n` suffix (n = 2, 3, ...), first occurrence unchanged. Returns how many changed.
fn rename_duplicates(records: &mut [Record]) -> usize {
    let mut seen: HashMap<String, usize> = records.iter().map(|r| (r.id.clone(), 0)).collect();
    let mut renamed = 0;
    for r in records.iter_mut() {
        let count = seen.get(&r.id).copied().unwrap_or(0) + 1;
        seen.insert(r.id.clone(), count);
        if count == 1 {
            continue;
        }
        let mut n = count;
        while seen.contains_key(&format!("{}~{n}", r.id)) {
            n += 1;
        }
        r.id = format!("{}~{n}", r.id);
        seen.insert(r.id.clone(), 1);
        renamed += 1;
    }
    renamed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(content: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(content.as_bytes()).unwrap();
        f
    }

    const LLAVA: &str = r#"[
      {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
        {"from": "gpt", "value": "The bus in the image is white and red."},
        {"from": "human", "value": "What feature can be seen on the back of the bus?"},
        {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
      {"id": 7, "conversations": [
        {"from": "human", "value": "Tell me a joke.\n<image>"}, {"from": "gpt", "value": "No."},
        {"from": "human", "value": "Why?"}]}
    ]"#;

    #[test]
    fn llava_array_turns_become_records() {
        let f = file(LLAVA);
        let input = read_input(f.path(), &InputOptions::default()).unwrap();
        assert_eq!(input.format, InputFormat::Llava);
        assert_eq!(input.unanswered_turns, 1);
        let ids: Vec<_> = input.records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["000000033471#0", "000000033471#1", "7#0"]);
        let r = &input.records[0];
        assert_eq!(r.prompt, "What are the colors of the bus in the image?");
        assert_eq!(r.image.as_deref(), Some("coco/train2017/000000033471.jpg"));
        assert_eq!(r.completions, vec![Completion::gt("The bus in the image is white and red.")]);
        assert_eq!(input.records[2].prompt, "Tell me a joke.");
        assert_eq!(input.records[2].image, None);
    }

    #[test]
    fn first_turn_only_keeps_turn_zero_ids() {
        let f = file(LLAVA);
        let opts = InputOptions { first_turn_only: true, ..Default::default() };
        let ids: Vec<_> = read_input(f.path(), &opts).unwrap().records.into_iter().map(|r| r.id).collect();
        assert_eq!(ids, ["000000033471#0", "7#0"]);
    }

    #[test]
    fn llava_errors_name_the_element() {
        let f = file(
            r#"[{"id": "a", "conversations": []}, {"id": "b", "conversations": [{"from": "gpt", "value": "x"}]}]"#,
        );
        let err = read_input(f.path(), &InputOptions::default()).unwrap_err().to_string();
        assert!(err.contains("element 1") && err.contains("\"b\""), "{err}");
        let f = file(r#"[{"id": "a", "conversations": []}, {"id": "b"}]"#);
        let err = read_input(f.path(), &InputOptions::default()).unwrap_err().to_string();
        assert!(err.contains("element 1") && err.contains("conversations"), "{err}");
    }

    #[test]
    fn llava_jsonl_lines_also_read() {
        let f = file("{\"id\": \"a\", \"conversations\": [{\"from\": \"human\", \"value\": \"q\"}, {\"from\": \"gpt\", \"value\": \"a\"}]}\n\n{\"id\": \"b\", \"conversations\": [{\"from\": \"gpt\", \"value\": \"a\"}]}\n");
        let err = read_input(f.path(), &InputOptions::default()).unwrap_err().to_string();
        assert!(err.contains(":3:"), "{err}");
    }

    #[test]
    fn plain_jsonl_ids_and_hashes() {
        let f = file("{\"prompt\": \"p\", \"answer\": \"a\"}\n{\"id\": 12, \"prompt\": \"q\", \"image\": \"i.jpg\", \"answer\": \"b\"}\n{\"prompt\": \"p\", \"answer\": \"a\"}\n");
        let input = read_input(f.path(), &InputOptions::default()).unwrap();
        assert_eq!(input.format, InputFormat::Jsonl);
        let ids: Vec<_> = input.records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, [content_id("p", None, "a").as_str(), "12", &format!("{}~2", content_id("p", None, "a"))]);
        assert_eq!(input.renamed_duplicates, 1);
    }

    #[test]
    fn records_keep_completions_and_reject_duplicate_ids() {
        let line = r#"{"id":"x","prompt":"p","completions":[{"response":"a","score":1,"type":"gt"},{"response":"b","score":0,"type":"mllm-hal"}]}"#;
        let f = file(&format!("{line}\n"));
        let input = read_input(f.path(), &InputOptions::default()).unwrap();
        assert_eq!(input.format, InputFormat::Records);
        assert_eq!(input.records[0].completions.len(), 2);
        let f = file(&format!("{line}\n{line}\n"));
        let err = read_input(f.path(), &InputOptions::default()).unwrap_err().to_string();
        assert!(err.contains(":2:") && err.contains("line 1"), "{err}");
    }

    #[test]
    fn undetectable_content_asks_for_format() {
        let f = file("{\"question\": \"q\"}\n");
        let err = read_input(f.path(), &InputOptions::default()).unwrap_err().to_string();
        assert!(err.contains("--format") && err.contains(":1:"), "{err}");
        let opts = InputOptions { format: InputFormat::Jsonl, ..Default::default() };
        assert!(read_input(f.path(), &opts).unwrap_err().to_string().contains("missing field `prompt`"));
    }

    #[test]
    fn rename_duplicates_avoids_existing_names() {
        let mk = |id: &str| Record { id: id.into(), prompt: String::new(), image: None, completions: vec![] };
        let mut recs = vec![mk("a"), mk("a~2"), mk("a"), mk("a")];
        assert_eq!(rename_duplicates(&mut recs), 2);
        let ids: Vec<_> = recs.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["a", "a~2", "a~3", "a~4"]);
    }
}
