//! `bpo serve`: a model and its adapters behind an OpenAI-compatible HTTP API (docs/serve.md).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use bpo::serve::{ServeOptions, Served};

use super::generate::BatchArgs;
use super::ModelArgs;

/// `bpo serve` (its help is on the subcommand in cli/mod.rs).
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on (0.0.0.0: every interface; then set an API key).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the address is printed on stderr).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Model id of the base model. Default: the model folder's name.
    #[arg(long)]
    served_model_name: Option<String>,
    /// Require `Authorization: Bearer KEY` on /v1/ requests. Prefer --api-key-env: a command line is visible to
    /// every user of the machine.
    #[arg(long, conflicts_with = "api_key_env", value_parser = super::range::not_empty)]
    api_key: Option<String>,
    /// Read the API key from this environment variable (which must be set).
    #[arg(long, value_name = "VAR")]
    api_key_env: Option<String>,
    #[command(flatten)]
    batch: BatchArgs,
    /// Requests waiting or running at most, all models together; the next gets 503 with Retry-After.
    #[arg(long, default_value_t = 1024, value_parser = super::range::at_least_one)]
    max_queue: usize,
    /// Largest request body in bytes (a base64 image is 4/3 of its file); a bigger one gets 413.
    #[arg(long, default_value_t = 32 << 20, value_parser = super::range::at_least_one)]
    max_body_bytes: usize,
    /// Largest max_tokens a request may ask for; a request without max_tokens gets this much, within the context.
    #[arg(long, default_value_t = 4096, value_parser = super::range::at_least_one)]
    max_tokens_cap: usize,
    /// Accept `file://` image URLs of files inside this folder (links resolved first). Without it only data URLs
    /// are accepted; http(s) URLs are never fetched.
    #[arg(long, value_name = "DIR")]
    allowed_local_media_path: Option<PathBuf>,
    /// Seconds running requests get to finish after Ctrl-C or SIGTERM.
    #[arg(long, default_value_t = 30)]
    shutdown_timeout_s: u64,
}

/// `NAME=DIR`, or `DIR` (named after the folder).
fn adapter_spec(arg: &Path) -> anyhow::Result<(String, PathBuf)> {
    let text = arg.to_str().with_context(|| format!("--adapter {}: not UTF-8", arg.display()))?;
    if let Some((name, dir)) = text.split_once('=').filter(|(n, _)| !n.is_empty() && !n.contains('/')) {
        return Ok((name.to_string(), PathBuf::from(dir)));
    }
    let name = arg.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if name.is_empty() {
        bail!("--adapter {}: give it a name, as NAME=DIR", arg.display());
    }
    Ok((name, arg.to_path_buf()))
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let api_key = match (&a.api_key, &a.api_key_env) {
        (Some(k), _) => Some(k.clone()),
        (None, Some(var)) => Some(
            bpo::http::api_key_from_env(var)?
                .with_context(|| format!("--api-key-env {var}: the environment variable is not set or empty"))?,
        ),
        (None, None) => None,
    };
    let adapters = a.model.adapter.iter().map(|p| adapter_spec(p)).collect::<anyhow::Result<Vec<_>>>()?;
    let media_dir = a
        .allowed_local_media_path
        .as_ref()
        .map(|d| d.canonicalize().with_context(|| format!("--allowed-local-media-path {}", d.display())))
        .transpose()?;
    let base_args = ModelArgs { adapter: Vec::new(), ..a.model.clone() };
    let vlm = base_args.load()?;
    let mut served = Served::new(vlm, a.served_model_name.clone().unwrap_or_else(|| a.model.model_id()));
    for (name, dir) in &adapters {
        served
            .add_adapter(name, dir, a.model.allow_non_finite)
            .with_context(|| format!("adapter {}", dir.display()))?;
    }
    let listener = std::net::TcpListener::bind((a.host.as_str(), a.port))
        .with_context(|| format!("listening on {}:{}", a.host, a.port))?;
    let addr = listener.local_addr()?;
    errln!(
        "serving {} on http://{addr}/v1{}",
        served.names.join(", "),
        if api_key.is_some() { " (API key required)" } else { "" }
    );
    let opts = ServeOptions {
        api_key,
        engine: a.batch.engine(),
        max_queue: a.max_queue,
        max_body_bytes: a.max_body_bytes,
        max_tokens: a.max_tokens_cap,
        media_dir,
        shutdown_timeout: Duration::from_secs(a.shutdown_timeout_s),
    };
    bpo::serve::run(listener, served, opts)?;
    errln!("stopped");
    Ok(())
}
