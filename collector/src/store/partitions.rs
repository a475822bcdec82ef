//! Daily partitions of the sample tables: created ahead of the data, dropped whole by
//! retention (never a `DELETE` of sample rows).

use chrono::{DateTime, NaiveDate, Utc};

use super::{day_of, Store, StoreError};

/// The partitioned sample tables, each with partitions named `<table>_pYYYYMMDD`.
const SAMPLE_TABLES: [&str; 3] = ["samples", "sample_chunks", "rollups_1m"];
const DAY_MS: i64 = 86_400_000;

/// Longest a summarizing pass waits for a partition's lock (held by a vacuum): under
/// PostgreSQL's `deadlock_timeout` (1 s), after which a waiter cancels an autovacuum.
const SUMMARIZE_LOCK_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

impl Store {
    /// Creates today's and tomorrow's partitions (call at start and daily).
    pub async fn ensure_partitions(&self, now: DateTime<Utc>) -> Result<(), StoreError> {
        let today = day_of(now.timestamp_millis());
        self.ensure_days(&[today, today + 1]).await
    }

    /// Makes sure the partitions of these days (days since the Unix epoch) exist.
    pub(crate) async fn ensure_days(&self, days: &[i64]) -> Result<(), StoreError> {
        let missing: Vec<i64> = {
            let known = self.days.lock().unwrap_or_else(|e| e.into_inner());
            days.iter()
                .copied()
                .filter(|d| !known.contains(d))
                .collect()
        };
        for day in missing {
            let Some(date) = date_of_day(day) else {
                continue;
            };
            sqlx::query("SELECT razar_ensure_day($1)")
                .bind(date)
                .execute(&self.pool)
                .await?;
            self.days
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(day);
        }
        Ok(())
    }

    /// Summarizes the block ranges filled since the last call in the raw samples'
    /// `series_id` BRIN (every partition's), so reads by series skip the pages of other
    /// series right away rather than once vacuum gets to them (a range not summarized
    /// matches every query; the `ts` BRIN is left to autosummarize and vacuum, as
    /// compaction needs it no sooner). Returns how many ranges it summarized. Only new ranges are read, but each of
    /// their rows once: the collector calls this while history is being read (see
    /// [`super::TailReads`]). A partition dropped or truncated meanwhile is skipped.
    pub async fn summarize_new_ranges(&self) -> Result<i64, StoreError> {
        let indexes: Vec<sqlx::postgres::types::Oid> = sqlx::query_scalar(
            "SELECT i.indexrelid
             FROM pg_inherits inh
             JOIN pg_index i ON i.indrelid = inh.inhrelid
             JOIN pg_class ic ON ic.oid = i.indexrelid
             JOIN pg_am am ON am.oid = ic.relam
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
             WHERE inh.inhparent = 'samples'::regclass AND am.amname = 'brin'
               AND a.attname = 'series_id'
             ORDER BY inh.inhrelid DESC",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut summarized = 0;
        for index in indexes {
            match self.summarize_one(index).await {
                Ok(n) => summarized += i64::from(n),
                // A vacuum holds the partition (it summarizes the ranges itself): skip
                // it this pass rather than wait, and never long enough for PostgreSQL to
                // cancel an autovacuum for our sake.
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => {}
                Err(error) => {
                    let exists: bool =
                        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_class WHERE oid = $1)")
                            .bind(index)
                            .fetch_one(&self.pool)
                            .await?;
                    if exists {
                        return Err(error.into());
                    }
                }
            }
        }
        self.metrics
            .ranges_summarized
            .inc_by(u64::try_from(summarized).unwrap_or(0));
        Ok(summarized)
    }

    /// `brin_summarize_new_values` on one index, waiting at most [`SUMMARIZE_LOCK_WAIT`]
    /// for its table's lock (SQLSTATE 55P03 when a vacuum holds it).
    async fn summarize_one(&self, index: sqlx::postgres::types::Oid) -> Result<i32, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(&format!(
            "SET LOCAL lock_timeout = {}",
            SUMMARIZE_LOCK_WAIT.as_millis()
        ))
        .execute(&mut *tx)
        .await?;
        let n = sqlx::query_scalar("SELECT brin_summarize_new_values($1::oid::regclass)")
            .bind(index)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(n)
    }

    /// Drops every daily partition (raw samples, chunks, rollups) whose whole day is older
    /// than `days` days before `now`, and deletes older events. Returns the dropped tables.
    pub async fn apply_retention(
        &self,
        now: DateTime<Utc>,
        days: u32,
    ) -> Result<Vec<String>, StoreError> {
        let cutoff_ms = now.timestamp_millis() - i64::from(days) * DAY_MS;
        let mut dropped = Vec::new();
        for (table, day) in self.partitions().await? {
            if (day + 1) * DAY_MS <= cutoff_ms {
                sqlx::query(&format!("DROP TABLE IF EXISTS \"{table}\""))
                    .execute(&self.pool)
                    .await?;
                self.days
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&day);
                dropped.push(table);
            }
        }
        if let Some(cutoff) = DateTime::from_timestamp_millis(cutoff_ms) {
            sqlx::query("DELETE FROM events WHERE ts < $1")
                .bind(cutoff)
                .execute(&self.pool)
                .await?;
        }
        Ok(dropped)
    }

    /// Every partition of the sample tables with its day (days since the Unix epoch).
    pub(crate) async fn partitions(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let names: Vec<(String, String)> = sqlx::query_as(
            "SELECT child.relname::text, parent.relname::text
             FROM pg_inherits
             JOIN pg_class child ON child.oid = pg_inherits.inhrelid
             JOIN pg_class parent ON parent.oid = pg_inherits.inhparent
             WHERE parent.relname = ANY($1)
             ORDER BY 1",
        )
        .bind(&SAMPLE_TABLES[..])
        .fetch_all(&self.pool)
        .await?;
        Ok(names
            .into_iter()
            .filter_map(|(child, parent)| {
                let suffix = child.strip_prefix(&format!("{parent}_p"))?;
                let date = NaiveDate::parse_from_str(suffix, "%Y%m%d").ok()?;
                let day = date.signed_duration_since(epoch_date()).num_days();
                Some((child, day))
            })
            .collect())
    }
}

fn epoch_date() -> NaiveDate {
    NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default()
}

fn date_of_day(day: i64) -> Option<NaiveDate> {
    epoch_date().checked_add_signed(chrono::Duration::try_days(day)?)
}
