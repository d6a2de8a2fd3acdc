//! The benchmark suites of `ctx bench`. Each one measures its cases and their baselines in the same
//! run and records rows on the [`Runner`]. To add a suite: a module here with
//! `pub fn run(r: &mut Runner) -> anyhow::Result<()>`, and one line in [`ALL`].

use crate::bench::Runner;

pub mod forkpool;
pub mod handoff;
mod placement;
pub mod proxy;
pub mod scaling;
mod shared_context;
pub mod shmem;
pub mod xproc;

/// A registered suite.
pub struct Suite {
    /// The name used on the command line and in the rows.
    pub name: &'static str,
    /// One line for `--help` and `ctx bench --list`.
    pub about: &'static str,
    /// Runs the suite.
    pub run: fn(&mut Runner) -> anyhow::Result<()>,
}

/// Every suite, in the order `ctx bench` runs them.
pub const ALL: &[Suite] = &[
    Suite {
        name: "handoff",
        about: "context entry and lock handoff: idle, busy, pinned",
        run: handoff::run,
    },
    Suite {
        name: "scaling",
        about: "isolated contexts vs shared Arc counts on 1 and 2 threads",
        run: scaling::run,
    },
    Suite {
        name: "forkpool",
        about: "fork pool: shared allocator, 2-worker sum, cross-process pointer walk, releasing memory, start-up",
        run: forkpool::run,
    },
    Suite {
        name: "proxy",
        about: "proxied calls (serialized, move, pinned) and the plain-buffer cheat copy",
        run: proxy::run,
    },
    Suite {
        name: "shmem",
        about: "process-shared lock, cross-process frame channel vs socket/pipe/futex, 64 MiB bulk copy",
        run: shmem::run,
    },
    Suite {
        name: "xproc",
        about: "cross-process proxy calls (vs Unix socket and spin/futex ping-pong) and entering an idle shared context from a pool worker",
        run: xproc::run,
    },
];
