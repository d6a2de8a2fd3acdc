//! The cross-process steps of the allocator's small-block protocol, written once over a [`Word`]
//! trait so that the allocator runs them on `std` atomics in shared memory and the loom model
//! (`tests/loom_alloc.rs`, `RUSTFLAGS="--cfg loom"`) runs the very same code on loom's atomics.
//!
//! The functions only compare chunk state words for equality and store `0` (the free state) when a
//! chunk is retired; the encoding of states is the allocator's business (see `alloc` module docs).
//!
//! The argument (Dekker's pattern with the state word as a read-modify-write meeting point): an
//! allocator sets its bit with an `AcqRel` CAS on the bitmap word, then *reads the chunk state with a
//! read-modify-write* (`fetch_or(0)`, `AcqRel`); a retirer CASes the state to `RETIRING` (`SeqCst`),
//! then reads every bitmap word with a plain load (`SeqCst`, though coherence alone is what the
//! argument uses). The allocator's state RMW and the retirer's state CAS are both RMWs of one word, so
//! one comes first in its modification order:
//! - retirer first: the allocator's RMW reads `RETIRING` (or what followed it) and gives its bit back;
//! - allocator first: the retirer's CAS reads the allocator's RMW (release -> acquire), so the
//!   allocator's bit CAS happens-before the retirer's bitmap load, which therefore (write-read
//!   coherence) sees the bit, or a later free of it, and restores the state.
//!
//! Never both "block handed out" and "chunk retired". Plain `SeqCst` loads would also be correct by
//! the single total order, but loom models `SeqCst` as `AcqRel` only; the RMW form is exact under
//! acquire/release, so the model checks the code that runs. The cost is one locked instruction on the
//! allocation path.

use std::sync::atomic::Ordering;

/// The atomic operations the protocol needs on one 64-bit word.
pub trait Word {
    /// Atomic load.
    fn load(&self, o: Ordering) -> u64;
    /// Atomic store.
    fn store(&self, v: u64, o: Ordering);
    /// Strong compare-exchange.
    fn cas(&self, cur: u64, new: u64, ok: Ordering, fail: Ordering) -> Result<u64, u64>;
    /// Atomic and; returns the previous value.
    fn fetch_and(&self, v: u64, o: Ordering) -> u64;
    /// Atomic or; returns the previous value (`fetch_or(0)` is a read that takes part in the
    /// word's modification order).
    fn fetch_or(&self, v: u64, o: Ordering) -> u64;
    /// Atomic swap; returns the previous value.
    fn swap(&self, v: u64, o: Ordering) -> u64;
}

/// `Word` for an atomic type with the std method set (std's, and loom's under `cfg(loom)`).
macro_rules! impl_word {
    ($atomic:ty) => {
        impl Word for $atomic {
            fn load(&self, o: Ordering) -> u64 {
                self.load(o)
            }
            fn store(&self, v: u64, o: Ordering) {
                self.store(v, o);
            }
            fn cas(&self, cur: u64, new: u64, ok: Ordering, fail: Ordering) -> Result<u64, u64> {
                self.compare_exchange(cur, new, ok, fail)
            }
            fn fetch_and(&self, v: u64, o: Ordering) -> u64 {
                self.fetch_and(v, o)
            }
            fn fetch_or(&self, v: u64, o: Ordering) -> u64 {
                self.fetch_or(v, o)
            }
            fn swap(&self, v: u64, o: Ordering) -> u64 {
                self.swap(v, o)
            }
        }
    };
}

impl_word!(std::sync::atomic::AtomicU64);
#[cfg(loom)]
impl_word!(loom::sync::atomic::AtomicU64);

/// Outcome of [`claim_bit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// This bit (index within the word) is now ours: the block is allocated.
    Got(u32),
    /// No free bit under `valid` in this word.
    Full,
    /// The chunk stopped being `want` (retired or being retired); any bit taken was given back.
    Lost,
}

/// Allocation half: takes a clear bit of `word` among `valid`, then re-reads `state`; if the chunk
/// is no longer in state `want`, clears the bit again and reports [`Claim::Lost`].
pub fn claim_bit<W: Word>(word: &W, state: &W, want: u64, valid: u64) -> Claim {
    let mut v = word.load(Ordering::Relaxed);
    loop {
        let free = !v & valid;
        if free == 0 {
            return Claim::Full;
        }
        let bit = 1u64 << free.trailing_zeros();
        // AcqRel: released by the state RMW below to a retirer that reads it (module docs).
        match word.cas(v, v | bit, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => {
                // A read-modify-write, not a load: see the module docs.
                if state.fetch_or(0, Ordering::AcqRel) != want {
                    word.fetch_and(!bit, Ordering::AcqRel);
                    return Claim::Lost;
                }
                return Claim::Got(bit.trailing_zeros());
            }
            Err(cur) => v = cur,
        }
    }
}

/// Free half: clears bit `bit` of `word`; returns whether it was set (false: double free).
pub fn free_bit<W: Word>(word: &W, bit: u32) -> bool {
    let mask = 1u64 << (bit & 63);
    // AcqRel: the freed block's last uses happen-before a retirer that reads this clear.
    word.fetch_and(!mask, Ordering::AcqRel) & mask != 0
}

/// Outcome of [`retire`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retire {
    /// The chunk held no block; `on_empty` ran and the state is now 0 (free).
    Retired,
    /// The state was not `small` (someone else is working on the chunk).
    Busy,
    /// A bit was set; the state was restored to `small`.
    NotEmpty,
}

/// Retirement half: moves `state` from `small` to `retiring`, then reads every bitmap word; if all
/// are zero, runs `on_empty` (e.g. returns the pages) and stores 0 (free), else restores `small`.
pub fn retire<'a, W: Word + 'a>(
    state: &W,
    small: u64,
    retiring: u64,
    words: impl IntoIterator<Item = &'a W>,
    on_empty: impl FnOnce(),
) -> Retire {
    // SeqCst: the write of the Dekker pair.
    if state
        .cas(small, retiring, Ordering::SeqCst, Ordering::Relaxed)
        .is_err()
    {
        return Retire::Busy;
    }
    // SeqCst: the read of the Dekker pair.
    if words.into_iter().all(|w| w.load(Ordering::SeqCst) == 0) {
        on_empty();
        // A swap, not a store: allocators' `fetch_or(0)` reads write the state word too, and every
        // write of it stays a read-modify-write so the modification order is the whole story.
        state.swap(0, Ordering::AcqRel);
        Retire::Retired
    } else {
        state.swap(small, Ordering::AcqRel);
        Retire::NotEmpty
    }
}
