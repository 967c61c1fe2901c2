use clap::Parser;

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
    let cli = spheredb_engine::cli::Cli::parse();
    if let Err(e) = spheredb_engine::cli::run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}
