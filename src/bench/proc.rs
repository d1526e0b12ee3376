//! CPU time and resident memory of a process, read from Linux's `/proc`.
//!
//! The handler under test runs in its own process so that its CPU and RSS
//! are its own and not the load generator's or the gateway's.

use std::time::Duration;

use anyhow::Context as _;

/// Clock ticks per second in `/proc/<pid>/stat`: the kernel's USER_HZ,
/// which is 100 on every Linux architecture this runs on.
const USER_HZ: u64 = 100;

/// One reading of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProcSample {
    /// User plus system CPU time so far.
    pub cpu: Duration,
    /// Resident set size (`VmRSS`).
    pub rss_bytes: u64,
}

/// Reads `pid`'s CPU time and RSS.
///
/// # Errors
/// The process is gone or `/proc` is not there (not Linux).
pub fn sample(pid: u32) -> anyhow::Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    Ok(ProcSample {
        cpu: parse_stat_cpu(&stat).context("unexpected /proc/<pid>/stat")?,
        rss_bytes: parse_status_rss(&status).context("no VmRSS in /proc/<pid>/status")?,
    })
}

/// `utime + stime` from a `/proc/<pid>/stat` line. The command name (field
/// 2) is in parentheses and may hold spaces, so fields are counted from the
/// last `)`.
pub(crate) fn parse_stat_cpu(stat: &str) -> Option<Duration> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    // After the name: state is field 3, utime 14 and stime 15 (1-based).
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let ticks = utime + stime;
    Some(Duration::from_millis(ticks * 1000 / USER_HZ))
}

/// `VmRSS` in bytes from `/proc/<pid>/status` (given there in kB).
pub(crate) fn parse_status_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line
        .trim_start_matches("VmRSS:")
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_cpu_counts_from_the_last_paren() {
        let stat = "1234 (exproto (x) a) S 1 1234 1234 0 -1 4194304 100 0 0 0 250 50 0 0 20 0 9 0 100 1000 200";
        assert_eq!(parse_stat_cpu(stat), Some(Duration::from_secs(3)));
        assert_eq!(parse_stat_cpu("garbage"), None);
    }

    #[test]
    fn status_rss_in_bytes() {
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmRSS:\t    1536 kB\nThreads:\t3\n";
        assert_eq!(parse_status_rss(status), Some(1536 * 1024));
        assert_eq!(parse_status_rss("Name: x\n"), None);
    }

    #[test]
    fn samples_this_process() {
        let s = sample(std::process::id()).unwrap();
        assert!(s.rss_bytes > 0);
    }
}
