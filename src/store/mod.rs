//! Where presence and message history are kept: the [`Store`] trait and its
//! two implementations, SQLite ([`SqliteStore`], embedded, the default) and
//! PostgreSQL ([`PgStore`], for several adapters beside several EMQX nodes
//! that must share one history).
//!
//! [`open`] picks one by URL: `sqlite:PATH`, `sqlite::memory:` or
//! `postgres://...`. Both run the versioned migrations under `migrations/`
//! (embedded in the binary) when they open, and both pass the same test
//! suite (`tests/store.rs`).
//!
//! The store knows nothing of EMQX or gRPC: the hook server
//! ([`crate::exhook`]) writes to it, the session driver reads WHO and
//! HISTORY from it.

mod faulty;
mod migrations;
mod postgres;
mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;

use crate::redact::redact_url;

pub use faulty::{Fault, FaultyStore};
pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// One online client, as EMQX's `client.connected` hook reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub clientid: String,
    pub username: String,
    /// The EMQX node the client is connected to.
    pub node: String,
    /// When the adapter heard of the connection, milliseconds since the
    /// Unix epoch (EMQX's hook does not carry the time).
    pub connected_at_ms: u64,
}

/// A page of online clientids.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WhoPage {
    /// How many clientids match, listed or not.
    pub total: u64,
    /// The first of them in byte order, at most the limit asked for.
    pub ids: Vec<String>,
}

/// A message as history keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredMessage {
    /// EMQX's message id (hex); a second message with the same id is not
    /// stored. Empty when the publisher gave none; such messages are never
    /// taken for duplicates.
    pub id: String,
    pub topic: String,
    /// The publisher's clientid; may be empty.
    pub from: String,
    pub payload: Bytes,
    pub qos: u8,
    /// EMQX's timestamp, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
}

/// Where a page of older history ends (exclusive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HistoryCursor {
    /// Messages stored before this one (by its EMQX message id).
    Id(String),
    /// Messages with an EMQX timestamp before this, in ms since the epoch.
    Time(u64),
}

/// How much history is kept; `None` means no limit of that kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// The newest this many messages of each topic are kept.
    pub max_per_topic: Option<u64>,
    /// Messages older than this (by EMQX's timestamp) are deleted.
    pub max_age: Option<Duration>,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL names no supported database. Only the scheme is kept: a
    /// URL may carry a password.
    #[error(
        "unsupported store URL (scheme {0:?}): use sqlite:PATH, sqlite::memory: or postgres://..."
    )]
    Url(String),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database cannot be used right now (a stall or an outage, as
    /// tests and benchmarks simulate it).
    #[error("database unavailable: {0}")]
    Unavailable(String),
}

impl StoreError {
    /// Whether the database refused the data itself (a constraint or a
    /// value it cannot hold), so that trying the same write again cannot
    /// succeed. Everything else (connection lost, pool exhausted, locked
    /// database) may pass on a retry.
    pub fn is_rejection(&self) -> bool {
        let StoreError::Db(sqlx::Error::Database(e)) = self else {
            return false;
        };
        use sqlx::error::ErrorKind;
        if matches!(
            e.kind(),
            ErrorKind::UniqueViolation
                | ErrorKind::ForeignKeyViolation
                | ErrorKind::NotNullViolation
                | ErrorKind::CheckViolation
        ) {
            return true;
        }
        // PostgreSQL's class 22 is "data exception" (e.g. a NUL in text);
        // SQLite's 18 and 20 are "too big" and "datatype mismatch".
        match e.code() {
            Some(code) => code.starts_with("22") || code == "18" || code == "20",
            None => false,
        }
    }
}

/// The storage behind presence and history. Cheap to share (`Arc`).
///
/// Every method is one short database round trip or transaction; none
/// waits for anything else. Callers bound them with their own timeouts.
pub trait Store: Send + Sync + 'static {
    /// `sqlite` or `postgres`, for logs.
    fn backend(&self) -> &'static str;

    /// Records `p` as online, replacing an earlier row for its clientid.
    ///
    /// # Errors
    /// A database failure.
    fn presence_upsert(&self, p: Presence) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Records `clientid` as gone, unless its row is from another node: the
    /// client has already reconnected there and only its old connection
    /// ended.
    ///
    /// # Errors
    /// A database failure.
    fn presence_remove<'a>(
        &'a self,
        clientid: &'a str,
        node: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Records as gone every client of `node` that connected before
    /// `before_ms`: EMQX's node restarted (so none of them can still be
    /// connected) or stopped without reporting their disconnects. Returns
    /// how many rows went.
    ///
    /// # Errors
    /// A database failure.
    fn presence_clear_node<'a>(
        &'a self,
        node: &'a str,
        before_ms: u64,
    ) -> BoxFuture<'a, Result<u64, StoreError>>;

    /// The rows of `node`'s clients, at most `limit` of them (in clientid
    /// order), for a reconciliation with EMQX's own list.
    ///
    /// # Errors
    /// A database failure.
    fn presence_of_node<'a>(
        &'a self,
        node: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Presence>, StoreError>>;

    /// Removes `clientid`'s row of `node` if it was written before
    /// `before_ms`: a reconciliation that found the client gone must not
    /// remove the row of a connect that came after it looked. Returns
    /// whether a row went.
    ///
    /// # Errors
    /// A database failure.
    fn presence_remove_before<'a>(
        &'a self,
        clientid: &'a str,
        node: &'a str,
        before_ms: u64,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Adds `p` unless its clientid has a row already (which a connect
    /// wrote, and which is newer than what a reconciliation knows).
    /// Returns whether it was added.
    ///
    /// # Errors
    /// A database failure.
    fn presence_insert_absent(&self, p: Presence) -> BoxFuture<'_, Result<bool, StoreError>>;

    /// The online clientids starting with `prefix` (all for an empty one):
    /// how many there are, and the first `limit` in byte order.
    ///
    /// # Errors
    /// A database failure.
    fn presence_list<'a>(
        &'a self,
        prefix: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<WhoPage, StoreError>>;

    /// Stores messages in one transaction, skipping any whose id is already
    /// stored; returns how many were new.
    ///
    /// # Errors
    /// A database failure; nothing of the batch is stored then.
    fn history_insert<'a>(
        &'a self,
        batch: &'a [StoredMessage],
    ) -> BoxFuture<'a, Result<u64, StoreError>>;

    /// The newest `n` messages of `topic`, oldest first (by timestamp, then
    /// by the order they were stored).
    ///
    /// # Errors
    /// A database failure.
    fn history_newest<'a>(
        &'a self,
        topic: &'a str,
        n: usize,
    ) -> BoxFuture<'a, Result<Vec<StoredMessage>, StoreError>>;

    /// The newest `n` messages of `topic` older than `before`, oldest
    /// first; `None` when `before` names a message id that `topic` does
    /// not hold.
    ///
    /// # Errors
    /// A database failure.
    fn history_before<'a>(
        &'a self,
        topic: &'a str,
        n: usize,
        before: &'a HistoryCursor,
    ) -> BoxFuture<'a, Result<Option<Vec<StoredMessage>>, StoreError>>;

    /// Deletes what `retention` no longer keeps, as of `now_ms`; returns
    /// how many messages were deleted.
    ///
    /// # Errors
    /// A database failure.
    fn prune(&self, retention: Retention, now_ms: u64) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// Closes the store's connections; later calls fail.
    fn close(&self) -> BoxFuture<'_, ()>;
}

/// Opens the store a URL names and brings its schema up to date.
///
/// `sqlite:PATH` creates the file if needed; `sqlite::memory:` lives as
/// long as the store; `postgres://` (or `postgresql://`) connects with the
/// URL's own options, e.g. `?options=-c%20search_path%3Dchat` for a schema.
///
/// # Errors
/// An unsupported URL, a database that cannot be reached, or a failed
/// migration.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::open(url).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PgStore::open(url).await?))
    } else {
        let scheme = url.split_once(':').map_or("", |(s, _)| s);
        Err(StoreError::Url(scheme.chars().take(16).collect()))
    }
}

/// A store URL. It may carry a password, so `Debug` and `Display` show it
/// redacted; [`StoreUrl::expose`] gives the URL itself.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreUrl(String);

impl StoreUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }
    /// The URL itself, for the one place that connects with it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoreUrl({:?})", redact_url(&self.0))
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

/// The smallest string above every string that starts with `prefix`, in
/// byte order (which for UTF-8 is code point order); `None` when there is
/// none. `prefix <= id < end` is then "id starts with prefix", a range an
/// index can serve, where `LIKE` would need escaping and differs in case
/// handling between SQLite and PostgreSQL.
fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let mut next = u32::from(last) + 1;
        // Skip the surrogate gap, which no `char` can hold.
        if (0xD800..=0xDFFF).contains(&next) {
            next = 0xE000;
        }
        if let Some(c) = char::from_u32(next) {
            chars.push(c);
            return Some(chars.into_iter().collect());
        }
        // `last` was char::MAX: carry into the previous character.
    }
    None
}

/// Milliseconds since the Unix epoch as the databases store them.
fn to_db_ms(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

fn from_db_ms(ms: i64) -> u64 {
    u64::try_from(ms).unwrap_or(0)
}

/// The cutoff below which `retention` deletes by age, if it does.
fn age_cutoff(retention: &Retention, now_ms: u64) -> Option<i64> {
    let age = retention.max_age?;
    let age_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
    Some(to_db_ms(now_ms.saturating_sub(age_ms)))
}

/// A row limit for SQL `LIMIT`, which both databases take as a signed
/// 64-bit number.
fn sql_limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The current time in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ranges() {
        assert_eq!(prefix_end(""), None);
        assert_eq!(prefix_end("al").as_deref(), Some("am"));
        assert_eq!(prefix_end("a/").as_deref(), Some("a0"));
        assert_eq!(prefix_end("\u{D7FF}").as_deref(), Some("\u{E000}"));
        assert_eq!(prefix_end("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_end("\u{10FFFF}"), None);
        // Every string with the prefix sorts below the end, in byte order.
        for (prefix, id) in [("al", "alice"), ("al", "al\u{10FFFF}"), ("é", "éz")] {
            let end = prefix_end(prefix).expect("has an end");
            assert!(id.as_bytes() < end.as_bytes(), "{id} < {end}");
            assert!(prefix.as_bytes() <= id.as_bytes());
        }
    }

    #[test]
    fn store_urls_print_redacted() {
        let url = StoreUrl::new("postgres://u:secret@db/x");
        assert_eq!(url.to_string(), "postgres://u:***@db/x");
        assert!(!format!("{url:?}").contains("secret"));
        assert_eq!(url.expose(), "postgres://u:secret@db/x");
    }

    #[tokio::test]
    async fn unsupported_urls_name_only_their_scheme() {
        let Err(e) = open("mysql://root:pw@localhost/x").await else {
            panic!("mysql is not supported")
        };
        assert!(matches!(&e, StoreError::Url(s) if s == "mysql"), "{e}");
        assert!(!e.to_string().contains("pw"));
    }

    #[test]
    fn age_cutoffs() {
        let r = Retention {
            max_per_topic: None,
            max_age: Some(Duration::from_secs(10)),
        };
        assert_eq!(age_cutoff(&r, 60_000), Some(50_000));
        assert_eq!(age_cutoff(&r, 5_000), Some(0));
        assert_eq!(age_cutoff(&Retention::default(), 60_000), None);
    }
}
