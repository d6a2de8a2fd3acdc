//! Who waits for whom among call chains, to tell a wait for a borrowed object that can never end
//! (a deadlock) from one that will.
//!
//! Context locks cannot deadlock (see `handoff`), but object borrows can: a borrow lasts across
//! calls out of the context, so chain X holding `oa` and waiting for `ob` while chain Y holds `ob`
//! and waits for `oa` would wait for ever. Two kinds of edge "X cannot go on until Y does" exist:
//!
//! - **Retry edges.** A chain W refused with `InUse` (the object is borrowed by chain B) that is
//!   about to wait and retry (a proxy does) calls [`begin_wait`]: that adds W -> B, unless B already
//!   reaches W, which is then a deadlock and the wait is refused. [`end_wait`] removes it.
//! - **Stack edges.** A pinned context's home thread that waits for a call of chain X and meanwhile
//!   serves a job of chain Y (which sits above X's frames on the same stack) makes X -> Y for the
//!   duration: X cannot resume before Y's job returns.
//!
//! A retry edge lasts only while its chain sleeps between attempts. It can still be a moment stale
//! (the borrower has just let go, and the waiter will find so at its next attempt), so a caller
//! should report a deadlock only when its waits keep closing a cycle for a while; proxies wait
//! 50 ms, far more than a retry's sleep.
//!
//! The table records, at each `InUse`, which chain the refused chain met (`note_in_use`); that
//! record becomes an edge only in `begin_wait`, so callers that do not wait leave no edge. Checks
//! and insertions happen under one mutex, so of two chains closing a cycle at the same time the
//! second sees it. Everything here is off the fast path: it runs only after an `InUse` or while a
//! home thread serves a nested job.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

#[derive(Default)]
struct Graph {
    /// The borrower each chain last met with `InUse` (by chain).
    met: HashMap<u64, u64>,
    /// Retry edges: the borrower each waiting chain waits for.
    retry: HashMap<u64, u64>,
    /// Stack edges, as a multiset per chain.
    edges: HashMap<u64, Vec<u64>>,
}

static GRAPH: Mutex<Option<Graph>> = Mutex::new(None);

fn graph() -> MutexGuard<'static, Option<Graph>> {
    // Each operation leaves the maps consistent, and nothing in them can panic midway.
    GRAPH.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Graph {
    fn add(&mut self, from: u64, to: u64) {
        self.edges.entry(from).or_default().push(to);
    }

    fn remove(&mut self, from: u64, to: u64) {
        if let Some(v) = self.edges.get_mut(&from) {
            if let Some(i) = v.iter().position(|&t| t == to) {
                v.swap_remove(i);
            }
            if v.is_empty() {
                self.edges.remove(&from);
            }
        }
    }

    /// Whether `target` can be reached from `start` (a depth-first walk; the graph has one node per
    /// waiting chain, so it is small).
    fn reaches(&self, start: u64, target: u64) -> bool {
        let mut stack = vec![start];
        let mut seen = Vec::new();
        while let Some(n) = stack.pop() {
            if n == target {
                return true;
            }
            if seen.contains(&n) {
                continue;
            }
            seen.push(n);
            if let Some(next) = self.edges.get(&n) {
                stack.extend_from_slice(next);
            }
            if let Some(&next) = self.retry.get(&n) {
                stack.push(next);
            }
        }
        false
    }
}

/// Records that chain `waiter` was refused with `InUse` by an object that chain `borrower` has
/// borrowed (called by the table, under the context's lock, on the cold path).
#[cold]
#[inline(never)]
pub(crate) fn note_in_use(waiter: u64, borrower: u64) {
    let mut g = graph();
    let g = g.get_or_insert_with(Graph::default);
    // A record is consumed by the waiter's next `begin_wait` or `end_wait`, which proxies always
    // make; callers of the core API that meet `InUse` and do not wait leave theirs (one per chain).
    // Bounded: past the cap the records are dropped, and a wait that finds none is simply not
    // checked for a cycle (it then lasts until its timeout, as without detection).
    if g.met.len() >= MAX_MET && !g.met.contains_key(&waiter) {
        g.met.clear();
    }
    g.met.insert(waiter, borrower);
}

/// At most this many `InUse` records are kept (see `note_in_use`).
const MAX_MET: usize = 4096;

/// A wait that would never end: the chain that has the object borrowed waits, directly or through
/// others, for the calling chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WouldDeadlock;

/// Declares that the calling chain is about to wait (sleep) for the borrower it last met with
/// `InUse`, before it retries. Refused if that borrower waits (through any chain of waits) for the
/// calling chain: the wait could never end. Call [`end_wait`] when the sleep is over, before the
/// next attempt (a chain that has its object and runs must not look like it still waits). The
/// `InUse` record is consumed; without one this does nothing.
///
/// # Errors
/// [`WouldDeadlock`] when the wait would close a cycle (nothing is recorded then).
pub fn begin_wait() -> Result<(), WouldDeadlock> {
    let me = crate::handoff::current_chain();
    let mut g = graph();
    let g = g.get_or_insert_with(Graph::default);
    // The edge of an earlier wait of this chain is replaced.
    g.retry.remove(&me);
    let Some(borrower) = g.met.remove(&me) else {
        return Ok(());
    };
    if borrower == me || g.reaches(borrower, me) {
        return Err(WouldDeadlock);
    }
    g.retry.insert(me, borrower);
    Ok(())
}

/// Ends the calling chain's wait (after [`begin_wait`], or instead of it for a chain that gives
/// up): its retry edge and any `InUse` record go.
pub fn end_wait() {
    let me = crate::handoff::current_chain();
    if let Some(g) = graph().as_mut() {
        g.retry.remove(&me);
        g.met.remove(&me);
    }
}

/// Holds the stack edge `below -> above` while a home thread serves chain `above`'s job on top of
/// chain `below`'s suspended frames.
pub(crate) struct StackEdge {
    below: u64,
    above: u64,
}

impl StackEdge {
    pub(crate) fn new(below: u64, above: u64) -> Option<Self> {
        if below == above || below == 0 || above == 0 {
            return None;
        }
        graph().get_or_insert_with(Graph::default).add(below, above);
        Some(Self { below, above })
    }
}

impl Drop for StackEdge {
    fn drop(&mut self) {
        if let Some(g) = graph().as_mut() {
            g.remove(self.below, self.above);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reaches_follows_chains_of_waits() {
        let mut g = Graph::default();
        g.add(1, 2);
        g.add(2, 3);
        g.add(3, 2); // a cycle not through 1 must not loop
        assert!(g.reaches(1, 3));
        assert!(!g.reaches(3, 1));
        assert!(g.reaches(2, 2));
        g.remove(2, 3);
        assert!(!g.reaches(1, 3));
        g.remove(9, 9); // absent: nothing happens
        assert_eq!(g.edges.get(&1), Some(&vec![2]));
        g.retry.insert(2, 3);
        assert!(g.reaches(1, 3), "through a retry edge");
    }

    #[test]
    fn in_use_records_are_consumed_and_bounded() {
        // Chains far above any real thread tag, so that other tests' records do not interfere.
        let base = u64::MAX / 2;
        note_in_use(base, base + 1);
        assert_eq!(graph().as_ref().unwrap().met.get(&base), Some(&(base + 1)));
        for i in 0..(MAX_MET as u64 + 10) {
            note_in_use(base + 2 + i, base);
        }
        assert!(graph().as_ref().unwrap().met.len() <= MAX_MET);
    }
}
