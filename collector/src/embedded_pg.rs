//! A private PostgreSQL cluster run from the server binaries installed on the machine:
//! `initdb` once under a data dir, `pg_ctl start` on a unix socket with no TCP listener,
//! `pg_ctl stop -m fast` on [`EmbeddedPg::stop`] or, best effort, on drop.
//!
//! PostgreSQL refuses to run as root, so when the collector runs as root the server
//! runs as the `postgres` user (the data dir is handed to it with `chown`).

use std::fmt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

/// Port number in the socket file's name (`.s.PGSQL.<port>`); no TCP port is opened.
pub const SOCKET_PORT: u16 = 5432;
/// Longest unix socket path the kernel accepts (108 bytes with the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;
const INSTALL_HINT: &str = "install it (`apt-get install postgresql`) or set a database URL";

/// Why the embedded cluster could not be prepared, started or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EmbeddedPgError {
    /// No `initdb`/`pg_ctl`/`postgres` found.
    #[error("PostgreSQL server binaries not found (looked in {searched}): {INSTALL_HINT}")]
    NotInstalled { searched: String },
    /// Running as root but there is no `postgres` user to run the server as.
    #[error("running as root and there is no `postgres` user to run PostgreSQL as: create one or set a database URL")]
    NoPostgresUser,
    /// A directory the server needs could not be created, read or handed over.
    #[error("{path}: {reason}")]
    Dir { path: PathBuf, reason: String },
    /// A PostgreSQL tool could not be run or exited with an error.
    #[error("{tool} failed: {detail}")]
    Tool { tool: String, detail: String },
    /// The server did not accept connections before the deadline.
    #[error("PostgreSQL did not become ready within {0:?} (see {1})")]
    NotReady(Duration, PathBuf),
    /// Talking to the freshly started server failed.
    #[error("PostgreSQL: {0}")]
    Sql(#[from] sqlx::Error),
}

/// How to run the cluster.
#[derive(Debug, Clone)]
pub struct EmbeddedPgOptions {
    /// Everything lives under this directory: `data/` (the cluster), `run/` (the socket),
    /// `postgres.log`.
    pub root: PathBuf,
    /// Database created for the collector.
    pub database: String,
    /// Directories searched for the server binaries, in order. `None`: `PATH`, then
    /// `/usr/lib/postgresql/*/bin` with the highest version first.
    pub search_dirs: Option<Vec<PathBuf>>,
    /// `fsync` (on for the product; tests turn it off for speed).
    pub fsync: bool,
    pub max_connections: u32,
    /// `shared_buffers`, e.g. `"128MB"`.
    pub shared_buffers: String,
    /// How long to wait for the server to accept connections.
    pub ready_timeout: Duration,
}

impl EmbeddedPgOptions {
    /// Product defaults for a cluster under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        EmbeddedPgOptions {
            root: root.into(),
            database: "razar".to_owned(),
            search_dirs: None,
            fsync: true,
            max_connections: 200,
            shared_buffers: "128MB".to_owned(),
            ready_timeout: Duration::from_secs(60),
        }
    }
}

/// The server binaries of one PostgreSQL installation.
#[derive(Debug, Clone)]
struct Binaries {
    initdb: PathBuf,
    pg_ctl: PathBuf,
}

/// The user the server runs as, when we are root.
#[derive(Debug, Clone, Copy)]
struct RunAs {
    uid: u32,
    gid: u32,
}

/// A running private PostgreSQL cluster. Stops the server when dropped.
pub struct EmbeddedPg {
    options: EmbeddedPgOptions,
    binaries: Binaries,
    run_as: Option<RunAs>,
    running: bool,
}

impl fmt::Debug for EmbeddedPg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedPg")
            .field("root", &self.options.root)
            .field("running", &self.running)
            .finish()
    }
}

impl EmbeddedPg {
    /// Prepares the cluster (`initdb` on first use, reused afterwards), starts it, waits
    /// until it accepts connections and creates the database if absent.
    pub async fn start(options: EmbeddedPgOptions) -> Result<EmbeddedPg, EmbeddedPgError> {
        let binaries = find_binaries(options.search_dirs.as_deref())?;
        let run_as = if nix::unistd::geteuid().is_root() {
            let user = nix::unistd::User::from_name("postgres")
                .ok()
                .flatten()
                .ok_or(EmbeddedPgError::NoPostgresUser)?;
            Some(RunAs {
                uid: user.uid.as_raw(),
                gid: user.gid.as_raw(),
            })
        } else {
            None
        };
        let mut pg = EmbeddedPg {
            options,
            binaries,
            run_as,
            running: false,
        };
        pg.prepare_dirs()?;
        if !pg.data_dir().join("PG_VERSION").exists() {
            pg.initdb()?;
        }
        pg.write_settings()?;
        pg.start_server().await?;
        pg.create_database().await?;
        Ok(pg)
    }

    /// A sqlx URL reaching the database over the unix socket.
    pub fn url(&self) -> String {
        format!(
            "postgres:///{}?host={}&port={}&user=postgres",
            self.options.database,
            percent_encode(&self.socket_dir().to_string_lossy()),
            SOCKET_PORT
        )
    }

    /// Connect options equivalent to [`EmbeddedPg::url`].
    pub fn connect_options(&self) -> PgConnectOptions {
        PgConnectOptions::new_without_pgpass()
            .socket(self.socket_dir())
            .port(SOCKET_PORT)
            .username("postgres")
            .database(&self.options.database)
    }

    /// The directory holding the unix socket (for `psql -h DIR`).
    pub fn socket_dir(&self) -> PathBuf {
        self.options.root.join("run")
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.options.root.join("data")
    }

    /// The server's log file.
    pub fn log_file(&self) -> PathBuf {
        self.options.root.join("postgres.log")
    }

    /// Stops the server (`pg_ctl stop -m fast`) and waits for it to exit.
    pub async fn stop(&mut self) -> Result<(), EmbeddedPgError> {
        if !self.running {
            return Ok(());
        }
        let pg_ctl = self.pg_ctl_command(&["stop", "-m", "fast", "-w", "-t", "60"]);
        let run_as = self.run_as;
        let output = tokio::task::spawn_blocking(move || run(pg_ctl, run_as))
            .await
            .map_err(|e| EmbeddedPgError::Tool {
                tool: "pg_ctl stop".to_owned(),
                detail: e.to_string(),
            })?;
        check("pg_ctl stop", output?)?;
        self.running = false;
        Ok(())
    }

    /// Stops the server and starts it again on the same data dir.
    pub async fn restart(&mut self) -> Result<(), EmbeddedPgError> {
        self.stop().await?;
        self.start_server().await
    }

    /// Kills the server the hard way (`pg_ctl stop -m immediate`: no shutdown
    /// checkpoint, crash recovery on the next start). For fault-injection tests.
    pub async fn crash(&mut self) -> Result<(), EmbeddedPgError> {
        let pg_ctl = self.pg_ctl_command(&["stop", "-m", "immediate", "-w", "-t", "60"]);
        let run_as = self.run_as;
        let output = tokio::task::spawn_blocking(move || run(pg_ctl, run_as))
            .await
            .map_err(|e| EmbeddedPgError::Tool {
                tool: "pg_ctl stop".to_owned(),
                detail: e.to_string(),
            })?;
        check("pg_ctl stop -m immediate", output?)?;
        self.running = false;
        Ok(())
    }

    /// Starts the server again after [`EmbeddedPg::stop`] or [`EmbeddedPg::crash`].
    pub async fn start_again(&mut self) -> Result<(), EmbeddedPgError> {
        self.start_server().await
    }

    fn prepare_dirs(&self) -> Result<(), EmbeddedPgError> {
        let root = &self.options.root;
        for dir in [root.clone(), self.data_dir(), self.socket_dir()] {
            std::fs::create_dir_all(&dir).map_err(|e| dir_error(&dir, e))?;
        }
        let socket = self.socket_dir().join(format!(".s.PGSQL.{SOCKET_PORT}"));
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(EmbeddedPgError::Dir {
                path: socket,
                reason: format!(
                    "unix socket path longer than {MAX_SOCKET_PATH} bytes: choose a shorter data dir"
                ),
            });
        }
        set_mode(&self.data_dir(), 0o700)?;
        set_mode(&self.socket_dir(), 0o700)?;
        if let Some(run_as) = self.run_as {
            for dir in [root.clone(), self.data_dir(), self.socket_dir()] {
                nix::unistd::chown(
                    &dir,
                    Some(nix::unistd::Uid::from_raw(run_as.uid)),
                    Some(nix::unistd::Gid::from_raw(run_as.gid)),
                )
                .map_err(|e| dir_error(&dir, e.into()))?;
            }
            // The server must be able to reach its directories through every ancestor.
            for ancestor in root.ancestors().skip(1) {
                let Ok(meta) = std::fs::metadata(ancestor) else {
                    continue;
                };
                if meta.uid() != run_as.uid && meta.mode() & 0o001 == 0 {
                    return Err(EmbeddedPgError::Dir {
                        path: ancestor.to_path_buf(),
                        reason: "PostgreSQL runs as user `postgres`, which cannot enter this directory (chmod o+x it or choose another data dir)".to_owned(),
                    });
                }
            }
        }
        Ok(())
    }

    fn initdb(&self) -> Result<(), EmbeddedPgError> {
        let mut cmd = Command::new(&self.binaries.initdb);
        cmd.arg("-D").arg(self.data_dir()).args([
            "--username=postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
        ]);
        if !self.options.fsync {
            cmd.arg("--no-sync");
        }
        check("initdb", run(cmd, self.run_as)?)?;
        let conf = self.data_dir().join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).map_err(|e| dir_error(&conf, e))?;
        text.push_str(
            "\n# Razar: settings written at every start\ninclude_if_exists = 'razar.conf'\n",
        );
        std::fs::write(&conf, text).map_err(|e| dir_error(&conf, e))?;
        Ok(())
    }

    fn write_settings(&self) -> Result<(), EmbeddedPgError> {
        let o = &self.options;
        let fsync = if o.fsync { "on" } else { "off" };
        let settings = format!(
            "listen_addresses = ''\n\
             port = {SOCKET_PORT}\n\
             unix_socket_directories = '{socket}'\n\
             unix_socket_permissions = 0700\n\
             max_connections = {max_connections}\n\
             shared_buffers = '{shared_buffers}'\n\
             fsync = {fsync}\n\
             full_page_writes = {fsync}\n\
             wal_buffers = '16MB'\n\
             max_wal_size = '4GB'\n\
             checkpoint_timeout = '15min'\n\
             logging_collector = off\n",
            socket = self.socket_dir().display().to_string().replace('\'', "''"),
            max_connections = o.max_connections,
            shared_buffers = o.shared_buffers.replace('\'', ""),
        );
        let path = self.data_dir().join("razar.conf");
        std::fs::write(&path, settings).map_err(|e| dir_error(&path, e))?;
        if let Some(run_as) = self.run_as {
            nix::unistd::chown(
                &path,
                Some(nix::unistd::Uid::from_raw(run_as.uid)),
                Some(nix::unistd::Gid::from_raw(run_as.gid)),
            )
            .map_err(|e| dir_error(&path, e.into()))?;
        }
        Ok(())
    }

    async fn start_server(&mut self) -> Result<(), EmbeddedPgError> {
        // A server left behind by a killed collector still holds the data dir: stop it.
        let status = run(self.pg_ctl_command(&["status"]), self.run_as)?;
        if status.status.success() {
            let stop = self.pg_ctl_command(&["stop", "-m", "fast", "-w", "-t", "60"]);
            check("pg_ctl stop (leftover server)", run(stop, self.run_as)?)?;
        }
        let log = self.log_file();
        if let Some(run_as) = self.run_as {
            if !log.exists() {
                std::fs::write(&log, b"").map_err(|e| dir_error(&log, e))?;
            }
            nix::unistd::chown(
                &log,
                Some(nix::unistd::Uid::from_raw(run_as.uid)),
                Some(nix::unistd::Gid::from_raw(run_as.gid)),
            )
            .map_err(|e| dir_error(&log, e.into()))?;
        }
        let timeout = self.options.ready_timeout.as_secs().max(1).to_string();
        let mut start = self.pg_ctl_command(&["start", "-w", "-t", &timeout]);
        start.arg("-l").arg(&log);
        let run_as = self.run_as;
        let output = tokio::task::spawn_blocking(move || run(start, run_as))
            .await
            .map_err(|e| EmbeddedPgError::Tool {
                tool: "pg_ctl start".to_owned(),
                detail: e.to_string(),
            })??;
        check("pg_ctl start", output).map_err(|e| match e {
            EmbeddedPgError::Tool { tool, detail } => EmbeddedPgError::Tool {
                tool,
                detail: format!("{detail} (server log: {})", log.display()),
            },
            other => other,
        })?;
        self.running = true;
        self.wait_ready().await
    }

    async fn wait_ready(&self) -> Result<(), EmbeddedPgError> {
        let deadline = Instant::now() + self.options.ready_timeout;
        let options = self.connect_options().database("postgres");
        loop {
            match options.connect().await {
                Ok(conn) => {
                    let _ = conn.close().await;
                    return Ok(());
                }
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(_) => {
                    return Err(EmbeddedPgError::NotReady(
                        self.options.ready_timeout,
                        self.log_file(),
                    ))
                }
            }
        }
    }

    async fn create_database(&self) -> Result<(), EmbeddedPgError> {
        let mut conn = self
            .connect_options()
            .database("postgres")
            .connect()
            .await?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(&self.options.database)
                .fetch_one(&mut conn)
                .await?;
        if !exists {
            let name = self.options.database.replace('"', "\"\"");
            sqlx::query(&format!("CREATE DATABASE \"{name}\""))
                .execute(&mut conn)
                .await?;
        }
        conn.close().await?;
        Ok(())
    }

    fn pg_ctl_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.binaries.pg_ctl);
        cmd.arg("-D").arg(self.data_dir()).args(args);
        cmd
    }
}

impl Drop for EmbeddedPg {
    fn drop(&mut self) {
        if self.running {
            let stop = self.pg_ctl_command(&["stop", "-m", "fast", "-w", "-t", "60"]);
            let _ = run(stop, self.run_as);
        }
    }
}

/// Finds `initdb` and `pg_ctl` (and checks `postgres` sits beside them).
fn find_binaries(search_dirs: Option<&[PathBuf]>) -> Result<Binaries, EmbeddedPgError> {
    let dirs = match search_dirs {
        Some(dirs) => dirs.to_vec(),
        None => default_search_dirs(),
    };
    for dir in &dirs {
        let initdb = dir.join("initdb");
        let pg_ctl = dir.join("pg_ctl");
        if is_executable(&initdb) && is_executable(&pg_ctl) && is_executable(&dir.join("postgres"))
        {
            return Ok(Binaries { initdb, pg_ctl });
        }
    }
    let searched = if dirs.is_empty() {
        "no directories".to_owned()
    } else {
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(EmbeddedPgError::NotInstalled { searched })
}

/// `PATH`, then `/usr/lib/postgresql/<version>/bin` from the highest version down.
fn default_search_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .collect();
    versions.sort_by_key(|v| std::cmp::Reverse(v.0));
    dirs.extend(versions.into_iter().map(|(_, dir)| dir));
    dirs
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Runs a PostgreSQL tool, as the `postgres` user when we are root.
fn run(mut cmd: Command, run_as: Option<RunAs>) -> Result<Output, EmbeddedPgError> {
    if let Some(run_as) = run_as {
        cmd.uid(run_as.uid).gid(run_as.gid);
        // Tools look for a readable working directory.
        cmd.current_dir("/");
    }
    cmd.stdin(Stdio::null()).env("LC_ALL", "C");
    let tool = Path::new(cmd.get_program())
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    cmd.output().map_err(|e| EmbeddedPgError::Tool {
        tool,
        detail: e.to_string(),
    })
}

fn check(tool: &str, output: Output) -> Result<Output, EmbeddedPgError> {
    if output.status.success() {
        return Ok(output);
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let detail = format!("{}: {} {}", output.status, stderr.trim(), stdout.trim());
    Err(EmbeddedPgError::Tool {
        tool: tool.to_owned(),
        detail: detail.trim().to_owned(),
    })
}

fn set_mode(path: &Path, mode: u32) -> Result<(), EmbeddedPgError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| dir_error(path, e))
}

fn dir_error(path: &Path, e: std::io::Error) -> EmbeddedPgError {
    EmbeddedPgError::Dir {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Percent-encodes everything but unreserved characters and `/`.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binaries_is_a_one_line_error_with_the_fix() {
        let empty = tempfile::tempdir().expect("tempdir");
        let err = find_binaries(Some(&[empty.path().to_path_buf()])).expect_err("no binaries");
        let text = err.to_string();
        assert!(text.contains("apt-get install postgresql"), "{text}");
        assert!(text.contains("database URL"), "{text}");
        assert!(!text.contains('\n'), "{text}");
    }

    #[test]
    fn percent_encoding_keeps_paths_readable() {
        assert_eq!(percent_encode("/tmp/a b/run"), "/tmp/a%20b/run");
    }
}
