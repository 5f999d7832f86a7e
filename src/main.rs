//! The `bpo` command line: a thin shell over the library, one file per subcommand under `src/cli/`.

mod cli;

/// Counts live heap bytes, so that `bpo bench` can report exact peak memory (two atomic updates per allocation).
#[global_allocator]
static ALLOC: bpo::memory::CountingAlloc = bpo::memory::CountingAlloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
