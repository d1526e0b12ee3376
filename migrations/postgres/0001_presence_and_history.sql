-- Presence and message history, PostgreSQL flavour (see ../sqlite for the other).
-- Tables carry an `exproto_` prefix so that a database shared with other
-- applications stays readable. They live in the first schema of the
-- connection's search_path.

-- Who is online: one row per clientid; the newest connection wins.
-- COLLATE "C" compares in byte order, which is the order WHO lists
-- clientids in, and lets prefix ranges use the primary key's index.
CREATE TABLE exproto_presence (
    clientid     TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    username     TEXT   NOT NULL,
    node         TEXT   NOT NULL,
    connected_at BIGINT NOT NULL -- milliseconds since the Unix epoch
);

-- Messages published on the history topics.
-- `seq` orders messages that share a timestamp; `msg_id` is EMQX's message
-- id, unique so that a message reported twice (by two EMQX nodes' adapters
-- sharing this database, say) is stored once; NULL when a publisher gave
-- none: NULLs never collide.
CREATE TABLE exproto_history (
    seq     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    msg_id  TEXT UNIQUE,
    topic   TEXT     NOT NULL,
    sender  TEXT     NOT NULL,
    payload BYTEA    NOT NULL,
    qos     SMALLINT NOT NULL,
    ts      BIGINT   NOT NULL -- EMQX's timestamp, milliseconds since the Unix epoch
);

-- HISTORY reads the newest rows of one topic; retention ranks rows per topic.
CREATE INDEX exproto_history_topic_ts ON exproto_history (topic, ts, seq);
-- Retention by age deletes the oldest rows of all topics.
CREATE INDEX exproto_history_ts ON exproto_history (ts);
