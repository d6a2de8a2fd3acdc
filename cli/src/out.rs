//! Writing to stdout without panicking.
//!
//! `println!` panics when stdout is a pipe whose reader has gone (`ctx shm ls | head -0`): Rust
//! ignores `SIGPIPE`, so the write fails with `EPIPE` and the macro turns that into a panic. The
//! macros here return the `io::Error` instead, and [`is_broken_pipe`] lets `main` end quietly with
//! the status a shell expects from a process stopped by `SIGPIPE`. Restoring `SIGPIPE` to its
//! default would do the same for stdout, but it would also kill `ctx bench` when one of its socket
//! baselines writes to a peer that has gone, instead of reporting the error.

/// The exit status of a process killed by `SIGPIPE` (128 + 13), as shells report it.
pub const BROKEN_PIPE_STATUS: u8 = 128 + 13;

/// `println!` that returns `io::Result<()>`.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        writeln!(::std::io::stdout().lock(), $($arg)*)
    }};
}

/// `print!` that returns `io::Result<()>`; flushes, so a closed pipe is seen here.
macro_rules! out {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let mut lock = ::std::io::stdout().lock();
        write!(lock, $($arg)*).and_then(|()| lock.flush())
    }};
}

/// Whether `err` (or anything in its chain) is a write to a pipe whose reader has gone.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broken_pipe_is_found_through_context() {
        let e = anyhow::Error::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
            .context("writing the table");
        assert!(is_broken_pipe(&e));
        let other = anyhow::Error::from(std::io::Error::from(std::io::ErrorKind::NotFound));
        assert!(!is_broken_pipe(&other));
        assert!(!is_broken_pipe(&anyhow::anyhow!("no io error at all")));
    }
}
