//! Time as a value that is passed in: the system clock in production, a hand-set clock in
//! tests (so that token expiry and transaction dates are tested without sleeping).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// A source of "now" in whole seconds since the Unix epoch.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    /// `None`: the system clock. `Some`: a clock that only moves when told to.
    manual: Option<Arc<AtomicU64>>,
}

impl Clock {
    pub fn system() -> Clock {
        Clock { manual: None }
    }

    /// A clock stopped at `epoch_seconds`; clones share it, so a test can move it later.
    pub fn manual(epoch_seconds: u64) -> Clock {
        Clock {
            manual: Some(Arc::new(AtomicU64::new(epoch_seconds))),
        }
    }

    /// Sets a manual clock; does nothing to the system clock.
    pub fn set(&self, epoch_seconds: u64) {
        if let Some(manual) = &self.manual {
            manual.store(epoch_seconds, Ordering::SeqCst);
        }
    }

    pub fn now(&self) -> u64 {
        match &self.manual {
            Some(manual) => manual.load(Ordering::SeqCst),
            None => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }
}

/// The wall time, to the microsecond, for log lines only: a manual [`Clock`] does not
/// move it, as it does not move the log formatter's own timestamps.
pub fn log_time() -> SystemTime {
    SystemTime::now()
}

/// RFC 3339 UTC to the second with a `Z`: `2026-11-27T10:15:00Z`.
///
/// Fixed width for years 0000–9999, so the strings sort like the times.
pub fn rfc3339(epoch_seconds: u64) -> String {
    // Without `core::fmt` (a response's timestamps were 1% of an issue's CPU that way).
    let mut buf = [0u8; 20];
    match write_rfc3339(epoch_seconds, &mut buf) {
        Some(text) => text.to_owned(),
        None => formatted(epoch_seconds),
    }
}

/// [`rfc3339`] through `core::fmt`: after the year 9999, and the reference in tests.
fn formatted(epoch_seconds: u64) -> String {
    let days = (epoch_seconds / 86_400) as i64;
    let secs = epoch_seconds % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// [`rfc3339`] written into `buf` without allocating (the listing writes one or more per
/// row); `None` after the year 9999, which needs more than four digits.
pub fn write_rfc3339(epoch_seconds: u64, buf: &mut [u8; 20]) -> Option<&str> {
    let days = (epoch_seconds / 86_400) as i64;
    let secs = (epoch_seconds % 86_400) as u32;
    let (year, month, day) = civil_from_days(days);
    if !(0..=9999).contains(&year) {
        return None;
    }
    let year = year as u32;
    let digits = |buf: &mut [u8], n: u32| {
        let mut n = n;
        for b in buf.iter_mut().rev() {
            *b = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    *buf = *b"0000-00-00T00:00:00Z";
    digits(&mut buf[0..4], year);
    digits(&mut buf[5..7], month);
    digits(&mut buf[8..10], day);
    digits(&mut buf[11..13], secs / 3600);
    digits(&mut buf[14..16], secs / 60 % 60);
    digits(&mut buf[17..19], secs % 60);
    Some(std::str::from_utf8(&buf[..]).expect("digits and separators are ASCII"))
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to (year, month, day).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_774_500), "2026-11-27T10:15:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(9_999_999_999), "2286-11-20T17:46:39Z");
    }

    #[test]
    fn written_rfc3339_is_the_same_text() {
        let mut buf = [0; 20];
        for t in [
            0,
            59,
            951_782_400,
            1_795_774_500,
            9_999_999_999,
            253_402_300_799,
        ] {
            assert_eq!(
                write_rfc3339(t, &mut buf),
                Some(formatted(t).as_str()),
                "{t}"
            );
            assert_eq!(rfc3339(t), formatted(t), "{t}");
        }
        // Every day's first and last second through the year 2400, and a prime step over
        // every second of the day.
        for day in 0..157_000u64 {
            for t in [
                day * 86_400,
                day * 86_400 + 86_399,
                day * 86_400 + day * 7_919 % 86_400,
            ] {
                assert_eq!(
                    write_rfc3339(t, &mut buf),
                    Some(formatted(t).as_str()),
                    "{t}"
                );
            }
        }
        // The first second of the year 10000 no longer fits.
        assert_eq!(write_rfc3339(253_402_300_800, &mut buf), None);
        assert_eq!(rfc3339(253_402_300_800), "10000-01-01T00:00:00Z");
        assert_eq!(write_rfc3339(u64::MAX, &mut buf), None);
    }

    #[test]
    fn a_manual_clock_moves_only_when_set() {
        let clock = Clock::manual(100);
        let shared = clock.clone();
        assert_eq!(clock.now(), 100);
        shared.set(700);
        assert_eq!(clock.now(), 700);
    }
}
