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
        parse_id("tx_", text).map(TransactionId)
    }
}

/// A reversal id as clients see it: `rv_` and 22 base64url characters of 128 bits, the
/// reversal's own sequence number enciphered with its own key (see [`IdCipher`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReversalId(pub u128);

impl ReversalId {
    /// `None` if `text` is not the text of some reversal id.
    pub fn parse(text: &str) -> Option<ReversalId> {
        parse_id("rv_", text).map(ReversalId)
    }
}

/// The 128 bits behind `prefix` and 22 base64url characters, in their one canonical
/// spelling (the last character has spare bits).
fn parse_id(prefix: &str, text: &str) -> Option<u128> {
    let encoded = text.strip_prefix(prefix)?;
    if encoded.len() != 22 {
        return None;
    }
    let bytes: [u8; 16] = URL_SAFE_NO_PAD.decode(encoded).ok()?.try_into().ok()?;
    let bits = u128::from_be_bytes(bytes);
    (URL_SAFE_NO_PAD.encode(bits.to_be_bytes()) == encoded).then_some(bits)
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
        TransactionId(self.encipher(seq))
    }

    /// The sequence number behind `id`, if this key made it.
    pub fn decode(&self, id: TransactionId) -> Option<u64> {
        self.decipher(id.0)
    }

    /// The 128 bits of the id of sequence number `seq` (whatever kind of id it is).
    pub fn encipher(&self, seq: u64) -> u128 {
        let (mut left, mut right) = (seq, 0u64);
        for round in 0..Self::ROUNDS {
            (left, right) = (right, left ^ self.round(round, right));
        }
        (u128::from(left) << 64) | u128::from(right)
    }

    /// The sequence number behind an id's 128 bits, if this key made them.
    pub fn decipher(&self, bits: u128) -> Option<u64> {
        let (mut left, mut right) = ((bits >> 64) as u64, bits as u64);
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

impl fmt::Display for ReversalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rv_{}", URL_SAFE_NO_PAD.encode(self.0.to_be_bytes()))
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
    /// The sum of its reversals' values (minor units) and points.
    pub reversed_value: u64,
    pub reversed_points: u64,
    /// Its reversals, oldest first.
    pub reversals: Vec<Reversal>,
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

/// The most reversals one transaction may have: each is an entry of the transaction's
/// `pointTransactions`, so the transaction's size stays bounded.
pub const MAX_REVERSALS: u32 = 1000;

/// A validated request to take back (part of) a transaction's points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewReversal {
    /// The reversal's idempotency key, unique per business among reversals.
    pub reference_number: ReferenceNumber,
    /// Minor units to reverse; `None` reverses all that remains.
    pub value: Option<u64>,
    pub reason: Option<Description>,
}

/// A stored reversal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reversal {
    pub id: ReversalId,
    /// Position in the order of creation of reversals.
    pub seq: u64,
    pub business: BusinessId,
    pub transaction_id: TransactionId,
    pub transaction_seq: u64,
    pub reference_number: ReferenceNumber,
    /// Minor units reversed.
    pub value: u64,
    /// Points taken back (see [`reversal_points`]).
    pub points: u64,
    /// Whether the request named no value ("all that remains").
    pub full: bool,
    pub reason: Option<Description>,
    pub created_at: u64,
    /// Its debit at the program's partner; `None` when there was nothing to take back
    /// there (no partner, no points, or a credit that never arrived).
    pub delivery: Option<Delivery>,
}

impl Reversal {
    /// Where its debit stands: `completed` when there was nothing to send.
    pub fn status(&self) -> DeliveryStatus {
        self.delivery
            .as_ref()
            .map_or(DeliveryStatus::Completed, |d| d.status)
    }

    /// The first field in which `request` (for transaction `transaction_seq`) differs
    /// from what this reversal was made from; `None` means the request is a replay.
    pub fn differing_field(
        &self,
        transaction_seq: u64,
        request: &NewReversal,
    ) -> Option<&'static str> {
        if self.transaction_seq != transaction_seq {
            Some("transactionId")
        } else if request
            .value
            .map_or(!self.full, |v| self.full || v != self.value)
        {
            Some("value")
        } else if self.reason != request.reason {
            Some("reason")
        } else {
            None
        }
    }
}

/// The points of a transaction of `total_points` for `value` minor units that still stand
/// after reversals of `reversed` minor units: floor(total × (value − reversed) / value).
/// Exact in 128 bits; `reversed` above `value` counts as all of it.
pub fn standing_points(total_points: u64, value: u64, reversed: u64) -> u64 {
    if value == 0 {
        return 0;
    }
    let left = u128::from(value.saturating_sub(reversed));
    // total ≤ 2^64 and left ≤ value, so the quotient is at most total: it fits.
    (u128::from(total_points) * left / u128::from(value)) as u64
}

/// What reversing `requested` (or, when `None`, all that remains) of a transaction of
/// `value` minor units and `total_points`, of which `reversed` minor units are reversed
/// already, takes: `(value, points)`. The points are the difference between what stands
/// before and after, so no sequence of reversals takes more than was issued and the last
/// one takes exactly what is left.
pub fn plan_reversal(
    value: u64,
    total_points: u64,
    reversed: u64,
    requested: Option<u64>,
) -> Result<(u64, u64), Rejection> {
    let remaining = value.saturating_sub(reversed);
    if remaining == 0 {
        return Err(Rejection::NothingToReverse);
    }
    let take = requested.unwrap_or(remaining);
    if take > remaining {
        return Err(Rejection::ValueExceedsRemaining {
            value: take,
            remaining,
        });
    }
    let before = standing_points(total_points, value, reversed);
    let after = standing_points(total_points, value, reversed + take);
    Ok((take, before - after))
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
    /// The transaction is wholly reversed already.
    NothingToReverse,
    /// A reversal of more than the transaction has left.
    ValueExceedsRemaining { value: u64, remaining: u64 },
    /// The transaction has the most reversals it may have.
    TooManyReversals { max: u32 },
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
            Rejection::NothingToReverse => "nothing-to-reverse",
            Rejection::ValueExceedsRemaining { .. } => "value-exceeds-remaining",
            Rejection::TooManyReversals { .. } => "too-many-reversals",
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
            Rejection::NothingToReverse => write!(
                f,
                "the transaction is wholly reversed already; nothing is left to reverse"
            ),
            Rejection::ValueExceedsRemaining { value, remaining } => write!(
                f,
                "value {value} is more than the {remaining} left to reverse; send at most \
                 {remaining}, or leave out `value` to reverse all that remains"
            ),
            Rejection::TooManyReversals { max } => write!(
                f,
                "the transaction has {max} reversals, the most one may have; reverse all \
                 that remains in one reversal (leave out `value`)"
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
    fn reversal_ids_parse_back_and_are_not_transaction_ids() {
        let cipher = IdCipher::new(&[1u8; 32]);
        let id = ReversalId(cipher.encipher(7));
        let text = id.to_string();
        assert!(text.starts_with("rv_") && text.len() == 25, "{text}");
        assert_eq!(ReversalId::parse(&text), Some(id));
        assert_eq!(TransactionId::parse(&text), None);
        assert_eq!(ReversalId::parse(&cipher.encode(7).to_string()), None);
        assert_eq!(cipher.decipher(id.0), Some(7));
    }

    proptest::proptest! {
        /// Any sequence of reversals: each takes what the formula says, together they
        /// never take more value or points than were issued, and reversing the rest takes
        /// exactly what is left.
        #[test]
        fn reversals_never_take_more_than_was_issued(
            value in 1u64..=MAX_VALUE,
            total_points in 0u64..=MAX_SAFE_POINTS,
            parts in proptest::collection::vec(1u64..=MAX_VALUE, 0..12),
        ) {
            let (mut reversed, mut taken) = (0u64, 0u64);
            for part in parts {
                match plan_reversal(value, total_points, reversed, Some(part)) {
                    Ok((v, points)) => {
                        proptest::prop_assert_eq!(v, part);
                        let before = (u128::from(total_points) * u128::from(value - reversed)) / u128::from(value);
                        let after = (u128::from(total_points) * u128::from(value - reversed - part)) / u128::from(value);
                        proptest::prop_assert_eq!(u128::from(points), before - after);
                        reversed += v;
                        taken += points;
                    }
                    Err(Rejection::ValueExceedsRemaining { value: asked, remaining }) => {
                        proptest::prop_assert_eq!(asked, part);
                        proptest::prop_assert_eq!(remaining, value - reversed);
                        proptest::prop_assert!(part > remaining);
                    }
                    Err(other) => proptest::prop_assert!(false, "unexpected {other:?}"),
                }
                proptest::prop_assert!(reversed <= value && taken <= total_points);
                proptest::prop_assert_eq!(total_points - taken, standing_points(total_points, value, reversed));
            }
            if reversed < value {
                let (v, points) = plan_reversal(value, total_points, reversed, None).expect("the rest");
                proptest::prop_assert_eq!(v, value - reversed);
                proptest::prop_assert_eq!(taken + points, total_points);
            }
            proptest::prop_assert_eq!(
                plan_reversal(value, total_points, value, None),
                Err(Rejection::NothingToReverse)
            );
        }
    }

    #[test]
    fn small_reversals_round_down_what_stands() {
        // 10 points for 1000: the first unit reversed takes a point (9.99 stands as 9), the
        // next ones none until another whole point is gone.
        assert_eq!(plan_reversal(1000, 10, 0, Some(1)), Ok((1, 1)));
        assert_eq!(plan_reversal(1000, 10, 1, Some(1)), Ok((1, 0)));
        assert_eq!(plan_reversal(1000, 10, 2, None), Ok((998, 9)));
        assert_eq!(
            plan_reversal(1000, 10, 2, Some(999)),
            Err(Rejection::ValueExceedsRemaining {
                value: 999,
                remaining: 998
            })
        );
        assert_eq!(
            plan_reversal(1, 1, 1, Some(1)),
            Err(Rejection::NothingToReverse)
        );
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
