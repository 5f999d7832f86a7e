#!/usr/bin/env bash
# The library builds without the CLI's crates: no clap, indicatif, plotters, ureq, anyhow, tokio or axum unless a feature asks
# for them (Cargo.toml, [features]). Run from anywhere: scripts/check-features.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --lib --no-default-features
# The server alone (the library with `serve` and nothing else) builds too.
cargo check --lib --no-default-features --features serve
tree=$(cargo tree --edges normal --no-default-features --prefix none)
status=0
for crate in clap indicatif plotters ureq anyhow tokio axum; do
    if grep -q "^$crate v" <<<"$tree"; then
        echo "error: the library without features still depends on $crate"
        status=1
    fi
done
[ "$status" = 0 ] && echo "ok: the library builds without clap, indicatif, plotters, ureq, anyhow, tokio and axum"
exit "$status"
