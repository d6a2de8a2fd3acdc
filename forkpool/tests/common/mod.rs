//! Shared by the multi-process test files.

/// A test whose body (`fn() -> anyhow::Result<()>`) runs in a single-threaded re-executed copy of
/// the test binary (`isolated::run`), so it may fork, under a timeout of `$secs` seconds.
macro_rules! isolated_test {
    ($name:ident, $body:ident, $secs:expr) => {
        #[test]
        fn $name() {
            fn entry() -> i32 {
                match $body() {
                    Ok(()) => 0,
                    Err(e) => {
                        eprintln!("FAILED: {e:#}");
                        1
                    }
                }
            }
            let out =
                ::context_forkpool::isolated::run(entry, ::std::time::Duration::from_secs($secs))
                    .expect("isolated run");
            // Shown with --nocapture (libtest captures it otherwise).
            print!("{}", out.stdout);
            assert!(
                out.success(),
                "code {:?} signal {:?}\n--- stdout\n{}\n--- stderr\n{}",
                out.code,
                out.signal,
                out.stdout,
                out.stderr
            );
        }
    };
}

/// How long the multi-process tests wait for a control reply before calling a worker stuck.
pub const T: std::time::Duration = std::time::Duration::from_secs(20);

/// A pool builder for tests: `workers` workers, a 1 GiB reservation, a 64 MiB first region and the
/// tests' control timeout.
pub fn small_pool(workers: usize) -> context_forkpool::PoolBuilder {
    context_forkpool::Pool::builder()
        .workers(workers)
        .reserve(1 << 30)
        .initial_region(64 << 20)
        .control_timeout(T)
}
