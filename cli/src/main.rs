//! `consign-relay`: the relay as a process, and the operator's commands
//! (`migrate`, `status`, `config`, `dead-letters`, `cleanup`). See
//! `consign-relay --help` and `reference.toml`.
//!
//! This crate holds everything the binary needs beyond the libraries:
//! command line (clap), configuration loading (figment), the admin HTTP
//! endpoint (axum) and the Prometheus exporter, so that a service embedding
//! `consign-relay` or `consign-inbox` compiles none of them.

use std::process::ExitCode;

use clap::Parser as _;

mod admin;
mod args;
mod commands;
mod dead_letters;
mod error;
mod load;
mod run;

use args::Cli;

/// Parses the arguments, runs the command, prints any error, returns the
/// exit status (1 on error).
fn main() -> ExitCode {
    let cli = Cli::parse();
    run::init_logging();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::execute(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            if error.is_missing_table() {
                eprintln!("hint: consign's tables are missing; run `consign-relay migrate` first");
            }
            ExitCode::FAILURE
        }
    }
}
