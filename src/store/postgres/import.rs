//! `cosmopoints migrate`: a redb file copied into an empty PostgreSQL database.
//!
//! The file is read out by `store::export` (from a private, migrated copy: the source
//! is never changed) on a thread of its own, and its batches come here over a bounded
//! channel, so reading and writing overlap. Everything is written in ONE PostgreSQL
//! transaction: the database ends up with the whole file or with nothing.
//!
//! Rows keep their `seq` (so ids, which are `seq` enciphered, stay the same), the file's
//! id key and signing key go into `meta` (so ids and tokens read the same), and each
//! sequence is moved past the largest `seq` written. A database that holds any row is
//! refused, after the tables are locked, so a copy never mixes with other data.

use std::path::Path;

use tokio::sync::mpsc;

use super::super::export::{export_file, Counts, ExportError, Rows};
use super::super::OpenError;
use super::rows::big;
use super::write::DeliveryParams;
use super::{blocking, connect, connection_config, describe, schema};
use crate::config::PostgresConfig;

/// Rows per batch read from the file and per INSERT.
const BATCH: usize = 5_000;

/// Why a migration did not happen. In every case nothing was copied (the schema and the
/// id key may have been made, as a server's start would make them).
#[derive(Debug)]
pub enum MigrateError {
    /// The source file cannot be opened (missing, in use, newer, damaged).
    Source(String),
    /// The storage settings or the database cannot be used (exit 2).
    Database(OpenError),
    /// The database holds data already.
    NotEmpty,
    /// Servers (this many connections) are connected to the database.
    InUse(i64),
    /// Reading or writing failed part-way (rolled back).
    Failed(String),
}

impl std::fmt::Display for MigrateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MigrateError::Source(e) => write!(f, "the source cannot be read: {e}"),
            MigrateError::Database(e) => write!(f, "{e}"),
            MigrateError::NotEmpty => f.write_str(
                "the PostgreSQL database holds data already; migrate copies into an empty \
                 database only",
            ),
            MigrateError::InUse(n) => write!(
                f,
                "{n} connections of cosmopoints servers are open on the PostgreSQL database; \
                 stop the servers first"
            ),
            MigrateError::Failed(e) => write!(f, "{e}"),
        }
    }
}

/// Copies the redb file at `source` into the (empty) database of `config`.
pub fn migrate_file(source: &Path, config: &PostgresConfig) -> Result<Counts, MigrateError> {
    let pg = connection_config(config).map_err(MigrateError::Database)?;
    let source = source.to_path_buf();
    blocking(async move {
        let (tx, rx) = mpsc::channel::<Rows>(4);
        let reader = tokio::task::spawn_blocking(move || {
            export_file(&source, BATCH, |rows| {
                tx.blocking_send(rows)
                    .map_err(|_| "the copy stopped".to_owned())
            })
        });
        let written = write_all(&pg, rx).await;
        let read = reader
            .await
            .map_err(|_| MigrateError::Failed("the reading thread panicked".into()))?;
        match (read, written) {
            // The writer's own error says why the reading stopped.
            (Err(ExportError::Sink(_)), Err(e)) => Err(e),
            (Err(ExportError::Open(e)), _) => Err(MigrateError::Source(e.to_string())),
            (Err(e), _) => Err(MigrateError::Failed(e.to_string())),
            (Ok(_), Err(e)) => Err(e),
            (Ok(counts), Ok(())) => Ok(counts),
        }
    })
    .map_err(MigrateError::Failed)?
}

fn failed(what: &str) -> impl Fn(tokio_postgres::Error) -> MigrateError + '_ {
    move |e| MigrateError::Failed(format!("PostgreSQL: {what}: {}", describe(&e)))
}

fn out_of_range(_: super::super::StoreError) -> MigrateError {
    MigrateError::Failed("a number in the source is too large for PostgreSQL's bigint".into())
}

/// Takes the batches from `rx` and writes them in one transaction, committed only after
/// the last one (and only if the reader sent the keys first).
async fn write_all(
    pg: &tokio_postgres::Config,
    mut rx: mpsc::Receiver<Rows>,
) -> Result<(), MigrateError> {
    // The keys come first; nothing at all means the source could not be read (the
    // reader's error says why).
    let Some(Rows::Keys {
        signing_key,
        id_key,
    }) = rx.recv().await
    else {
        return Err(MigrateError::Failed("the source sent no keys".into()));
    };
    let mut client = connect(pg).await.map_err(|e| {
        MigrateError::Database(OpenError::Unusable(format!(
            "cannot connect to PostgreSQL: {}",
            describe(&e)
        )))
    })?;
    schema::prepare(&mut client, &id_key)
        .await
        .map_err(MigrateError::Database)?;
    // Held until this session ends: a server starting meanwhile waits in its own
    // migration step, then reads the keys copied here.
    client
        .execute("SELECT pg_advisory_lock($1)", &[&schema::MIGRATION_LOCK])
        .await
        .map_err(failed("cannot take the migration lock"))?;
    let txn = client.transaction().await.map_err(failed("cannot begin"))?;
    // A server already running on the database keeps the keys it read in memory, and
    // takes seqs that may be the copied ones: none may be connected.
    let servers: i64 = txn
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = 'cosmopoints' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .map_err(failed("cannot look for servers"))?
        .try_get(0)
        .map_err(failed("cannot look for servers"))?;
    if servers > 0 {
        return Err(MigrateError::InUse(servers));
    }
    // No server may write while the copy is made, and the copy goes only into an empty
    // database.
    txn.batch_execute(
        "LOCK TABLE transactions, connections, reversals, events, deliveries IN EXCLUSIVE MODE",
    )
    .await
    .map_err(failed("cannot lock the tables"))?;
    let any: bool = txn
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM transactions) OR EXISTS (SELECT 1 FROM connections) \
             OR EXISTS (SELECT 1 FROM reversals) OR EXISTS (SELECT 1 FROM events) \
             OR EXISTS (SELECT 1 FROM deliveries)",
            &[],
        )
        .await
        .map_err(failed("cannot look for rows"))?
        .try_get(0)
        .map_err(failed("cannot look for rows"))?;
    if any {
        return Err(MigrateError::NotEmpty);
    }
    // The file's keys replace any a server made on the empty database.
    let keys: Vec<(&str, &[u8])> = std::iter::once(("id_key", id_key.as_slice()))
        .chain(signing_key.as_deref().map(|k| ("signing_key", k)))
        .collect();
    for (name, bytes) in keys {
        txn.execute(
            "INSERT INTO meta (name, bytes) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET bytes = EXCLUDED.bytes",
            &[&name, &bytes],
        )
        .await
        .map_err(failed("cannot store the keys"))?;
    }
    while let Some(rows) = rx.recv().await {
        insert(&txn, rows).await?;
    }
    for (sequence, table) in [
        ("transactions_seq", "transactions"),
        ("reversals_seq", "reversals"),
        ("events_seq", "events"),
    ] {
        txn.execute(
            &format!(
                "SELECT setval('{sequence}', max(seq) + 1, false) FROM {table} HAVING count(*) > 0"
            ),
            &[],
        )
        .await
        .map_err(failed("cannot move a sequence"))?;
    }
    txn.commit().await.map_err(failed("cannot commit"))?;
    // Statistics for the planner at once, as after any bulk load (autovacuum would get to
    // it within a minute or so): the servers' plans are made from them.
    client
        .batch_execute("ANALYZE transactions, connections, reversals, events, deliveries")
        .await
        .map_err(failed("copied, but ANALYZE failed"))
}

/// One batch as one INSERT of arrays.
async fn insert(txn: &tokio_postgres::Transaction<'_>, rows: Rows) -> Result<(), MigrateError> {
    match rows {
        Rows::Keys { .. } => Err(MigrateError::Failed("the keys came twice".into())),
        Rows::Transactions(txs) => {
            let mut c = TxColumns::default();
            for t in txs {
                c.seq.push(big(t.seq).map_err(out_of_range)?);
                c.value.push(big(t.value).map_err(out_of_range)?);
                c.total_points
                    .push(big(t.total_points).map_err(out_of_range)?);
                c.created_at.push(big(t.created_at).map_err(out_of_range)?);
                c.reversed_value
                    .push(big(t.reversed_value).map_err(out_of_range)?);
                c.reversed_points
                    .push(big(t.reversed_points).map_err(out_of_range)?);
                c.reversals.push(i32::try_from(t.reversals).map_err(|_| {
                    MigrateError::Failed("a reversal count is out of range".into())
                })?);
                c.bonus.push(t.bonus);
                c.business.push(t.business);
                c.reference_number.push(t.reference_number);
                c.program_id.push(t.program_id);
                c.program_name.push(t.program_name);
                c.user_id.push(t.user_id);
                c.description.push(t.description);
                c.currency.push(t.currency);
                c.end_user_id.push(t.end_user_id);
            }
            txn.execute(
                "INSERT INTO transactions (seq, business, reference_number, program_id, \
                 program_name, user_id, description, currency, value, total_points, bonus, \
                 created_at, end_user_id, reversed_value, reversed_points, reversals) \
                 SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], \
                 $5::text[], $6::text[], $7::text[], $8::text[], $9::bigint[], $10::bigint[], \
                 $11::boolean[], $12::bigint[], $13::text[], $14::bigint[], $15::bigint[], \
                 $16::integer[])",
                &[
                    &c.seq,
                    &c.business,
                    &c.reference_number,
                    &c.program_id,
                    &c.program_name,
                    &c.user_id,
                    &c.description,
                    &c.currency,
                    &c.value,
                    &c.total_points,
                    &c.bonus,
                    &c.created_at,
                    &c.end_user_id,
                    &c.reversed_value,
                    &c.reversed_points,
                    &c.reversals,
                ],
            )
            .await
            .map_err(failed("cannot copy transactions"))?;
            Ok(())
        }
        Rows::Connections(conns) => {
            let (mut business, mut end_user, mut program, mut destination) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let (mut created, mut updated) = (Vec::new(), Vec::new());
            for (b, e, p, c) in conns {
                business.push(b);
                end_user.push(e);
                program.push(p);
                destination.push(c.destination_user_id);
                created.push(big(c.created_at).map_err(out_of_range)?);
                updated.push(big(c.updated_at).map_err(out_of_range)?);
            }
            txn.execute(
                "INSERT INTO connections (business, end_user_id, program_id, \
                 destination_user_id, created_at, updated_at) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], \
                 $5::bigint[], $6::bigint[])",
                &[
                    &business,
                    &end_user,
                    &program,
                    &destination,
                    &created,
                    &updated,
                ],
            )
            .await
            .map_err(failed("cannot copy connections"))?;
            Ok(())
        }
        Rows::Reversals(reversals) => {
            let mut c = ReversalColumns::default();
            for (seq, r) in reversals {
                c.seq.push(big(seq).map_err(out_of_range)?);
                c.tx_seq.push(big(r.tx_seq).map_err(out_of_range)?);
                c.value.push(big(r.value).map_err(out_of_range)?);
                c.points.push(big(r.points).map_err(out_of_range)?);
                c.created_at.push(big(r.created_at).map_err(out_of_range)?);
                c.is_full.push(r.full);
                c.business.push(r.business);
                c.reference_number.push(r.reference_number);
                c.reason.push(r.reason);
            }
            txn.execute(
                "INSERT INTO reversals (seq, business, reference_number, tx_seq, value, points, \
                 is_full, reason, created_at) \
                 SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::bigint[], \
                 $5::bigint[], $6::bigint[], $7::boolean[], $8::text[], $9::bigint[])",
                &[
                    &c.seq,
                    &c.business,
                    &c.reference_number,
                    &c.tx_seq,
                    &c.value,
                    &c.points,
                    &c.is_full,
                    &c.reason,
                    &c.created_at,
                ],
            )
            .await
            .map_err(failed("cannot copy reversals"))?;
            Ok(())
        }
        Rows::Events(events) => {
            let (mut seq, mut business, mut target, mut kind) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let (mut created, mut payload) = (Vec::new(), Vec::new());
            for (s, e) in events {
                seq.push(big(s).map_err(out_of_range)?);
                created.push(big(e.created_at).map_err(out_of_range)?);
                business.push(e.business);
                target.push(e.target);
                kind.push(e.kind);
                payload.push(e.payload);
            }
            txn.execute(
                "INSERT INTO events (seq, business, target, kind, created_at, payload) \
                 SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], \
                 $5::bigint[], $6::bytea[])",
                &[&seq, &business, &target, &kind, &created, &payload],
            )
            .await
            .map_err(failed("cannot copy events"))?;
            Ok(())
        }
        Rows::Deliveries(deliveries) => {
            let mut c = DeliveryColumns::default();
            for (kind, id, d) in deliveries {
                let p = DeliveryParams::of(i16::from(kind), id, &d).map_err(out_of_range)?;
                c.kind.push(p.kind);
                c.id.push(p.id);
                c.status.push(p.status);
                c.attempts.push(p.attempts);
                c.step.push(p.step);
                c.last_attempt_at.push(p.last_attempt_at);
                c.next_attempt_at.push(p.next_attempt_at);
                c.partner_transaction_id.push(p.partner_transaction_id);
                c.error_kind.push(p.error_kind);
                c.error_http_status.push(p.error_http_status);
                c.error_detail.push(p.error_detail);
            }
            txn.execute(
                "INSERT INTO deliveries (kind, id, status, attempts, step, last_attempt_at, \
                 next_attempt_at, partner_transaction_id, error_kind, error_http_status, \
                 error_detail) \
                 SELECT * FROM UNNEST($1::smallint[], $2::bigint[], $3::smallint[], \
                 $4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[], $8::text[], \
                 $9::smallint[], $10::integer[], $11::text[])",
                &[
                    &c.kind,
                    &c.id,
                    &c.status,
                    &c.attempts,
                    &c.step,
                    &c.last_attempt_at,
                    &c.next_attempt_at,
                    &c.partner_transaction_id,
                    &c.error_kind,
                    &c.error_http_status,
                    &c.error_detail,
                ],
            )
            .await
            .map_err(failed("cannot copy deliveries"))?;
            Ok(())
        }
    }
}

#[derive(Default)]
struct TxColumns {
    seq: Vec<i64>,
    business: Vec<String>,
    reference_number: Vec<String>,
    program_id: Vec<String>,
    program_name: Vec<String>,
    user_id: Vec<String>,
    description: Vec<Option<String>>,
    currency: Vec<String>,
    value: Vec<i64>,
    total_points: Vec<i64>,
    bonus: Vec<bool>,
    created_at: Vec<i64>,
    end_user_id: Vec<Option<String>>,
    reversed_value: Vec<i64>,
    reversed_points: Vec<i64>,
    reversals: Vec<i32>,
}

#[derive(Default)]
struct ReversalColumns {
    seq: Vec<i64>,
    business: Vec<String>,
    reference_number: Vec<String>,
    tx_seq: Vec<i64>,
    value: Vec<i64>,
    points: Vec<i64>,
    is_full: Vec<bool>,
    reason: Vec<Option<String>>,
    created_at: Vec<i64>,
}

#[derive(Default)]
struct DeliveryColumns {
    kind: Vec<i16>,
    id: Vec<i64>,
    status: Vec<i16>,
    attempts: Vec<i64>,
    step: Vec<i64>,
    last_attempt_at: Vec<Option<i64>>,
    next_attempt_at: Vec<Option<i64>>,
    partner_transaction_id: Vec<Option<String>>,
    error_kind: Vec<Option<i16>>,
    error_http_status: Vec<Option<i32>>,
    error_detail: Vec<Option<String>>,
}
