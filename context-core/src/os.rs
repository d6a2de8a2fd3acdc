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

/// Probes of what the kernel offers the workspace, for `ctx doctor`. Each returns `Ok(detail)` when
/// the feature works (it is exercised, not just looked up), or the OS error.
pub mod probe {
    use std::io;
    use std::sync::atomic::AtomicU32;

    fn check(rc: libc::c_long) -> io::Result<libc::c_long> {
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }

    /// Closes a descriptor this module opened.
    fn close(fd: libc::c_int) {
        // SAFETY: `fd` was returned by a successful syscall in this module and is closed once.
        unsafe { libc::close(fd) };
    }

    /// `memfd_create` plus `F_ADD_SEALS` (shrink, grow, seal) and `F_GET_SEALS`: what sealed
    /// anonymous segments need.
    ///
    /// # Errors
    /// The OS error of the first step that failed.
    pub fn memfd_seals() -> io::Result<String> {
        // SAFETY: the name is a valid NUL-terminated string; the flags are valid for memfd_create.
        let fd = unsafe {
            libc::memfd_create(
                c"ctx-doctor".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let result = (|| {
            // SAFETY: `fd` is a valid descriptor we own.
            check(unsafe { libc::ftruncate(fd, 4096) }.into())?;
            let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
            // SAFETY: F_ADD_SEALS takes an int argument; `fd` is valid.
            check(unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) }.into())?;
            // SAFETY: F_GET_SEALS takes no argument; `fd` is valid.
            let got = check(unsafe { libc::fcntl(fd, libc::F_GET_SEALS) }.into())?;
            // A sealed memfd must refuse to shrink.
            // SAFETY: `fd` is valid.
            let shrink = unsafe { libc::ftruncate(fd, 0) };
            if shrink == 0 {
                return Err(io::Error::other("a sealed memfd could still be truncated"));
            }
            Ok(format!("seals {got:#x} set and enforced"))
        })();
        close(fd);
        result
    }

    /// `mmap` with `MAP_FIXED_NOREPLACE` inside a reserved range (Linux 4.17+): what the fork pool's
    /// fixed-address regions need.
    ///
    /// # Errors
    /// The OS error, or an error if the kernel ignored the flag.
    pub fn map_fixed_noreplace() -> io::Result<String> {
        const LEN: usize = 2 * 4096;
        // SAFETY: a fresh anonymous PROT_NONE reservation at a kernel-chosen address; no existing
        // mapping is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // Mapping over our own reservation with NOREPLACE must fail with EEXIST: that is the
        // guarantee (never silently replacing a mapping) the pool relies on.
        // SAFETY: `base` is our own reservation; with MAP_FIXED_NOREPLACE the kernel refuses rather
        // than replace it, and if an old kernel ignores the flag it maps elsewhere (checked below).
        let over = unsafe {
            libc::mmap(
                base,
                4096,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        let result = if over == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EEXIST) {
                Ok("refuses to replace an existing mapping (EEXIST)".to_owned())
            } else {
                Err(e)
            }
        } else {
            let ignored = over != base;
            // SAFETY: `over` is a mapping the call above just created and nobody else uses.
            unsafe { libc::munmap(over, 4096) };
            if ignored {
                Err(io::Error::other(
                    "kernel ignores MAP_FIXED_NOREPLACE (older than 4.17)",
                ))
            } else {
                Err(io::Error::other(
                    "MAP_FIXED_NOREPLACE replaced an existing mapping",
                ))
            }
        };
        // SAFETY: `base` is the reservation made above, unmapped once.
        unsafe { libc::munmap(base, LEN) };
        result
    }

    /// A shared (not process-private) `FUTEX_WAKE` and a `FUTEX_WAIT` that times out: what the
    /// process-shared lock and channel need.
    ///
    /// # Errors
    /// The OS error.
    pub fn futex_shared() -> io::Result<String> {
        let word = AtomicU32::new(0);
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 1_000,
        };
        // SAFETY: FUTEX_WAIT on a valid, aligned u32 we own, with a valid timeout; the value (0)
        // matches, so it sleeps at most 1 us and returns ETIMEDOUT.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_futex,
                word.as_ptr(),
                libc::FUTEX_WAIT,
                0u32,
                &raw const ts,
                std::ptr::null_mut::<u32>(),
                0u32,
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            // Timing out is the expected outcome; a signal may also cut the wait short.
            if !matches!(e.raw_os_error(), Some(libc::ETIMEDOUT | libc::EINTR)) {
                return Err(e);
            }
        }
        // SAFETY: FUTEX_WAKE on a valid, aligned u32 we own; no waiters.
        let woken = check(unsafe {
            libc::syscall(
                libc::SYS_futex,
                word.as_ptr(),
                libc::FUTEX_WAKE,
                1u32,
                std::ptr::null::<libc::timespec>(),
                std::ptr::null_mut::<u32>(),
                0u32,
            )
        })?;
        Ok(format!(
            "wait (timed out) and wake ({woken} woken) on a shared word"
        ))
    }

    /// `pidfd_open` on this process (Linux 5.3+): the liveness token that survives PID reuse.
    ///
    /// # Errors
    /// The OS error.
    pub fn pidfd() -> io::Result<String> {
        let pid = std::process::id();
        // SAFETY: pidfd_open takes a pid and flags (0) and returns a new descriptor or -1.
        let fd = check(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0u32) })?;
        close(libc::c_int::try_from(fd).map_err(io::Error::other)?);
        Ok("pidfd_open works".to_owned())
    }
}
