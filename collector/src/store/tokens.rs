//! Operator API tokens (`api_tokens`, migration 0007).
//!
//! A token reads `rzr_<id>_<secret>` (64 hex characters of secret from the OS's random
//! generator). Only SHA-256 of the secret is stored: the id finds the row and the hashes
//! are compared in constant time. The token itself is shown once, at creation.

use super::audit::AuditEntry;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};
use subtle::ConstantTimeEq;

/// Prefix of every token.
pub const TOKEN_PREFIX: &str = "rzr_";
/// Longest token name (bytes).
pub const MAX_NAME_BYTES: usize = 128;

/// What a token may do; each role includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Reads.
    Viewer,
    /// Reads, commands, escalations, deployments.
    Operator,
    /// Everything, tokens and settings included.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "viewer" => Role::Viewer,
            "operator" => Role::Operator,
            "admin" => Role::Admin,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        Role::parse(s).ok_or_else(|| format!("unknown role {s:?} (viewer, operator or admin)"))
    }
}

/// A token as stored (never its secret).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenInfo {
    pub id: i64,
    pub name: String,
    pub role: Role,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used: Option<DateTime<Utc>>,
}

/// Why a presented token is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    #[error("the token is malformed")]
    Malformed,
    #[error("the token is unknown")]
    Unknown,
    #[error("the token was revoked")]
    Revoked,
    #[error("the token has expired")]
    Expired,
}

/// Why a token operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    #[error("name: {0}")]
    InvalidName(&'static str),
    #[error("the expiry is not in the future")]
    ExpiryPassed,
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

/// A token split into its id and secret, or why not.
pub fn parse_token(token: &str) -> Result<(i64, [u8; 32]), TokenRefusal> {
    let rest = token
        .strip_prefix(TOKEN_PREFIX)
        .ok_or(TokenRefusal::Malformed)?;
    let (id, secret) = rest.split_once('_').ok_or(TokenRefusal::Malformed)?;
    if id.is_empty() || id.len() > 19 || !id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TokenRefusal::Malformed);
    }
    let id: i64 = id.parse().map_err(|_| TokenRefusal::Malformed)?;
    if secret.len() != 64 || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(TokenRefusal::Malformed);
    }
    Ok((id, hash_secret(secret)))
}

fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Whether a stored token may be used at `now` (pure).
pub fn usable(
    stored_hash: &[u8],
    presented_hash: &[u8; 32],
    revoked_at: Option<DateTime<Utc>>,
    expires_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<(), TokenRefusal> {
    // Constant time in the hash bytes: timing tells nothing about how much matched.
    if !bool::from(stored_hash.ct_eq(&presented_hash[..])) {
        return Err(TokenRefusal::Unknown);
    }
    if revoked_at.is_some() {
        return Err(TokenRefusal::Revoked);
    }
    if expires_at.is_some_and(|e| e <= now) {
        return Err(TokenRefusal::Expired);
    }
    Ok(())
}

fn check_name(name: &str) -> Result<(), TokenError> {
    if name.trim().is_empty() {
        return Err(TokenError::InvalidName("empty"));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(TokenError::InvalidName("longer than 128 bytes"));
    }
    if name.chars().any(char::is_control) {
        return Err(TokenError::InvalidName("control characters"));
    }
    Ok(())
}

const COLUMNS: &str = "token_id, name, role, created_at, expires_at, revoked_at, last_used";

fn info(row: &PgRow) -> Result<TokenInfo, sqlx::Error> {
    let role: String = row.try_get(2)?;
    Ok(TokenInfo {
        id: row.try_get(0)?,
        name: row.try_get(1)?,
        role: Role::parse(&role)
            .ok_or_else(|| sqlx::Error::Decode(format!("role {role:?}").into()))?,
        created_at: row.try_get(3)?,
        expires_at: row.try_get(4)?,
        revoked_at: row.try_get(5)?,
        last_used: row.try_get(6)?,
    })
}

/// Creates a token; returns it as stored and the token text (shown once). With
/// `audit`, the audit row is written in the same transaction.
pub async fn create(
    pool: &PgPool,
    name: &str,
    role: Role,
    expires_at: Option<DateTime<Utc>>,
    audit: Option<&AuditEntry>,
) -> Result<(TokenInfo, String), TokenError> {
    check_name(name)?;
    let now = Utc::now();
    if expires_at.is_some_and(|e| e <= now) {
        return Err(TokenError::ExpiryPassed);
    }
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let mut tx = pool.begin().await?;
    let row = sqlx::query(&format!(
        "INSERT INTO api_tokens (name, role, secret_hash, created_at, expires_at)
         VALUES ($1, $2, $3, $4, $5) RETURNING {COLUMNS}"
    ))
    .bind(name)
    .bind(role.as_str())
    .bind(&hash_secret(&secret)[..])
    .bind(now)
    .bind(expires_at)
    .fetch_one(&mut *tx)
    .await?;
    let token = info(&row)?;
    if let Some(audit) = audit {
        audit
            .write(&mut tx, &format!("created token {}", token.id), now)
            .await?;
    }
    tx.commit().await?;
    let text = format!("{TOKEN_PREFIX}{}_{secret}", token.id);
    Ok((token, text))
}

/// Every token, newest first.
pub async fn list(pool: &PgPool) -> Result<Vec<TokenInfo>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM api_tokens ORDER BY token_id DESC"
    ))
    .fetch_all(pool)
    .await?;
    rows.iter().map(info).collect()
}

/// Revokes token `id`; `None` when there is no such token. Revoking twice keeps the
/// first time. With `audit`, the audit row is written in the same transaction.
pub async fn revoke(
    pool: &PgPool,
    id: i64,
    audit: Option<&AuditEntry>,
) -> Result<Option<TokenInfo>, sqlx::Error> {
    let now = Utc::now();
    let mut tx = pool.begin().await?;
    let row = sqlx::query(&format!(
        "UPDATE api_tokens SET revoked_at = coalesce(revoked_at, $2) WHERE token_id = $1
         RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(now)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let token = info(&row)?;
    if let Some(audit) = audit {
        audit
            .write(&mut tx, &format!("revoked token {id}"), now)
            .await?;
    }
    tx.commit().await?;
    Ok(Some(token))
}

/// The token a presented text stands for, if usable now; marks it used (at most once a
/// minute).
pub async fn verify(
    pool: &PgPool,
    token: &str,
) -> Result<Result<TokenInfo, TokenRefusal>, sqlx::Error> {
    let (id, presented) = match parse_token(token) {
        Ok(p) => p,
        Err(refusal) => return Ok(Err(refusal)),
    };
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS}, secret_hash FROM api_tokens WHERE token_id = $1"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else {
        return Ok(Err(TokenRefusal::Unknown));
    };
    let stored: Vec<u8> = row.try_get(7)?;
    let token = info(&row)?;
    let now = Utc::now();
    if let Err(refusal) = usable(&stored, &presented, token.revoked_at, token.expires_at, now) {
        return Ok(Err(refusal));
    }
    if token
        .last_used
        .is_none_or(|used| now.signed_duration_since(used) > chrono::Duration::minutes(1))
    {
        sqlx::query("UPDATE api_tokens SET last_used = $2 WHERE token_id = $1")
            .bind(id)
            .bind(now)
            .execute(pool)
            .await?;
    }
    Ok(Ok(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_strictly() {
        let secret = "ab".repeat(32);
        assert!(parse_token(&format!("rzr_12_{secret}")).is_ok());
        for bad in [
            String::new(),
            format!("rzr__{secret}"),
            format!("rzr_-1_{secret}"),
            format!("rzr_99999999999999999999_{secret}"),
            format!("xyz_1_{secret}"),
            "rzr_1_abc".to_owned(),
            format!("rzr_1_{}", "zz".repeat(32)),
            format!("rzr_1_{secret}0"),
        ] {
            assert_eq!(parse_token(&bad), Err(TokenRefusal::Malformed), "{bad}");
        }
    }

    #[test]
    fn usable_refuses_mismatch_revoked_expired() {
        let now = Utc::now();
        let h = hash_secret("s");
        assert_eq!(usable(&h, &h, None, None, now), Ok(()));
        assert_eq!(
            usable(&h, &hash_secret("t"), None, None, now),
            Err(TokenRefusal::Unknown)
        );
        assert_eq!(
            usable(&h[..31], &h, None, None, now),
            Err(TokenRefusal::Unknown)
        );
        assert_eq!(
            usable(&h, &h, Some(now), None, now),
            Err(TokenRefusal::Revoked)
        );
        assert_eq!(
            usable(&h, &h, None, Some(now), now),
            Err(TokenRefusal::Expired)
        );
        let later = now + chrono::Duration::hours(1);
        assert_eq!(usable(&h, &h, None, Some(later), now), Ok(()));
    }
}
