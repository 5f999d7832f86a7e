//! The `bpo` command line: a thin shell over the library, one file per subcommand under `src/cli/`.

mod cli;

fn main() {
    if let Err(e) = cli::run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
