//! The PostgreSQL schema: embedded, versioned migrations applied on open under an
//! advisory lock (so that processes starting together apply each migration once), and
//! the keys every process shares (`meta`).
//!
//! [`MIGRATIONS`]`[i]` brings a database from schema `i` to `i + 1`, in one transaction
//! with the new version. Migrations are never edited once released: a change is a new
//! one at the end. A database of a newer schema than this build's is refused.

use tokio_postgres::Client;

use super::super::OpenError;

/// The PostgreSQL schema this build reads and writes.
pub const PG_SCHEMA_VERSION: u64 = 1;

/// Held while migrating: any constant, the same in every build.
pub(super) const MIGRATION_LOCK: i64 = 0x636f_736d_6f70_7473; // "cosmopts"

/// Created before anything else, so that the version can be read.
const META: &str = "CREATE TABLE IF NOT EXISTS meta (
    name text PRIMARY KEY,
    number bigint,
    bytes bytea
)";

pub(super) const MIGRATIONS: &[&str] = &[
    // 0 → 1: the first layout.
    "
    CREATE SEQUENCE transactions_seq AS bigint MINVALUE 0 START WITH 0;
    CREATE TABLE transactions (
        seq bigint PRIMARY KEY CHECK (seq >= 0),
        business text NOT NULL,
        reference_number text NOT NULL,
        program_id text NOT NULL,
        program_name text NOT NULL,
        user_id text NOT NULL,
        description text,
        currency text NOT NULL,
        value bigint NOT NULL CHECK (value >= 0),
        total_points bigint NOT NULL CHECK (total_points >= 0),
        bonus boolean NOT NULL,
        created_at bigint NOT NULL,
        end_user_id text,
        reversed_value bigint NOT NULL DEFAULT 0 CHECK (reversed_value >= 0),
        reversed_points bigint NOT NULL DEFAULT 0 CHECK (reversed_points >= 0),
        reversals integer NOT NULL DEFAULT 0 CHECK (reversals >= 0),
        CONSTRAINT transactions_reference UNIQUE (business, reference_number)
    );
    CREATE INDEX transactions_by_date ON transactions (business, created_at, seq);
    CREATE INDEX transactions_by_program_date
        ON transactions (business, program_id, created_at, seq);

    CREATE TABLE connections (
        business text NOT NULL,
        end_user_id text NOT NULL,
        program_id text NOT NULL,
        destination_user_id text NOT NULL,
        created_at bigint NOT NULL,
        updated_at bigint NOT NULL,
        PRIMARY KEY (business, end_user_id, program_id)
    );

    CREATE TABLE deliveries (
        kind smallint NOT NULL,
        id bigint NOT NULL,
        status smallint NOT NULL,
        attempts bigint NOT NULL,
        step bigint NOT NULL,
        last_attempt_at bigint,
        next_attempt_at bigint,
        partner_transaction_id text,
        error_kind smallint,
        error_http_status integer,
        error_detail text,
        claimed_until bigint,
        claimed_by bigint,
        PRIMARY KEY (kind, id)
    );
    CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE status = 0;

    CREATE SEQUENCE events_seq AS bigint MINVALUE 0 START WITH 0;
    CREATE TABLE events (
        seq bigint PRIMARY KEY CHECK (seq >= 0),
        business text NOT NULL,
        target text NOT NULL,
        kind text NOT NULL,
        created_at bigint NOT NULL,
        payload bytea NOT NULL
    );

    CREATE SEQUENCE reversals_seq AS bigint MINVALUE 0 START WITH 0;
    CREATE TABLE reversals (
        seq bigint PRIMARY KEY CHECK (seq >= 0),
        business text NOT NULL,
        reference_number text NOT NULL,
        tx_seq bigint NOT NULL REFERENCES transactions (seq),
        value bigint NOT NULL CHECK (value >= 0),
        points bigint NOT NULL CHECK (points >= 0),
        is_full boolean NOT NULL,
        reason text,
        created_at bigint NOT NULL,
        CONSTRAINT reversals_reference UNIQUE (business, reference_number)
    );
    CREATE INDEX reversals_by_tx ON reversals (tx_seq, seq);
    ",
];

/// What opening found.
pub(super) struct Prepared {
    pub id_key: Vec<u8>,
    pub migrated_from: Option<u64>,
}

fn unusable(what: &str, e: tokio_postgres::Error) -> OpenError {
    OpenError::Unusable(format!("PostgreSQL: {what}: {}", super::describe(&e)))
}

/// The schema version of the database (0: none yet).
pub(super) async fn version<C: tokio_postgres::GenericClient>(
    client: &C,
) -> Result<u64, OpenError> {
    let row = client
        .query_opt("SELECT number FROM meta WHERE name = 'schema_version'", &[])
        .await
        .map_err(|e| unusable("cannot read the schema version", e))?;
    let v: Option<i64> = match row {
        Some(row) => row
            .try_get(0)
            .map_err(|e| unusable("cannot read the schema version", e))?,
        None => None,
    };
    u64::try_from(v.unwrap_or(0))
        .map_err(|_| OpenError::Unusable("PostgreSQL: a negative schema version".into()))
}

/// Brings the database to [`PG_SCHEMA_VERSION`] (under an advisory lock: other processes
/// opening at the same time wait, then find it done) and makes the id key if it has none.
pub(super) async fn prepare(client: &mut Client, new_id_key: &[u8]) -> Result<Prepared, OpenError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| unusable("cannot take the migration lock", e))?;
    let prepared = migrate(client, new_id_key).await;
    // Released at the end of the session anyway; an error here changes nothing.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    prepared
}

async fn migrate(client: &mut Client, new_id_key: &[u8]) -> Result<Prepared, OpenError> {
    client
        .batch_execute(META)
        .await
        .map_err(|e| unusable("cannot create the meta table", e))?;
    let found = version(client).await?;
    if found > PG_SCHEMA_VERSION {
        return Err(OpenError::NewerSchema(found));
    }
    for (from, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let to = from as i64 + 1;
        let txn = client
            .transaction()
            .await
            .map_err(|e| unusable("cannot begin a migration", e))?;
        txn.batch_execute(sql)
            .await
            .map_err(|e| unusable(&format!("migration to schema {to} failed"), e))?;
        txn.execute(
            "INSERT INTO meta (name, number) VALUES ('schema_version', $1) \
             ON CONFLICT (name) DO UPDATE SET number = EXCLUDED.number",
            &[&to],
        )
        .await
        .map_err(|e| unusable("cannot record the schema version", e))?;
        txn.commit()
            .await
            .map_err(|e| unusable(&format!("migration to schema {to} failed"), e))?;
    }
    let id_key = shared_key(client, "id_key", new_id_key)
        .await
        .map_err(|e| unusable("cannot read or store the id key", e))?;
    Ok(Prepared {
        id_key,
        migrated_from: (found > 0 && found < PG_SCHEMA_VERSION).then_some(found),
    })
}

/// The key `name` in `meta`: `candidate` if none was stored yet, else the stored one.
/// Every process reads back what the first one stored (INSERT … ON CONFLICT DO NOTHING),
/// so they all share it.
pub(super) async fn shared_key(
    client: &Client,
    name: &str,
    candidate: &[u8],
) -> Result<Vec<u8>, tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO meta (name, bytes) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
            &[&name, &candidate],
        )
        .await?;
    let row = client
        .query_one("SELECT bytes FROM meta WHERE name = $1", &[&name])
        .await?;
    row.try_get::<_, Vec<u8>>(0)
}
