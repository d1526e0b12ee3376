-- Presence and message history, SQLite flavour (see ../postgres for the other).
-- Tables carry an `exproto_` prefix so that a database shared with other
-- applications stays readable.

-- Who is online: one row per clientid; the newest connection wins.
-- TEXT compares with the BINARY collation, i.e. in byte order, which is the
-- order WHO lists clientids in.
CREATE TABLE exproto_presence (
    clientid     TEXT    NOT NULL PRIMARY KEY,
    username     TEXT    NOT NULL,
    node         TEXT    NOT NULL,
    connected_at INTEGER NOT NULL -- milliseconds since the Unix epoch
) WITHOUT ROWID;

-- Messages published on the history topics.
-- `seq` orders messages that share a timestamp; `msg_id` is EMQX's message
-- id, unique so that a message reported twice is stored once (NULL when a
-- publisher gave none: NULLs never collide).
CREATE TABLE exproto_history (
    seq     INTEGER NOT NULL PRIMARY KEY,
    msg_id  TEXT    UNIQUE,
    topic   TEXT    NOT NULL,
    sender  TEXT    NOT NULL,
    payload BLOB    NOT NULL,
    qos     INTEGER NOT NULL,
    ts      INTEGER NOT NULL -- EMQX's timestamp, milliseconds since the Unix epoch
);

-- HISTORY reads the newest rows of one topic; retention ranks rows per topic.
CREATE INDEX exproto_history_topic_ts ON exproto_history (topic, ts, seq);
-- Retention by age deletes the oldest rows of all topics.
CREATE INDEX exproto_history_ts ON exproto_history (ts);
