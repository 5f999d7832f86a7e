//! All integration tests compile into one binary (ripgrep-style); each module covers one stage.

mod bootstrap; // records, resume, shards, injection through a fake LLM, pairs and `bpo pairs`
mod bootstrap_http; // the HTTP completer and `bpo bootstrap inject` against a loopback test server
