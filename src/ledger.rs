//! The domain: what a transaction and a program connection are, the rules a request must
//! satisfy, and the points quote. Plain Rust types; no HTTP, no JSON, no storage format.
//!
//! Invariant: values of these types were validated when they were made, so the store and
//! the API layer never re-check them.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::{SecureRandom, SystemRandom};

use crate::config::{Business, Config, Program};
use crate::decimal::points_for;
use crate::error::Error;

/// The largest `value` accepted, in minor units.
pub const MAX_VALUE: u64 = 1_000_000_000_000;
/// Points above 2^53 − 1 would not survive a JSON parser that uses doubles, so no
/// issuance may exceed it, whatever the program's maximum says.
pub const MAX_SAFE_POINTS: u64 = (1 << 53) - 1;
/// Longest `userId`, `referenceNumber`, `endUserId`, `destinationUserId` (characters).
pub const MAX_ID_CHARS: usize = 128;
/// Longest `description` (characters).
pub const MAX_DESCRIPTION_CHARS: usize = 512;

/// A transaction id: 128 random bits, shown as `tx_` and 22 base64url characters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TransactionId(pub u128);

impl TransactionId {
    pub fn random() -> TransactionId {
        let mut bytes = [0u8; 16];
        SystemRandom::new()
            .fill(&mut bytes)
            .expect("the operating system's random source works");
        TransactionId(u128::from_be_bytes(bytes))
    }

    /// `None` if `text` is not the text of some id (it may still be a referenceNumber).
    pub fn parse(text: &str) -> Option<TransactionId> {
        let encoded = text.strip_prefix("tx_")?;
        if encoded.len() != 22 {
            return None;
        }
        let bytes: [u8; 16] = URL_SAFE_NO_PAD.decode(encoded).ok()?.try_into().ok()?;
        let id = TransactionId(u128::from_be_bytes(bytes));
        // Only the canonical spelling names the id (the last character has spare bits).
        (id.to_string() == text).then_some(id)
    }
}

impl fmt::Display for TransactionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tx_{}", URL_SAFE_NO_PAD.encode(self.0.to_be_bytes()))
    }
}

/// A validated request to issue points, before the store gives it an id and a time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewTransaction {
    pub program_id: String,
    pub value: u64,
    pub user_id: String,
    pub reference_number: String,
    pub description: Option<String>,
    pub bonus: bool,
}

/// A stored transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transaction {
    pub id: TransactionId,
    pub business: String,
    pub reference_number: String,
    pub program_id: String,
    /// The program's name when the points were issued.
    pub program_name: String,
    pub user_id: String,
    pub description: Option<String>,
    pub currency: String,
    /// Minor units of `currency`.
    pub value: u64,
    pub total_points: u64,
    pub bonus: bool,
    pub created_at: u64,
    /// Position in the order of creation: orders transactions within one second.
    pub seq: u64,
}

impl Transaction {
    /// The first field in which `request` differs from what this transaction was made
    /// from, if any: `None` means the request is a replay.
    pub fn differing_field(&self, request: &NewTransaction) -> Option<&'static str> {
        if self.program_id != request.program_id {
            Some("programId")
        } else if self.value != request.value {
            Some("value")
        } else if self.user_id != request.user_id {
            Some("userId")
        } else if self.description != request.description {
            Some("description")
        } else if self.bonus != request.bonus {
            Some("bonus")
        } else {
            None
        }
    }
}

/// The link between a business's end user and their member id in a partner program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    pub end_user_id: String,
    pub program_id: String,
    pub destination_user_id: String,
    pub created_at: u64,
    pub updated_at: u64,
}

/// Checks an id-like text field: 1..=max characters, no control characters.
pub fn check_text(field: &str, value: &str, max_chars: usize) -> Result<(), Error> {
    let chars = value.chars().count();
    if chars == 0 || chars > max_chars {
        return Err(Error::bad_request(format!(
            "`{field}` must be 1 to {max_chars} characters long, not {chars}"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::bad_request(format!(
            "`{field}` must not contain control characters"
        )));
    }
    Ok(())
}

/// Checks a free-text description: at most [`MAX_DESCRIPTION_CHARS`] characters.
pub fn check_description(value: &str) -> Result<(), Error> {
    let chars = value.chars().count();
    if chars > MAX_DESCRIPTION_CHARS {
        return Err(Error::bad_request(format!(
            "`description` must be at most {MAX_DESCRIPTION_CHARS} characters long, not {chars}"
        )));
    }
    Ok(())
}

/// The program, if `business` has it enabled; 422 otherwise.
pub fn enabled_program<'c>(
    config: &'c Config,
    business: &Business,
    program_id: &str,
) -> Result<&'c Program, Error> {
    business
        .programs
        .iter()
        .any(|p| p == program_id)
        .then(|| config.programs.get(program_id))
        .flatten()
        .ok_or_else(|| {
            Error::Unprocessable(format!(
                "program \"{program_id}\" is not enabled for this business; GET /v1/programs lists the enabled ones"
            ))
        })
}

/// Points for `value` minor units of the business currency in `program`, within the
/// program's limits; 422 when zero or outside them.
pub fn quote(
    config: &Config,
    business: &Business,
    program: &Program,
    value: u64,
) -> Result<u64, Error> {
    let currency = config.currency(&business.currency);
    let points = points_for(
        value,
        currency.exponent,
        currency.units_per_usd,
        program.price_per_point_usd,
    )
    .ok_or_else(|| {
        tracing::error!(program = %program.id, "the points formula overflowed or divided by zero");
        Error::Internal
    })?;
    let max = program
        .max_points
        .unwrap_or(MAX_SAFE_POINTS)
        .min(MAX_SAFE_POINTS);
    if points == 0 {
        return Err(Error::Unprocessable(format!(
            "value {value} is worth 0 points in program \"{}\"; send a larger value",
            program.id
        )));
    }
    if points < u128::from(program.min_points) {
        return Err(Error::Unprocessable(format!(
            "value {value} is worth {points} points, below the minimum of {} for program \"{}\"",
            program.min_points, program.id
        )));
    }
    if points > u128::from(max) {
        return Err(Error::Unprocessable(format!(
            "value {value} is worth {points} points, above the maximum of {max} for program \"{}\"",
            program.id
        )));
    }
    Ok(points as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_url_safe_and_parse_back() {
        let id = TransactionId::random();
        let text = id.to_string();
        assert_eq!(text.len(), 25);
        assert!(text[3..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(TransactionId::parse(&text), Some(id));
        assert_ne!(TransactionId::random(), id);
    }

    #[test]
    fn non_ids_do_not_parse() {
        for text in [
            "",
            "tx_",
            "inv-1",
            "tx_AAAAAAAAAAAAAAAAAAAAAB",
            "tx_AAAAAAAAAAAAAAAAAAAA!A",
        ] {
            assert_eq!(TransactionId::parse(text), None, "{text}");
        }
    }

    #[test]
    fn text_fields_are_checked_in_characters() {
        assert!(check_text("userId", "u", 128).is_ok());
        assert!(check_text("userId", &"é".repeat(128), 128).is_ok());
        assert!(check_text("userId", &"é".repeat(129), 128).is_err());
        assert!(check_text("userId", "", 128).is_err());
        assert!(check_text("userId", "a\nb", 128).is_err());
        assert!(check_text("userId", "a\u{7f}", 128).is_err());
        assert!(check_description(&"x".repeat(512)).is_ok());
        assert!(check_description(&"x".repeat(513)).is_err());
    }
}
