//! The ledger: what a transaction and a program connection are, the rules an issuance must
//! satisfy, and the points quote. Plain Rust types; no HTTP, no JSON, no storage format.
//!
//! Invariant: values of these types were validated when they were made, so the store and
//! the API layer never re-check them. A rule that refuses a request says why in a
//! [`Rejection`]; only `error` turns that into an HTTP answer.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::digest;

use crate::decimal::points_for;
use crate::delivery::{Delivery, DeliveryStatus};
use crate::domain::{
    Business, BusinessId, Currency, Description, DestinationUserId, EndUserId, Program, ProgramId,
    ReferenceNumber, UserId,
};

/// The largest `value` accepted, in minor units.
pub const MAX_VALUE: u64 = 1_000_000_000_000;
/// Points above 2^53 − 1 would not survive a JSON parser that uses doubles, so no
/// issuance may exceed it, whatever the program's maximum says.
pub const MAX_SAFE_POINTS: u64 = (1 << 53) - 1;

/// A transaction id as clients see it: `tx_` and 22 base64url characters of 128 bits.
///
/// The bits are the transaction's sequence number run through [`IdCipher`], a keyed
/// permutation: ids look random and reveal neither volume nor order to anyone without the
/// key, yet the store keeps records in sequence order (appends, not random page writes)
/// and needs no id index, since an id deciphers to its sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TransactionId(pub u128);

impl TransactionId {
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

/// A 128-bit keyed permutation (a four-round Feistel network): sequence number →
/// [`TransactionId`] and back. Each round function is SHA-256 of the secret key, the round
/// number and the half block, truncated to 64 bits: a keyed PRF on fixed-length input,
/// at one SHA-256 compression per round (half the cost of HMAC, which matters to the
/// listing: every row shown enciphers its id).
///
/// The plaintext is the sequence number in the high half and zero in the low half; an id
/// whose low half does not decipher to zero was not made with this key, which leaves a
/// forged id a 2^-64 chance of naming a transaction (and it must still belong to the
/// caller's business).
pub struct IdCipher {
    /// A digest that has absorbed the key: each round clones it and adds its input.
    keyed: digest::Context,
    /// Round 0 of zero: the first round of every encoding (the plaintext's low half is
    /// always zero), and the last of every decoding of an id this key made. Kept, it saves
    /// a quarter of the SHA-256 work of a listing.
    first_of_zero: u64,
}

impl IdCipher {
    const ROUNDS: u8 = 4;

    pub fn new(secret: &[u8]) -> IdCipher {
        let mut keyed = digest::Context::new(&digest::SHA256);
        keyed.update(secret);
        let mut cipher = IdCipher {
            keyed,
            first_of_zero: 0,
        };
        cipher.first_of_zero = cipher.compute_round(0, 0);
        cipher
    }

    fn round(&self, round: u8, half: u64) -> u64 {
        if round == 0 && half == 0 {
            self.first_of_zero
        } else {
            self.compute_round(round, half)
        }
    }

    fn compute_round(&self, round: u8, half: u64) -> u64 {
        let mut context = self.keyed.clone();
        context.update(&[round]);
        context.update(&half.to_be_bytes());
        let digest = context.finish();
        let mut out = [0u8; 8];
        out.copy_from_slice(&digest.as_ref()[..8]);
        u64::from_be_bytes(out)
    }

    pub fn encode(&self, seq: u64) -> TransactionId {
        let (mut left, mut right) = (seq, 0u64);
        for round in 0..Self::ROUNDS {
            (left, right) = (right, left ^ self.round(round, right));
        }
        TransactionId((u128::from(left) << 64) | u128::from(right))
    }

    /// The sequence number behind `id`, if this key made it.
    pub fn decode(&self, id: TransactionId) -> Option<u64> {
        let (mut left, mut right) = ((id.0 >> 64) as u64, id.0 as u64);
        for round in (0..Self::ROUNDS).rev() {
            (left, right) = (right ^ self.round(round, left), left);
        }
        (right == 0).then_some(left)
    }
}

impl TransactionId {
    /// Its text (`tx_` and 22 base64url characters) written into `buf`, without allocating:
    /// the listing spells one per row.
    pub fn write_text<'b>(&self, buf: &'b mut [u8; 25]) -> &'b str {
        buf[..3].copy_from_slice(b"tx_");
        let written = URL_SAFE_NO_PAD
            .encode_slice(self.0.to_be_bytes(), &mut buf[3..])
            .expect("16 bytes are 22 base64 characters");
        debug_assert_eq!(written, 22);
        std::str::from_utf8(&buf[..]).expect("base64 is ASCII")
    }
}

impl fmt::Display for TransactionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.write_text(&mut [0; 25]))
    }
}

/// A validated request to issue points, before the store gives it an id and a time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewTransaction {
    pub program_id: ProgramId,
    pub value: u64,
    pub recipient: Recipient,
    pub reference_number: ReferenceNumber,
    pub description: Option<Description>,
    pub bonus: bool,
}

/// Who receives the points: a member id in the partner program, or the business's own
/// user id, resolved through its program connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recipient {
    Member(UserId),
    EndUser(EndUserId),
}

/// A stored transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transaction {
    pub id: TransactionId,
    pub business: BusinessId,
    pub reference_number: ReferenceNumber,
    pub program_id: ProgramId,
    /// The program's name when the points were issued.
    pub program_name: String,
    /// The partner member id the points went to.
    pub user_id: UserId,
    /// The business's own user id, when the points were issued by it.
    pub end_user_id: Option<EndUserId>,
    pub description: Option<Description>,
    pub currency: String,
    /// Minor units of `currency`.
    pub value: u64,
    pub total_points: u64,
    pub bonus: bool,
    pub created_at: u64,
    /// Position in the order of creation: orders transactions within one second.
    pub seq: u64,
    /// Its delivery to the program's partner; `None` when it was never to be delivered.
    pub delivery: Option<Delivery>,
}

impl Transaction {
    /// Where its delivery stands: `completed` when there was nothing to deliver.
    pub fn status(&self) -> DeliveryStatus {
        self.delivery
            .as_ref()
            .map_or(DeliveryStatus::Completed, |d| d.status)
    }

    /// The first field in which `request` differs from what this transaction was made
    /// from, if any: `None` means the request is a replay.
    pub fn differing_field(&self, request: &NewTransaction) -> Option<&'static str> {
        if self.program_id != request.program_id {
            Some("programId")
        } else if self.value != request.value {
            Some("value")
        } else if let Some(field) = self.differing_recipient(&request.recipient) {
            Some(field)
        } else if self.description != request.description {
            Some("description")
        } else if self.bonus != request.bonus {
            Some("bonus")
        } else {
            None
        }
    }
}

impl Transaction {
    fn differing_recipient(&self, recipient: &Recipient) -> Option<&'static str> {
        match (recipient, &self.end_user_id) {
            (Recipient::Member(user), None) if *user == self.user_id => None,
            (Recipient::EndUser(end_user), Some(stored)) if end_user == stored => None,
            (Recipient::Member(_), _) => Some("userId"),
            (Recipient::EndUser(_), _) => Some("endUserId"),
        }
    }
}

/// The link between a business's end user and their member id in a partner program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    pub end_user_id: EndUserId,
    pub program_id: ProgramId,
    pub destination_user_id: DestinationUserId,
    pub created_at: u64,
    pub updated_at: u64,
}

/// Why the ledger refuses a well-formed request. Each says what to do instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// The program is not one of the business's enabled programs.
    ProgramNotEnabled(ProgramId),
    /// The value buys no points at all.
    ZeroPoints { value: u64, program: ProgramId },
    /// Fewer points than the program's minimum for one issuance.
    BelowMinimum {
        value: u64,
        points: u128,
        min: u64,
        program: ProgramId,
    },
    /// More points than the program's (or JSON's) maximum for one issuance.
    AboveMaximum {
        value: u64,
        points: u128,
        max: u64,
        program: ProgramId,
    },
    /// The points formula overflowed: a configuration the server cannot price with. A bug
    /// in validation, not the client's fault.
    Unpriceable(ProgramId),
    /// Issued by `endUserId`, but the end user has no connection to the program.
    NoProgramConnection {
        end_user_id: EndUserId,
        program: ProgramId,
    },
}

impl Rejection {
    /// The problem type clients match on (`urn:cosmopoints:problem:…`).
    pub fn problem_type(&self) -> &'static str {
        match self {
            Rejection::ProgramNotEnabled(_)
            | Rejection::ZeroPoints { .. }
            | Rejection::BelowMinimum { .. }
            | Rejection::AboveMaximum { .. }
            | Rejection::Unpriceable(_) => "unprocessable",
            Rejection::NoProgramConnection { .. } => "no-program-connection",
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::ProgramNotEnabled(id) => write!(
                f,
                "program \"{id}\" is not enabled for this business; GET /v1/programs lists the enabled ones"
            ),
            Rejection::ZeroPoints { value, program } => write!(
                f,
                "value {value} is worth 0 points in program \"{program}\"; send a larger value"
            ),
            Rejection::BelowMinimum {
                value,
                points,
                min,
                program,
            } => write!(
                f,
                "value {value} is worth {points} points, below the minimum of {min} for program \"{program}\""
            ),
            Rejection::AboveMaximum {
                value,
                points,
                max,
                program,
            } => write!(
                f,
                "value {value} is worth {points} points, above the maximum of {max} for program \"{program}\""
            ),
            Rejection::NoProgramConnection {
                end_user_id,
                program,
            } => write!(
                f,
                "end user \"{end_user_id}\" has no connection to program \"{program}\"; \
                 create one with PUT /v1/program-connections, or send `userId`"
            ),
            Rejection::Unpriceable(program) => write!(
                f,
                "the points formula overflowed or divided by zero for program \"{program}\""
            ),
        }
    }
}

/// The program, if `business` has it enabled.
pub fn enabled_program<'c>(
    programs: &'c std::collections::BTreeMap<ProgramId, Program>,
    business: &Business,
    program_id: &ProgramId,
) -> Result<&'c Program, Rejection> {
    business
        .has_program(program_id)
        .then(|| programs.get(program_id.as_str()))
        .flatten()
        .ok_or_else(|| Rejection::ProgramNotEnabled(program_id.clone()))
}

/// Points for `value` minor units of `currency` in `program`, within the program's limits.
pub fn quote(currency: &Currency, program: &Program, value: u64) -> Result<u64, Rejection> {
    let points = points_for(
        value,
        currency.exponent,
        currency.units_per_usd,
        program.price_per_point_usd,
    )
    .ok_or_else(|| Rejection::Unpriceable(program.id.clone()))?;
    let max = program
        .max_points
        .unwrap_or(MAX_SAFE_POINTS)
        .min(MAX_SAFE_POINTS);
    if points == 0 {
        return Err(Rejection::ZeroPoints {
            value,
            program: program.id.clone(),
        });
    }
    if points < u128::from(program.min_points) {
        return Err(Rejection::BelowMinimum {
            value,
            points,
            min: program.min_points,
            program: program.id.clone(),
        });
    }
    if points > u128::from(max) {
        return Err(Rejection::AboveMaximum {
            value,
            points,
            max,
            program: program.id.clone(),
        });
    }
    Ok(points as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_url_safe_parse_back_and_decipher_to_their_sequence() {
        let cipher = IdCipher::new(&[1u8; 32]);
        let mut seen = std::collections::HashSet::new();
        for seq in (0..1000).chain([u64::MAX - 1, u64::MAX]) {
            let id = cipher.encode(seq);
            let text = id.to_string();
            assert_eq!(text.len(), 25);
            assert!(text[3..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
            assert_eq!(TransactionId::parse(&text), Some(id));
            assert_eq!(cipher.decode(id), Some(seq));
            assert!(seen.insert(id), "two sequence numbers share an id");
        }
    }

    #[test]
    fn consecutive_ids_look_unrelated_and_other_keys_do_not_decipher_them() {
        let cipher = IdCipher::new(&[1u8; 32]);
        let (a, b) = (cipher.encode(41), cipher.encode(42));
        // About half of the 128 bits differ between neighbours.
        let differing = (a.0 ^ b.0).count_ones();
        assert!((32..=96).contains(&differing), "{differing}");
        assert_eq!(IdCipher::new(&[2u8; 32]).decode(a), None);
        assert_eq!(IdCipher::new(&[2u8; 32]).decode(cipher.encode(0)), None);
        assert_eq!(cipher.decode(TransactionId(a.0 ^ 1)), None);
    }

    #[test]
    fn the_kept_first_round_changes_no_id() {
        let cipher = IdCipher::new(&[7u8; 32]);
        for seq in [0, 1, 2, 1 << 40, u64::MAX] {
            let (mut left, mut right) = (seq, 0u64);
            for round in 0..IdCipher::ROUNDS {
                (left, right) = (right, left ^ cipher.compute_round(round, right));
            }
            let id = TransactionId((u128::from(left) << 64) | u128::from(right));
            assert_eq!(cipher.encode(seq), id);
            assert_eq!(
                id.to_string(),
                format!("tx_{}", URL_SAFE_NO_PAD.encode(id.0.to_be_bytes()))
            );
        }
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
}
