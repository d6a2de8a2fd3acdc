//! Loom models of the allocator's cross-process protocol: the same `protocol` functions the
//! allocator runs on shared memory, run here on loom atomics under every interleaving.
//!
//! `RUSTFLAGS="--cfg loom" cargo test -p context-forkpool --release --test loom_alloc`
#![cfg(loom)]

use std::sync::atomic::Ordering::SeqCst;

use context_forkpool::protocol::{Claim, Retire, claim_bit, free_bit, retire};
use loom::sync::Arc;
use loom::sync::atomic::AtomicU64;

/// Any two distinct non-zero state words will do: the protocol only compares them.
const SMALL: u64 = 0x0302;
const RETIRING: u64 = 0x0107;

#[test]
fn allocation_racing_retirement_never_hands_out_a_retired_block() {
    loom::model(|| {
        let state = Arc::new(AtomicU64::new(SMALL));
        let word = Arc::new(AtomicU64::new(0));
        let (s2, w2) = (state.clone(), word.clone());
        let t = loom::thread::spawn(move || claim_bit(&*w2, &*s2, SMALL, u64::MAX));
        let r = retire(&*state, SMALL, RETIRING, [&*word], || ());
        let c = t.join().expect("allocator thread");
        match c {
            Claim::Got(b) => {
                assert_ne!(
                    r,
                    Retire::Retired,
                    "a block was handed out of a retired chunk"
                );
                assert_eq!(state.load(SeqCst), SMALL);
                assert_ne!(word.load(SeqCst) & (1 << b), 0);
            }
            Claim::Lost => assert_eq!(word.load(SeqCst), 0, "a lost claim gives its bit back"),
            Claim::Full => unreachable!("the word had free bits"),
        }
        if r == Retire::Retired {
            assert_eq!(state.load(SeqCst), 0);
            assert_eq!(word.load(SeqCst), 0);
        }
    });
}

#[test]
fn two_allocators_never_get_the_same_block() {
    loom::model(|| {
        let state = Arc::new(AtomicU64::new(SMALL));
        let word = Arc::new(AtomicU64::new(0));
        let (s2, w2) = (state.clone(), word.clone());
        // Two blocks in the word: both allocators must get one each, distinct.
        let t = loom::thread::spawn(move || claim_bit(&*w2, &*s2, SMALL, 0b11));
        let a = claim_bit(&*word, &*state, SMALL, 0b11);
        let b = t.join().expect("allocator thread");
        match (a, b) {
            (Claim::Got(x), Claim::Got(y)) => assert_ne!(x, y),
            other => panic!("both must succeed: {other:?}"),
        }
        assert_eq!(word.load(SeqCst), 0b11);
    });
}

#[test]
fn free_racing_retirement_and_allocation() {
    loom::model(|| {
        // One live block (bit 0); a freer, a retirer and an allocator race.
        let state = Arc::new(AtomicU64::new(SMALL));
        let word = Arc::new(AtomicU64::new(1));
        let w2 = word.clone();
        let freer = loom::thread::spawn(move || free_bit(&*w2, 0));
        let (s3, w3) = (state.clone(), word.clone());
        let alloc = loom::thread::spawn(move || claim_bit(&*w3, &*s3, SMALL, 0b1));
        let r = retire(&*state, SMALL, RETIRING, [&*word], || ());
        assert!(
            freer.join().expect("freer"),
            "the live block's free succeeds exactly once"
        );
        let c = alloc.join().expect("allocator");
        if let Claim::Got(_) = c {
            assert_ne!(r, Retire::Retired);
            assert_eq!(word.load(SeqCst), 1);
        }
        if r == Retire::Retired {
            assert_eq!(word.load(SeqCst), 0);
        }
        // Whatever happened, a second free of the same block is a double free unless it was re-allocated.
        if !matches!(c, Claim::Got(_)) {
            assert!(!free_bit(&*word, 0));
        }
    });
}
