//! The chat template a model folder ships, rendered the way transformers' `apply_chat_template` renders it: a
//! Jinja template (minijinja, with Python string methods) over `messages`, `add_generation_prompt` and the special
//! tokens, with `trim_blocks` and `lstrip_blocks` on, `raise_exception` and transformers' `{% generation %}`
//! markers (which only mark assistant text and render nothing themselves).
//!
//! Where the template comes from, first found wins: `chat_template.jinja`, `chat_template.json`
//! (`{"chat_template": "..."}`, what llava-hf processors save), then `tokenizer_config.json`'s `chat_template`
//! (a string, or a list of `{name, template}` of which `default` is used).

use std::path::{Path, PathBuf};

use minijinja::{Environment, ErrorKind};
use serde_json::{json, Value};

use crate::{jsonl, Error, Result};

/// A compiled chat template and the file it came from.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The file the template was read from (for errors and run configs).
    pub path: PathBuf,
    /// The template text as written in that file.
    pub source: String,
    /// Whether user messages carry a list of typed parts (`[{"type": "image"}, {"type": "text", ...}]`, as
    /// multimodal processors and TRL's vision datasets have them) rather than a string.
    parts: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("path", &self.path).finish_non_exhaustive()
    }
}

/// The special tokens a template may refer to (`bos_token`, `eos_token`, ...), as strings.
#[derive(Debug, Clone, Default)]
pub struct SpecialTokens {
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub pad: Option<String>,
}

impl ChatTemplate {
    /// The template of the model folder `dir`; an error naming the files looked at when it ships none.
    /// `parts`: user messages as typed parts (a multimodal model) or as plain strings (a text model).
    pub fn from_dir(dir: &Path, parts: bool) -> Result<Self> {
        let jinja = dir.join("chat_template.jinja");
        if let Some(source) = jsonl::read_text_if_exists(&jinja)? {
            return Self::new(source, jinja, parts);
        }
        for (file, key) in [("chat_template.json", "chat_template"), ("tokenizer_config.json", "chat_template")] {
            let path = dir.join(file);
            let Some(text) = jsonl::read_text_if_exists(&path)? else { continue };
            let value: Value = serde_json::from_str(&text).map_err(|e| Error::parse(&path, None, e))?;
            let source = match value.get(key) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(named)) => {
                    match named.iter().find(|t| t["name"] == "default").and_then(|t| t["template"].as_str()) {
                        Some(s) => s.to_string(),
                        None => {
                            return Err(Error::parse(
                                &path,
                                None,
                                format!("`{key}` is a list of named templates without one named \"default\""),
                            ))
                        }
                    }
                }
                Some(_) => {
                    return Err(Error::parse(
                        &path,
                        None,
                        format!("`{key}` is neither a string nor a list of named templates"),
                    ))
                }
                None => continue,
            };
            return Self::new(source, path, parts);
        }
        Err(Error::invalid(format!(
            "{}: the model folder ships no chat template (chat_template.jinja, chat_template.json or tokenizer_config.json's chat_template); choose a built-in one with --template vicuna-v1|llava-hf|plain",
            dir.display()
        )))
    }

    /// Compiles `source` (read from `path`).
    pub fn new(source: String, path: PathBuf, parts: bool) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", strip_generation_markers(&source))
            .map_err(|e| Error::parse(&path, e.line(), format!("chat template: {e}")))?;
        Ok(ChatTemplate { env, path, source, parts })
    }

    /// The messages of one exchange: the user's question (with an image part first when `image`), and the
    /// assistant's answer when given.
    fn messages(&self, question: &str, image: bool, answer: Option<&str>) -> Vec<Value> {
        let mut out = Vec::new();
        if self.parts {
            let mut content = Vec::new();
            if image {
                content.push(json!({"type": "image"}));
            }
            content.push(json!({"type": "text", "text": question}));
            out.push(json!({"role": "user", "content": content}));
            out.extend(answer.map(|a| json!({"role": "assistant", "content": [{"type": "text", "text": a}]})));
        } else {
            out.push(json!({"role": "user", "content": question}));
            out.extend(answer.map(|a| json!({"role": "assistant", "content": a})));
        }
        out
    }

    /// Renders `messages` (JSON values with `role` and `content`) as transformers does.
    pub fn render_messages(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
        special: &SpecialTokens,
    ) -> Result<String> {
        let ctx = json!({
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": special.bos,
            "eos_token": special.eos,
            "pad_token": special.pad,
        });
        let template = self.env.get_template("chat").map_err(|e| self.error(e))?;
        template.render(ctx).map_err(|e| self.error(e))
    }

    /// The prompt of a single-turn question, up to where the answer starts (`add_generation_prompt`). The image
    /// is a part of the user message; the template writes its `<image>` placeholder.
    pub fn render(&self, question: &str, image: bool, special: &SpecialTokens) -> Result<String> {
        self.render_messages(&self.messages(question, image, None), true, special)
    }

    fn error(&self, e: minijinja::Error) -> Error {
        Error::parse(&self.path, e.line(), format!("chat template: {e}"))
    }
}

/// Removes transformers' `{% generation %}` / `{% endgeneration %}` markers (whitespace control included).
fn strip_generation_markers(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start..].find("%}") else { break };
        let tag = &rest[start + 2..start + len];
        let word = tag.trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..start]);
        if word != "generation" && word != "endgeneration" {
            out.push_str(&rest[start..start + len + 2]);
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every case of tests/fixtures/chat/cases.json (rendered by jinja2 as transformers sets it up, see
    /// scripts/chat_template_fixture.py) renders to the same text.
    #[test]
    fn renders_like_transformers() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat/cases.json");
        let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let s = &fixture["special"];
        let special = SpecialTokens {
            bos: s["bos_token"].as_str().map(Into::into),
            eos: s["eos_token"].as_str().map(Into::into),
            pad: s["pad_token"].as_str().map(Into::into),
        };
        let template = |name: &str, parts: bool| {
            ChatTemplate::new(
                fixture["templates"][name].as_str().unwrap().to_string(),
                format!("{name}.jinja").into(),
                parts,
            )
            .unwrap()
        };
        let cases = fixture["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 12);
        for c in cases {
            let t = template(c["template"].as_str().unwrap(), c["parts"].as_bool().unwrap());
            let got = t.render(c["question"].as_str().unwrap(), c["image"].as_bool().unwrap(), &special).unwrap();
            assert_eq!(got, c["expected"].as_str().unwrap(), "{c}");
        }
        let sc = &fixture["system_case"];
        let got = template("inst", false).render_messages(sc["messages"].as_array().unwrap(), false, &special).unwrap();
        assert_eq!(got, sc["expected"].as_str().unwrap());
        // The template's own check fires as in transformers.
        let bad = [json!({"role": "assistant", "content": "x"})];
        let err = template("inst", false).render_messages(&bad, false, &special).unwrap_err().to_string();
        assert!(err.contains("roles must alternate"), "{err}");
    }

    #[test]
    fn generation_markers_render_nothing() {
        assert_eq!(
            strip_generation_markers("a{% generation %}b{%- endgeneration -%}c{% if x %}d{% endif %}"),
            "abc{% if x %}d{% endif %}"
        );
    }

    #[test]
    fn raise_exception_is_an_error_naming_the_file() {
        let t = ChatTemplate::new(
            "{{ raise_exception('only user and assistant') }}".into(),
            "chat_template.jinja".into(),
            true,
        )
        .unwrap();
        let err = t.render("q", false, &SpecialTokens::default()).unwrap_err().to_string();
        assert!(err.contains("chat_template.jinja") && err.contains("only user and assistant"), "{err}");
    }

    #[test]
    fn a_broken_template_is_refused_at_load() {
        let err = ChatTemplate::new("{% for m in messages %}".into(), "x/chat_template.jinja".into(), true)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("x/chat_template.jinja"), "{err}");
    }
}
