//! Why a write failed: the database is away (worth retrying) or it refused the data (never worth
//! retrying). Pure: [`classify`] decides from the error alone where it can, and says when only
//! asking the same connection `SELECT 1` can tell ([`class_of`] asks).

use diesel::connection::SimpleConnection;
use diesel::result::{DatabaseErrorKind, Error as DieselError};

use crate::store::db::DbConnection;
use crate::store::StoreError;

/// Why a statement failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The database (or the way to it) is away: a later attempt may succeed.
    Away,
    /// The database answered and refused this data: the same write will always fail.
    Refused,
}

/// The class of `e` when the error alone says it; `None` when it does not (diesel gives
/// PostgreSQL's data exceptions, class 22, and trigger refusals no kind of their own, and SQLite's
/// trigger refusals likewise): then the connection it happened on must be asked.
pub fn classify(e: &StoreError) -> Option<Class> {
    use DatabaseErrorKind as K;
    match e {
        StoreError::Duplicate | StoreError::Refused(_) => Some(Class::Refused),
        StoreError::Unavailable(_) => Some(Class::Away),
        StoreError::Query(DieselError::DatabaseError(kind, info)) => match kind {
            K::ClosedConnection
            | K::UnableToSendCommand
            | K::SerializationFailure
            | K::ReadOnlyTransaction => Some(Class::Away),
            K::UniqueViolation
            | K::ForeignKeyViolation
            | K::NotNullViolation
            | K::CheckViolation
            | K::RestrictViolation
            | K::ExclusionViolation => Some(Class::Refused),
            _ if sqlite_transient(info.message()) => Some(Class::Away),
            _ => None,
        },
        StoreError::Query(
            DieselError::NotFound
            | DieselError::SerializationError(_)
            | DieselError::DeserializationError(_)
            | DieselError::QueryBuilderError(_),
        ) => Some(Class::Refused),
        StoreError::Query(_) => None,
    }
}

/// The class of `e`, asking `conn` (the connection it happened on) when the error does not say:
/// a connection that still answers refused the data; one that does not is away.
pub fn class_of(conn: &mut DbConnection, e: &StoreError) -> Class {
    classify(e).unwrap_or_else(|| {
        if conn.batch_execute("SELECT 1").is_ok() {
            Class::Refused
        } else {
            Class::Away
        }
    })
}

/// SQLite's messages for a database that is busy, locked or cannot be read or written just now.
fn sqlite_transient(message: &str) -> bool {
    const TRANSIENT: [&str; 5] = [
        "database is locked",
        "database table is locked",
        "disk I/O error",
        "database or disk is full",
        "unable to open database file",
    ];
    TRANSIENT.iter().any(|t| message.contains(t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::result::DatabaseErrorInformation;

    /// A database error as diesel reports it: a kind and a message.
    struct Info(&'static str);

    impl DatabaseErrorInformation for Info {
        fn message(&self) -> &str {
            self.0
        }
        fn details(&self) -> Option<&str> {
            None
        }
        fn hint(&self) -> Option<&str> {
            None
        }
        fn table_name(&self) -> Option<&str> {
            None
        }
        fn column_name(&self) -> Option<&str> {
            None
        }
        fn constraint_name(&self) -> Option<&str> {
            None
        }
        fn statement_position(&self) -> Option<i32> {
            None
        }
    }

    fn db(kind: DatabaseErrorKind, message: &'static str) -> StoreError {
        StoreError::Query(DieselError::DatabaseError(kind, Box::new(Info(message))))
    }

    #[test]
    fn a_lost_or_read_only_database_is_away() {
        use DatabaseErrorKind as K;
        for kind in [
            K::ClosedConnection,
            K::UnableToSendCommand,
            K::SerializationFailure,
            K::ReadOnlyTransaction,
        ] {
            assert_eq!(classify(&db(kind, "x")), Some(Class::Away), "{kind:?}");
        }
        let pool_timeout = StoreError::Unavailable("timed out waiting for connection".into());
        assert_eq!(classify(&pool_timeout), Some(Class::Away));
    }

    #[test]
    fn constraint_violations_and_bad_data_are_refused() {
        use DatabaseErrorKind as K;
        for kind in [
            K::UniqueViolation,
            K::ForeignKeyViolation,
            K::NotNullViolation,
            K::CheckViolation,
            K::RestrictViolation,
            K::ExclusionViolation,
        ] {
            assert_eq!(classify(&db(kind, "x")), Some(Class::Refused), "{kind:?}");
        }
        assert_eq!(classify(&StoreError::Duplicate), Some(Class::Refused));
        assert_eq!(
            classify(&StoreError::Query(DieselError::NotFound)),
            Some(Class::Refused)
        );
    }

    #[test]
    fn sqlite_busy_and_full_disk_are_away_by_message() {
        for message in [
            "database is locked",
            "database table is locked",
            "disk I/O error",
            "database or disk is full",
            "unable to open database file",
        ] {
            assert_eq!(
                classify(&db(DatabaseErrorKind::Unknown, message)),
                Some(Class::Away),
                "{message}"
            );
        }
    }

    #[test]
    fn trigger_refusals_and_data_exceptions_need_the_connection_asked() {
        // PostgreSQL's class 22 (a NUL in text) and a trigger's RAISE carry no kind of their own.
        let nul = db(
            DatabaseErrorKind::Unknown,
            "invalid byte sequence for encoding \"UTF8\": 0x00",
        );
        assert_eq!(classify(&nul), None);
        let trigger = db(
            DatabaseErrorKind::Unknown,
            "task status may only move forward",
        );
        assert_eq!(classify(&trigger), None);
        assert_eq!(
            classify(&StoreError::Query(DieselError::BrokenTransactionManager)),
            None
        );
    }
}
