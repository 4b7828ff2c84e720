//! `consign-relay`: see `consign-relay --help`.

fn main() -> std::process::ExitCode {
    consign_relay::cli::main()
}
