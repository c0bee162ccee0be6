//! The `update-agent` binary: one CLI over the library. Errors become `anyhow` only here.

use std::process::ExitCode;

use clap::Parser;

mod cli;

// build.rs links release binaries without unwind tables, which only an aborting panic survives.
#[cfg(all(no_unwind_tables, panic = "unwind"))]
compile_error!(
    "release binaries are linked without unwind tables: keep panic = \"abort\" in Cargo.toml's release profile"
);

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    args.init_logging();
    match cli::run(args) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(cli::EXIT_ERROR)
        }
    }
}
