use clap::Parser;

/// mimalloc for the node's own (Rust) allocations: under load the write path allocates for
/// every request (HTTP/2 frames, protobuf and log records), and glibc's malloc spent about a
/// sixth of the leader's CPU on it, mimalloc half that (`docs/performance/write-path.md`).
/// RocksDB's C++ allocations keep the system allocator; nothing allocated by one is freed
/// by the other. (mimalloc's default line, v3, is the one measured.)
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code after a panic anywhere in the process (EX_SOFTWARE).
const PANIC_EXIT_CODE: i32 = 70;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SPHEREDB_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    // Fault injection for the Jepsen tester: activates the failpoints named in the
    // FAILPOINTS environment variable. Compiled only with the `failpoints` feature, so a
    // normal build carries neither the hook nor the points.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    // Says so in the log, so a tester can tell a binary without the feature (where
    // FAILPOINTS would silently do nothing) from one with it.
    #[cfg(feature = "failpoints")]
    if let Ok(spec) = std::env::var("FAILPOINTS") {
        tracing::warn!(%spec, "failpoints active");
    }
    // Fail-stop on any panic, on any thread: a panic inside openraft's core (it panics when
    // the monotonic clock goes backwards), the WAL syncer or a service task would otherwise
    // leave a live process with a dead part that peers keep trusting.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        tracing::error!("fatal: panic ({info}); the process exits");
        std::process::exit(PANIC_EXIT_CODE);
    }));
    let cli = spheredb_engine::cli::Cli::parse();
    if let Err(e) = spheredb_engine::cli::run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}
