//! Counting failed `/v1/auth` attempts in a sliding window, per client id and per remote
//! address, so that guessing secrets is slow while other clients are not held back.
//!
//! Each key keeps the times of its last `limit` failures (a ring of at most `limit`
//! seconds), which makes the window exact. Memory is bounded by `MAX_KEYS`: when the map is
//! full, keys whose failures have all left the window are dropped first, then the keys
//! whose latest failure is oldest.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// Most keys tracked at once (two per failing request: client id and address).
const MAX_KEYS: usize = 100_000;

pub struct Throttle {
    limit: usize,
    window: u64,
    failures: Mutex<HashMap<String, VecDeque<u64>>>,
}

impl Throttle {
    pub fn new(limit: u32, window_seconds: u64) -> Throttle {
        Throttle {
            limit: limit.max(1) as usize,
            window: window_seconds.max(1),
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Starts an attempt: `Err(retry_after_seconds)` if any key already has `limit`
    /// failures within the window; otherwise the attempt is counted as a failure at once,
    /// in the same step, so that concurrent guesses cannot all slip past the check. A
    /// successful attempt is taken back with [`Throttle::succeeded`].
    pub fn attempt(&self, keys: &[&str], now: u64) -> Result<(), u64> {
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut wait = 0;
        for key in keys {
            if let Some(times) = failures.get(*key) {
                if times.len() >= self.limit {
                    let oldest = times.front().copied().unwrap_or(0);
                    let free_at = oldest.saturating_add(self.window);
                    wait = wait.max(free_at.saturating_sub(now));
                }
            }
        }
        if wait > 0 {
            return Err(wait);
        }
        for key in keys {
            if !failures.contains_key(*key) && failures.len() >= MAX_KEYS {
                self.evict(&mut failures, now);
            }
            let times = failures.entry((*key).to_owned()).or_default();
            if times.len() >= self.limit {
                times.pop_front();
            }
            times.push_back(now);
        }
        Ok(())
    }

    /// Takes back the attempt started at `started`: it was not a failure.
    pub fn succeeded(&self, keys: &[&str], started: u64) {
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for key in keys {
            if let Some(times) = failures.get_mut(*key) {
                if let Some(i) = times.iter().rposition(|&t| t == started) {
                    times.remove(i);
                }
                if times.is_empty() {
                    failures.remove(*key);
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
        let throttle = Throttle::new(3, 60);
        for t in [100, 110, 120] {
            assert_eq!(throttle.attempt(&["c"], t), Ok(()));
        }
        // Three failures at 100, 110, 120: blocked until the first leaves the window.
        assert_eq!(throttle.attempt(&["c"], 121), Err(39));
        assert_eq!(throttle.attempt(&["c"], 159), Err(1));
        assert_eq!(throttle.attempt(&["c"], 160), Ok(()));
        assert_eq!(throttle.attempt(&["other"], 121), Ok(()));
    }

    #[test]
    fn any_blocked_key_blocks_the_attempt() {
        let throttle = Throttle::new(1, 60);
        assert_eq!(throttle.attempt(&["client:a", "addr:1"], 0), Ok(()));
        assert!(throttle.attempt(&["client:b", "addr:1"], 1).is_err());
        assert!(throttle.attempt(&["client:a", "addr:2"], 1).is_err());
        assert_eq!(throttle.attempt(&["client:b", "addr:2"], 1), Ok(()));
    }

    #[test]
    fn successful_attempts_are_taken_back() {
        let throttle = Throttle::new(2, 60);
        for t in 0..10 {
            assert_eq!(throttle.attempt(&["c"], t), Ok(()));
            throttle.succeeded(&["c"], t);
        }
        assert_eq!(throttle.len(), 0);
        assert_eq!(throttle.attempt(&["c"], 10), Ok(()));
        assert_eq!(throttle.attempt(&["c"], 11), Ok(()));
        assert!(throttle.attempt(&["c"], 12).is_err());
    }

    #[test]
    fn memory_stays_bounded() {
        let throttle = Throttle::new(2, 60);
        for i in 0..MAX_KEYS {
            let _ = throttle.attempt(&[&format!("k{i}")], 5);
        }
        assert_eq!(throttle.len(), MAX_KEYS);
        // A full map of live keys sheds its oldest tenth, never grows past the bound.
        assert_eq!(throttle.attempt(&["newest"], 6), Ok(()));
        assert!(throttle.len() <= MAX_KEYS);
        assert_eq!(throttle.attempt(&["newest"], 6), Ok(()));
        assert!(throttle.attempt(&["newest"], 7).is_err());
    }

    #[test]
    fn keys_whose_window_passed_are_dropped_first() {
        let throttle = Throttle::new(2, 60);
        for i in 0..MAX_KEYS {
            let _ = throttle.attempt(&[&format!("k{i}")], 5);
        }
        assert_eq!(throttle.attempt(&["late"], 1_000), Ok(()));
        assert_eq!(throttle.len(), 1);
    }
}
