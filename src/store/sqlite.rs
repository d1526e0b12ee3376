//! [`Store`] on an embedded SQLite database (bundled with the binary, so no
//! system library is needed): one file, or memory.

use std::str::FromStr;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::Row;

use super::{
    age_cutoff, from_db_ms, migrations, prefix_end, sql_limit, to_db_ms, HistoryCursor, Presence,
    Retention, Store, StoreError, StoredMessage, WhoPage,
};

/// Presence and history in SQLite.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) the database `url` names (`sqlite:PATH`
    /// or `sqlite::memory:`) and migrates it.
    ///
    /// # Errors
    /// A bad URL, a file that cannot be opened, or a failed migration.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            // Writers wait for each other briefly instead of failing with
            // SQLITE_BUSY (another adapter process on the same file, say).
            .busy_timeout(Duration::from_secs(5));
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let pool = if in_memory {
            // An in-memory database lives as long as a connection to it:
            // one connection, never recycled.
            SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
                .connect_with(options)
                .await?
        } else {
            // WAL lets WHO and HISTORY read while the hook writer writes.
            SqlitePoolOptions::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(options.journal_mode(SqliteJournalMode::Wal))
                .await?
        };
        migrations::migrator(migrations::SQLITE)
            .await?
            .run(&pool)
            .await?;
        Ok(Self { pool })
    }
}

impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn presence_upsert(&self, p: Presence) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            sqlx::query(
                "INSERT INTO exproto_presence (clientid, username, node, connected_at) \
                 VALUES (?, ?, ?, ?) \
                 ON CONFLICT (clientid) DO UPDATE SET username = excluded.username, \
                 node = excluded.node, connected_at = excluded.connected_at",
            )
            .bind(&p.clientid)
            .bind(&p.username)
            .bind(&p.node)
            .bind(to_db_ms(p.connected_at_ms))
            .execute(&self.pool)
            .await?;
            Ok(())
        })
    }

    fn presence_remove<'a>(
        &'a self,
        clientid: &'a str,
        node: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            sqlx::query("DELETE FROM exproto_presence WHERE clientid = ? AND node = ?")
                .bind(clientid)
                .bind(node)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
    }

    fn presence_clear_node<'a>(
        &'a self,
        node: &'a str,
        before_ms: u64,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            let done =
                sqlx::query("DELETE FROM exproto_presence WHERE node = ? AND connected_at < ?")
                    .bind(node)
                    .bind(to_db_ms(before_ms))
                    .execute(&self.pool)
                    .await?;
            Ok(done.rows_affected())
        })
    }

    fn presence_of_node<'a>(
        &'a self,
        node: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Presence>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT clientid, username, node, connected_at FROM exproto_presence \
                 WHERE node = ? ORDER BY clientid LIMIT ?",
            )
            .bind(node)
            .bind(sql_limit(limit))
            .fetch_all(&self.pool)
            .await?;
            rows.iter()
                .map(|row| {
                    Ok(Presence {
                        clientid: row.try_get(0)?,
                        username: row.try_get(1)?,
                        node: row.try_get(2)?,
                        connected_at_ms: from_db_ms(row.try_get(3)?),
                    })
                })
                .collect()
        })
    }

    fn presence_remove_before<'a>(
        &'a self,
        clientid: &'a str,
        node: &'a str,
        before_ms: u64,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let done = sqlx::query(
                "DELETE FROM exproto_presence \
                 WHERE clientid = ? AND node = ? AND connected_at < ?",
            )
            .bind(clientid)
            .bind(node)
            .bind(to_db_ms(before_ms))
            .execute(&self.pool)
            .await?;
            Ok(done.rows_affected() > 0)
        })
    }

    fn presence_insert_absent(&self, p: Presence) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(async move {
            let done = sqlx::query(
                "INSERT INTO exproto_presence (clientid, username, node, connected_at) \
                 VALUES (?, ?, ?, ?) ON CONFLICT (clientid) DO NOTHING",
            )
            .bind(&p.clientid)
            .bind(&p.username)
            .bind(&p.node)
            .bind(to_db_ms(p.connected_at_ms))
            .execute(&self.pool)
            .await?;
            Ok(done.rows_affected() > 0)
        })
    }

    fn presence_list<'a>(
        &'a self,
        prefix: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<WhoPage, StoreError>> {
        Box::pin(async move {
            // The window count is taken before LIMIT applies, so one query
            // gives both the page and the total; at least one row is asked
            // for so that the total comes back even for a limit of 0.
            let rows = sqlx::query(
                "SELECT clientid, count(*) OVER () FROM exproto_presence \
                 WHERE clientid >= ? AND (? IS NULL OR clientid < ?) \
                 ORDER BY clientid LIMIT ?",
            )
            .bind(prefix)
            .bind(prefix_end(prefix))
            .bind(prefix_end(prefix))
            .bind(sql_limit(limit.max(1)))
            .fetch_all(&self.pool)
            .await?;
            let total = match rows.first() {
                Some(row) => u64::try_from(row.try_get::<i64, _>(1)?).unwrap_or(0),
                None => 0,
            };
            let mut ids = rows
                .iter()
                .map(|r| r.try_get::<String, _>(0))
                .collect::<Result<Vec<_>, _>>()?;
            ids.truncate(limit);
            Ok(WhoPage { total, ids })
        })
    }

    fn history_insert<'a>(
        &'a self,
        batch: &'a [StoredMessage],
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            let mut tx = self.pool.begin().await?;
            let mut inserted = 0;
            for m in batch {
                inserted += sqlx::query(
                    "INSERT INTO exproto_history (msg_id, topic, sender, payload, qos, ts) \
                     VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (msg_id) DO NOTHING",
                )
                .bind((!m.id.is_empty()).then_some(m.id.as_str()))
                .bind(&m.topic)
                .bind(&m.from)
                .bind(&m.payload[..])
                .bind(i32::from(m.qos))
                .bind(to_db_ms(m.timestamp_ms))
                .execute(&mut *tx)
                .await?
                .rows_affected();
            }
            tx.commit().await?;
            Ok(inserted)
        })
    }

    fn history_newest<'a>(
        &'a self,
        topic: &'a str,
        n: usize,
    ) -> BoxFuture<'a, Result<Vec<StoredMessage>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT msg_id, topic, sender, payload, qos, ts FROM \
                 (SELECT * FROM exproto_history WHERE topic = ? \
                  ORDER BY ts DESC, seq DESC LIMIT ?) AS newest \
                 ORDER BY ts, seq",
            )
            .bind(topic)
            .bind(sql_limit(n))
            .fetch_all(&self.pool)
            .await?;
            rows.iter().map(stored_message).collect()
        })
    }

    fn history_before<'a>(
        &'a self,
        topic: &'a str,
        n: usize,
        before: &'a HistoryCursor,
    ) -> BoxFuture<'a, Result<Option<Vec<StoredMessage>>, StoreError>> {
        Box::pin(async move {
            let rows = match before {
                HistoryCursor::Time(ms) => {
                    sqlx::query(
                        "SELECT msg_id, topic, sender, payload, qos, ts FROM \
                         (SELECT * FROM exproto_history WHERE topic = ? AND ts < ? \
                          ORDER BY ts DESC, seq DESC LIMIT ?) AS older \
                         ORDER BY ts, seq",
                    )
                    .bind(topic)
                    .bind(to_db_ms(*ms))
                    .bind(sql_limit(n))
                    .fetch_all(&self.pool)
                    .await?
                }
                HistoryCursor::Id(id) => {
                    // The cursor is looked up within the topic asked for, so
                    // an id from another topic finds nothing.
                    let Some(at) = sqlx::query(
                        "SELECT ts, seq FROM exproto_history WHERE topic = ? AND msg_id = ?",
                    )
                    .bind(topic)
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?
                    else {
                        return Ok(None);
                    };
                    let ts: i64 = at.try_get(0)?;
                    let seq: i64 = at.try_get(1)?;
                    sqlx::query(
                        "SELECT msg_id, topic, sender, payload, qos, ts FROM \
                         (SELECT * FROM exproto_history WHERE topic = ? AND (ts < ? OR (ts = ? AND seq < ?)) \
                          ORDER BY ts DESC, seq DESC LIMIT ?) AS older \
                         ORDER BY ts, seq",
                    )
                    .bind(topic)
                    .bind(ts)
                    .bind(ts)
                    .bind(seq)
                    .bind(sql_limit(n))
                    .fetch_all(&self.pool)
                    .await?
                }
            };
            rows.iter()
                .map(stored_message)
                .collect::<Result<_, _>>()
                .map(Some)
        })
    }

    fn prune(&self, retention: Retention, now_ms: u64) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let mut deleted = 0;
            if let Some(cutoff) = age_cutoff(&retention, now_ms) {
                deleted += sqlx::query("DELETE FROM exproto_history WHERE ts < ?")
                    .bind(cutoff)
                    .execute(&self.pool)
                    .await?
                    .rows_affected();
            }
            if let Some(cap) = retention.max_per_topic {
                deleted += sqlx::query(
                    "DELETE FROM exproto_history WHERE seq IN (SELECT seq FROM \
                     (SELECT seq, row_number() OVER \
                      (PARTITION BY topic ORDER BY ts DESC, seq DESC) AS rn \
                      FROM exproto_history) AS ranked WHERE rn > ?)",
                )
                .bind(i64::try_from(cap).unwrap_or(i64::MAX))
                .execute(&self.pool)
                .await?
                .rows_affected();
            }
            Ok(deleted)
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.pool.close())
    }
}

/// A history row as the store hands it out.
fn stored_message(r: &sqlx::sqlite::SqliteRow) -> Result<StoredMessage, StoreError> {
    Ok(StoredMessage {
        id: r.try_get::<Option<String>, _>(0)?.unwrap_or_default(),
        topic: r.try_get(1)?,
        from: r.try_get(2)?,
        payload: Bytes::from(r.try_get::<Vec<u8>, _>(3)?),
        qos: u8::try_from(r.try_get::<i32, _>(4)?).unwrap_or(0),
        timestamp_ms: from_db_ms(r.try_get(5)?),
    })
}
