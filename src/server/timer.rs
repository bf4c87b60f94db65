//! hyper's timer, with the header read timeout's sleeps recycled.
//!
//! hyper arms a fresh sleep each time it waits for a request head and drops it once the
//! head is in: on a keep-alive connection, once per request. With hyper-util's
//! `TokioTimer` each is a new tokio `Sleep`: an allocation, an insertion into tokio's
//! timer wheel under the wheel's lock when first polled, and a removal under it again
//! when dropped (3.8% of a GET's worker CPU samples).
//!
//! [`RecycledTimer`] keeps a dropped sleep, still filed in the wheel, in a small
//! per-thread pool, and gives it to the next `sleep_until` moved to the new deadline with
//! `Sleep::reset`. tokio moves a filed timer to a later deadline without touching the
//! wheel (it re-files it when the old deadline comes), and the deadlines hyper asks for
//! only grow: now plus the same timeout. A recycled sleep fires at the deadline it was
//! last given, as a fresh one would.
//!
//! A pool only serves timers of the runtime its sleeps were made on: polled on another
//! runtime (one shut down, say, in a test thread that outlived it) a sleep would panic.
//! The API and admin servers share the pools of their one runtime. A sleep hyper dropped
//! without ever polling it (the head was already in) is not pooled: it was never filed,
//! so dropping it costs nothing, and filing it for the next user would cost the lock.
//! What a pool holds when its thread ends is dropped with it (tokio unfiles each).
//! A pooled sleep keeps the waker of the last task that polled it, and with it that
//! task's allocation (about a connection's future): at most [`POOL_MAX`] per thread, and
//! a pooled sleep that comes due wakes that task once, for nothing.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::rt::{Sleep, Timer};
use tokio::runtime::{Handle, Id};

/// The most sleeps a thread's pool keeps; beyond that a dropped sleep is unfiled as
/// usual. hyper holds at most one per connection, so this covers more connections per
/// worker thread than the pool needs to save the wheel's work.
const POOL_MAX: usize = 256;

/// A timer for hyper whose sleeps are recycled through a per-thread pool.
#[derive(Clone, Debug)]
pub(super) struct RecycledTimer {
    /// The runtime this timer was made on (where hyper's connections run); `None`
    /// outside any runtime, and then nothing is pooled.
    runtime: Option<Id>,
}

impl RecycledTimer {
    pub(super) fn new() -> RecycledTimer {
        RecycledTimer {
            runtime: Handle::try_current().ok().map(|handle| handle.id()),
        }
    }
}

impl Timer for RecycledTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
        let now = self.now();
        // As tokio does for a duration too long to add: about 30 years.
        let far = Duration::from_secs(86_400 * 365 * 30);
        self.sleep_until(now.checked_add(duration).unwrap_or(now + far))
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Sleep>> {
        let deadline = tokio::time::Instant::from_std(deadline);
        let (sleep, recycled) = match self.runtime.and_then(take) {
            Some(mut sleep) => {
                sleep.as_mut().reset(deadline);
                (sleep, true)
            }
            None => (Box::pin(tokio::time::sleep_until(deadline)), false),
        };
        Box::pin(Recycled {
            sleep: Some(sleep),
            runtime: self.runtime,
            filed: recycled,
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
    runtime: Option<Id>,
    /// Whether tokio has (or had) a wheel entry for it: it came from the pool, or it
    /// was polled or reset. Only those are worth pooling.
    filed: bool,
}

impl Recycled {
    fn reset(&mut self, deadline: Instant) {
        if let Some(sleep) = self.sleep.as_mut() {
            sleep
                .as_mut()
                .reset(tokio::time::Instant::from_std(deadline));
            self.filed = true;
        }
    }
}

impl Future for Recycled {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        this.filed = true;
        match this.sleep.as_mut() {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => Poll::Ready(()),
        }
    }
}

impl Sleep for Recycled {}

impl Drop for Recycled {
    fn drop(&mut self) {
        if let (Some(sleep), Some(runtime), true) = (self.sleep.take(), self.runtime, self.filed) {
            give_back(runtime, sleep);
        }
    }
}

/// A thread's spare sleeps, all made on the runtime `runtime`.
struct Pool {
    runtime: Option<Id>,
    sleeps: Vec<Pin<Box<tokio::time::Sleep>>>,
}

thread_local! {
    static POOL: RefCell<Pool> = const {
        RefCell::new(Pool {
            runtime: None,
            sleeps: Vec::new(),
        })
    };
}

/// A spare sleep of `runtime`'s from this thread's pool, if it has one.
fn take(runtime: Id) -> Option<Pin<Box<tokio::time::Sleep>>> {
    POOL.try_with(|pool| {
        let mut pool = pool.try_borrow_mut().ok()?;
        if pool.runtime == Some(runtime) {
            pool.sleeps.pop()
        } else {
            None
        }
    })
    .ok()
    .flatten()
}

/// Keeps `sleep` (of `runtime`) in this thread's pool, which gives up another runtime's
/// sleeps to make room; when the pool is full (or gone, as the thread ends), `sleep` is
/// dropped as usual.
fn give_back(runtime: Id, sleep: Pin<Box<tokio::time::Sleep>>) {
    let _ = POOL.try_with(|pool| {
        let Ok(mut pool) = pool.try_borrow_mut() else {
            return Vec::new();
        };
        let others = if pool.runtime == Some(runtime) {
            Vec::new()
        } else {
            pool.runtime = Some(runtime);
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
    //! On the real clock, with checks that hold however late the test runs: a sleep that
    //! fired must be past its deadline ([`fired`]), and awaiting one ends at or after it.

    use super::*;
    use std::future::poll_fn;

    /// Polls `sleep` once: whether it fired. A sleep that fired must be past `deadline`.
    async fn fired(
        sleep: &mut Pin<Box<dyn Sleep>>,
        timer: &RecycledTimer,
        deadline: Instant,
    ) -> bool {
        let fired = poll_fn(|cx| Poll::Ready(sleep.as_mut().poll(cx).is_ready())).await;
        assert!(
            !fired || timer.now() >= deadline,
            "fired {:?} before its deadline",
            deadline - timer.now()
        );
        fired
    }

    /// Awaits `sleep` (at most 10 s): it must end, and not before `deadline`.
    async fn ends(sleep: Pin<Box<dyn Sleep>>, timer: &RecycledTimer, deadline: Instant) {
        tokio::time::timeout(Duration::from_secs(10), sleep)
            .await
            .expect("the sleep never fired");
        assert!(timer.now() >= deadline, "ended before its deadline");
    }

    fn pooled() -> usize {
        POOL.with(|pool| pool.borrow().sleeps.len())
    }

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test]
    async fn a_recycled_sleep_fires_at_its_new_deadline_not_its_old_one() {
        let timer = RecycledTimer::new();
        let start = timer.now();
        let mut first = timer.sleep_until(start + 200 * MS);
        fired(&mut first, &timer, start + 200 * MS).await;
        drop(first);
        assert_eq!(pooled(), 1, "a polled sleep is kept");

        let deadline = timer.now() + 600 * MS;
        let mut second = timer.sleep_until(deadline);
        assert_eq!(pooled(), 0, "and given out again");
        // Past the first sleep's deadline: the recycled one must not fire there.
        tokio::time::sleep_until((start + 400 * MS).into()).await;
        fired(&mut second, &timer, deadline).await;
        ends(second, &timer, deadline).await;
    }

    #[tokio::test]
    async fn a_sleep_that_fired_in_the_pool_is_filed_again_when_reused() {
        let timer = RecycledTimer::new();
        let mut first = timer.sleep(50 * MS);
        fired(&mut first, &timer, timer.now()).await;
        drop(first);
        // It comes due while pooled: tokio fires and unfiles it.
        tokio::time::sleep(150 * MS).await;
        assert_eq!(pooled(), 1);
        let deadline = timer.now() + 300 * MS;
        let mut second = timer.sleep_until(deadline);
        assert_eq!(pooled(), 0, "reused");
        fired(&mut second, &timer, deadline).await;
        ends(second, &timer, deadline).await;
    }

    #[tokio::test]
    async fn reset_moves_a_sleep_earlier_and_later() {
        let timer = RecycledTimer::new();
        let start = timer.now();
        let mut sleep = timer.sleep_until(start + 10_000 * MS);
        fired(&mut sleep, &timer, start + 10_000 * MS).await;
        timer.reset(&mut sleep, start + 100 * MS);
        tokio::time::timeout(Duration::from_secs(5), &mut sleep)
            .await
            .expect("not fired at the earlier deadline");
        assert!(timer.now() >= start + 100 * MS);
        let later = timer.now() + 300 * MS;
        timer.reset(&mut sleep, later);
        fired(&mut sleep, &timer, later).await;
        ends(sleep, &timer, later).await;
    }

    #[tokio::test]
    async fn reset_of_another_kind_of_sleep_replaces_it() {
        struct Never;
        impl Future for Never {
            type Output = ();
            fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
                Poll::Pending
            }
        }
        impl Sleep for Never {}
        let timer = RecycledTimer::new();
        let mut sleep: Pin<Box<dyn Sleep>> = Box::pin(Never);
        let deadline = timer.now() + 50 * MS;
        timer.reset(&mut sleep, deadline);
        ends(sleep, &timer, deadline).await;
    }

    #[tokio::test]
    async fn only_sleeps_that_were_filed_are_pooled() {
        let timer = RecycledTimer::new();
        // Never polled: never filed, dropped for free.
        drop(timer.sleep(Duration::from_secs(30)));
        assert_eq!(pooled(), 0);
        let mut polled = timer.sleep(Duration::from_secs(30));
        fired(&mut polled, &timer, timer.now()).await;
        drop(polled);
        assert_eq!(pooled(), 1);
        // A pooled one stays filed: back to the pool even if hyper never polls it.
        drop(timer.sleep(Duration::from_secs(30)));
        assert_eq!(pooled(), 1);
    }

    #[test]
    fn a_pooled_sleep_serves_its_own_runtime_only() {
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("runtime")
        };
        // A sleep of the first runtime goes into this thread's pool...
        let first = runtime();
        first.block_on(async {
            let timer = RecycledTimer::new();
            let mut sleep = timer.sleep(Duration::from_secs(30));
            fired(&mut sleep, &timer, timer.now()).await;
        });
        assert_eq!(pooled(), 1);
        drop(first);
        // ...and a timer of a second runtime on the same thread must not use it: polled
        // there, a sleep of the first (shut down) runtime would panic.
        runtime().block_on(async {
            let timer = RecycledTimer::new();
            let deadline = timer.now() + 100 * MS;
            let mut sleep = timer.sleep_until(deadline);
            assert_eq!(pooled(), 1, "the other runtime's sleep was not taken");
            fired(&mut sleep, &timer, deadline).await;
            drop(sleep);
            assert_eq!(
                pooled(),
                1,
                "the other runtime's sleep is given up for this one's"
            );
            // Another timer of the same runtime (the admin server's) shares the pool.
            let admin = RecycledTimer::new();
            let deadline = admin.now() + 100 * MS;
            let sleep = admin.sleep_until(deadline);
            assert_eq!(pooled(), 0);
            ends(sleep, &admin, deadline).await;
        });
    }

    #[tokio::test]
    async fn the_pool_keeps_at_most_pool_max_sleeps() {
        let timer = RecycledTimer::new();
        let mut sleeps: Vec<_> = (0..POOL_MAX + 10)
            .map(|_| timer.sleep(Duration::from_secs(30)))
            .collect();
        for sleep in &mut sleeps {
            fired(sleep, &timer, timer.now()).await;
        }
        drop(sleeps);
        assert_eq!(pooled(), POOL_MAX);
    }
}
