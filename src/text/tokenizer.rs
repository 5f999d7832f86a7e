//! A Hugging Face `tokenizer.json` plus the special ids bpo needs (BOS, EOS, pad, `<image>`).

use std::path::Path;

use crate::{Error, Result};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
    pub pad: u32,
    /// Bytes of the longest token in the vocabulary.
    longest: usize,
}

impl Tokenizer {
    /// Reads `dir/tokenizer.json`; BOS/EOS/pad come from `tokenizer_config.json` when present, else from the
    /// conventional `<s>`, `</s>`, `<pad>` / `<unk>` tokens. `eos_ids` (from the model config) are added to EOS.
    pub fn from_dir(dir: &Path, eos_ids: &[u32]) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let text = crate::jsonl::read_folder_file(&path)?.ok_or_else(|| {
            Error::io(&path, std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer.json not found"))
        })?;
        let inner = text.parse::<tokenizers::Tokenizer>().map_err(|e| Error::parse(&path, None, e))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = match crate::jsonl::read_folder_file(&cfg_path)? {
            Some(t) => serde_json::from_str(&t).map_err(|e| Error::parse(&cfg_path, None, e))?,
            None => serde_json::Value::Null,
        };
        // Special tokens are either strings or {"content": ...} objects in tokenizer_config.json.
        let named = |key: &str, fallback: &[&str]| -> Option<u32> {
            let from_cfg = cfg.get(key).and_then(|v| v.as_str().or_else(|| v.get("content").and_then(|c| c.as_str())));
            from_cfg.into_iter().chain(fallback.iter().copied()).find_map(|t| inner.token_to_id(t))
        };
        let bos = named("bos_token", &["<s>", "<|begin_of_text|>"]);
        let mut eos: Vec<u32> = named("eos_token", &["</s>", "<|end_of_text|>"]).into_iter().collect();
        for id in eos_ids {
            if !eos.contains(id) {
                eos.push(*id);
            }
        }
        let pad = named("pad_token", &["<pad>", "<unk>"]).or(eos.first().copied()).unwrap_or(0);
        let longest = inner.get_vocab(true).keys().map(String::len).max().unwrap_or(1);
        Ok(Tokenizer { inner, bos, eos, pad, longest })
    }

    /// Whether `text` surely needs more than `tokens` tokens, known from its length alone, without tokenising it:
    /// no token stands for more than four times the bytes of the longest token (or of 16 bytes), normalizers
    /// included. A 50 MB prompt for a 4096-token context is refused at once this way instead of after a minute of
    /// tokenising; a text that passes may still be too long.
    pub fn surely_longer_than(&self, text: &str, tokens: usize) -> bool {
        text.len() > tokens.saturating_mul(self.longest.max(16)).saturating_mul(4)
    }

    /// Token ids of `text`, with no special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| Error::invalid(format!("tokenizer: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| Error::invalid(format!("tokenizer: {e}")))
    }

    /// BOS, EOS and pad as strings, for chat templates.
    pub fn special_tokens(&self) -> super::chat::SpecialTokens {
        let name = |id: u32| self.inner.id_to_token(id);
        super::chat::SpecialTokens {
            bos: self.bos.and_then(name),
            eos: self.eos.first().copied().and_then(name),
            pad: name(self.pad),
        }
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Whether `id` is a byte-fallback token (`<0xNN>`): a run of them decodes as one UTF-8 sequence, so its text
    /// may change when the next token arrives.
    pub fn is_byte_token(&self, id: u32) -> bool {
        self.inner.id_to_token(id).is_some_and(|t| t.len() == 6 && t.starts_with("<0x") && t.ends_with('>'))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Special tokens of a word-level tokenizer, ids 0..5 in this order.
pub const WORD_LEVEL_SPECIALS: [&str; 5] = ["<unk>", "<s>", "</s>", "<pad>", "<image>"];

/// A `tokenizer.json` (as a JSON value) for a whitespace word-level vocabulary: the specials of
/// [`WORD_LEVEL_SPECIALS`] first, then `words`. Used for models bpo builds itself (the demo, benchmarks).
pub fn word_level_json(words: &[String]) -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    for (i, w) in WORD_LEVEL_SPECIALS.iter().map(|s| s.to_string()).chain(words.iter().cloned()).enumerate() {
        vocab.entry(w).or_insert(serde_json::Value::from(i));
    }
    let added: Vec<serde_json::Value> = WORD_LEVEL_SPECIALS
        .iter()
        .enumerate()
        .map(|(i, t)| serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
}

/// Writes `tokenizer.json` and `tokenizer_config.json` for a word-level vocabulary into `dir`.
pub fn write_word_level(dir: &Path, words: &[String]) -> Result<()> {
    let write = |name: &str, v: serde_json::Value| {
        let path = dir.join(name);
        crate::output::write_bytes(&path, serde_json::to_string_pretty(&v).unwrap_or_default().as_bytes())
    };
    write("tokenizer.json", word_level_json(words))?;
    write(
        "tokenizer_config.json",
        serde_json::json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "tokenizer_class": "PreTrainedTokenizerFast"}),
    )
}
