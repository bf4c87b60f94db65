//! Property tests: the parsers of untrusted input never panic, and what they accept
//! round-trips. Token decoding, JSON bodies, query strings, path segments, config decimals
//! and whole config files.

use cosmopoints::auth::{Claims, TokenKey};
use cosmopoints::config::Config;
use cosmopoints::decimal::Decimal;
use cosmopoints::input::{decode_component, encode_component, query, Fields};
use cosmopoints::ledger::TransactionId;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn token_verification_never_panics(text in ".{0,900}", now in any::<u64>()) {
        let key = TokenKey::new(&[9u8; 32]);
        let _ = key.verify(&text, now);
    }

    #[test]
    fn tokens_round_trip_and_any_byte_flip_is_rejected(
        business in "[a-z0-9-]{1,40}",
        client in "[a-z0-9-]{1,40}",
        issued in 0u64..4_000_000_000,
        ttl in 1u64..86_400,
        flip in any::<prop::sample::Index>(),
    ) {
        let key = TokenKey::new(&[3u8; 32]);
        let claims = Claims { business: business.into(), client: client.into(), issued_at: issued, expires_at: issued + ttl };
        let token = key.sign(&claims).expect("short ids");
        prop_assert_eq!(key.verify(&token, issued), Ok(claims));
        let mut bytes = token.into_bytes();
        let i = flip.index(bytes.len());
        bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
        let altered = String::from_utf8(bytes).expect("ascii");
        prop_assert!(key.verify(&altered, issued).is_err());
    }

    #[test]
    fn json_bodies_never_panic(body in prop::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(mut fields) = Fields::parse(&body, &["a", "b", "c"]) {
            let _ = fields.required_integer("a", 1, 1_000_000_000_000);
            let _ = fields.string("b");
            let _ = fields.boolean("c");
        }
    }

    #[test]
    fn json_shaped_bodies_never_panic(
        value in prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(|f| serde_json::json!(f)),
            ".{0,20}".prop_map(serde_json::Value::from),
        ],
        key in prop_oneof![Just("a".to_owned()), Just("b".to_owned()), ".{0,5}"],
    ) {
        let body = serde_json::json!({ key: value }).to_string();
        if let Ok(mut fields) = Fields::parse(body.as_bytes(), &["a", "b"]) {
            let _ = fields.required_integer("a", 1, 10);
            let _ = fields.required_string("b");
        }
    }

    #[test]
    fn query_strings_never_panic(raw in ".{0,200}") {
        let _ = query(Some(&raw), &["startDate", "endDate", "programId"]);
    }

    #[test]
    fn path_segments_never_panic_and_encoding_round_trips(raw in ".{0,100}") {
        let _ = decode_component(&raw, false);
        let _ = TransactionId::parse(&raw);
        prop_assert_eq!(decode_component(&encode_component(&raw), true), Ok(raw.clone()));
        prop_assert_eq!(decode_component(&encode_component(&raw), false), Ok(raw));
    }

    #[test]
    fn decimals_never_panic_and_accepted_ones_print_back(raw in "[0-9.eE +\\-]{0,20}") {
        if let Ok(d) = Decimal::parse(&raw) {
            // The shortest form reads back as the same value, and prints the same again.
            let shown = d.to_string();
            let again = Decimal::parse(&shown).map(|d| d.to_string());
            prop_assert_eq!(again, Ok(shown));
        }
    }

    #[test]
    fn valid_decimals_keep_their_value(int in 0u64..1_000_000, frac in 0u32..1_000_000, digits in 1usize..7) {
        let text = format!("{int}.{:0width$}", frac % 10u32.pow(digits as u32), width = digits);
        let d = Decimal::parse(&text).expect("valid");
        let a = d.to_string();
        let expected = text.trim_end_matches('0').trim_end_matches('.');
        prop_assert_eq!(a, expected);
    }

    #[test]
    fn config_files_never_panic(raw in "[\\[\\]a-z_=\"0-9. \n]{0,300}") {
        let _ = Config::parse(&raw, std::path::Path::new("/tmp"));
    }
}
