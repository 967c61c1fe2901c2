//! A throwaway PostgreSQL server for side-by-side runs: a fresh data directory per run,
//! durability settings stated on the command line (fsync and synchronous commit on), reached
//! over TCP on loopback, stopped on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

/// Where Debian's PostgreSQL 15 server binaries live (`apt-get install -y postgresql`).
pub const DEFAULT_PG_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";
/// Connections the server accepts: the largest client sweep plus a few for setup.
pub const PG_MAX_CONNECTIONS: usize = 300;
/// Shared buffers, enough to hold every benchmark table in memory.
pub const PG_SHARED_BUFFERS_MB: u64 = 256;
/// The account the throwaway cluster is created with (trust authentication, loopback only).
pub const PG_USER: &str = "bench";
/// The unprivileged system user that runs the server when this tool runs as root
/// (PostgreSQL refuses to run as root); Debian's package creates it.
const PG_SYSTEM_USER: &str = "postgres";

/// A running PostgreSQL server in a temporary directory.
pub struct PgServer {
    bin_dir: PathBuf,
    data_dir: PathBuf,
    pub port: u16,
    as_root: bool,
    _dir: tempfile::TempDir,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A command for `program` in `bin_dir`, run as [`PG_SYSTEM_USER`] when `as_root`.
fn pg_command(bin_dir: &Path, program: &str, as_root: bool) -> Command {
    let path = bin_dir.join(program);
    let mut c = if as_root {
        let mut c = Command::new("runuser");
        c.args(["-u", PG_SYSTEM_USER, "--"]).arg(path);
        c
    } else {
        Command::new(path)
    };
    // The unprivileged user may not be allowed into the caller's working directory.
    c.current_dir(std::env::temp_dir());
    c
}

fn run(mut cmd: Command, what: &str) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What `postgres --version` in `bin_dir` prints.
pub fn version(bin_dir: &Path) -> anyhow::Result<String> {
    let mut c = Command::new(bin_dir.join("postgres"));
    c.arg("--version");
    Ok(run(c, "postgres --version")?.trim().to_string())
}

impl PgServer {
    /// Creates a cluster with `initdb` and starts it on `port` with fsync and synchronous
    /// commit on; waits until it accepts connections.
    pub fn start(bin_dir: &Path, port: u16) -> anyhow::Result<PgServer> {
        let postgres = bin_dir.join("postgres");
        if !postgres.exists() {
            bail!(
                "{} not found: install PostgreSQL 15 with `apt-get install -y postgresql` \
                 (benches/install-postgres.sh) or pass --pg-bin-dir",
                postgres.display()
            );
        }
        version(bin_dir)?;
        let as_root = is_root();
        let dir = tempfile::Builder::new().prefix("pg-bench-").tempdir()?;
        if as_root {
            run(
                {
                    let mut c = Command::new("chown");
                    c.arg(format!("{PG_SYSTEM_USER}:")).arg(dir.path());
                    c
                },
                "chown of the PostgreSQL directory",
            )?;
        }
        let data_dir = dir.path().join("data");
        let mut initdb = pg_command(bin_dir, "initdb", as_root);
        initdb
            .arg("-D")
            .arg(&data_dir)
            .args(["--auth=trust", "--username", PG_USER, "--encoding=UTF8"])
            .arg("--no-instructions");
        run(initdb, "initdb")?;
        let options = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} \
             -c fsync=on -c synchronous_commit=on -c full_page_writes=on \
             -c max_connections={PG_MAX_CONNECTIONS} -c shared_buffers={PG_SHARED_BUFFERS_MB}MB",
            dir.path().display()
        );
        let mut start = pg_command(bin_dir, "pg_ctl", as_root);
        start
            .arg("-D")
            .arg(&data_dir)
            .arg("-l")
            .arg(dir.path().join("server.log"))
            .args(["-w", "-o", &options, "start"]);
        // The guard first: a start that times out may leave a server running, which the
        // guard's drop stops before the directory goes.
        let server = PgServer {
            bin_dir: bin_dir.to_path_buf(),
            data_dir,
            port,
            as_root,
            _dir: dir,
        };
        run(start, "pg_ctl start")?;
        Ok(server)
    }

    /// A new connection; its driver task runs until the connection closes.
    pub async fn connect(&self) -> anyhow::Result<tokio_postgres::Client> {
        let config = format!(
            "host=127.0.0.1 port={} user={PG_USER} dbname=postgres",
            self.port
        );
        let (client, connection) = tokio_postgres::connect(&config, tokio_postgres::NoTls)
            .await
            .context("connecting to PostgreSQL")?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                eprintln!("    PostgreSQL connection ended: {e}");
            }
        });
        Ok(client)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let mut stop = pg_command(&self.bin_dir, "pg_ctl", self.as_root);
        stop.arg("-D")
            .arg(&self.data_dir)
            .args(["-w", "-m", "fast", "stop"]);
        if let Err(e) = run(stop, "pg_ctl stop") {
            eprintln!("    warning: {e:#}");
        }
    }
}
