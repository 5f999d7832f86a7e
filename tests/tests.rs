//! All integration tests compile into one binary (ripgrep-style); each module covers one stage.

mod bootstrap; // records, resume, shards, injection through a fake LLM, pairs and `bpo pairs`
mod bootstrap_http; // the HTTP completer and `bpo bootstrap inject` against a loopback test server
mod bootstrap_model; // weaken + local inject on the tiny checkpoint: end to end, kill/resume, shards, contrast decoding
mod checkpointing; // --gradient-checkpointing: the same step with and without, fused and generic, dropout, vision tower, resume
mod cli; // the binary on the tiny fixture model: generate, score, and bad input
mod demo; // `bpo demo --quick` end to end: every stage's files, the report, the model cache
mod engine; // the generation engine: batched = one at a time (greedy, sampled), budgets, policies; generate --questions
mod eval; // POPE and CHAIR scoring through the binary, bad files
mod faults_eval; // judge caches that are not, closed stdout, settings through every door, suites checked first, races
mod faults_input; // hostile input: garbage/hanging servers, image bombs, impossible configs, BOMs, fuzzed readers
mod faults_io; // outputs: links, FIFOs, folders, inputs as outputs, unwritable folders, locks, kill -9 and resume
mod faults_train; // numeric options out of range, divergence (exit 3), non-finite weights, kill -9 + resume, exit codes
mod judge; // MM-Vet, LLaVA-Bench and MMHal-Bench against a loopback mock judge: prompts, parsing, scores, cache, resume
mod r#loop; // `bpo loop`: two rounds end to end on the tiny model, SIGKILL at a seeded random point then restart = uninterrupted
mod mdpo; // --objective mdpo: image-side rows, 3 ln 2, finite differences, released trainer, resume, CLI
mod model; // parity with transformers: logits, greedy decoding, log-probs, gradients
mod runtime; // what CUDA runs, on the CPU: the device-generic ops path, bf16 compute with f32 masters
mod serve; // `bpo serve` on the tiny model: parity with generate, streaming, adapters, the error table, SIGTERM, bpo's clients
mod suite; // `bpo eval suite` and judged commands with --model on the tiny model, `bpo eval compare` over suites
mod train; // DPO/SFT training: TRL parity, overfitting, resume, merge, adapters, `bpo train/sft/merge`
mod util;
mod vision; // preprocessing parity with transformers, noise schedule, `bpo distort` // what the tests share: fixtures, the binary, paths as arguments, failure checks
