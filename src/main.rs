//! The `bpo` command line: a thin shell over the library, one file per subcommand under `src/cli/`.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
