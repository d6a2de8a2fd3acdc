//! The baselines and loops that `ctx bench handoff` and this crate's criterion benches share, in
//! one place so that the two cannot drift apart. Not part of the stable API.

use std::hint::spin_loop;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use crate::Context;
use crate::sync::futex;

/// Polls before sleeping, as in `shared/limits.md`'s "spin up to 2000 polls, then futex" floor.
const SPIN_POLLS: u32 = 2_000;

/// The turn word of [`spin_futex_pingpong`] and, for each side, whether it sleeps on it.
struct Turn {
    word: AtomicU32,
    /// `sleeping[i]`: side `i` is about to sleep on `word`. Only then does the other side pay
    /// for a `FUTEX_WAKE`, as every waiter in this workspace (and `context-shmem`'s process
    /// ping-pong baseline) does: an unconditional wake would add a system call to each pass that
    /// none of the cases compared with this pays. One flag per side, each written only by its
    /// side, so that a side clearing its flag after a wake-up cannot clear the other's.
    sleeping: [AtomicBool; 2],
}

impl Turn {
    fn new() -> Self {
        Self {
            word: AtomicU32::new(0),
            sleeping: [AtomicBool::new(false), AtomicBool::new(false)],
        }
    }

    /// Side `me` waits until the word is `want`.
    fn wait_for(&self, me: usize, want: u32) {
        for _ in 0..SPIN_POLLS {
            if self.word.load(Ordering::Acquire) == want {
                return;
            }
            spin_loop();
        }
        loop {
            // Dekker with `post`: the flag is set before the word is read again, and `post`
            // stores the word before it reads the flag (all SeqCst), so no wake-up is lost.
            self.sleeping[me].store(true, Ordering::SeqCst);
            let v = self.word.load(Ordering::SeqCst);
            if v == want {
                self.sleeping[me].store(false, Ordering::Relaxed);
                return;
            }
            futex::wait(&self.word, v, Some(Duration::from_millis(50)));
            self.sleeping[me].store(false, Ordering::Relaxed);
        }
    }

    /// Side `me` hands the turn over: stores `value` and wakes the other side if it sleeps.
    fn post(&self, me: usize, value: u32) {
        self.word.store(value, Ordering::SeqCst);
        if self.sleeping[1 - me].load(Ordering::SeqCst) {
            futex::wake_addr(&raw const self.word);
        }
    }
}

/// `n` round trips between this thread and a partner thread over one shared word: each side
/// spins briefly for its turn, then sleeps on a (private) futex, and a side wakes the other only
/// if it sleeps. This is `spin_futex_pingpong`, the floor of a thread-to-thread round trip.
pub fn spin_futex_pingpong(n: u64) {
    let turn = Turn::new();
    std::thread::scope(|s| {
        s.spawn(|| {
            for _ in 0..n {
                turn.wait_for(1, 1);
                turn.post(1, 0);
            }
        });
        for _ in 0..n {
            turn.post(0, 1);
            turn.wait_for(0, 0);
        }
    });
}

/// `n` round trips of a busy context between two threads: each thread enters `ctx` `n` times
/// and, inside, stays until the other thread is queued for it (or has finished), so that every
/// release hands the context straight to the waiting thread. One round trip is two such
/// handoffs, this thread's and the partner's, which is what [`spin_futex_pingpong`]'s round trip
/// is too. (Without the wait most entries would find the context free, and the loop would
/// measure uncontended entries racing for one cache line, not handoffs.) Returns how many
/// entries were contended, as the context's counters count them: `2 n`, less the few at the
/// start and the end, if every entry was a handoff.
///
/// # Panics
/// If an entry fails (`ctx` closed, or a pinned context: use a free one).
pub fn busy_handoff_roundtrips(ctx: &Context, n: u64) -> u64 {
    let before = ctx.stats().contended_entries;
    let done = [AtomicBool::new(false), AtomicBool::new(false)];
    let run = |me: usize| {
        /// Marks this side done when it ends, a panic included, so the other side never waits
        /// inside the context for a partner that is gone.
        struct Done<'a>(&'a AtomicBool);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        let _done = Done(&done[me]);
        for _ in 0..n {
            ctx.enter(|_| {
                while !ctx.lock().has_waiters() && !done[1 - me].load(Ordering::Acquire) {
                    spin_loop();
                }
            })
            .expect("entering the benchmark's context");
        }
    };
    std::thread::scope(|s| {
        s.spawn(|| run(1));
        run(0);
    });
    ctx.stats().contended_entries - before
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg_attr(miri, ignore = "futex system calls and spinning threads: not for Miri")]
    fn every_busy_entry_is_a_handoff() {
        let ctx = Context::new("busy");
        let n = 2_000;
        let contended = busy_handoff_roundtrips(&ctx, n);
        // All but the first entry of the thread that starts second (it may find the context
        // free) and the ones after the other thread has finished.
        assert!(contended >= 2 * n - 4, "{contended} of {} entries", 2 * n);
        spin_futex_pingpong(1_000);
    }
}
