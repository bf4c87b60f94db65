//! Counting failed `/v1/auth` attempts in a sliding window, per key with a limit of its
//! own (the caller's keys: per client id and address, per address, per client id), so
//! that guessing secrets is slow while other clients are not held back.
//!
//! Each key keeps the times of its last `limit` failures (a ring of at most `limit`
//! seconds), which makes the window exact. Memory is bounded by `MAX_KEYS`: when the map is
//! full, keys whose failures have all left the window are dropped first, then the keys
//! whose latest failure is oldest.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// Most keys tracked at once (three per failing request).
const MAX_KEYS: usize = 100_000;

pub struct Throttle {
    window: u64,
    failures: Mutex<HashMap<String, VecDeque<u64>>>,
}

impl Throttle {
    pub fn new(window_seconds: u64) -> Throttle {
        Throttle {
            window: window_seconds.max(1),
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Starts an attempt under `keys`, each `(key, limit)`: `Err(retry_after_seconds)` if
    /// any key already has `limit` failures within the window; otherwise the attempt is
    /// counted as a failure under every key at once, in the same step under one lock, so
    /// that concurrent guesses cannot all slip past the check. A successful attempt is
    /// taken back with [`Throttle::succeeded`]. A key must always come with the same limit.
    pub fn attempt(&self, keys: &[(&str, u32)], now: u64) -> Result<(), u64> {
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut wait = 0;
        for &(key, limit) in keys {
            if let Some(times) = failures.get(key) {
                if times.len() >= limit.max(1) as usize {
                    let oldest = times.front().copied().unwrap_or(0);
                    let free_at = oldest.saturating_add(self.window);
                    wait = wait.max(free_at.saturating_sub(now));
                }
            }
        }
        if wait > 0 {
            return Err(wait);
        }
        for &(key, limit) in keys {
            if !failures.contains_key(key) && failures.len() >= MAX_KEYS {
                self.evict(&mut failures, now);
            }
            let times = failures.entry(key.to_owned()).or_default();
            if times.len() >= limit.max(1) as usize {
                times.pop_front();
            }
            times.push_back(now);
        }
        Ok(())
    }

    /// Takes back the attempt started at `started`: it was not a failure.
    pub fn succeeded(&self, keys: &[(&str, u32)], started: u64) {
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for &(key, _) in keys {
            if let Some(times) = failures.get_mut(key) {
                if let Some(i) = times.iter().rposition(|&t| t == started) {
                    times.remove(i);
                }
                if times.is_empty() {
                    failures.remove(key);
                }
            }
        }
    }

    fn evict(&self, failures: &mut HashMap<String, VecDeque<u64>>, now: u64) {
        let window = self.window;
        failures.retain(|_, times| times.back().is_some_and(|&t| t + window > now));
        if failures.len() >= MAX_KEYS {
            // Still full of live keys: drop the tenth whose latest failure is oldest.
            let mut latest: Vec<u64> = failures
                .values()
                .filter_map(|t| t.back().copied())
                .collect();
            let cut = latest.len() / 10;
            let (_, &mut threshold, _) = latest.select_nth_unstable(cut);
            failures.retain(|_, times| times.back().is_some_and(|&t| t > threshold));
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.failures.lock().expect("not poisoned").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_the_limit_within_the_window_only() {
        let throttle = Throttle::new(60);
        for t in [100, 110, 120] {
            assert_eq!(throttle.attempt(&[("c", 3)], t), Ok(()));
        }
        // Three failures at 100, 110, 120: blocked until the first leaves the window.
        assert_eq!(throttle.attempt(&[("c", 3)], 121), Err(39));
        assert_eq!(throttle.attempt(&[("c", 3)], 159), Err(1));
        assert_eq!(throttle.attempt(&[("c", 3)], 160), Ok(()));
        assert_eq!(throttle.attempt(&[("other", 3)], 121), Ok(()));
    }

    #[test]
    fn each_key_has_its_own_limit() {
        let throttle = Throttle::new(60);
        let keys = |pair: &'static str| [(pair, 2), ("addr", 3)];
        assert_eq!(throttle.attempt(&keys("a"), 0), Ok(()));
        assert_eq!(throttle.attempt(&keys("a"), 1), Ok(()));
        // The pair is at its limit of 2; the address (3) is not.
        assert!(throttle.attempt(&keys("a"), 2).is_err());
        assert_eq!(throttle.attempt(&keys("b"), 2), Ok(()));
        // Now the address is at its limit of 3.
        assert!(throttle.attempt(&keys("c"), 3).is_err());
    }

    #[test]
    fn any_blocked_key_blocks_the_attempt() {
        let throttle = Throttle::new(60);
        assert_eq!(
            throttle.attempt(&[("client:a", 1), ("addr:1", 1)], 0),
            Ok(())
        );
        assert!(throttle
            .attempt(&[("client:b", 1), ("addr:1", 1)], 1)
            .is_err());
        assert!(throttle
            .attempt(&[("client:a", 1), ("addr:2", 1)], 1)
            .is_err());
        assert_eq!(
            throttle.attempt(&[("client:b", 1), ("addr:2", 1)], 1),
            Ok(())
        );
    }

    #[test]
    fn successful_attempts_are_taken_back() {
        let throttle = Throttle::new(60);
        for t in 0..10 {
            assert_eq!(throttle.attempt(&[("c", 2)], t), Ok(()));
            throttle.succeeded(&[("c", 2)], t);
        }
        assert_eq!(throttle.len(), 0);
        assert_eq!(throttle.attempt(&[("c", 2)], 10), Ok(()));
        assert_eq!(throttle.attempt(&[("c", 2)], 11), Ok(()));
        assert!(throttle.attempt(&[("c", 2)], 12).is_err());
    }

    #[test]
    fn memory_stays_bounded() {
        let throttle = Throttle::new(60);
        for i in 0..MAX_KEYS {
            let _ = throttle.attempt(&[(&format!("k{i}"), 2)], 5);
        }
        assert_eq!(throttle.len(), MAX_KEYS);
        // A full map of live keys sheds its oldest tenth, never grows past the bound.
        assert_eq!(throttle.attempt(&[("newest", 2)], 6), Ok(()));
        assert!(throttle.len() <= MAX_KEYS);
        assert_eq!(throttle.attempt(&[("newest", 2)], 6), Ok(()));
        assert!(throttle.attempt(&[("newest", 2)], 7).is_err());
    }

    #[test]
    fn keys_whose_window_passed_are_dropped_first() {
        let throttle = Throttle::new(60);
        for i in 0..MAX_KEYS {
            let _ = throttle.attempt(&[(&format!("k{i}"), 2)], 5);
        }
        assert_eq!(throttle.attempt(&[("late", 2)], 1_000), Ok(()));
        assert_eq!(throttle.len(), 1);
    }
}
