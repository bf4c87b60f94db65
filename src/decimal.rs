//! Exact decimals for prices and exchange rates, and the points formula.
//!
//! Invariant: no floating point anywhere in money math. A decimal is an integer mantissa
//! and a power-of-ten scale; every operation is exact or explicitly floors.

use std::fmt;

/// At most this many digits in a configured decimal, so that the points formula below
/// always fits in a `u128` (10^12 · 10^24 numerator, 10^4 · 10^30 denominator).
pub const MAX_DIGITS: usize = 15;
/// At most this many digits after the point.
pub const MAX_SCALE: u32 = 12;

/// A non-negative exact decimal: `mantissa / 10^scale`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decimal {
    mantissa: u128,
    scale: u32,
}

impl Decimal {
    /// Parses `digits[.digits]`: no sign, no exponent, no spaces, at most [`MAX_DIGITS`]
    /// digits of which at most [`MAX_SCALE`] after the point.
    pub fn parse(text: &str) -> Result<Decimal, String> {
        let (int, frac) = match text.split_once('.') {
            Some((int, frac)) => (int, Some(frac)),
            None => (text, None),
        };
        let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !all_digits(int) || frac.is_some_and(|f| !all_digits(f)) {
            return Err(format!(
                "\"{text}\" is not a decimal like \"0.012\" (digits, at most one point, no sign)"
            ));
        }
        let frac = frac.unwrap_or("");
        let significant = int.trim_start_matches('0').len() + frac.len();
        if significant > MAX_DIGITS || frac.len() > MAX_SCALE as usize {
            return Err(format!(
                "\"{text}\" has too many digits (at most {MAX_DIGITS}, at most {MAX_SCALE} after the point)"
            ));
        }
        let mut mantissa: u128 = 0;
        for b in int.bytes().chain(frac.bytes()) {
            mantissa = mantissa * 10 + u128::from(b - b'0');
        }
        Ok(Decimal {
            mantissa,
            scale: frac.len() as u32,
        })
    }

    pub fn is_zero(&self) -> bool {
        self.mantissa == 0
    }

    /// The exact product (scales add, mantissas multiply; both stay far below `u128::MAX`
    /// for parsed decimals).
    pub fn times(self, other: Decimal) -> Decimal {
        Decimal {
            mantissa: self.mantissa * other.mantissa,
            scale: self.scale + other.scale,
        }
    }
}

impl fmt::Display for Decimal {
    /// The shortest exact text: "0.04407", "12", never "1.50" or "1e-3".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (mut mantissa, mut scale) = (self.mantissa, self.scale);
        while scale > 0 && mantissa % 10 == 0 {
            mantissa /= 10;
            scale -= 1;
        }
        let digits = mantissa.to_string();
        let scale = scale as usize;
        if scale == 0 {
            return f.write_str(&digits);
        }
        let padded = format!("{digits:0>width$}", width = scale + 1);
        let (int, frac) = padded.split_at(padded.len() - scale);
        write!(f, "{int}.{frac}")
    }
}

/// The ISO 4217 minor-unit exponent of a currency code, or `None` for a code that is not
/// in ISO 4217's list of currencies with minor units (current codes, and a few withdrawn
/// since 2020 so that configs naming them keep working). A config must give the exponent
/// of any other code itself.
pub fn minor_unit_exponent(code: &str) -> Option<u32> {
    match code {
        "BIF" | "CLP" | "DJF" | "GNF" | "ISK" | "JPY" | "KMF" | "KRW" | "PYG" | "RWF" | "UGX"
        | "UYI" | "VND" | "VUV" | "XAF" | "XOF" | "XPF" => Some(0),
        "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => Some(3),
        "CLF" | "UYW" => Some(4),
        "AED" | "AFN" | "ALL" | "AMD" | "ANG" | "AOA" | "ARS" | "AUD" | "AWG" | "AZN" | "BAM"
        | "BBD" | "BDT" | "BGN" | "BMD" | "BND" | "BOB" | "BOV" | "BRL" | "BSD" | "BTN" | "BWP"
        | "BYN" | "BZD" | "CAD" | "CDF" | "CHE" | "CHF" | "CHW" | "CNY" | "COP" | "COU" | "CRC"
        | "CUC" | "CUP" | "CVE" | "CZK" | "DKK" | "DOP" | "DZD" | "EGP" | "ERN" | "ETB" | "EUR"
        | "FJD" | "FKP" | "GBP" | "GEL" | "GHS" | "GIP" | "GMD" | "GTQ" | "GYD" | "HKD" | "HNL"
        | "HRK" | "HTG" | "HUF" | "IDR" | "ILS" | "INR" | "IRR" | "JMD" | "KES" | "KGS" | "KHR"
        | "KPW" | "KYD" | "KZT" | "LAK" | "LBP" | "LKR" | "LRD" | "LSL" | "MAD" | "MDL" | "MGA"
        | "MKD" | "MMK" | "MNT" | "MOP" | "MRU" | "MUR" | "MVR" | "MWK" | "MXN" | "MXV" | "MYR"
        | "MZN" | "NAD" | "NGN" | "NIO" | "NOK" | "NPR" | "NZD" | "PAB" | "PEN" | "PGK" | "PHP"
        | "PKR" | "PLN" | "QAR" | "RON" | "RSD" | "RUB" | "SAR" | "SBD" | "SCR" | "SDG" | "SEK"
        | "SGD" | "SHP" | "SLE" | "SLL" | "SOS" | "SRD" | "SSP" | "STN" | "SVC" | "SYP" | "SZL"
        | "THB" | "TJS" | "TMT" | "TOP" | "TRY" | "TTD" | "TWD" | "TZS" | "UAH" | "USD" | "USN"
        | "UYU" | "UZS" | "VED" | "VES" | "WST" | "XCD" | "XCG" | "YER" | "ZAR" | "ZMW" | "ZWG"
        | "ZWL" => Some(2),
        _ => None,
    }
}

/// `floor(value / 10^exponent / units_per_usd / price_per_point_usd)`, exactly.
///
/// `value` is in minor units of the currency. Returns `None` only if a divisor is zero,
/// which validated configuration rules out.
pub fn points_for(
    value: u64,
    exponent: u32,
    units_per_usd: Decimal,
    price_per_point_usd: Decimal,
) -> Option<u128> {
    // value / 10^e / (u / 10^us) / (p / 10^ps) = value · 10^(us+ps) / (10^e · u · p)
    let numerator = u128::from(value)
        .checked_mul(10u128.checked_pow(units_per_usd.scale + price_per_point_usd.scale)?)?;
    let denominator = 10u128
        .checked_pow(exponent)?
        .checked_mul(units_per_usd.mantissa)?
        .checked_mul(price_per_point_usd.mantissa)?;
    numerator.checked_div(denominator)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(text: &str) -> Decimal {
        Decimal::parse(text).expect("test decimal")
    }

    #[test]
    fn parses_and_prints_exactly() {
        for (input, shown) in [
            ("0.012", "0.012"),
            ("3.6725", "3.6725"),
            ("1", "1"),
            ("1.50", "1.5"),
            ("0007", "7"),
            ("0.000000000001", "0.000000000001"),
            ("999999999999999", "999999999999999"),
        ] {
            assert_eq!(d(input).to_string(), shown, "{input}");
        }
    }

    #[test]
    fn rejects_what_is_not_a_plain_decimal() {
        for bad in [
            "",
            ".",
            "1.",
            ".5",
            "-1",
            "+1",
            "1e3",
            " 1",
            "1 ",
            "1,5",
            "1.2.3",
            "0x10",
            "NaN",
            "1000000000000000",
            "0.0000000000001",
            "١",
        ] {
            assert!(Decimal::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn products_are_exact() {
        assert_eq!(d("0.012").times(d("3.6725")).to_string(), "0.04407");
        assert_eq!(d("0.007").times(d("1")).to_string(), "0.007");
        assert_eq!(d("0.1").times(d("0.2")).to_string(), "0.02");
    }

    #[test]
    fn points_are_floored_exactly() {
        // Floats give 99 here: 0.70 / 0.007 = 99.99999999999999.
        assert_eq!(points_for(70, 2, d("1"), d("0.007")), Some(100));
        // 36.73 AED / 3.6725 AED per USD / 0.012 USD per point = 833.4…
        assert_eq!(points_for(3673, 2, d("3.6725"), d("0.012")), Some(833));
        assert_eq!(points_for(1, 2, d("1"), d("0.012")), Some(0));
        assert_eq!(points_for(1, 0, d("150.25"), d("0.01")), Some(0));
        assert_eq!(points_for(1_000, 3, d("0.3770"), d("0.01")), Some(265));
    }

    #[test]
    fn the_largest_inputs_do_not_overflow() {
        let tiny = d("0.000000000001");
        let biggest = d("999999999999999");
        assert!(points_for(1_000_000_000_000, 0, tiny, tiny).is_some());
        assert_eq!(points_for(1_000_000_000_000, 4, biggest, biggest), Some(0));
    }

    #[test]
    fn exponents_follow_iso_4217() {
        assert_eq!(minor_unit_exponent("USD"), Some(2));
        assert_eq!(minor_unit_exponent("AED"), Some(2));
        assert_eq!(minor_unit_exponent("JPY"), Some(0));
        assert_eq!(minor_unit_exponent("KWD"), Some(3));
        assert_eq!(minor_unit_exponent("BTC"), None);
        assert_eq!(minor_unit_exponent("XAU"), None);
    }
}
