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
