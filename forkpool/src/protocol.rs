//! The cross-process steps of the allocator's small-block protocol, written once over a [`Word`]
//! trait so that the allocator runs them on `std` atomics in shared memory and the loom model
//! (`tests/loom_alloc.rs`, `RUSTFLAGS="--cfg loom"`) runs the very same code on loom's atomics.
//!
//! The functions only compare chunk state words for equality and store `0` (the free state) when a
//! chunk is retired; the encoding of states is the allocator's business (see `alloc` module docs).
//!
//! The argument, Dekker's pattern: an allocator *writes* its bit, then *reads* the chunk state; a
//! retirer *writes* the state, then *reads* the bitmap; all four accesses are `SeqCst`, so in the
//! single total order at least one of the two reads sees the other side's write. If the retirer
//! sees the bit, it restores the state and the block stays allocated; if the allocator sees the
//! state change, it gives the bit back before using the block. Never both "block handed out" and
//! "chunk retired".

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
}

impl Word for std::sync::atomic::AtomicU64 {
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
}

#[cfg(loom)]
impl Word for loom::sync::atomic::AtomicU64 {
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
}

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
        // SeqCst: the write of the Dekker pair (see module docs).
        match word.cas(v, v | bit, Ordering::SeqCst, Ordering::Relaxed) {
            Ok(_) => {
                // SeqCst: the read of the Dekker pair.
                if state.load(Ordering::SeqCst) != want {
                    word.fetch_and(!bit, Ordering::SeqCst);
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
    // SeqCst: a retirer reading the bitmap must be ordered against this clear.
    word.fetch_and(!mask, Ordering::SeqCst) & mask != 0
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
        state.store(0, Ordering::Release);
        Retire::Retired
    } else {
        state.store(small, Ordering::Release);
        Retire::NotEmpty
    }
}
