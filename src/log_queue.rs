//! The log's way out: lines are queued in memory and written to stderr by one thread, so
//! that a request never waits on stderr, its lock or a slow journal.
//!
//! A logger appends its line to one shared buffer under a lock (a copy, no allocation of
//! its own) and goes on. The writer thread takes the whole buffer at once, writes it with
//! one `write`, and then lingers for [`LINGER`] before it looks again: under load a
//! millisecond's lines go out in one system call, instead of a few lines per call and a
//! wake-up of the thread for each. When the buffer is empty the thread sleeps until a line
//! comes, so an idle server neither wakes up nor holds a line back: a line is written at
//! once when the thread was asleep, and within [`LINGER`] otherwise.
//!
//! Nothing is dropped: when `limit` bytes are queued (the writer cannot keep up, or stderr
//! blocks), loggers wait until the writer has taken the queue; they are not served in
//! order of arrival. Dropping the [`Flush`] guard writes out what is queued and stops the
//! thread (waiting at most [`STOP_WAIT`] once it has the queue; loggers held by a full
//! queue are let go with their lines unwritten). Lines logged after that are not written
//! (they come only at the very end of a run).

use std::io::Write;
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// How long the writer waits after a write before it takes the queue again.
pub const LINGER: Duration = Duration::from_millis(1);

/// How long dropping [`Flush`] waits for the queue to be written out.
pub const STOP_WAIT: Duration = Duration::from_secs(5);

/// The queue's bound in bytes for the binary's log: about 128k lines of ~250 bytes (the
/// bound `tracing-appender`'s queue had, in lines).
pub const LIMIT: usize = 32 << 20;

/// A handle on the queue: cheap to clone, and a `MakeWriter` for `tracing_subscriber`.
#[derive(Clone)]
pub struct LogQueue {
    shared: Arc<Shared>,
}

/// Stops the writer thread when dropped, after it has written everything queued.
#[must_use = "the log's writer thread stops when this is dropped"]
pub struct Flush {
    shared: Arc<Shared>,
    /// Disconnected when the writer thread has returned.
    stopped: mpsc::Receiver<()>,
}

struct Shared {
    state: Mutex<State>,
    /// The writer thread waits here while the queue is empty.
    lines: Condvar,
    /// Loggers wait here while the queue is full.
    room: Condvar,
    limit: usize,
}

struct State {
    queued: Vec<u8>,
    /// The writer thread is waiting on `lines`: the next logger must wake it. (Only then:
    /// a wake-up is a system call, and under load the thread is busy or lingering.)
    asleep: bool,
    /// The guard was dropped: the thread writes what is queued and stops.
    closed: bool,
}

/// A queue bounded at `limit` bytes (at least 1: a line always fits in an empty queue),
/// written to `out` by a thread called `name`.
pub fn start<W: Write + Send + 'static>(
    out: W,
    name: &str,
    limit: usize,
) -> std::io::Result<(LogQueue, Flush)> {
    let limit = limit.max(1);
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queued: Vec::new(),
            asleep: false,
            closed: false,
        }),
        lines: Condvar::new(),
        room: Condvar::new(),
        limit,
    });
    let (stopping, stopped) = mpsc::channel::<()>();
    std::thread::Builder::new().name(name.to_owned()).spawn({
        let shared = Arc::clone(&shared);
        move || {
            shared.run(out);
            drop(stopping);
        }
    })?;
    Ok((
        LogQueue {
            shared: Arc::clone(&shared),
        },
        Flush { shared, stopped },
    ))
}

impl LogQueue {
    /// Queues `line` (whole lines: the writer may write any queued bytes together).
    pub fn push(&self, line: &[u8]) {
        let shared = &*self.shared;
        let mut state = shared.lock();
        while state.queued.len() >= shared.limit && !state.closed {
            state = shared
                .room
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if state.closed {
            return;
        }
        state.queued.extend_from_slice(line);
        if state.asleep {
            state.asleep = false;
            drop(state);
            shared.lines.notify_one();
        }
    }
}

impl Shared {
    /// The lock, also after a panic elsewhere while it was held: the state is a buffer
    /// and two flags, each change of them complete.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The writer thread.
    fn run<W: Write>(&self, mut out: W) {
        let mut batch = Vec::new();
        loop {
            {
                let mut state = self.lock();
                while state.queued.is_empty() && !state.closed {
                    state.asleep = true;
                    state = self
                        .lines
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                state.asleep = false;
                if state.queued.is_empty() {
                    return;
                }
                let was_full = state.queued.len() >= self.limit;
                std::mem::swap(&mut state.queued, &mut batch);
                if was_full {
                    self.room.notify_all();
                }
            }
            // A failed write (stderr closed) loses the lines: there is nowhere to say so.
            let _ = out.write_all(&batch).and_then(|()| out.flush());
            batch.clear();
            // A burst's buffer is not kept for ever.
            batch.shrink_to(1 << 20);
            std::thread::sleep(LINGER);
        }
    }
}

impl Drop for Flush {
    fn drop(&mut self) {
        {
            let mut state = self.shared.lock();
            state.closed = true;
        }
        self.shared.lines.notify_one();
        self.shared.room.notify_all();
        // Bounded: a stderr that takes nothing (a stalled journal) does not hold the
        // process's exit for ever.
        let _ = self.stopped.recv_timeout(STOP_WAIT);
    }
}

/// One event's text is written with one `write_all`, so it is queued whole.
impl Write for &LogQueue {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogQueue {
    type Writer = &'a LogQueue;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A writer that keeps what it is given, and can be held up by holding `gate`.
    #[derive(Clone, Default)]
    struct Kept {
        text: Arc<Mutex<Vec<u8>>>,
        writes: Arc<Mutex<usize>>,
        gate: Arc<Mutex<()>>,
    }

    impl Write for Kept {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _held = self.gate.lock().unwrap();
            self.text.lock().unwrap().extend_from_slice(buf);
            *self.writes.lock().unwrap() += 1;
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Kept {
        fn text(&self) -> String {
            String::from_utf8(self.text.lock().unwrap().clone()).unwrap()
        }
    }

    #[test]
    fn every_line_of_every_thread_is_written_whole_and_in_its_order() {
        let kept = Kept::default();
        let (queue, flush) = start(kept.clone(), "test-log", 4096).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let queue = queue.clone();
                std::thread::spawn(move || {
                    for n in 0..5000 {
                        queue.push(
                            format!("thread {t} line {n} {}\n", "x".repeat(n % 50)).as_bytes(),
                        );
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        drop(flush);
        let text = kept.text();
        let mut next = [0usize; 4];
        for line in text.lines() {
            let words: Vec<&str> = line.split(' ').collect();
            let (t, n): (usize, usize) = (words[1].parse().unwrap(), words[3].parse().unwrap());
            assert_eq!(n, next[t], "thread {t}'s lines out of order or missing");
            assert_eq!(words[4], "x".repeat(n % 50), "a torn line: {line}");
            next[t] += 1;
        }
        assert_eq!(next, [5000; 4]);
        // Many lines per write: the queue batches (each line alone would be 20,000).
        let writes = *kept.writes.lock().unwrap();
        assert!(writes < 20_000, "{writes} writes for 20,000 lines");
    }

    #[test]
    fn a_line_reaches_an_idle_writer_without_waiting_for_the_end() {
        let kept = Kept::default();
        let (queue, _flush) = start(kept.clone(), "test-log", 4096).unwrap();
        for n in 0..3 {
            // Let the thread fall asleep on an empty queue, then wake it with one line.
            std::thread::sleep(Duration::from_millis(20));
            queue.push(format!("line {n}\n").as_bytes());
            let deadline = Instant::now() + Duration::from_secs(10);
            while !kept.text().contains(&format!("line {n}\n")) {
                assert!(Instant::now() < deadline, "line {n} was not written");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    #[test]
    fn a_full_queue_holds_loggers_back_and_loses_nothing() {
        let kept = Kept::default();
        let held = kept.gate.lock().unwrap();
        let (queue, flush) = start(kept.clone(), "test-log", 100).unwrap();
        let (done, finished) = mpsc::channel();
        let logger = std::thread::spawn({
            let queue = queue.clone();
            move || {
                for n in 0..100 {
                    queue.push(format!("{n:09}\n").as_bytes());
                }
                done.send(()).unwrap();
            }
        });
        // The writer holds at most one batch (blocked in its write), the queue 100 bytes
        // more: 100 lines of 10 bytes cannot all be queued while the output is held.
        assert_eq!(
            finished.recv_timeout(Duration::from_millis(300)),
            Err(mpsc::RecvTimeoutError::Timeout),
            "the logger went on past a full queue"
        );
        drop(held);
        finished.recv_timeout(Duration::from_secs(10)).unwrap();
        logger.join().unwrap();
        drop(flush);
        let expected: String = (0..100).map(|n| format!("{n:09}\n")).collect();
        assert_eq!(kept.text(), expected);
    }

    #[test]
    fn a_bound_of_zero_still_takes_lines() {
        let kept = Kept::default();
        let (queue, flush) = start(kept.clone(), "test-log", 0).unwrap();
        let (done, finished) = mpsc::channel();
        std::thread::spawn(move || {
            queue.push(b"one\n");
            queue.push(b"two\n");
            done.send(()).unwrap();
        });
        finished
            .recv_timeout(Duration::from_secs(10))
            .expect("a logger waited on an empty queue");
        drop(flush);
        assert_eq!(kept.text(), "one\ntwo\n");
    }

    #[test]
    fn lines_after_the_end_are_not_written_and_do_not_block() {
        let kept = Kept::default();
        let (queue, flush) = start(kept.clone(), "test-log", 10).unwrap();
        queue.push(b"before\n");
        drop(flush);
        for _ in 0..10 {
            queue.push(b"after the end\n");
        }
        assert_eq!(kept.text(), "before\n");
        // Not kept either: nothing would ever write them.
        assert!(queue.shared.lock().queued.is_empty());
    }
}
