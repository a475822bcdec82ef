//! Every PostgreSQL advisory lock key the collector takes, in one place.
//!
//! Advisory locks share one key space per database: two tasks that picked the same key
//! would exclude each other (a session lock held for hours by the engine leader once
//! made every compaction pass report `contended`). Keys are named here, checked
//! distinct by a test, and a configured key may not take a reserved one.

/// Held (transaction-scoped) by the transaction that compacts a window.
pub const COMPACTION: i64 = 0x7261_7a61_7200_0001;
/// Held (session-scoped, on a dedicated connection) by the decision engine's leader.
/// `engine.lock_key` overrides it.
pub const ENGINE_LEADER: i64 = 0x7261_7a61_7200_0002;

/// Keys reserved for the collector's own tasks other than the engine leader.
/// (The two-key forms `pg_advisory_xact_lock(int4, int4)` used by day partitions and
/// series registration live in a separate key space and cannot collide with these.)
pub const RESERVED: &[(&str, i64)] = &[("compaction", COMPACTION)];

/// The task a key is reserved for, if it is.
pub fn reserved_by(key: i64) -> Option<&'static str> {
    RESERVED
        .iter()
        .find(|(_, k)| *k == key)
        .map(|(name, _)| *name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_distinct() {
        let mut keys: Vec<i64> = RESERVED.iter().map(|(_, k)| *k).collect();
        keys.push(ENGINE_LEADER);
        let n = keys.len();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), n, "two tasks share an advisory lock key");
        assert_eq!(reserved_by(ENGINE_LEADER), None);
        assert_eq!(reserved_by(COMPACTION), Some("compaction"));
    }
}
