//! The session journal (`--state-dir`): each session's saved state, kept on
//! disk so that an adapter started again after a crash restores its
//! sessions instead of telling every client its session was lost.
//!
//! The driver hands over a session's state when what the journal keeps of
//! it changed (a login, a subscription), never per message, and waits for
//! it to be on disk before the client hears `OK`: a subscription a client
//! was told about survives a crash. A thread of its own appends records in
//! batches, one write and one `fdatasync` per batch, so many logins at once
//! share a sync, and a message never waits for the disk. The file is one header and then
//! records, each with its length and CRC-32: a crash in the middle of a
//! write leaves a torn last record, which reading stops at and cuts off.
//! When the file has grown to several times its size after the last
//! rewrite, it is read back and rewritten with the live states alone (to a
//! new file, renamed over the old): the writer keeps no copy of the states
//! in memory, which would cost as much again as the sessions themselves.
//!
//! File: `sessions.journal` = `EXPJ` (4 bytes), format version (u16), then
//! records `length (u32) | crc32 (u32) | payload`, payload = `1 | conn |
//! state` (put) or `2 | conn` (remove), `conn` and `state` with a u32
//! length in front, integers big-endian.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

const MAGIC: &[u8; 4] = b"EXPJ";
const FORMAT: u16 = 1;
const FILE: &str = "sessions.journal";
/// Records waiting for the disk before the driver waits for it.
const QUEUE: usize = 8192;
/// Records written in one batch at most.
const BATCH: usize = 1024;
/// The file is rewritten once it is this many times its size after the
/// last rewrite (and at least `COMPACT_MIN` bytes).
const COMPACT_RATIO: u64 = 4;
const COMPACT_MIN: u64 = 1 << 20;

const PUT: u8 = 1;
const REMOVE: u8 = 2;

enum Record {
    /// With whom to tell once it is on disk.
    Put(Arc<str>, Vec<u8>, Option<oneshot::Sender<()>>),
    Remove(Arc<str>),
    /// Answered once everything before it is on disk.
    Flush(oneshot::Sender<()>),
}

/// The sessions a journal held when it was opened: conn → saved state.
pub type Saved = HashMap<String, Vec<u8>>;

/// Counts of a journal's work, for tests and metrics.
#[derive(Debug, Default)]
pub struct JournalStats {
    /// Records written to disk (puts and removes), since open.
    pub written: AtomicU64,
    /// Rewrites of the file with the live states only.
    pub compactions: AtomicU64,
}

/// The handle the driver writes through. Dropping every handle stops the
/// writer thread once it has written what was queued.
#[derive(Clone)]
pub struct Journal {
    tx: mpsc::Sender<Record>,
    stats: Arc<JournalStats>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").finish_non_exhaustive()
    }
}

impl Journal {
    /// Opens (or creates) the journal in `dir` and returns the sessions it
    /// holds, with a writer for new records. A torn last record is cut off;
    /// the file is then rewritten with the live states alone.
    ///
    /// # Errors
    /// The directory cannot be created, or the file read or written, or it
    /// is not a journal of a format this build reads.
    pub fn open(dir: &Path) -> io::Result<(Journal, Saved)> {
        fs::create_dir_all(dir)?;
        let path = dir.join(FILE);
        let saved = match File::open(&path) {
            Ok(mut f) => {
                let mut bytes = Vec::new();
                f.read_to_end(&mut bytes)?;
                replay(&bytes)?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Saved::new(),
            Err(e) => return Err(e),
        };
        rewrite(&path, &saved)?;
        let file = OpenOptions::new().append(true).open(&path)?;
        let base = file.metadata()?.len();
        let (tx, rx) = mpsc::channel(QUEUE);
        let stats = Arc::new(JournalStats::default());
        let writer = Writer {
            path,
            file: BufWriter::new(file),
            base,
            stats: stats.clone(),
        };
        std::thread::Builder::new()
            .name("journal".into())
            .spawn(move || writer.run(rx))?;
        Ok((Journal { tx, stats }, saved))
    }

    /// Writes the state of `conn`, and returns once it is on disk.
    pub async fn put(&self, conn: Arc<str>, state: Vec<u8>) {
        let (done, written) = oneshot::channel();
        // A closed channel or a dropped answer: the writer failed and said
        // so in the log; the session goes on without its record.
        if self
            .tx
            .send(Record::Put(conn, state, Some(done)))
            .await
            .is_ok()
        {
            let _ = written.await;
        }
    }

    /// Returns once every record queued before is on disk (at shutdown).
    pub async fn flush(&self) {
        let (done, written) = oneshot::channel();
        if self.tx.send(Record::Flush(done)).await.is_ok() {
            let _ = written.await;
        }
    }

    /// Queues the end of `conn`'s session.
    pub fn remove(&self, conn: Arc<str>) {
        if let Err(mpsc::error::TrySendError::Full(record)) = self.tx.try_send(Record::Remove(conn))
        {
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(record).await;
            });
        }
    }

    /// What the writer has done so far.
    pub fn stats(&self) -> &JournalStats {
        &self.stats
    }
}

/// Reads the sessions a journal in `dir` holds, without opening it for
/// writing (for tools and tests).
///
/// # Errors
/// As [`Journal::open`] reading.
pub fn read(dir: &Path) -> io::Result<Saved> {
    let mut bytes = Vec::new();
    File::open(dir.join(FILE))?.read_to_end(&mut bytes)?;
    replay(&bytes)
}

/// The live states in `bytes`, stopping at a torn or corrupt record.
fn replay(bytes: &[u8]) -> io::Result<Saved> {
    Ok(live(bytes)?
        .into_iter()
        .map(|(conn, state)| (conn.to_owned(), state.to_vec()))
        .collect())
}

/// The live states in `bytes` as slices of it: a rewrite needs no copy.
fn live(bytes: &[u8]) -> io::Result<HashMap<&str, &[u8]>> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_owned());
    let mut saved = HashMap::new();
    if bytes.is_empty() {
        return Ok(saved);
    }
    if bytes.len() < 6 || &bytes[..4] != MAGIC {
        return Err(bad("not a session journal"));
    }
    let format = u16::from_be_bytes([bytes[4], bytes[5]]);
    if format != FORMAT {
        return Err(bad(&format!(
            "session journal of format {format}; this build reads {FORMAT}"
        )));
    }
    let mut rest = &bytes[6..];
    let mut torn = false;
    while !rest.is_empty() {
        let Some(payload) = next_record(&mut rest) else {
            torn = true;
            break;
        };
        let mut r = exproto_protocol::state::Reader::new(payload);
        match (r.u8(), r.str()) {
            (Ok(PUT), Ok(conn)) => match r.bytes() {
                Ok(state) => {
                    saved.insert(conn, state);
                }
                Err(_) => {
                    torn = true;
                    break;
                }
            },
            (Ok(REMOVE), Ok(conn)) => {
                saved.remove(conn);
            }
            _ => {
                torn = true;
                break;
            }
        }
    }
    if torn {
        tracing::warn!(
            sessions = saved.len(),
            "the session journal ends in a torn record (a crash mid-write); reading stopped there"
        );
    }
    Ok(saved)
}

/// The next record's payload, if it is whole and its CRC matches.
fn next_record<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    if rest.len() < 8 {
        return None;
    }
    let len = usize::try_from(u32::from_be_bytes(rest[..4].try_into().ok()?)).ok()?;
    let crc = u32::from_be_bytes(rest[4..8].try_into().ok()?);
    let payload = rest.get(8..8 + len)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    *rest = &rest[8 + len..];
    Some(payload)
}

fn encode(record: &Record, out: &mut Vec<u8>) {
    match record {
        Record::Put(conn, state, _) => encode_put(conn, state, out),
        Record::Remove(conn) => {
            let mut w = exproto_protocol::state::Writer::new();
            w.u8(REMOVE);
            w.str(conn);
            frame(&w.into_bytes(), out);
        }
        Record::Flush(_) => {}
    }
}

fn encode_put(conn: &str, state: &[u8], out: &mut Vec<u8>) {
    let mut w = exproto_protocol::state::Writer::new();
    w.u8(PUT);
    w.str(conn);
    w.bytes(state);
    frame(&w.into_bytes(), out);
}

fn frame(payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    out.extend_from_slice(&crc32fast::hash(payload).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Writes `live` as a fresh journal at `path`, atomically; returns its
/// size. Streamed through a buffer, not built whole in memory.
fn rewrite<K: AsRef<str>, V: AsRef<[u8]>>(path: &Path, live: &HashMap<K, V>) -> io::Result<u64> {
    let tmp: PathBuf = path.with_extension("journal.new");
    let mut out = BufWriter::new(File::create(&tmp)?);
    out.write_all(MAGIC)?;
    out.write_all(&FORMAT.to_be_bytes())?;
    let mut size = 6u64;
    let mut record = Vec::new();
    for (conn, state) in live {
        record.clear();
        encode_put(conn.as_ref(), state.as_ref(), &mut record);
        out.write_all(&record)?;
        size += record.len() as u64;
    }
    let f = out.into_inner().map_err(io::IntoInnerError::into_error)?;
    f.sync_data()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        // The rename itself must survive a crash.
        File::open(dir)?.sync_all()?;
    }
    Ok(size)
}

struct Writer {
    path: PathBuf,
    file: BufWriter<File>,
    /// The file's size after the last rewrite: the live states then.
    base: u64,
    stats: Arc<JournalStats>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Record>) {
        let mut size = self.file.get_ref().metadata().map_or(0, |m| m.len());
        let mut batch = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            let mut records = vec![first];
            while records.len() < BATCH {
                match rx.try_recv() {
                    Ok(r) => records.push(r),
                    Err(_) => break,
                }
            }
            batch.clear();
            for r in &records {
                encode(r, &mut batch);
            }
            if let Err(e) = self.append(&batch) {
                tracing::error!(error = %e, path = %self.path.display(), "cannot write the session journal; sessions will not survive a crash");
                return;
            }
            size += batch.len() as u64;
            let mut written = 0;
            for r in records {
                match r {
                    Record::Put(_, _, done) => {
                        if let Some(done) = done {
                            let _ = done.send(());
                        }
                        written += 1;
                    }
                    Record::Remove(_) => written += 1,
                    Record::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
            self.stats.written.fetch_add(written, Ordering::Relaxed);
            if size > COMPACT_MIN.max(self.base.saturating_mul(COMPACT_RATIO)) {
                match self.compact() {
                    Ok(new_size) => size = new_size,
                    Err(e) => tracing::warn!(error = %e, "cannot compact the session journal"),
                }
            }
        }
    }

    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all(bytes)?;
        self.file.flush()?;
        self.file.get_ref().sync_data()
    }

    fn compact(&mut self) -> io::Result<u64> {
        let mut bytes = Vec::new();
        File::open(&self.path)?.read_to_end(&mut bytes)?;
        let size = rewrite(&self.path, &live(&bytes)?)?;
        self.file = BufWriter::new(OpenOptions::new().append(true).open(&self.path)?);
        self.base = size;
        self.stats.compactions.fetch_add(1, Ordering::Relaxed);
        Ok(size)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "exproto-journal-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let _ = fs::remove_dir_all(&d);
        d
    }

    async fn until_written(j: &Journal, n: u64) {
        for _ in 0..5_000 {
            if j.stats().written.load(Ordering::Relaxed) >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("the journal did not write {n} records");
    }

    #[tokio::test]
    async fn states_survive_a_reopen_and_removed_ones_do_not() {
        let d = dir("reopen");
        let (j, saved) = Journal::open(&d).unwrap();
        assert!(saved.is_empty());
        j.put("a".into(), b"one".to_vec()).await;
        j.put("b".into(), b"two".to_vec()).await;
        j.put("a".into(), b"three".to_vec()).await;
        j.remove("b".into());
        until_written(&j, 4).await;
        drop(j);
        let saved = read(&d).unwrap();
        assert_eq!(saved.len(), 1);
        assert_eq!(saved["a"], b"three");
        let (_, saved) = Journal::open(&d).unwrap();
        assert_eq!(saved["a"], b"three");
        fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn a_torn_last_record_is_cut_off_at_any_byte() {
        let d = dir("torn");
        let (j, _) = Journal::open(&d).unwrap();
        j.put("a".into(), b"kept".to_vec()).await;
        until_written(&j, 1).await;
        let whole = fs::read(d.join(FILE)).unwrap().len();
        j.put("b".into(), b"torn away".to_vec()).await;
        until_written(&j, 2).await;
        drop(j);
        let full = fs::read(d.join(FILE)).unwrap();
        for cut in whole..full.len() {
            let saved = replay(&full[..cut]).unwrap();
            assert_eq!(saved.len(), 1, "cut at {cut}");
            assert_eq!(saved["a"], b"kept");
        }
        // A flipped byte inside the last record is caught by its CRC.
        let mut flipped = full.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 0xff;
        assert!(!replay(&flipped).unwrap().contains_key("b"));
        assert_eq!(replay(&full).unwrap().len(), 2);
        fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn the_file_is_rewritten_when_it_holds_mostly_old_states() {
        let d = dir("compact");
        let (j, _) = Journal::open(&d).unwrap();
        let state = vec![7u8; 1000];
        for _ in 0..3_000 {
            j.put("same".into(), state.clone()).await;
        }
        until_written(&j, 3_000).await;
        assert!(j.stats().compactions.load(Ordering::Relaxed) >= 1);
        let size = fs::metadata(d.join(FILE)).unwrap().len();
        assert!(size < COMPACT_MIN + 100_000, "{size} bytes");
        drop(j);
        assert_eq!(read(&d).unwrap()["same"], state);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn other_files_are_refused() {
        assert!(replay(b"EXPJ\x00\x02").is_err(), "a newer format");
        assert!(replay(b"hello world").is_err());
        assert!(replay(b"").unwrap().is_empty());
    }
}
