//! A fresh PostgreSQL schema per test, on the machine's server
//! (`postgres://postgres@127.0.0.1:5432/test`, or `EXPROTO_TEST_POSTGRES`).
//!
//! When the server cannot be reached a test says it was skipped, unless
//! `EXPROTO_REQUIRE_SERVICES=1` (as CI sets), which makes it fail.

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures::FutureExt;
use sqlx::Connection;

/// A name no other test (in this or another process) uses.
pub fn unique_name() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "exproto_test_{}_{}_{:08x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>()
    )
}

fn base_url() -> String {
    std::env::var("EXPROTO_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// Runs `test` with the URL of a fresh schema, dropped afterwards even
/// when the test panics; or skips it as described above.
pub async fn with_schema<F, Fut>(name: &str, test: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()>,
{
    let base = base_url();
    let admin = tokio::time::timeout(Duration::from_secs(5), sqlx::PgConnection::connect(&base))
        .await
        .map_err(|_| "no answer within 5 s".to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    let mut admin = match admin {
        Ok(c) => c,
        Err(e) => {
            let shown = exproto_adapter::redact::redact_url(&base);
            if std::env::var("EXPROTO_REQUIRE_SERVICES").as_deref() == Ok("1") {
                panic!("PostgreSQL at {shown} is required (EXPROTO_REQUIRE_SERVICES=1): {e}");
            }
            // Written straight to stderr: the test harness captures
            // eprintln! of passing tests, and a skip must be seen.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {name}: PostgreSQL at {shown} unreachable: {e}"
            );
            return;
        }
    };
    let schema = unique_name();
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut admin)
        .await
        .expect("create schema");
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}options=-c%20search_path%3D{schema}");
    let outcome = std::panic::AssertUnwindSafe(test(url)).catch_unwind().await;
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&mut admin)
        .await
        .expect("drop schema");
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
