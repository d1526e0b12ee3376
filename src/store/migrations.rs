//! The schema migrations, embedded in the binary from `migrations/`.
//!
//! sqlx's `migrate!` macro would embed them too, but it needs sqlx's
//! proc-macro crate, which compiles both database drivers a second time; a
//! list of `include_str!`s does the same job. sqlx's migrator then applies
//! the ones a database lacks, records them in `_sqlx_migrations` with a
//! checksum, and (on PostgreSQL) holds an advisory lock meanwhile so that
//! adapters starting together do not race.
//!
//! A migration, once released, is never edited: a changed checksum stops
//! the adapter at startup. Changes go into a new numbered file in both
//! folders.

use std::borrow::Cow;

use futures::future::BoxFuture;
use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};

/// One migration: version, description, SQL.
type Embedded = (i64, &'static str, &'static str);

pub(super) const SQLITE: &[Embedded] = &[(
    1,
    "presence and history",
    include_str!("../../migrations/sqlite/0001_presence_and_history.sql"),
)];

pub(super) const POSTGRES: &[Embedded] = &[(
    1,
    "presence and history",
    include_str!("../../migrations/postgres/0001_presence_and_history.sql"),
)];

/// A migration source over embedded files.
#[derive(Debug)]
struct Source(&'static [Embedded]);

impl MigrationSource<'static> for Source {
    fn resolve(self) -> BoxFuture<'static, Result<Vec<Migration>, BoxDynError>> {
        let migrations = self
            .0
            .iter()
            .map(|&(version, description, sql)| {
                Migration::new(
                    version,
                    Cow::Borrowed(description),
                    MigrationType::Simple,
                    Cow::Borrowed(sql),
                    false,
                )
            })
            .collect();
        Box::pin(async move { Ok(migrations) })
    }
}

/// The migrator for one database's list.
pub(super) async fn migrator(
    list: &'static [Embedded],
) -> Result<Migrator, sqlx::migrate::MigrateError> {
    Migrator::new(Source(list)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_databases_have_the_same_versions_in_order() {
        let versions = |l: &[Embedded]| l.iter().map(|m| m.0).collect::<Vec<_>>();
        assert_eq!(versions(SQLITE), versions(POSTGRES));
        assert!(versions(SQLITE).windows(2).all(|w| w[0] < w[1]));
        assert_eq!(versions(SQLITE).first(), Some(&1));
    }
}
