//! Where the two parties of a cross-thread or cross-process row run: this thread on one CPU, the
//! partner (a thread it starts, a child it forks or spawns) on another, for the cases and their
//! baselines alike. Left to itself the scheduler places them as it likes, differently from one run
//! to the next, and sometimes both on one CPU, where no spinning can succeed: every figure then
//! swings by two orders of magnitude. Pinning takes that out of the comparison. (The host's own
//! changes of speed between its vCPUs remain: the spinning thread hop took 175 ns in one run and
//! 1,461 ns in the next, both pinned.)
//!
//! The two CPUs are the two lowest this process may use ([`cpu_pair`]: its affinity mask, as
//! `taskset` or a container's cpuset left it), not CPUs 0 and 1, which such a mask may exclude.

use anyhow::Context as _;
use context_shmem::benchkit::{Pinned, cpu_pair, pin_current_thread};

/// The CPU pair of a suite, with this thread pinned to the first CPU until it drops.
pub struct Placement {
    /// `(this thread's CPU, the partner's CPU)`; `None` with one usable CPU (nobody is pinned).
    pair: Option<(usize, usize)>,
    _main: Option<Pinned>,
}

impl Placement {
    /// Picks the pair and pins the calling thread to its first CPU.
    ///
    /// # Errors
    /// The affinity mask could not be read or set.
    pub fn new() -> anyhow::Result<Self> {
        let pair = cpu_pair().context("reading this process's CPU affinity")?;
        let main = match pair {
            Some((mine, _)) => Some(
                pin_current_thread(mine)
                    .with_context(|| format!("pinning this thread to CPU {mine}"))?,
            ),
            None => None,
        };
        Ok(Self { pair, _main: main })
    }

    /// The CPU for partner processes (forked or spawned children pin themselves there); `None`
    /// with one usable CPU.
    pub fn partner_cpu(&self) -> Option<usize> {
        self.pair.map(|(_, theirs)| theirs)
    }

    /// Runs `spawn` (which starts a partner thread) pinned to the partner's CPU: a new thread
    /// inherits the affinity of the thread that starts it.
    ///
    /// # Errors
    /// The affinity could not be set.
    pub fn partner<T>(&self, spawn: impl FnOnce() -> T) -> anyhow::Result<T> {
        let _theirs = match self.partner_cpu() {
            Some(cpu) => Some(
                pin_current_thread(cpu)
                    .with_context(|| format!("pinning to CPU {cpu} to start a partner thread"))?,
            ),
            None => None,
        };
        Ok(spawn())
    }

    /// For a row's note: where `me` and `partner` ran.
    pub fn describe(&self, me: &str, partner: &str) -> String {
        match self.pair {
            Some((mine, theirs)) => format!("{me} on CPU {mine}, {partner} on CPU {theirs}"),
            None => format!("one CPU only: {me} and {partner} share it"),
        }
    }
}
