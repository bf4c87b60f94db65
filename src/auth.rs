//! Client secrets (PBKDF2-HMAC-SHA256) and bearer tokens (HMAC-SHA256), both from `ring`.
//!
//! Everything here is a pure function of its inputs and `now`: no clock, no I/O.
//!
//! A token is base64url (no padding) of `claims ‖ tag`, where `tag` is the 32-byte
//! HMAC-SHA256 of `claims` and `claims` is:
//!
//! ```text
//! version u8 = 1 | key id [u8; 4] | issued_at u64 BE | expires_at u64 BE
//! | business len u8 | business bytes | client len u8 | client bytes
//! ```
//!
//! The key id (the first four bytes of SHA-256 of the key) lets a token signed by another
//! key be told apart from a damaged one in the logs; the tag is what decides.
//!
//! Listing cursors are sealed with a key derived from the same secret ([`CursorKey`]).

use std::num::NonZeroU32;
use std::sync::Arc;

use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use base64::Engine;
use ring::rand::{SecureRandom, SystemRandom};
use ring::{aead, digest, hmac, pbkdf2};

const TOKEN_VERSION: u8 = 1;
const TAG_LEN: usize = 32;
/// Longest token text accepted before decoding: claims with two 255-byte ids plus the tag.
const MAX_TOKEN_LEN: usize = 800;
/// Iterations that `hash-secret` uses: about 50 ms on one core of a small server.
pub const DEFAULT_ITERATIONS: u32 = 100_000;
const SALT_LEN: usize = 16;
const HASH_LEN: usize = 32;

/// A stored client secret: `$pbkdf2-sha256$i=ITER$SALT$HASH` (PHC string format, salt and
/// hash in unpadded standard base64).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretHash {
    iterations: NonZeroU32,
    salt: Vec<u8>,
    hash: Vec<u8>,
}

impl SecretHash {
    /// Hashes `secret` with a fresh random salt.
    pub fn new(secret: &[u8], iterations: NonZeroU32) -> SecretHash {
        let mut salt = vec![0u8; SALT_LEN];
        SystemRandom::new()
            .fill(&mut salt)
            .expect("the operating system's random source works");
        let mut hash = vec![0u8; HASH_LEN];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            iterations,
            &salt,
            secret,
            &mut hash,
        );
        SecretHash {
            iterations,
            salt,
            hash,
        }
    }

    pub fn parse(text: &str) -> Result<SecretHash, String> {
        let bad = || {
            "is not a `$pbkdf2-sha256$i=ITERATIONS$SALT$HASH` string from `cosmopoints hash-secret`"
                .to_owned()
        };
        let mut parts = text.split('$');
        let (Some(""), Some("pbkdf2-sha256"), Some(params), Some(salt), Some(hash), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(bad());
        };
        let iterations = params
            .strip_prefix("i=")
            .and_then(|i| i.parse::<u32>().ok())
            .filter(|i| (1..=10_000_000).contains(i))
            .and_then(NonZeroU32::new)
            .ok_or_else(bad)?;
        let salt = STANDARD_NO_PAD.decode(salt).map_err(|_| bad())?;
        let hash = STANDARD_NO_PAD.decode(hash).map_err(|_| bad())?;
        if salt.len() < 8 || hash.len() != HASH_LEN {
            return Err(bad());
        }
        Ok(SecretHash {
            iterations,
            salt,
            hash,
        })
    }

    pub fn iterations(&self) -> u32 {
        self.iterations.get()
    }

    /// Constant-time check of `secret` against the hash.
    pub fn verify(&self, secret: &[u8]) -> bool {
        pbkdf2::verify(
            pbkdf2::PBKDF2_HMAC_SHA256,
            self.iterations,
            &self.salt,
            secret,
            &self.hash,
        )
        .is_ok()
    }
}

impl std::fmt::Display for SecretHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "$pbkdf2-sha256$i={}${}${}",
            self.iterations,
            STANDARD_NO_PAD.encode(&self.salt),
            STANDARD_NO_PAD.encode(&self.hash)
        )
    }
}

/// 32 fresh random bytes: a key made on first start (token signing, id enciphering).
pub fn random_secret() -> Vec<u8> {
    let mut secret = vec![0u8; 32];
    SystemRandom::new()
        .fill(&mut secret)
        .expect("the operating system's random source works");
    secret
}

/// Constant-time equality of a plain-text secret: both sides are run through HMAC with a
/// throw-away key and the tags compared by `ring`, so timing says nothing about a prefix.
pub fn plain_secret_matches(expected: &str, given: &[u8]) -> bool {
    let key = hmac::Key::generate(hmac::HMAC_SHA256, &SystemRandom::new())
        .expect("the operating system's random source works");
    let tag = hmac::sign(&key, expected.as_bytes());
    hmac::verify(&key, given, tag.as_ref()).is_ok()
}

/// What a token says: who it is for and when it stops being valid.
///
/// The ids are shared text: a token verified before (see [`Verified`]) gives its claims
/// and the request's log line the same text without copying it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    pub business: Arc<str>,
    pub client: Arc<str>,
    pub issued_at: u64,
    pub expires_at: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenError {
    /// Not base64url, too short or long, or claims that do not parse.
    Malformed,
    /// The tag does not match: altered, truncated, or signed with another key.
    BadSignature,
    Expired,
}

/// The HMAC key that signs and verifies tokens.
pub struct TokenKey {
    key: hmac::Key,
    id: [u8; 4],
    /// This key among every `TokenKey` the process made: what [`Verified`] entries are
    /// kept under, so that one key never takes a token that only another one verified.
    instance: u64,
}

/// The tokens this thread verified last, each with the key that verified it and its
/// claims. A client sends the same token with request after request (every request of a
/// connection, as a rule), and its base64 decoding and HMAC were a sixth of a GET's
/// instructions. A token is taken from here only when it is byte for byte one that the
/// same key verified (HMAC is deterministic, so checking it again would give the same
/// answer), compared in constant time; its expiry is still checked at every use.
struct Verified {
    instance: u64,
    token: Box<str>,
    claims: Claims,
}

/// How many tokens each thread keeps (a handful of clients per thread at a time).
const VERIFIED_PER_THREAD: usize = 4;

#[cfg(test)]
thread_local! {
    /// Tags this thread checked: what shows a test whether [`VERIFIED`] answered.
    static TAG_CHECKS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

thread_local! {
    static VERIFIED: std::cell::RefCell<(usize, [Option<Verified>; VERIFIED_PER_THREAD])> =
        const { std::cell::RefCell::new((0, [None, None, None, None])) };
}

/// Equality of two byte strings that takes as long whatever their common prefix: how far
/// a guess matches a token kept in [`VERIFIED`] does not show in the time it takes.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let differ = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(differ) == 0
}

impl TokenKey {
    pub fn new(secret: &[u8]) -> TokenKey {
        let digest = digest::digest(&digest::SHA256, secret);
        let mut id = [0u8; 4];
        id.copy_from_slice(&digest.as_ref()[..4]);
        static INSTANCES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        TokenKey {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            id,
            instance: INSTANCES.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Ids longer than 255 bytes cannot be encoded; validated configuration limits ids to
    /// 128 characters (at most 512 bytes of UTF-8), so callers pass ids ≤ 255 bytes or get
    /// `None`.
    pub fn sign(&self, claims: &Claims) -> Option<String> {
        let business = u8::try_from(claims.business.len()).ok()?;
        let client = u8::try_from(claims.client.len()).ok()?;
        let mut bytes =
            Vec::with_capacity(23 + claims.business.len() + claims.client.len() + TAG_LEN);
        bytes.push(TOKEN_VERSION);
        bytes.extend_from_slice(&self.id);
        bytes.extend_from_slice(&claims.issued_at.to_be_bytes());
        bytes.extend_from_slice(&claims.expires_at.to_be_bytes());
        bytes.push(business);
        bytes.extend_from_slice(claims.business.as_bytes());
        bytes.push(client);
        bytes.extend_from_slice(claims.client.as_bytes());
        let tag = hmac::sign(&self.key, &bytes);
        bytes.extend_from_slice(tag.as_ref());
        Some(URL_SAFE_NO_PAD.encode(bytes))
    }

    /// Checks the tag in constant time, then the claims, then expiry against `now`.
    /// A token this key verified before on this thread skips the tag (see [`Verified`]).
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let known = VERIFIED.with_borrow(|(_, kept)| {
            kept.iter()
                .flatten()
                .filter(|v| v.instance == self.instance)
                .find(|v| same_bytes(v.token.as_bytes(), token.as_bytes()))
                .map(|v| v.claims.clone())
        });
        let claims = match known {
            Some(claims) => claims,
            None => {
                let claims = self.check_tag(token)?;
                VERIFIED.with_borrow_mut(|(next, kept)| {
                    kept[*next] = Some(Verified {
                        instance: self.instance,
                        token: token.into(),
                        claims: claims.clone(),
                    });
                    *next = (*next + 1) % VERIFIED_PER_THREAD;
                });
                claims
            }
        };
        if now >= claims.expires_at {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }

    /// The claims of `token` if its tag is this key's.
    fn check_tag(&self, token: &str) -> Result<Claims, TokenError> {
        #[cfg(test)]
        TAG_CHECKS.with(|n| n.set(n.get() + 1));
        let bytes = URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| TokenError::Malformed)?;
        if bytes.len() < TAG_LEN + 1 {
            return Err(TokenError::Malformed);
        }
        let (claims, tag) = bytes.split_at(bytes.len() - TAG_LEN);
        hmac::verify(&self.key, claims, tag).map_err(|_| TokenError::BadSignature)?;
        decode_claims(claims, &self.id).ok_or(TokenError::Malformed)
    }
}

/// Seals a listing cursor (a position in the business's transactions) so that it is
/// opaque and bound to one business: ChaCha20-Poly1305 with the business id as associated
/// data. The nonce is an HMAC of the business and the position (a synthetic IV), so that
/// one position always gives the same cursor and no randomness is needed. The cursor is
/// base64url of `nonce (12) ‖ ciphertext (16) ‖ tag (16)`: 59 characters.
///
/// Plain positions would tell a business how many transactions all businesses together
/// made between two of its pages, which is what enciphered ids exist to hide.
pub struct CursorKey {
    cipher: aead::LessSafeKey,
    nonces: hmac::Key,
}

/// Bytes of a sealed cursor, and the length of its text.
const CURSOR_BYTES: usize = aead::NONCE_LEN + 16 + 16;
const CURSOR_CHARS: usize = (CURSOR_BYTES * 4).div_ceil(3);

impl CursorKey {
    /// Derives the cursor keys from `secret` (the token signing key), one per purpose.
    pub fn new(secret: &[u8]) -> CursorKey {
        let master = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let cipher = hmac::sign(&master, b"cosmopoints listing cursor cipher v1");
        let nonces = hmac::sign(&master, b"cosmopoints listing cursor nonce v1");
        let cipher = aead::UnboundKey::new(&aead::CHACHA20_POLY1305, cipher.as_ref())
            .expect("an HMAC-SHA256 tag is a 32-byte ChaCha20 key");
        CursorKey {
            cipher: aead::LessSafeKey::new(cipher),
            nonces: hmac::Key::new(hmac::HMAC_SHA256, nonces.as_ref()),
        }
    }

    /// The cursor text for `position` in `business`'s listing.
    pub fn seal(&self, business: &str, position: [u8; 16]) -> Option<String> {
        let mut context = hmac::Context::with_key(&self.nonces);
        context.update(&(business.len() as u64).to_be_bytes());
        context.update(business.as_bytes());
        context.update(&position);
        let mut nonce = [0u8; aead::NONCE_LEN];
        nonce.copy_from_slice(&context.sign().as_ref()[..aead::NONCE_LEN]);
        let mut sealed = position.to_vec();
        self.cipher
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(business.as_bytes()),
                &mut sealed,
            )
            .ok()?;
        let mut bytes = nonce.to_vec();
        bytes.extend_from_slice(&sealed);
        Some(URL_SAFE_NO_PAD.encode(bytes))
    }

    /// The position in a cursor that [`CursorKey::seal`] made for this `business`; `None`
    /// for anything else (altered, forged, another business's, another key's).
    pub fn open(&self, business: &str, text: &str) -> Option<[u8; 16]> {
        if text.len() != CURSOR_CHARS {
            return None;
        }
        let bytes = URL_SAFE_NO_PAD.decode(text).ok()?;
        let (nonce, sealed) = bytes.split_at_checked(aead::NONCE_LEN)?;
        let nonce = aead::Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut sealed = sealed.to_vec();
        let position = self
            .cipher
            .open_in_place(nonce, aead::Aad::from(business.as_bytes()), &mut sealed)
            .ok()?;
        position.try_into().ok()
    }
}

fn decode_claims(bytes: &[u8], key_id: &[u8; 4]) -> Option<Claims> {
    let mut rest = bytes;
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, tail) = rest.split_at_checked(n)?;
        rest = tail;
        Some(head)
    };
    if take(1)? != [TOKEN_VERSION] || take(4)? != key_id {
        return None;
    }
    let issued_at = u64::from_be_bytes(take(8)?.try_into().ok()?);
    let expires_at = u64::from_be_bytes(take(8)?.try_into().ok()?);
    let len = usize::from(take(1)?[0]);
    let business = Arc::from(std::str::from_utf8(take(len)?).ok()?);
    let len = usize::from(take(1)?[0]);
    let client = Arc::from(std::str::from_utf8(take(len)?).ok()?);
    if !rest.is_empty() {
        return None;
    }
    Some(Claims {
        business,
        client,
        issued_at,
        expires_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_open_only_for_their_business_and_key() {
        let key = CursorKey::new(b"k");
        let position = *b"0123456789abcdef";
        let cursor = key.seal("acme", position).expect("sealed");
        assert_eq!(cursor.len(), CURSOR_CHARS);
        assert_eq!(key.seal("acme", position).as_deref(), Some(cursor.as_str()));
        assert_eq!(key.open("acme", &cursor), Some(position));
        assert_eq!(key.open("globex", &cursor), None);
        assert_eq!(CursorKey::new(b"other").open("acme", &cursor), None);
        let mut altered = cursor.clone().into_bytes();
        altered[20] = if altered[20] == b'A' { b'B' } else { b'A' };
        let altered = String::from_utf8(altered).expect("ascii");
        assert_eq!(key.open("acme", &altered), None);
        assert_eq!(key.open("acme", ""), None);
        assert_eq!(key.open("acme", &"A".repeat(CURSOR_CHARS)), None);
    }

    fn claims() -> Claims {
        Claims {
            business: "acme".into(),
            client: "acme-pos".into(),
            issued_at: 1_000,
            expires_at: 1_600,
        }
    }

    fn key() -> TokenKey {
        TokenKey::new(&[7u8; 32])
    }

    #[test]
    fn a_token_round_trips_until_it_expires() {
        let token = key().sign(&claims()).expect("short ids");
        assert_eq!(key().verify(&token, 1_000), Ok(claims()));
        assert_eq!(key().verify(&token, 1_599), Ok(claims()));
        assert_eq!(key().verify(&token, 1_600), Err(TokenError::Expired));
    }

    #[test]
    fn any_altered_character_is_rejected() {
        let token = key().sign(&claims()).expect("short ids");
        for i in 0..token.len() {
            let mut chars: Vec<char> = token.chars().collect();
            chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
            let altered: String = chars.into_iter().collect();
            assert!(key().verify(&altered, 1_000).is_err(), "position {i}");
        }
    }

    #[test]
    fn truncated_extended_and_foreign_tokens_are_rejected() {
        let token = key().sign(&claims()).expect("short ids");
        for cut in [1, 2, 10, token.len() / 2, token.len() - 1] {
            assert!(key().verify(&token[..cut], 1_000).is_err(), "cut at {cut}");
        }
        assert!(key().verify(&format!("{token}AA"), 1_000).is_err());
        let foreign = TokenKey::new(&[8u8; 32])
            .sign(&claims())
            .expect("short ids");
        assert_eq!(key().verify(&foreign, 1_000), Err(TokenError::BadSignature));
        assert_eq!(key().verify("", 1_000), Err(TokenError::Malformed));
        assert_eq!(
            key().verify("not base64!", 1_000),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn a_kept_token_is_taken_only_by_its_own_key_whole_and_until_it_expires() {
        let checks = || TAG_CHECKS.with(std::cell::Cell::get);
        let key = key();
        let token = key.sign(&claims()).expect("short ids");
        let before = checks();
        assert_eq!(key.verify(&token, 1_000), Ok(claims()));
        assert_eq!(checks(), before + 1, "a new token's tag is checked");
        // Kept now: the same answer again, and still not past its expiry.
        assert_eq!(key.verify(&token, 1_599), Ok(claims()));
        assert_eq!(key.verify(&token, 1_600), Err(TokenError::Expired));
        assert_eq!(
            checks(),
            before + 1,
            "a kept token's tag is not checked again"
        );
        // Another key with the same secret has not verified it: it checks the tag
        // itself. A key with another secret never takes it.
        assert_eq!(
            TokenKey::new(&[7u8; 32]).verify(&token, 1_000),
            Ok(claims())
        );
        assert_eq!(checks(), before + 2, "another key took this key's token");
        assert_eq!(
            TokenKey::new(&[8u8; 32]).verify(&token, 1_000),
            Err(TokenError::BadSignature)
        );
        // Altered, cut or extended copies of a kept token are checked as any other.
        for i in 0..token.len() {
            let mut chars: Vec<char> = token.chars().collect();
            chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
            let altered: String = chars.into_iter().collect();
            assert!(key.verify(&altered, 1_000).is_err(), "position {i}");
        }
        assert!(key.verify(&token[..token.len() - 1], 1_000).is_err());
        assert!(key.verify(&format!("{token}A"), 1_000).is_err());
        // More clients than a thread keeps: each token still verifies as itself.
        let tokens: Vec<(Claims, String)> = (0..10)
            .map(|i| {
                let c = Claims {
                    client: format!("client-{i}").into(),
                    ..claims()
                };
                let t = key.sign(&c).expect("short ids");
                (c, t)
            })
            .collect();
        for _ in 0..2 {
            for (c, t) in &tokens {
                assert_eq!(key.verify(t, 1_000).as_ref(), Ok(c));
            }
        }
        assert!(same_bytes(b"abc", b"abc"));
        assert!(!same_bytes(b"abc", b"abd") && !same_bytes(b"abc", b"ab"));
    }

    #[test]
    fn secret_hashes_verify_and_round_trip_through_text() {
        let hash = SecretHash::new(b"s3cret", NonZeroU32::new(1_000).expect("nonzero"));
        assert!(hash.verify(b"s3cret"));
        assert!(!hash.verify(b"s3cret "));
        let parsed = SecretHash::parse(&hash.to_string()).expect("own output parses");
        assert_eq!(parsed, hash);
        assert!(parsed.verify(b"s3cret"));
    }

    #[test]
    fn malformed_secret_hashes_are_rejected() {
        for bad in [
            "",
            "s3cret",
            "$pbkdf2-sha256$i=0$c2FsdHNhbHQ$AAAA",
            "$pbkdf2-sha512$i=10$c2FsdHNhbHQ$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "$pbkdf2-sha256$i=10$c2FsdHNhbHQ$AAAA",
            "$pbkdf2-sha256$10$c2FsdHNhbHQ$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert!(SecretHash::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn plain_secrets_compare_exactly() {
        assert!(plain_secret_matches("abc", b"abc"));
        assert!(!plain_secret_matches("abc", b"abd"));
        assert!(!plain_secret_matches("abc", b"ab"));
    }
}
