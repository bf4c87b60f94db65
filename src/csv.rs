//! Transactions as CSV rows (RFC 4180), for settlement reports: the listing with
//! `Accept: text/csv` and `cosmopoints export --format csv`.
//!
//! - Columns: [`COLUMNS`], one row per transaction, in the listing's order; a header row
//!   first. Values as the JSON listing has them (`sourceValue` in minor units, `createdAt`
//!   RFC 3339, `bonus` true/false, empty for an absent value).
//! - Quoting: a cell holding a comma, a double quote, CR or LF is enclosed in double
//!   quotes, its quotes doubled; rows end with CRLF.
//! - Formula injection: a cell whose text starts with `=`, `+`, `-`, `@`, TAB or CR (which
//!   spreadsheets run as a formula) gets a leading apostrophe `'`, so that a description
//!   like `=HYPERLINK(...)` shows as text. Only text fields can start so: the numbers are
//!   never negative. A program reading the CSV sees the apostrophe and can strip it from
//!   such cells.

use bytes::BytesMut;

use crate::clock::rfc3339;
use crate::domain::{Description, EndUserId};
use crate::ledger::Transaction;

/// The columns, in order (the header row).
pub const COLUMNS: &[&str] = &[
    "id",
    "referenceNumber",
    "createdAt",
    "programId",
    "programName",
    "userId",
    "endUserId",
    "sourceValue",
    "currency",
    "totalPoints",
    "bonus",
    "status",
    "partnerTransactionId",
    "description",
    "reversedValue",
    "reversedPoints",
];

/// The header row; `business` first when `with_business` (exports span businesses).
pub fn header(with_business: bool, out: &mut BytesMut) {
    let mut first = true;
    if with_business {
        cell(out, &mut first, "business");
    }
    for name in COLUMNS {
        cell(out, &mut first, name);
    }
    out.extend_from_slice(b"\r\n");
}

/// One transaction's row; `business` first when given.
pub fn row(tx: &Transaction, business: Option<&str>, out: &mut BytesMut) {
    let mut first = true;
    if let Some(business) = business {
        cell(out, &mut first, business);
    }
    let partner = tx
        .delivery
        .as_ref()
        .and_then(|d| d.partner_transaction_id.as_deref());
    for value in [
        tx.id.to_string().as_str(),
        tx.reference_number.as_str(),
        &rfc3339(tx.created_at),
        tx.program_id.as_str(),
        &tx.program_name,
        tx.user_id.as_str(),
        tx.end_user_id.as_ref().map_or("", EndUserId::as_str),
        &tx.value.to_string(),
        &tx.currency,
        &tx.total_points.to_string(),
        if tx.bonus { "true" } else { "false" },
        tx.status().as_str(),
        partner.unwrap_or(""),
        tx.description.as_ref().map_or("", Description::as_str),
        &tx.reversed_value.to_string(),
        &tx.reversed_points.to_string(),
    ] {
        cell(out, &mut first, value);
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends one cell (comma-led but for the first of a row), neutralised and quoted as
/// the module comment says.
fn cell(out: &mut BytesMut, first: &mut bool, value: &str) {
    if !*first {
        out.extend_from_slice(b",");
    }
    *first = false;
    let formula = value.starts_with(['=', '+', '-', '@', '\t', '\r']);
    let quote = value.contains([',', '"', '\r', '\n']);
    if quote {
        out.extend_from_slice(b"\"");
    }
    if formula {
        out.extend_from_slice(b"'");
    }
    if quote {
        out.extend_from_slice(value.replace('"', "\"\"").as_bytes());
        out.extend_from_slice(b"\"");
    } else {
        out.extend_from_slice(value.as_bytes());
    }
}

/// Whether an `Accept` header asks for CSV rather than JSON: `text/csv` is listed with a
/// weight above 0 and at least the weight of `application/json` (and of `*/*` or
/// `application/*` when JSON is not listed itself). Anything else gets JSON, as before.
pub fn accepts_csv(accept: Option<&str>) -> bool {
    let Some(accept) = accept else {
        return false;
    };
    let mut csv: Option<f32> = None;
    let mut json: Option<f32> = None;
    let mut wildcard: Option<f32> = None;
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let mut weight = 1.0f32;
        for parameter in parts {
            if let Some((name, value)) = parameter.split_once('=') {
                if name.trim().eq_ignore_ascii_case("q") {
                    weight = value.trim().parse().unwrap_or(0.0);
                }
            }
        }
        let slot = match media.as_str() {
            "text/csv" => &mut csv,
            "application/json" => &mut json,
            "*/*" | "application/*" => &mut wildcard,
            _ => continue,
        };
        *slot = Some(slot.map_or(weight, |w: f32| w.max(weight)));
    }
    match csv {
        Some(c) if c > 0.0 => c >= json.or(wildcard).unwrap_or(0.0),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cells(values: &[&str]) -> String {
        let mut out = BytesMut::new();
        let mut first = true;
        for v in values {
            cell(&mut out, &mut first, v);
        }
        String::from_utf8(out.to_vec()).expect("utf8")
    }

    #[test]
    fn cells_are_quoted_and_formulas_neutralised() {
        assert_eq!(cells(&["a", "b c"]), "a,b c");
        assert_eq!(cells(&["a,b", "say \"hi\""]), "\"a,b\",\"say \"\"hi\"\"\"");
        assert_eq!(cells(&["line\nbreak"]), "\"line\nbreak\"");
        assert_eq!(
            cells(&["=1+2", "+1", "-1", "@SUM(A1)"]),
            "'=1+2,'+1,'-1,'@SUM(A1)"
        );
        assert_eq!(
            cells(&["=HYPERLINK(\"http://x\",\"y\")"]),
            "\"'=HYPERLINK(\"\"http://x\"\",\"\"y\"\")\""
        );
        assert_eq!(cells(&["\tx"]), "'\tx");
        assert_eq!(cells(&["a=b", ""]), "a=b,");
    }

    #[test]
    fn accept_picks_csv_only_when_preferred() {
        for yes in [
            "text/csv",
            "text/csv; charset=utf-8",
            "application/json;q=0.5, text/csv",
            "TEXT/CSV",
            "*/*, text/csv",
        ] {
            assert!(accepts_csv(Some(yes)), "{yes}");
        }
        for no in [
            "",
            "application/json",
            "text/csv;q=0",
            "text/csv;q=0.5, application/json",
            "text/html",
            "*/*",
        ] {
            assert!(!accepts_csv(Some(no)), "{no}");
        }
        assert!(!accepts_csv(None));
    }
}
