//! Small OS probes used by tests and benchmarks to check the claims this crate makes.

/// Voluntary and involuntary context switches of the calling thread so far
/// (`getrusage(RUSAGE_THREAD)`): `(voluntary, involuntary)`. A thread that never blocks in the kernel
/// keeps its voluntary count unchanged.
///
/// # Errors
/// The OS error if `getrusage` fails.
pub fn thread_context_switches() -> std::io::Result<(u64, u64)> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY:
    // - `usage` points to writable memory of the right size and alignment for a `rusage`.
    // - RUSAGE_THREAD is valid on Linux since 2.6.26.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: getrusage returned 0, so it filled the struct (and it was zeroed before anyway).
    let usage = unsafe { usage.assume_init() };
    let v = u64::try_from(usage.ru_nvcsw).unwrap_or(0);
    let i = u64::try_from(usage.ru_nivcsw).unwrap_or(0);
    Ok((v, i))
}
