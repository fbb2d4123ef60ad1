//! Start-up's work on the database before serving: the schema, the round's rows, and the proof
//! that the server's role may do all it will do. A role that could connect but not store would
//! let the server start and then answer every batch `ERR STORAGE`, and the agencies retry.

use postgres::error::SqlState;
use postgres::types::Type;
use postgres::{Client, Transaction};

use super::error::{OpenError, classify, detail};
use super::{ALL_DONE, BATCH, CHANNEL, FIGURES, RELATIONS, SCHEMA, SCHEMA_LOCK};

/// Every table privilege the server uses: the round's rows are inserted at start-up, bets by
/// batches, and `FOR UPDATE` needs `UPDATE`.
const NEEDED: [(&str, &str); 8] = [
    ("SELECT", "lottery_round"),
    ("INSERT", "lottery_round"),
    ("UPDATE", "lottery_round"),
    ("SELECT", "lottery_agency"),
    ("INSERT", "lottery_agency"),
    ("UPDATE", "lottery_agency"),
    ("SELECT", "lottery_bet"),
    ("INSERT", "lottery_bet"),
];

/// What to do for a role that cannot create the tables.
const CREATE_ADVICE: &str = "grant it CREATE on the schema, or create them as an administrator from \
                             src/ledger/schema.sql and grant it SELECT, INSERT and UPDATE on them";

/// Creates or migrates the schema if any of it is missing, checks the role's table privileges,
/// and makes sure the round row and the agencies' rows exist.
pub(super) fn migrate(client: &mut Client, agencies: u32, place: &str) -> Result<(), OpenError> {
    let fail = |e: postgres::Error| classify(&e, place, "");
    let user: String = client.query_one("SELECT current_user::text", &[]).map_err(fail)?.get(0);
    let mut tx = client.transaction().map_err(fail)?;
    // Without it, every `IF NOT EXISTS` that skips says so in a NOTICE, which the client logs.
    tx.batch_execute("SET LOCAL client_min_messages = warning").map_err(fail)?;
    tx.execute_typed("SELECT pg_advisory_xact_lock($1)", &[(&SCHEMA_LOCK, Type::INT8)]).map_err(fail)?;
    if !schema_present(&mut tx).map_err(fail)? {
        tx.batch_execute(SCHEMA)
            .map_err(|e| refused(&e, &user, ("create the round's tables", CREATE_ADVICE), place))?;
    }
    let missing = missing_privileges(&mut tx).map_err(fail)?;
    if !missing.is_empty() {
        return Err(OpenError::MissingPrivileges { user, missing });
    }
    let n = agencies as i32;
    tx.execute_typed(
        "INSERT INTO lottery_round (id, agencies) VALUES (1, $1) ON CONFLICT DO NOTHING",
        &[(&n, Type::INT4)],
    )
    .map_err(fail)?;
    let held: i32 = tx.query_typed_one("SELECT agencies FROM lottery_round WHERE id = 1", &[]).map_err(fail)?.get(0);
    if held != n {
        return Err(OpenError::OtherRound { held, agencies });
    }
    tx.execute_typed(
        "INSERT INTO lottery_agency (agency) SELECT generate_series(1, $1) ON CONFLICT DO NOTHING",
        &[(&n, Type::INT4)],
    )
    .map_err(fail)?;
    tx.commit().map_err(fail)
}

/// Whether every relation of the schema exists.
fn schema_present(tx: &mut Transaction<'_>) -> Result<bool, postgres::Error> {
    let names: Vec<String> = RELATIONS.iter().map(|&r| r.to_owned()).collect();
    let row = tx.query_typed_one(
        "SELECT bool_and(to_regclass(n) IS NOT NULL) FROM unnest($1::text[]) AS n",
        &[(&names, Type::TEXT_ARRAY)],
    )?;
    Ok(row.get(0))
}

/// Each privilege of [`NEEDED`] the role lacks, as `UPDATE on table lottery_agency`.
fn missing_privileges(tx: &mut Transaction<'_>) -> Result<Vec<String>, postgres::Error> {
    let (privileges, tables): (Vec<String>, Vec<String>) =
        NEEDED.iter().map(|&(p, t)| (p.to_owned(), t.to_owned())).unzip();
    let rows = tx.query_typed(
        "SELECT p || ' on table ' || t FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS n(p, t, i) \
         WHERE NOT has_table_privilege(t, p) ORDER BY i",
        &[(&privileges, Type::TEXT_ARRAY), (&tables, Type::TEXT_ARRAY)],
    )?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// Runs every kind of statement the server will run, on rows that do not exist (so that it
/// locks nothing another replica uses), in a transaction rolled back: what a table privilege
/// does not show (a function's `EXECUTE`, a row policy) is found now, not at the first batch.
pub(super) fn dry_run(client: &mut Client, place: &str) -> Result<(), OpenError> {
    let fail = |e: postgres::Error| classify(&e, place, "");
    let user: String = client.query_one("SELECT current_user::text", &[]).map_err(fail)?.get(0);
    let mut tx = client.transaction().map_err(fail)?;
    let none: Vec<String> = Vec::new();
    let numbers: Vec<i16> = Vec::new();
    let (agency, offset, count, max) = (0_i32, None::<i64>, 0_i64, 0_i64);
    let params: [&(dyn postgres::types::ToSql + Sync); 9] =
        [&agency, &offset, &count, &none, &none, &none, &none, &numbers, &max];
    tx.query(BATCH, &params).map_err(|e| refused(&e, &user, ("store a batch", GRANT), place))?;
    let steps = [
        ("mark an agency done", "UPDATE lottery_agency SET done = true WHERE agency = 0".to_owned()),
        ("read the round", format!("{ALL_DONE}; {FIGURES}")),
        ("lock the round", "SELECT drawn FROM lottery_round WHERE id = 0 FOR UPDATE".to_owned()),
        (
            "make the draw",
            "UPDATE lottery_agency a SET winners = w.joined FROM (SELECT agency, string_agg(document, ',') AS joined \
             FROM lottery_bet WHERE false GROUP BY agency) w WHERE a.agency = w.agency; \
             UPDATE lottery_round SET drawn = true, drawn_at = now() WHERE id = 0"
                .to_owned(),
        ),
        ("notify the other replicas", format!("LISTEN {CHANNEL}; NOTIFY {CHANNEL}; UNLISTEN {CHANNEL}")),
        ("wait for the disk", "SELECT pg_logical_emit_message(true, 'lottery', 'check')".to_owned()),
    ];
    for (what, sql) in steps {
        tx.batch_execute(&sql).map_err(|e| refused(&e, &user, (what, GRANT), place))?;
    }
    tx.rollback().map_err(fail)
}

/// What to do for a role that may not run a statement.
const GRANT: &str = "grant it what it lacks, or use another role";

/// A statement the role may not run (what it is, and what to do), or another failure.
fn refused(e: &postgres::Error, user: &str, (what, advice): (&'static str, &'static str), place: &str) -> OpenError {
    if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
        OpenError::CannotRun { user: user.to_owned(), what, said: detail(e), advice }
    } else {
        classify(e, place, "")
    }
}
