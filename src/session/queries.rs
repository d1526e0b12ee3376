//! Answers to the protocols' queries (`WHO`, `HISTORY`) from the presence
//! and history store, within a bound.

use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use crate::protocol::{Answer, Message, Query, QueryError};
use crate::store::Store;

/// Where the driver reads presence and history for [`Query`]s.
#[derive(Clone)]
pub struct StoreReader {
    pub store: Arc<dyn Store>,
    /// Bound on each read: a stalled database answers the command with an
    /// error instead of holding the session (and the EMQX connection
    /// behind it) forever.
    pub timeout: Duration,
}

/// Answers `query` from `reader`; `None` means the service is off.
pub(crate) async fn answer(
    reader: Option<&StoreReader>,
    conn: &str,
    query: Query,
) -> Result<Answer, QueryError> {
    let Some(reader) = reader else {
        // A protocol asked although the service is off: its config and the
        // driver disagree, which is ours to fix, not the client's.
        warn!(%conn, "a query reached a driver without a store");
        return Err(QueryError::NotEnabled);
    };
    let store = &*reader.store;
    let outcome = match query {
        Query::Who { prefix, limit } => {
            tokio::time::timeout(reader.timeout, store.presence_list(&prefix, limit))
                .await
                .map(|r| {
                    r.map(|page| Answer::Who {
                        total: page.total,
                        ids: page.ids,
                    })
                })
        }
        Query::History { topic, limit } => {
            tokio::time::timeout(reader.timeout, store.history_newest(&topic, limit))
                .await
                .map(|r| {
                    r.map(|stored| {
                        Answer::History(
                            stored
                                .into_iter()
                                .map(|m| Message {
                                    node: String::new(),
                                    id: m.id,
                                    qos: m.qos,
                                    from: m.from,
                                    topic: m.topic,
                                    payload: m.payload,
                                    timestamp_ms: m.timestamp_ms,
                                })
                                .collect(),
                        )
                    })
                })
        }
    };
    match outcome {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(e)) => {
            warn!(%conn, error = %e, "store read failed");
            Err(QueryError::Unavailable)
        }
        Err(_) => {
            warn!(%conn, timeout = ?reader.timeout, "store read timed out");
            Err(QueryError::Unavailable)
        }
    }
}
