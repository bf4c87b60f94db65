//! `cosmopoints export`: every business's transactions in a date range, as CSV (the
//! columns of [`crate::csv`] after a `business` column) or JSON Lines (each line the JSON
//! the API lists, with a `business` field first), read from one stopped server's database.

use std::io::Write;

use bytes::BytesMut;

use crate::api::write_transaction_json;
use crate::config::Config;
use crate::ledger::Transaction;
use crate::store::{Store, StoreError, TxQuery};

/// The output format of an export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    Csv,
    Jsonl,
}

impl ExportFormat {
    pub fn parse(text: &str) -> Option<ExportFormat> {
        match text {
            "csv" => Some(ExportFormat::Csv),
            "jsonl" => Some(ExportFormat::Jsonl),
            _ => None,
        }
    }
}

/// Why an export stopped.
#[derive(Debug)]
pub enum ExportError {
    Store(StoreError),
    Write(std::io::Error),
}

impl std::fmt::Display for ExportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExportError::Store(e) => write!(f, "the database could not be read: {e:?}"),
            ExportError::Write(e) => write!(f, "cannot write the export: {e}"),
        }
    }
}

/// Writes the transactions created in `start..=end` (epoch seconds) of every business of
/// `config`, business by business in the config's order, each oldest first. Returns how
/// many rows were written.
pub async fn export(
    store: &Store,
    config: &Config,
    start: u64,
    end: u64,
    format: ExportFormat,
    out: &mut impl Write,
) -> Result<u64, ExportError> {
    if format == ExportFormat::Csv {
        let mut head = BytesMut::new();
        crate::csv::header(true, &mut head);
        out.write_all(&head).map_err(ExportError::Write)?;
    }
    let mut rows = 0u64;
    for business in &config.businesses {
        let query = TxQuery {
            business: business.id.clone(),
            program: None,
            start,
            end,
            after: None,
            limit: None,
            status: None,
        };
        let name = business.id.to_string();
        let mut listing = store
            .list(query, move |txs| encode(txs, &name, format))
            .map_err(ExportError::Store)?;
        while let Some(batch) = listing.next().await {
            let (count, bytes) = batch.map_err(ExportError::Store)?;
            out.write_all(&bytes).map_err(ExportError::Write)?;
            rows += count;
        }
    }
    out.flush().map_err(ExportError::Write)?;
    Ok(rows)
}

/// A batch of rows as text, and how many.
fn encode(txs: &[Transaction], business: &str, format: ExportFormat) -> (u64, BytesMut) {
    let mut buf = BytesMut::with_capacity(txs.len() * 400);
    for tx in txs {
        match format {
            ExportFormat::Csv => crate::csv::row(tx, Some(business), &mut buf),
            ExportFormat::Jsonl => {
                // The API's object with `business` put in front: its text after the `{`.
                let mut object = Vec::with_capacity(400);
                if let Err(e) = write_transaction_json(tx, &mut object) {
                    tracing::error!(error = %e, "cannot encode a transaction");
                    continue;
                }
                buf.extend_from_slice(b"{\"business\":");
                buf.extend_from_slice(
                    serde_json::to_string(business)
                        .expect("a string always encodes")
                        .as_bytes(),
                );
                buf.extend_from_slice(b",");
                buf.extend_from_slice(object.get(1..).unwrap_or_default());
                buf.extend_from_slice(b"\n");
            }
        }
    }
    (txs.len() as u64, buf)
}
