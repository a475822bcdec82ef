//! `razar-collector token create|list|revoke`: operator API tokens, straight in the
//! collector's database (the running collector need not be up; with an embedded
//! database that is not running, it is started for the command and stopped after).

use anyhow::Context;
use clap::{Args, Subcommand};
use razar_collector::config::{CollectorConfig, Database};
use razar_collector::embedded_pg::{EmbeddedPg, EmbeddedPgOptions};
use razar_collector::store::audit::AuditEntry;
use razar_collector::store::tokens::{self, Role};
use razar_collector::store::Store;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The collector's configuration file.
    #[arg(long, conflicts_with = "data_dir")]
    pub config: Option<PathBuf>,
    /// The data dir of `razar-collector dev` (instead of --config).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: TokenCommand,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Creates a token and prints it (shown this once).
    Create {
        /// viewer, operator or admin.
        #[arg(long)]
        role: Role,
        /// Who or what uses it.
        #[arg(long)]
        name: String,
        /// Lifetime, e.g. `30d` (default: no expiry).
        #[arg(long)]
        expires: Option<String>,
    },
    /// Lists tokens (never their secrets).
    List,
    /// Revokes a token by id.
    Revoke { id: i64 },
}

pub async fn run(args: TokenArgs) -> anyhow::Result<()> {
    let config = match (&args.config, &args.data_dir) {
        (Some(path), _) => CollectorConfig::load(path).map_err(|e| anyhow::anyhow!("{e}"))?,
        (None, Some(dir)) => CollectorConfig::defaults(dir),
        (None, None) => anyhow::bail!("give --config FILE or --data-dir DIR"),
    };
    let (store, mut pg) = match &config.database {
        Database::Url(url) => (Store::connect(url, 2).await?, None),
        Database::Embedded => {
            let options = EmbeddedPgOptions::new(config.data_dir.join("postgres"));
            let socket = options.root.join("run");
            let running = sqlx::postgres::PgConnectOptions::new_without_pgpass()
                .socket(&socket)
                .port(razar_collector::embedded_pg::SOCKET_PORT)
                .username("postgres")
                .database(&options.database);
            match Store::connect_with(running, 2).await {
                Ok(store) => (store, None),
                Err(_) => {
                    let pg = EmbeddedPg::start(options)
                        .await
                        .context("starting the embedded PostgreSQL")?;
                    (
                        Store::connect_with(pg.connect_options(), 2).await?,
                        Some(pg),
                    )
                }
            }
        }
    };
    store.migrate().await?;
    let result = command(&store, args.command).await;
    store.close().await;
    if let Some(pg) = pg.as_mut() {
        pg.stop().await?;
    }
    result
}

/// The audit row of a token change made on the collector's host.
fn local_audit(route: &str, arguments: serde_json::Value) -> AuditEntry {
    let user = nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| nix::unistd::getuid().to_string());
    AuditEntry {
        token_id: None,
        who: format!("local:{user}"),
        role: "admin".into(),
        method: "CLI".into(),
        route: route.into(),
        arguments,
        request_id: hex::encode(rand::random::<[u8; 16]>()),
    }
}

async fn command(store: &Store, command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create {
            role,
            name,
            expires,
        } => {
            let now = chrono::Utc::now();
            let expires_at = match expires {
                None => None,
                Some(text) => {
                    let d = humantime::parse_duration(&text)
                        .with_context(|| format!("--expires {text:?}"))?;
                    Some(now + chrono::Duration::from_std(d).context("--expires is too long")?)
                }
            };
            let audit = local_audit(
                "razar-collector token create",
                serde_json::json!({ "name": name, "role": role.as_str(), "expires_at": expires_at }),
            );
            let (info, text) =
                tokens::create(store.pool(), &name, role, expires_at, Some(&audit)).await?;
            eprintln!(
                "token {} ({}, role {}{}); it is shown this once:",
                info.id,
                info.name,
                info.role,
                info.expires_at
                    .map(|e| format!(", expires {}", e.to_rfc3339()))
                    .unwrap_or_default()
            );
            println!("{text}");
        }
        TokenCommand::List => {
            println!(
                "{:>6}  {:<9} {:<26} {:<26} {:<8} NAME",
                "ID", "ROLE", "CREATED", "EXPIRES", "STATE"
            );
            for t in tokens::list(store.pool()).await? {
                let state = if t.revoked_at.is_some() {
                    "revoked"
                } else if t.expires_at.is_some_and(|e| e <= chrono::Utc::now()) {
                    "expired"
                } else {
                    "active"
                };
                println!(
                    "{:>6}  {:<9} {:<20} {:<20} {:<8} {}",
                    t.id,
                    t.role.as_str(),
                    t.created_at.to_rfc3339(),
                    t.expires_at
                        .map(|e| e.to_rfc3339())
                        .unwrap_or_else(|| "never".into()),
                    state,
                    t.name
                );
            }
        }
        TokenCommand::Revoke { id } => match tokens::revoke(
            store.pool(),
            id,
            Some(&local_audit(
                "razar-collector token revoke",
                serde_json::json!({ "id": id }),
            )),
        )
        .await?
        {
            Some(t) => println!("token {} ({}) revoked", t.id, t.name),
            None => anyhow::bail!("no token {id}"),
        },
    }
    Ok(())
}
