//! The chat template a model folder ships, rendered the way transformers' `apply_chat_template` renders it: a
//! Jinja template (minijinja, with Python string methods) over `messages`, `add_generation_prompt` and the special
//! tokens, with `trim_blocks` and `lstrip_blocks` on, `raise_exception`, `strftime_now` (the local time, as the
//! Llama 3.x templates use it), macros, and transformers' `{% generation %}` markers (which only mark assistant
//! text and render nothing themselves). `{% include %}` parses but, as in transformers (no template loader),
//! finds no other template when it runs.
//!
//! A template is a program from the model folder, so rendering has a budget: [`FUEL`] instructions and
//! [`MAX_RENDER_BYTES`] of output, far beyond any real chat template's single turn; a template that loops
//! longer or writes more stops with one line naming its file.
//!
//! Where the template comes from, first found wins: `chat_template.jinja`, `chat_template.json`
//! (`{"chat_template": "..."}`, what llava-hf processors save), then `tokenizer_config.json`'s `chat_template`
//! (a string, or a list of `{name, template}` of which `default` is used).

use std::path::{Path, PathBuf};

use minijinja::{Environment, ErrorKind};
use serde_json::{json, Value};

use crate::{jsonl, Error, Result};

/// Instructions one render may run (minijinja's fuel): a Llama 3.1 template's single turn takes about a thousand.
pub const FUEL: u64 = 1_000_000;
/// Most bytes one render may write besides the messages it renders.
pub const MAX_RENDER_BYTES: usize = 4 << 20;

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
        if let Some(source) = jsonl::read_folder_file(&jinja)? {
            return Self::new(source, jinja, parts);
        }
        for (file, key) in [("chat_template.json", "chat_template"), ("tokenizer_config.json", "chat_template")] {
            let path = dir.join(file);
            let Some(text) = jsonl::read_folder_file(&path)? else { continue };
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
        env.add_function("strftime_now", strftime_now);
        env.set_fuel(Some(FUEL));
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
        // The template's own text may add MAX_RENDER_BYTES to the messages it renders.
        let limit = MAX_RENDER_BYTES + messages.iter().map(|m| m.to_string().len()).sum::<usize>();
        let mut out = Capped { bytes: Vec::new(), limit };
        match template.render_captured_to(ctx, &mut out) {
            Ok(_) => String::from_utf8(out.bytes).map_err(|e| Error::parse(&self.path, None, e)),
            Err(_) if out.bytes.len() >= limit => Err(Error::parse(
                &self.path,
                None,
                format!(
                    "chat template: wrote more than {} MiB besides the messages for one prompt; refusing to go on",
                    MAX_RENDER_BYTES >> 20
                ),
            )),
            Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(Error::parse(
                &self.path,
                e.line(),
                format!(
                    "chat template: ran more than {FUEL} instructions for one prompt (an endless or huge loop?); \
                     refusing to go on"
                ),
            )),
            Err(e) => Err(self.error(e)),
        }
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

/// The output of one render, refused past `limit` bytes.
struct Capped {
    bytes: Vec<u8>,
    limit: usize,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > self.limit {
            self.bytes.resize(self.limit, 0);
            return Err(std::io::Error::other("chat template output over the limit"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// transformers' `strftime_now(format)`: the local time formatted by the C library's `strftime`, as Python's
/// `datetime.now().strftime` does.
fn strftime_now(format: String) -> std::result::Result<String, minijinja::Error> {
    let bad = |what: &str| minijinja::Error::new(ErrorKind::InvalidOperation, format!("strftime_now: {what}"));
    let format = std::ffi::CString::new(format).map_err(|_| bad("the format holds a NUL byte"))?;
    let mut buf = vec![0u8; 1024];
    // SAFETY: time and localtime_r write only to the values we pass; strftime writes at most buf.len() bytes
    // into buf and reads the NUL-terminated format.
    let n = unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return Err(bad("no local time"));
        }
        libc::strftime(buf.as_mut_ptr().cast(), buf.len(), format.as_ptr(), &tm)
    };
    buf.truncate(n);
    String::from_utf8(buf).map_err(|_| bad("the result is not UTF-8"))
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
    fn rendering_has_a_budget_and_names_the_file() {
        let render = |source: &str| {
            let t = ChatTemplate::new(source.into(), "m/chat_template.jinja".into(), false).unwrap();
            t.render("q", false, &SpecialTokens::default()).map_err(|e| e.to_string())
        };
        let start = std::time::Instant::now();
        let nested = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}";
        let quiet = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
        let wide = "{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}";
        for (source, needle) in [(nested, "instructions"), (quiet, "instructions"), (wide, "4 MiB")] {
            let err = render(source).unwrap_err();
            assert!(err.contains("m/chat_template.jinja") && err.contains(needle) && !err.contains('\n'), "{err}");
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(5), "{:?}", start.elapsed());
        // A long question is the messages' size, not the template's.
        let t = ChatTemplate::new("{{ messages[0].content }}".into(), "t.jinja".into(), false).unwrap();
        assert_eq!(t.render(&"z".repeat(5 << 20), false, &SpecialTokens::default()).unwrap().len(), 5 << 20);
    }

    #[test]
    fn macros_strftime_now_and_include_behave_as_in_transformers() {
        let render = |source: &str| {
            let t = ChatTemplate::new(source.into(), "chat_template.jinja".into(), false).unwrap();
            t.render("q", false, &SpecialTokens::default()).map_err(|e| e.to_string())
        };
        let macro_ =
            "{% macro wrap(x) %}[{{ x }}]{% endmacro %}{% for m in messages %}{{ wrap(m.content) }}{% endfor %}";
        assert_eq!(render(macro_).unwrap(), "[q]");
        // Llama 3.1's date line.
        let date = "{%- if strftime_now is defined %}{%- set d = strftime_now(\"%d %b %Y\") %}{%- else %}{%- set d = \"26 Jul 2024\" %}{%- endif %}{{ d }}";
        let d = render(date).unwrap();
        let parts: Vec<&str> = d.split(' ').collect();
        assert!(parts.len() == 3 && parts[0].len() == 2 && parts[2].len() == 4 && d != "26 Jul 2024", "{d}");
        assert!(parts[2].parse::<u32>().is_ok_and(|y| y >= 2024), "{d}");
        // transformers has no template loader: an include parses, and fails when it runs, naming the file.
        let err = render("{% include 'tools.jinja' %}").unwrap_err();
        assert!(err.contains("chat_template.jinja") && err.contains("tools.jinja"), "{err}");
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
