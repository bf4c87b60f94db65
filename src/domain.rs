//! The nouns of the domain that do not depend on how they are stored or shown: checked
//! identifiers, and the businesses, programs (with their partners) and currencies the
//! configuration declares.
//!
//! Invariant: a value of an identifier type was checked when it was made ([`ProgramId::parse`]
//! and friends for untrusted text; the configuration and the store make them from text that
//! was checked before it was written). So nothing below the API layer re-checks them, and an
//! unchecked string cannot reach the store where one of these types is asked for.
//! No HTTP, no JSON parsing, no storage format here.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Serialize, Serializer};

use crate::auth::SecretHash;
use crate::decimal::Decimal;

/// Longest `userId`, `referenceNumber`, `endUserId`, `destinationUserId`, `programId`
/// (characters).
pub const MAX_ID_CHARS: usize = 128;
/// Longest `description` (characters).
pub const MAX_DESCRIPTION_CHARS: usize = 512;

/// Why a piece of untrusted text is not a valid value of its type: the field it came in
/// and a sentence a person can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub field: &'static str,
    pub reason: String,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` {}", self.field, self.reason)
    }
}

/// Checks an id-like text field: 1..=max characters, no control characters.
pub fn check_text(field: &'static str, value: &str, max_chars: usize) -> Result<(), Invalid> {
    let chars = value.chars().count();
    if chars == 0 || chars > max_chars {
        return Err(Invalid {
            field,
            reason: format!("must be 1 to {max_chars} characters long, not {chars}"),
        });
    }
    if value.chars().any(char::is_control) {
        return Err(Invalid {
            field,
            reason: "must not contain control characters".into(),
        });
    }
    Ok(())
}

/// Declares a checked text identifier: 1..=[`MAX_ID_CHARS`] characters, no control
/// characters. It derefs to `str`, serializes as a string and borrows as `str` (so maps
/// keyed by it can be searched with a plain `&str`).
macro_rules! text_id {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// The name of the API field this value travels in.
            pub const FIELD: &'static str = $field;

            /// Checks untrusted text.
            pub fn parse(value: impl Into<String>) -> Result<$name, Invalid> {
                let value = value.into();
                check_text($field, &value, MAX_ID_CHARS)?;
                Ok($name(value))
            }

            /// Text that was checked before it was stored or configured.
            pub(crate) fn trusted(value: String) -> $name {
                $name(value)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
    };
}

text_id!(
    /// A business (tenant) id, from the configuration.
    BusinessId,
    "businessId"
);
text_id!(
    /// A partner program id.
    ProgramId,
    "programId"
);
text_id!(
    /// The member id in a partner program that points are issued to.
    UserId,
    "userId"
);
text_id!(
    /// The idempotency key of an issuance, unique per business.
    ReferenceNumber,
    "referenceNumber"
);
text_id!(
    /// The business's own id for one of its customers.
    EndUserId,
    "endUserId"
);
text_id!(
    /// An end user's member id in a partner program.
    DestinationUserId,
    "destinationUserId"
);

/// A free-text description: at most [`MAX_DESCRIPTION_CHARS`] characters, no NUL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Description(String);

impl Description {
    pub fn parse(value: impl Into<String>) -> Result<Description, Invalid> {
        Description::parse_field("description", value)
    }

    /// Checks free text that travels in the API field `field` (a reversal's `reason`).
    pub fn parse_field(
        field: &'static str,
        value: impl Into<String>,
    ) -> Result<Description, Invalid> {
        let value = value.into();
        let chars = value.chars().count();
        if chars > MAX_DESCRIPTION_CHARS {
            return Err(Invalid {
                field,
                reason: format!(
                    "must be at most {MAX_DESCRIPTION_CHARS} characters long, not {chars}"
                ),
            });
        }
        // Line breaks and tabs are free text's own; NUL is no text at all (and no
        // PostgreSQL `text` can hold it).
        if value.contains('\0') {
            return Err(Invalid {
                field,
                reason: "must not contain the NUL character (U+0000)".into(),
            });
        }
        Ok(Description(value))
    }

    pub(crate) fn trusted(value: String) -> Description {
        Description(value)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// A currency the server prices in.
#[derive(Debug, Clone)]
pub struct Currency {
    pub code: String,
    pub units_per_usd: Decimal,
    /// Minor-unit exponent, from ISO 4217 unless the config gives it: `value` 3673 in AED
    /// (exponent 2) is 36.73 AED; 1 in BTC with exponent 8 is one satoshi.
    pub exponent: u32,
}

/// A partner loyalty program.
#[derive(Debug, Clone)]
pub struct Program {
    pub id: ProgramId,
    pub name: String,
    pub price_per_point_usd: Decimal,
    pub min_points: u64,
    pub max_points: Option<u64>,
    /// Where this program's transactions are delivered; `None`: recorded here only.
    pub partner: Option<Partner>,
}

/// The partner program's endpoint that a program's transactions are delivered to, with
/// how patiently: checked by the configuration, used by [`crate::partner`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partner {
    pub target: PartnerTarget,
    /// The longest one attempt may take, from connecting to the last byte of the answer.
    pub timeout: Duration,
    /// Seconds to wait before attempt 2, 3, …: one entry per retry; after the last one a
    /// delivery that still fails is given up. Never empty, each entry 1..=86400.
    pub retry_schedule: Vec<u64>,
    /// Requests in flight to this partner at most.
    pub concurrency: usize,
    /// An extra certificate authority for an https partner, as configured (resolved
    /// against the config file's folder); its certificates are in `ca_certificates`.
    pub ca_file: Option<PathBuf>,
    /// The DER certificates read from `ca_file` at load (empty without one), so that the
    /// client trusts exactly what was checked at start-up and reads no file itself.
    pub ca_certificates: Vec<Vec<u8>>,
}

/// Who answers a partner request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartnerTarget {
    /// A real partner over HTTP(S).
    Http {
        base_url: PartnerUrl,
        secret: WebhookSecret,
    },
    /// The in-process simulated partner (`sandbox = true`): no network at all.
    Sandbox,
}

/// A checked `http`/`https` base URL: no userinfo, query or fragment; requests go to
/// `{base}/credits` and so on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartnerUrl {
    pub https: bool,
    /// `host` or `host:port` (an IPv6 host in brackets), lower-cased.
    pub authority: String,
    /// Empty or starting with `/`, never ending with `/`.
    pub path: String,
}

impl PartnerUrl {
    /// The full URL of an endpoint below the base; `endpoint` starts with `/`.
    pub fn join(&self, endpoint: &str) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}{}{endpoint}", self.authority, self.path)
    }
}

impl fmt::Display for PartnerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.join(""))
    }
}

/// The key of Standard Webhooks signatures (the bytes behind `whsec_…`). Its `Debug`
/// shows no byte of it, so a logged config or partner cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret(Vec<u8>);

impl WebhookSecret {
    pub fn new(bytes: Vec<u8>) -> WebhookSecret {
        WebhookSecret(bytes)
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WebhookSecret({} bytes, redacted)", self.0.len())
    }
}

/// How a client proves who it is.
#[derive(Debug, Clone)]
pub enum ClientSecret {
    Hash(SecretHash),
    /// Accepted for trying things out; a warning is logged at start-up.
    Plain(String),
}

/// One set of API credentials of a business.
#[derive(Debug, Clone)]
pub struct Client {
    pub client_id: String,
    pub secret: ClientSecret,
}

/// A tenant: a merchant that issues points.
#[derive(Debug, Clone)]
pub struct Business {
    pub id: BusinessId,
    pub name: String,
    /// The business's own program id, shown in its profile.
    pub program_id: String,
    /// A configured currency code.
    pub currency: String,
    /// Enabled partner programs, in config order; each is a configured program.
    pub programs: Vec<ProgramId>,
    pub clients: Vec<Client>,
    /// Where the business is told of status changes.
    pub webhooks: Vec<Webhook>,
}

/// The events a merchant webhook can subscribe to.
pub const WEBHOOK_EVENTS: [&str; 4] = [
    "transaction.completed",
    "transaction.failed",
    "reversal.completed",
    "reversal.failed",
];

/// A merchant's webhook: events are POSTed to its URL, signed and retried like partner
/// deliveries (the same schedule and signing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    /// The URL as configured (checked like a partner URL); events are sent to it as is.
    pub url: String,
    /// How to reach it: an http(s) target with the webhook's secret, the default timeout,
    /// retry schedule and concurrency.
    pub endpoint: Partner,
    /// Subscribed events, each one of [`WEBHOOK_EVENTS`].
    pub events: Vec<&'static str>,
}

impl Webhook {
    pub fn wants(&self, event: &str) -> bool {
        self.events.contains(&event)
    }
}

impl Business {
    pub fn has_program(&self, id: &str) -> bool {
        self.programs.iter().any(|p| p == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_text_takes_line_breaks_but_not_nul() {
        assert!(Description::parse("two\nlines\tand a tab").is_ok());
        let e = Description::parse_field("reason", "a\0b").expect_err("NUL");
        assert_eq!(e.field, "reason");
        assert!(e.reason.contains("NUL"), "{}", e.reason);
    }

    #[test]
    fn text_fields_are_checked_in_characters() {
        assert!(UserId::parse("u").is_ok());
        assert!(UserId::parse("é".repeat(128)).is_ok());
        assert!(UserId::parse("é".repeat(129)).is_err());
        assert!(UserId::parse("").is_err());
        assert!(UserId::parse("a\nb").is_err());
        assert!(UserId::parse("a\u{7f}").is_err());
        assert!(Description::parse("x".repeat(512)).is_ok());
        assert!(Description::parse("x".repeat(513)).is_err());
        let e = ReferenceNumber::parse("").expect_err("empty");
        assert_eq!(
            e.to_string(),
            "`referenceNumber` must be 1 to 128 characters long, not 0"
        );
    }

    #[test]
    fn webhook_secrets_do_not_show_in_debug_output() {
        let secret = WebhookSecret::new(b"very-secret-bytes".to_vec());
        let shown = format!("{secret:?}");
        assert_eq!(shown, "WebhookSecret(17 bytes, redacted)");
    }

    #[test]
    fn partner_urls_join_endpoints() {
        let url = PartnerUrl {
            https: true,
            authority: "partner.example:8443".into(),
            path: "/cosmo".into(),
        };
        assert_eq!(
            url.join("/credits"),
            "https://partner.example:8443/cosmo/credits"
        );
        assert_eq!(url.to_string(), "https://partner.example:8443/cosmo");
    }
}
