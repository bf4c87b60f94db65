//! Parsing untrusted request input into typed values: JSON bodies field by field (so
//! every error names its field), query strings, percent-encoded path segments.
//!
//! Invariant: nothing here panics on any input, and every rejection is a 400 whose
//! detail says which field or parameter is wrong and how.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use crate::error::Error;

/// The fields of a JSON object body, taken one by one.
pub struct Fields {
    entries: Vec<(String, Value)>,
}

impl Fields {
    /// Parses `body` as a JSON object whose keys are all in `allowed`.
    pub fn parse(body: &[u8], allowed: &[&str]) -> Result<Fields, Error> {
        // Not `Value`: serde_json keeps the last of two equal keys, where a proxy, a log or
        // the client's own validator may have read the first.
        let UniqueKeys(object) = serde_json::from_slice(body).map_err(|e| {
            if e.is_data() {
                Error::bad_request(format!(
                    "the body must be a JSON object without repeated keys: {e}"
                ))
            } else {
                Error::bad_request(format!("the body is not valid JSON: {e}"))
            }
        })?;
        Fields::of_object(object, allowed)
    }

    /// The fields of a JSON object already parsed (an item of a batch), whose keys are
    /// all in `allowed`.
    pub fn of_object(object: Object, allowed: &[&str]) -> Result<Fields, Error> {
        let entries = object.0;
        // The first unknown key in sorted order (as when the fields were a sorted map).
        let unknown = entries
            .iter()
            .map(|(k, _)| k)
            .filter(|k| !allowed.contains(&k.as_str()))
            .min();
        if let Some(unknown) = unknown {
            return Err(Error::bad_request(format!(
                "unknown field `{unknown}`; this endpoint takes: {}",
                allowed.join(", ")
            )));
        }
        Ok(Fields { entries })
    }

    /// Whether the field is there with the value `null`.
    pub fn is_null(&self, name: &str) -> bool {
        self.entries.iter().any(|(k, v)| k == name && v.is_null())
    }

    /// A field that is absent or `null` is `None`.
    fn take(&mut self, name: &str) -> Option<Value> {
        let at = self.entries.iter().position(|(k, _)| k == name)?;
        Some(self.entries.swap_remove(at).1).filter(|v| !v.is_null())
    }

    pub fn string(&mut self, name: &str) -> Result<Option<String>, Error> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(Error::bad_request(format!("`{name}` must be a string"))),
        }
    }

    pub fn required_string(&mut self, name: &str) -> Result<String, Error> {
        self.string(name)?.ok_or_else(|| missing(name))
    }

    /// A JSON integer in `min..=max` (no fraction, no exponent, no string).
    pub fn required_integer(&mut self, name: &str, min: u64, max: u64) -> Result<u64, Error> {
        self.integer(name, min, max)?.ok_or_else(|| missing(name))
    }

    /// Like [`Fields::required_integer`]; absent or `null` is `None`.
    pub fn integer(&mut self, name: &str, min: u64, max: u64) -> Result<Option<u64>, Error> {
        let Some(value) = self.take(name) else {
            return Ok(None);
        };
        value
            .as_u64()
            .filter(|v| (min..=max).contains(v))
            .map(Some)
            .ok_or_else(|| {
                Error::bad_request(format!("`{name}` must be an integer from {min} to {max}"))
            })
    }

    pub fn boolean(&mut self, name: &str) -> Result<Option<bool>, Error> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(_) => Err(Error::bad_request(format!(
                "`{name}` must be true or false"
            ))),
        }
    }
}

/// Parses `body` as `{"items": [item, …]}` with 1..=`max` items. The body's own shape
/// is checked here (a 400 for the whole request); each item is an object without repeated
/// keys, or the reason it is not, so that one bad item fails alone.
pub fn items(body: &[u8], max: usize) -> Result<Vec<ItemFields>, Error> {
    let whole = |e: serde_json::Error| {
        if e.is_data() {
            Error::bad_request(format!(
                "the body must be a JSON object {{\"items\": [...]}} without repeated keys: {e}"
            ))
        } else {
            Error::bad_request(format!("the body is not valid JSON: {e}"))
        }
    };
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        items: Vec<Item>,
    }
    let body: Body = serde_json::from_slice(body).map_err(whole)?;
    if body.items.is_empty() || body.items.len() > max {
        return Err(Error::bad_request(format!(
            "`items` must hold 1 to {max} items, not {}",
            body.items.len()
        )));
    }
    Ok(body
        .items
        .into_iter()
        .map(|item| match item {
            Item::Object(map) => Ok(map),
            Item::Invalid(reason) => Err(Error::bad_request(reason)),
        })
        .collect())
}

/// A batch item's fields, or why it is not an object with unique keys.
pub type ItemFields = Result<Object, Error>;

/// One item of a batch: an object without repeated keys, or why it is not one.
enum Item {
    Object(Object),
    Invalid(String),
}

/// A JSON object's entries in their order, no key twice. A vector, not a map: the
/// objects here have a handful of keys (a batch has a thousand of them), and a tree of
/// its own for each was a fifth of the cost of reading an item.
pub struct Object(Vec<(String, Value)>);

impl Object {
    /// Reads `access`'s entries until the end of the object, or until a key appears a
    /// second time (then `Err` with that key, read with its value, and the rest of the
    /// object unread). Every value is read as a [`Value`], whether kept or not.
    fn read<'de, A: serde::de::MapAccess<'de>>(
        access: &mut A,
    ) -> Result<Result<Object, String>, A::Error> {
        let mut entries: Vec<(String, Value)> = Vec::with_capacity(8);
        // Keys are compared one by one while there are few; past `LINEAR`, through a set
        // (an object with many keys must not cost their square).
        const LINEAR: usize = 16;
        let mut seen: Option<HashSet<String>> = None;
        while let Some(key) = access.next_key::<String>()? {
            let repeated = match &mut seen {
                Some(set) => !set.insert(key.clone()),
                None => entries.iter().any(|(k, _)| *k == key),
            };
            if repeated {
                // Read as strictly as any value (numbers in range, valid text, nesting
                // limit): a body is refused for what it holds whether or not it repeats.
                access.next_value::<Value>()?;
                return Ok(Err(key));
            }
            if seen.is_none() && entries.len() == LINEAR {
                let mut set: HashSet<String> = entries.iter().map(|(k, _)| k.clone()).collect();
                set.insert(key.clone());
                seen = Some(set);
            }
            let value = access.next_value::<Value>()?;
            entries.push((key, value));
        }
        Ok(Ok(Object(entries)))
    }
}

impl<'de> serde::Deserialize<'de> for Item {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Item;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut access: A,
            ) -> Result<Item, A::Error> {
                Ok(match Object::read(&mut access)? {
                    Ok(object) => Item::Object(object),
                    Err(key) => {
                        // The rest of the item is read (as strictly as any item), so that
                        // the items after it are read.
                        while access.next_entry::<String, Value>()?.is_some() {}
                        Item::Invalid(format!(
                            "the item must be a JSON object without repeated keys: the key `{key}` appears twice"
                        ))
                    }
                })
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Item, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(not_an_object())
            }
            fn visit_bool<E>(self, _: bool) -> Result<Item, E> {
                Ok(not_an_object())
            }
            fn visit_i64<E>(self, _: i64) -> Result<Item, E> {
                Ok(not_an_object())
            }
            fn visit_u64<E>(self, _: u64) -> Result<Item, E> {
                Ok(not_an_object())
            }
            fn visit_f64<E>(self, _: f64) -> Result<Item, E> {
                Ok(not_an_object())
            }
            fn visit_str<E>(self, _: &str) -> Result<Item, E> {
                Ok(not_an_object())
            }
            fn visit_unit<E>(self) -> Result<Item, E> {
                Ok(not_an_object())
            }
        }
        fn not_an_object() -> Item {
            Item::Invalid("the item must be a JSON object".into())
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A JSON object in which no key appears twice.
struct UniqueKeys(Object);

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = UniqueKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut access: A,
            ) -> Result<UniqueKeys, A::Error> {
                match Object::read(&mut access)? {
                    Ok(object) => Ok(UniqueKeys(object)),
                    Err(key) => Err(serde::de::Error::custom(format!(
                        "the key `{key}` appears twice"
                    ))),
                }
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

fn missing(name: &str) -> Error {
    Error::bad_request(format!("`{name}` is required"))
}

/// Query parameters, each at most once and each in `allowed`.
pub fn query<'a>(
    query: Option<&str>,
    allowed: &[&'a str],
) -> Result<HashMap<&'a str, String>, Error> {
    let mut params = HashMap::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = decode_component(raw_name, true)?;
        let Some(known) = allowed.iter().find(|a| **a == name) else {
            return Err(Error::bad_request(format!(
                "unknown query parameter `{name}`; this endpoint takes: {}",
                allowed.join(", ")
            )));
        };
        let value = decode_component(raw_value, true)?;
        if params.insert(*known, value).is_some() {
            return Err(Error::bad_request(format!(
                "query parameter `{name}` is given more than once"
            )));
        }
    }
    Ok(params)
}

/// Percent-decodes a path segment or (with `plus_is_space`) a query component into UTF-8.
pub fn decode_component(text: &str, plus_is_space: bool) -> Result<String, Error> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| {
                        Error::bad_request("the URL has a `%` not followed by two hex digits")
                    })?;
                out.push(hex);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| Error::bad_request("the URL does not decode to UTF-8"))
}

/// Percent-encodes a query component: everything but RFC 3986 unreserved characters.
pub fn encode_component(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_percent_escapes_and_rejects_broken_ones() {
        assert_eq!(
            decode_component("inv%202026%2F11%237", false),
            Ok("inv 2026/11#7".into())
        );
        assert_eq!(decode_component("a+b", false), Ok("a+b".into()));
        assert_eq!(decode_component("a+b", true), Ok("a b".into()));
        assert_eq!(decode_component("caf%C3%A9", false), Ok("café".into()));
        for bad in ["%", "%2", "%zz", "%C3", "%FF", "%+1"] {
            assert!(decode_component(bad, true).is_err(), "{bad}");
        }
    }

    #[test]
    fn encoding_round_trips() {
        for text in ["inv 2026/11#7", "café", "a&b=c", "~-._"] {
            assert_eq!(
                decode_component(&encode_component(text), true).as_deref(),
                Ok(text)
            );
        }
    }

    #[test]
    fn query_rejects_unknown_and_repeated_parameters() {
        let allowed = ["startDate", "endDate"];
        let q = query(Some("startDate=1&endDate=2"), &allowed).expect("valid");
        assert_eq!(q.get("endDate").map(String::as_str), Some("2"));
        assert!(query(Some("startDate=1&startDate=2"), &allowed).is_err());
        assert!(query(Some("other=1"), &allowed).is_err());
        assert!(query(None, &allowed).expect("empty").is_empty());
    }

    #[test]
    fn fields_name_the_field_that_is_wrong() {
        let detail = |body: &str| -> String {
            let mut f = match Fields::parse(body.as_bytes(), &["value", "name"]) {
                Ok(f) => f,
                Err(Error::BadRequest(d)) => return d,
                Err(e) => return format!("{e:?}"),
            };
            match f
                .required_integer("value", 1, 10)
                .and(f.required_string("name"))
            {
                Ok(_) => "ok".into(),
                Err(Error::BadRequest(d)) => d,
                Err(e) => format!("{e:?}"),
            }
        };
        assert_eq!(detail(r#"{"value":1,"name":"x"}"#), "ok");
        assert!(detail(r#"{"value":1.5,"name":"x"}"#).contains("`value`"));
        assert!(detail(r#"{"value":"1","name":"x"}"#).contains("`value`"));
        assert!(detail(r#"{"value":11,"name":"x"}"#).contains("`value`"));
        assert!(detail(r#"{"value":1}"#).contains("`name`"));
        assert!(detail(r#"{"value":1,"name":5}"#).contains("`name`"));
        assert!(detail(r#"{"value":1,"name":"x","extra":0}"#).contains("`extra`"));
        assert!(detail("[1]").contains("object"));
        assert!(detail("{").contains("JSON"));
        assert!(detail(r#"{"value":1,"name":"x","value":5}"#).contains("`value` appears twice"));
    }

    #[test]
    fn values_after_a_repeated_key_are_read_as_strictly_and_unknown_keys_named_in_order() {
        // A value that is not valid stays a reason to refuse the whole body, repeat or not.
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        for bad in [r#"1e400"#, "\"\\ud800\"", &deep] {
            let single = format!(r#"{{"a":1,"a":{bad}}}"#);
            let e = serde_json::from_str::<UniqueKeys>(&single)
                .err()
                .expect("refused");
            assert!(!e.to_string().contains("twice"), "{single}: {e}");
            let batch = format!(r#"{{"items":[{{"a":1,"a":1,"b":{bad}}},{{"a":1}}]}}"#);
            assert!(items(batch.as_bytes(), 5).is_err(), "{batch}");
        }
        // The first unknown key in sorted order, as the sorted map named it.
        let Err(Error::BadRequest(d)) =
            Fields::parse(br#"{"zzz":1,"aaa":1,"value":1}"#, &["value"])
        else {
            panic!("unknown keys accepted");
        };
        assert!(d.starts_with("unknown field `aaa`"), "{d}");
    }

    #[test]
    fn repeated_keys_are_found_in_small_and_large_objects() {
        // Keys are compared one by one up to 16 of them, through a set beyond.
        for n in [1, 2, 15, 16, 17, 40] {
            for repeat in [None, Some(0), Some(n - 1), Some(n / 2)] {
                let mut entries: Vec<String> = (0..n).map(|i| format!("\"k{i}\":{i}")).collect();
                if let Some(i) = repeat {
                    entries.push(format!("\"k{i}\":\"again\""));
                }
                entries.push("\"z\":[1,{\"k0\":2}]".into());
                let object = format!("{{{}}}", entries.join(","));
                let parsed = serde_json::from_str::<UniqueKeys>(&object);
                let batch = items(
                    format!("{{\"items\":[{object},{{\"a\":1}}]}}").as_bytes(),
                    5,
                )
                .expect("a batch");
                assert_eq!(batch.len(), 2);
                assert!(batch[1].is_ok(), "the item after it is read");
                match repeat {
                    None => {
                        let UniqueKeys(Object(read)) = parsed.expect("unique keys");
                        assert_eq!(read.len(), n + 1, "{object}");
                        assert_eq!(read[n].0, "z");
                        assert!(batch[0].is_ok(), "{object}");
                    }
                    Some(i) => {
                        let twice = format!("`k{i}` appears twice");
                        let e = parsed.err().expect("refused").to_string();
                        assert!(e.contains(&twice), "{object}: {e}");
                        match &batch[0] {
                            Err(Error::BadRequest(d)) => assert!(d.contains(&twice), "{d}"),
                            _ => panic!("{object}: an item with `k{i}` twice was read"),
                        }
                    }
                }
            }
        }
    }
}
