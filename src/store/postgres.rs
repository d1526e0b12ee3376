//! [`Store`] on PostgreSQL, for deployments where several adapters beside
//! several EMQX nodes share one presence table and one history.

use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::Row;

use super::{
    age_cutoff, from_db_ms, migrations, prefix_end, sql_limit, to_db_ms, HistoryCursor, Presence,
    Retention, Store, StoreError, StoredMessage, WhoPage,
};

/// Presence and history in PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Connects to `url` (`postgres://...`) and migrates the schema first
    /// in its search_path.
    ///
    /// # Errors
    /// A bad URL, an unreachable server, or a failed migration.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            // The hook writer holds one connection at a time; the rest
            // serve WHO and HISTORY.
            .max_connections(5)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await?;
        migrations::migrator(migrations::POSTGRES)
            .await?
            .run(&pool)
            .await?;
        Ok(Self { pool })
    }
}

impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn presence_upsert(&self, p: Presence) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            sqlx::query(
                "INSERT INTO exproto_presence (clientid, username, node, connected_at) \
                 VALUES ($1, $2, $3, $4) \
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
            sqlx::query("DELETE FROM exproto_presence WHERE clientid = $1 AND node = $2")
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
                sqlx::query("DELETE FROM exproto_presence WHERE node = $1 AND connected_at < $2")
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
                 WHERE node = $1 ORDER BY clientid LIMIT $2",
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
                 WHERE clientid = $1 AND node = $2 AND connected_at < $3",
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
                 VALUES ($1, $2, $3, $4) ON CONFLICT (clientid) DO NOTHING",
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
            // The column's "C" collation makes the comparisons byte order.
            // The window count is taken before LIMIT applies; at least one
            // row is asked for so the total comes back for a limit of 0.
            let rows = sqlx::query(
                "SELECT clientid, count(*) OVER () FROM exproto_presence \
                 WHERE clientid >= $1 AND ($2::text IS NULL OR clientid < $2::text) \
                 ORDER BY clientid LIMIT $3",
            )
            .bind(prefix)
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
            if batch.is_empty() {
                return Ok(0);
            }
            // One statement for the whole batch: a database across the
            // network costs a round trip per statement.
            let ids: Vec<Option<&str>> = batch
                .iter()
                .map(|m| (!m.id.is_empty()).then_some(m.id.as_str()))
                .collect();
            let topics: Vec<&str> = batch.iter().map(|m| m.topic.as_str()).collect();
            let senders: Vec<&str> = batch.iter().map(|m| m.from.as_str()).collect();
            let payloads: Vec<&[u8]> = batch.iter().map(|m| &m.payload[..]).collect();
            let qos: Vec<i16> = batch.iter().map(|m| i16::from(m.qos)).collect();
            let ts: Vec<i64> = batch.iter().map(|m| to_db_ms(m.timestamp_ms)).collect();
            let inserted = sqlx::query(
                "INSERT INTO exproto_history (msg_id, topic, sender, payload, qos, ts) \
                 SELECT msg_id, topic, sender, payload, qos, ts \
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::int2[], \
                 $6::int8[]) WITH ORDINALITY AS b(msg_id, topic, sender, payload, qos, ts, n) \
                 ORDER BY n \
                 ON CONFLICT (msg_id) DO NOTHING",
            )
            .bind(ids)
            .bind(topics)
            .bind(senders)
            .bind(payloads)
            .bind(qos)
            .bind(ts)
            .execute(&self.pool)
            .await?
            .rows_affected();
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
                 (SELECT * FROM exproto_history WHERE topic = $1 \
                  ORDER BY ts DESC, seq DESC LIMIT $2) AS newest \
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
                         (SELECT * FROM exproto_history WHERE topic = $1 AND ts < $2 \
                          ORDER BY ts DESC, seq DESC LIMIT $3) AS older \
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
                        "SELECT ts, seq FROM exproto_history WHERE topic = $1 AND msg_id = $2",
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
                         (SELECT * FROM exproto_history WHERE topic = $1 AND (ts < $2 OR (ts = $2 AND seq < $3)) \
                          ORDER BY ts DESC, seq DESC LIMIT $4) AS older \
                         ORDER BY ts, seq",
                    )
                    .bind(topic)
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
                deleted += sqlx::query("DELETE FROM exproto_history WHERE ts < $1")
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
                      FROM exproto_history) AS ranked WHERE rn > $1)",
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
fn stored_message(r: &sqlx::postgres::PgRow) -> Result<StoredMessage, StoreError> {
    Ok(StoredMessage {
        id: r.try_get::<Option<String>, _>(0)?.unwrap_or_default(),
        topic: r.try_get(1)?,
        from: r.try_get(2)?,
        payload: Bytes::from(r.try_get::<Vec<u8>, _>(3)?),
        qos: u8::try_from(r.try_get::<i16, _>(4)?).unwrap_or(0),
        timestamp_ms: from_db_ms(r.try_get(5)?),
    })
}
