//! Error injection through an OpenAI-compatible server: [`HttpCompleter`] as a [`Completer`], one request per
//! prompt, up to the client's `concurrency` at once on scoped std threads.

use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{json, Value};

use super::inject::{Completer, CompletionOptions};
use crate::http::{Endpoint, HttpCompleter};
use crate::{Error, Result};

/// The request body of one prompt: sampling options, the prompt as `prompt` or as one user message.
fn request_body(client: &HttpCompleter, prompt: &str, opts: &CompletionOptions) -> Value {
    let mut body = json!({
        "temperature": opts.temperature,
        "top_p": opts.top_p,
        "max_tokens": opts.max_tokens,
        "n": 1,
        "stream": false,
    });
    match client.options().endpoint {
        Endpoint::Completions => body["prompt"] = json!(prompt),
        Endpoint::Chat => body["messages"] = json!([{"role": "user", "content": prompt}]),
    }
    if !opts.stop.is_empty() {
        body["stop"] = json!(opts.stop);
    }
    if let Some(seed) = opts.seed {
        body["seed"] = json!(seed);
    }
    if let Some(model) = &client.options().model {
        body["model"] = json!(model);
    }
    body
}

impl HttpCompleter {
    /// One prompt, with the client's retries.
    pub fn complete_one(&self, prompt: &str, opts: &CompletionOptions) -> Result<String> {
        Ok(self.send(&request_body(self, prompt, opts))?.text)
    }
}

impl Completer for HttpCompleter {
    fn complete(&self, prompts: &[String], opts: &CompletionOptions) -> Result<Vec<Result<String>>> {
        let next = AtomicUsize::new(0);
        let workers = self.options().concurrency.min(prompts.len());
        let mut slots: Vec<Option<Result<String>>> = prompts.iter().map(|_| None).collect();
        std::thread::scope(|scope| -> Result<()> {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    scope.spawn(|| {
                        let mut done = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(prompt) = prompts.get(i) else { return done };
                            done.push((i, self.complete_one(prompt, opts)));
                        }
                    })
                })
                .collect();
            for handle in handles {
                let done = handle.join().map_err(|_| Error::Http("an HTTP worker thread panicked".into()))?;
                for (i, result) in done {
                    slots[i] = Some(result);
                }
            }
            Ok(())
        })?;
        Ok(slots.into_iter().map(|s| s.unwrap_or_else(|| Err(Error::Http("request was not run".into())))).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::HttpOptions;

    #[test]
    fn request_bodies() {
        let mk = |endpoint| {
            let opts = HttpOptions { url: "http://x".into(), endpoint, model: Some("m".into()), ..Default::default() };
            HttpCompleter::new(opts).unwrap()
        };
        let copts = CompletionOptions { stop: vec!["</s>".into()], seed: Some(3), ..Default::default() };
        let b = request_body(&mk(Endpoint::Completions), "P", &copts);
        assert_eq!((b["prompt"].as_str(), b["model"].as_str(), b["seed"].as_u64()), (Some("P"), Some("m"), Some(3)));
        assert_eq!((b["max_tokens"].as_u64(), b["stop"][0].as_str()), (Some(1024), Some("</s>")));
        assert!((b["temperature"].as_f64().unwrap() - 0.8).abs() < 1e-6);
        let b = request_body(&mk(Endpoint::Chat), "P", &CompletionOptions::default());
        assert_eq!(b["messages"], json!([{"role": "user", "content": "P"}]));
        assert!(b.get("stop").is_none() && b.get("seed").is_none());
    }
}
