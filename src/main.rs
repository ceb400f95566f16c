//! The `herald` binary: parses the command line and runs one role (see `herald --help`).

use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of glibc malloc: the request and batch paths allocate many short-lived
/// buffers, and glibc's malloc/free showed up as ~15% of the API's CPU in profiles.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    no_transparent_huge_pages();
    let cli = herald::cli::Cli::parse();
    match herald::cli::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Turns transparent huge pages off for this process. mimalloc asks for them on its arenas,
/// and the router's batches then made the kernel zero fresh 2 MiB pages over and over:
/// `clear_page` was 17-24% of the router's CPU in profiles, under 1% without THP (and the
/// peak RSS lower). The flag is per process and holds for every later page fault, so
/// setting it here, after the first allocations, still covers the arenas.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes plain integer arguments and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}
