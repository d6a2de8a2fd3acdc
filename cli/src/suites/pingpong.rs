//! The thread-to-thread baselines several suites compare against.

use std::sync::atomic::{AtomicU32, Ordering};

/// Polls before sleeping, as in `shared/limits.md`'s "spin up to 2000 polls then futex" floor.
const SPIN_POLLS: u32 = 2_000;

fn wait_for(word: &AtomicU32, want: u32) {
    let mut polls = 0;
    loop {
        let v = word.load(Ordering::Acquire);
        if v == want {
            return;
        }
        if polls < SPIN_POLLS {
            polls += 1;
            std::hint::spin_loop();
        } else {
            atomic_wait::wait(word, v);
        }
    }
}

fn pass_to(word: &AtomicU32, value: u32) {
    word.store(value, Ordering::Release);
    atomic_wait::wake_one(word);
}

/// `n` round trips between this thread and a partner thread over one shared word: each side spins
/// briefly for its turn, then sleeps on a futex. This is `spin_futex_pingpong`.
pub fn spin_futex_pingpong(n: u64) {
    let turn = AtomicU32::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            for _ in 0..n {
                wait_for(&turn, 1);
                pass_to(&turn, 0);
            }
        });
        for _ in 0..n {
            pass_to(&turn, 1);
            wait_for(&turn, 0);
        }
    });
}
