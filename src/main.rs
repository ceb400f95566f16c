//! The `herald` binary: parses the command line and runs one role (see `herald --help`).

use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of glibc malloc: the request and batch paths allocate many short-lived
/// buffers, and glibc's malloc/free showed up as ~15% of the API's CPU in profiles.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = herald::cli::Cli::parse();
    match herald::cli::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
