//! hyper's timer, with the header read timeout's sleeps recycled.
//!
//! hyper arms a fresh sleep each time it waits for a request head and drops it once the
//! head is in: on a keep-alive connection, once per request. With hyper-util's
//! `TokioTimer` each is a new tokio `Sleep`: an allocation, an insertion into tokio's
//! timer wheel under the wheel's lock when first polled, and a removal under it again
//! when dropped (3.7% of a GET's worker CPU samples).
//!
//! [`RecycledTimer`] keeps a dropped sleep, still filed in the wheel, in a small
//! per-thread pool, and gives it to the next `sleep_until` moved to the new deadline with
//! `Sleep::reset`. tokio moves a filed timer to a later deadline without touching the
//! wheel (it re-files it when the old deadline comes), and the deadlines hyper asks for
//! only grow: now plus the same timeout. A recycled sleep fires at the deadline it was
//! last given, as a fresh one would.
//!
//! A pool only serves the timer that filled it: a sleep belongs to the runtime it was
//! made on, and each server (each runtime) has its own timer. What a pool holds when its
//! thread ends is dropped with it (tokio unfiles each).

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::rt::{Sleep, Timer};

/// The most sleeps a thread's pool keeps; beyond that a dropped sleep is unfiled as
/// usual. hyper holds at most one per connection, so this covers more connections per
/// worker thread than the pool needs to save the wheel's work.
const POOL_MAX: usize = 256;

/// A timer for hyper whose sleeps are recycled through a per-thread pool.
#[derive(Clone, Debug)]
pub(super) struct RecycledTimer {
    /// Tells this timer's pooled sleeps from another's (see the module doc).
    id: u64,
}

impl RecycledTimer {
    pub(super) fn new() -> RecycledTimer {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        RecycledTimer {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
        }
    }
}

impl Timer for RecycledTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
        self.sleep_until(self.now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Sleep>> {
        let deadline = tokio::time::Instant::from_std(deadline);
        let sleep = match take(self.id) {
            Some(mut sleep) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        Box::pin(Recycled {
            sleep: Some(sleep),
            timer: self.id,
        })
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn Sleep>>, new_deadline: Instant) {
        match sleep.as_mut().downcast_mut_pin::<Recycled>() {
            Some(recycled) => recycled.get_mut().reset(new_deadline),
            None => *sleep = self.sleep_until(new_deadline),
        }
    }

    fn now(&self) -> Instant {
        // tokio's clock: the one its sleeps run on (and that tests can pause).
        tokio::time::Instant::now().into_std()
    }
}

/// A tokio sleep that goes back to its thread's pool when hyper drops it.
struct Recycled {
    /// Always `Some` until the drop takes it.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    timer: u64,
}

impl Recycled {
    fn reset(&mut self, deadline: Instant) {
        if let Some(sleep) = self.sleep.as_mut() {
            sleep
                .as_mut()
                .reset(tokio::time::Instant::from_std(deadline));
        }
    }
}

impl Future for Recycled {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.get_mut().sleep.as_mut() {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => Poll::Ready(()),
        }
    }
}

impl Sleep for Recycled {}

impl Drop for Recycled {
    fn drop(&mut self) {
        if let Some(sleep) = self.sleep.take() {
            give_back(self.timer, sleep);
        }
    }
}

/// A thread's spare sleeps, all made by the timer `timer`.
struct Pool {
    timer: u64,
    sleeps: Vec<Pin<Box<tokio::time::Sleep>>>,
}

thread_local! {
    static POOL: RefCell<Pool> = const {
        RefCell::new(Pool {
            timer: 0,
            sleeps: Vec::new(),
        })
    };
}

/// A spare sleep of `timer`'s from this thread's pool, if it has one.
fn take(timer: u64) -> Option<Pin<Box<tokio::time::Sleep>>> {
    POOL.try_with(|pool| {
        let mut pool = pool.try_borrow_mut().ok()?;
        if pool.timer == timer {
            pool.sleeps.pop()
        } else {
            None
        }
    })
    .ok()
    .flatten()
}

/// Keeps `sleep` (of `timer`) in this thread's pool, which gives up another timer's
/// sleeps to make room; when the pool is full (or gone, as the thread ends), `sleep` is
/// dropped as usual.
fn give_back(timer: u64, sleep: Pin<Box<tokio::time::Sleep>>) {
    let _ = POOL.try_with(|pool| {
        let Ok(mut pool) = pool.try_borrow_mut() else {
            return Vec::new();
        };
        let others = if pool.timer == timer {
            Vec::new()
        } else {
            pool.timer = timer;
            std::mem::take(&mut pool.sleeps)
        };
        if pool.sleeps.len() < POOL_MAX {
            pool.sleeps.push(sleep);
        }
        others // dropped (unfiled) once the pool is no longer borrowed
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    /// Polls `sleep` once: whether it has fired.
    async fn fired(sleep: &mut Pin<Box<dyn Sleep>>) -> bool {
        poll_fn(|cx| Poll::Ready(sleep.as_mut().poll(cx).is_ready())).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_recycled_sleep_fires_at_its_new_deadline_not_its_old_one() {
        let timer = RecycledTimer::new();
        let start = timer.now();
        let mut first = timer.sleep_until(start + Duration::from_secs(10));
        assert!(!fired(&mut first).await, "filed in the wheel, not yet due");
        drop(first);
        assert_eq!(POOL.with(|pool| pool.borrow().sleeps.len()), 1);

        tokio::time::advance(Duration::from_secs(5)).await;
        let mut second = timer.sleep_until(timer.now() + Duration::from_secs(10));
        assert_eq!(POOL.with(|pool| pool.borrow().sleeps.len()), 0, "reused");
        assert!(!fired(&mut second).await);
        // Past the first deadline (10 s): the recycled sleep must not fire there.
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(!fired(&mut second).await, "fired at the old deadline");
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(
            !fired(&mut second).await,
            "fired before its deadline (15 s)"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(fired(&mut second).await, "not fired at its deadline (15 s)");
        assert_eq!(timer.now() - start, Duration::from_secs(15));
    }

    #[tokio::test(start_paused = true)]
    async fn a_sleep_that_fired_in_the_pool_is_filed_again_when_reused() {
        let timer = RecycledTimer::new();
        let mut first = timer.sleep(Duration::from_secs(1));
        assert!(!fired(&mut first).await);
        drop(first);
        // It comes due while pooled: tokio fires and unfiles it.
        tokio::time::advance(Duration::from_secs(2)).await;
        let mut second = timer.sleep(Duration::from_secs(1));
        assert!(
            !fired(&mut second).await,
            "a fired sleep must be filed anew"
        );
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(!fired(&mut second).await);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(fired(&mut second).await);
    }

    #[tokio::test(start_paused = true)]
    async fn reset_moves_a_sleep_earlier_and_later() {
        let timer = RecycledTimer::new();
        let start = timer.now();
        let mut sleep = timer.sleep_until(start + Duration::from_secs(10));
        assert!(!fired(&mut sleep).await);
        timer.reset(&mut sleep, start + Duration::from_secs(2));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(fired(&mut sleep).await, "not fired at the earlier deadline");
        timer.reset(&mut sleep, start + Duration::from_secs(30));
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(!fired(&mut sleep).await, "fired before the later deadline");
        tokio::time::advance(Duration::from_secs(8)).await;
        assert!(fired(&mut sleep).await);
    }

    #[test]
    fn a_pooled_sleep_never_serves_another_timer_or_runtime() {
        let paused = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .expect("runtime")
        };
        // A sleep of the first server's runtime goes into this thread's pool...
        let first = paused();
        first.block_on(async {
            let timer = RecycledTimer::new();
            let mut sleep = timer.sleep(Duration::from_secs(30));
            assert!(!fired(&mut sleep).await);
        });
        assert_eq!(POOL.with(|pool| pool.borrow().sleeps.len()), 1);
        drop(first);
        // ...and a second runtime's timer on the same thread must not use it: polled
        // there, a sleep of the first (shut down) runtime would panic.
        paused().block_on(async {
            let timer = RecycledTimer::new();
            let mut sleep = timer.sleep(Duration::from_secs(1));
            assert!(!fired(&mut sleep).await);
            drop(sleep);
            assert_eq!(
                POOL.with(|pool| pool.borrow().sleeps.len()),
                1,
                "the other timer's sleep is given up for this one's"
            );
            let mut sleep = timer.sleep(Duration::from_secs(1));
            tokio::time::advance(Duration::from_secs(1)).await;
            assert!(fired(&mut sleep).await);
        });
    }

    #[test]
    fn the_pool_keeps_at_most_pool_max_sleeps() {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime")
            .block_on(async {
                let timer = RecycledTimer::new();
                let sleeps: Vec<_> = (0..POOL_MAX + 10)
                    .map(|_| timer.sleep(Duration::from_secs(5)))
                    .collect();
                drop(sleeps);
                assert_eq!(POOL.with(|pool| pool.borrow().sleeps.len()), POOL_MAX);
            });
    }
}
