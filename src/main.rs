//! The `bpo` command line: a thin shell over the library, one file per subcommand under `src/cli/`.

mod cli;

fn main() -> std::process::ExitCode {
    cli::run().unwrap_or_else(|e| {
        eprintln!("error: {}", cli::error_line(&e));
        cli::exit_code(&e)
    })
}
