//! A private PostgreSQL cluster per test, from the server binaries installed on the
//! machine (through the collector's embedded PostgreSQL), in a temporary directory.
//! Dropping it stops the server synchronously, so no `postgres` outlives a test.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use razar_collector::embedded_pg::{EmbeddedPg, EmbeddedPgError, EmbeddedPgOptions};
use razar_collector::store::Store;
use sqlx::PgPool;

/// A running throwaway cluster with a `razar` database.
#[derive(Debug)]
pub struct TestPg {
    // Field order matters: the server stops before its directory is removed.
    pg: EmbeddedPg,
    dir: tempfile::TempDir,
}

impl TestPg {
    /// Starts a fresh cluster (fsync off: tests need speed, not durability across a
    /// power cut).
    pub async fn start() -> Result<TestPg, EmbeddedPgError> {
        let dir = tempfile::Builder::new()
            .prefix("razar-pg")
            .tempdir()
            .map_err(|e| EmbeddedPgError::Dir {
                path: std::env::temp_dir(),
                reason: e.to_string(),
            })?;
        // The server may run as `postgres`: it must be able to enter the directory.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).map_err(
            |e| EmbeddedPgError::Dir {
                path: dir.path().to_path_buf(),
                reason: e.to_string(),
            },
        )?;
        let mut options = EmbeddedPgOptions::new(dir.path().join("pg"));
        options.fsync = false;
        options.shared_buffers = "64MB".to_owned();
        let pg = EmbeddedPg::start(options).await?;
        Ok(TestPg { pg, dir })
    }

    /// sqlx URL of the `razar` database.
    pub fn url(&self) -> String {
        self.pg.url()
    }

    /// A fresh pool on the database.
    pub async fn pool(&self) -> Result<PgPool, sqlx::Error> {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect_with(self.pg.connect_options())
            .await
    }

    /// A store on the database, migrated.
    pub async fn store(&self) -> Result<Store, razar_collector::store::StoreError> {
        let store = Store::connect(&self.url(), 8).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Stops the server and starts it again on the same data (fast shutdown).
    pub async fn restart(&mut self) -> Result<(), EmbeddedPgError> {
        self.pg.restart().await
    }

    /// Kills the server without a shutdown checkpoint (crash recovery on start).
    pub async fn crash(&mut self) -> Result<(), EmbeddedPgError> {
        self.pg.crash().await
    }

    /// Starts the server again after [`TestPg::crash`] or [`TestPg::stop`].
    pub async fn start_again(&mut self) -> Result<(), EmbeddedPgError> {
        self.pg.start_again().await
    }

    /// Stops the server (also done on drop).
    pub async fn stop(&mut self) -> Result<(), EmbeddedPgError> {
        self.pg.stop().await
    }

    /// The cluster itself.
    pub fn embedded(&self) -> &EmbeddedPg {
        &self.pg
    }

    /// The temporary directory holding the cluster.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
