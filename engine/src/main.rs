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
    let cli = spheredb_engine::cli::Cli::parse();
    if let Err(e) = spheredb_engine::cli::run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}
