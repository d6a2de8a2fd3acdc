//! PIDs across PID namespaces and hidden `/proc` entries (review of 2026-12-04): a live process
//! must never be judged dead because this process cannot see it, and tokens of another
//! namespace must never be compared with ours.
//!
//! The tests that need namespaces or a private `/proc` mount fork a child that calls
//! `unshare`, which needs `CAP_SYS_ADMIN`; where that is refused they say so and check nothing
//! else (the unit tests in `process.rs` cover the decision logic either way).
#![cfg(not(loom))]

mod common;

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{fork_child, load_name, store_name, wait_child};
use context_shmem::registry::{self, CreatorState};
use context_shmem::segment::SegmentHeader;
use context_shmem::{
    AtomicArray, Channel, ChannelError, Error, ProcessToken, Segment, SharedLock, TypeId,
};

const T: TypeId = TypeId::of_name("tests::namespaces/v1");

/// Exit code of a child whose `unshare` or `mount` was refused.
const UNSUPPORTED: i32 = 77;

fn skipped(what: &str) {
    eprintln!("skipped: {what} needs CAP_SYS_ADMIN (unshare/mount refused here)");
}

/// In a child: a mount namespace of its own whose mounts do not propagate back.
fn private_mounts() -> bool {
    // SAFETY: a plain syscall on this (forked) child's own namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return false;
    }
    // SAFETY: NUL-terminated literal target, null source/type/data: a propagation change only.
    unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) == 0
    }
}

/// In a child with private mounts: a fresh procfs at `/proc` with these options.
fn mount_proc(options: &std::ffi::CStr) -> bool {
    // SAFETY: NUL-terminated literals and option string that live across the call.
    unsafe {
        libc::mount(
            c"proc".as_ptr(),
            c"/proc".as_ptr(),
            c"proc".as_ptr(),
            0,
            options.as_ptr().cast(),
        ) == 0
    }
}

/// Forks a child that makes a new PID namespace and runs `f` in its first process (PID 1 there);
/// the child exits with `f`'s code, [`UNSUPPORTED`] if the namespace was refused, or 100 if the
/// inner process did not exit normally within `limit`.
fn in_new_pid_namespace(limit: Duration, f: impl FnOnce() -> i32) -> libc::pid_t {
    fork_child(|| {
        // SAFETY: the new PID namespace applies to this child's children only.
        if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
            return UNSUPPORTED;
        }
        let st = wait_child(fork_child(f), limit);
        if libc::WIFEXITED(st) {
            libc::WEXITSTATUS(st)
        } else {
            100
        }
    })
}

/// Waits for `child` (at most `limit`) and returns its exit code, or `None` (after saying so) if
/// it found what it needs refused ([`UNSUPPORTED`]).
fn verdict(child: libc::pid_t, limit: Duration, needs: &str) -> Option<i32> {
    let st = wait_child(child, limit);
    assert!(libc::WIFEXITED(st), "status {st:#x}");
    match libc::WEXITSTATUS(st) {
        UNSUPPORTED => {
            skipped(needs);
            None
        }
        code => Some(code),
    }
}

#[test]
fn a_process_hidden_by_hidepid_is_not_dead() {
    let me = ProcessToken::current().unwrap();
    let child = fork_child(|| {
        if !private_mounts() || !mount_proc(c"hidepid=2") {
            return UNSUPPORTED;
        }
        // SAFETY: changes this (forked, single-threaded) child's group id only.
        let gid = unsafe { libc::setgid(65534) };
        // SAFETY: as above, the user id.
        let uid = unsafe { libc::setuid(65534) };
        if gid != 0 || uid != 0 {
            return UNSUPPORTED;
        }
        // As nobody under hidepid=2, the test process (root) has no /proc entry here.
        let hidden = !std::path::Path::new(&format!("/proc/{}", me.pid())).exists();
        if !hidden {
            return UNSUPPORTED;
        }
        if me.is_alive() { 0 } else { 1 }
    });
    if let Some(code) = verdict(child, Duration::from_secs(20), "hidepid") {
        assert_eq!(
            code, 0,
            "a live process hidden by hidepid=2 was judged dead"
        );
    }
}

#[test]
fn a_proc_of_another_pid_namespace_gives_no_token_and_proves_no_death() {
    // A process that surely lives, under a start time it does not have: read from the right
    // /proc it is another process (dead token), so the result below shows whose /proc is read.
    let me = ProcessToken::current().unwrap();
    let stale = ProcessToken::new(me.pid(), u64::from(me.start_ticks()) + 1);
    let child = in_new_pid_namespace(Duration::from_secs(10), || {
        // PID 1 of a new namespace, still looking at the outer namespace's /proc.
        // SAFETY: getpid has no preconditions.
        if unsafe { libc::getpid() } != 1 {
            return 2;
        }
        if ProcessToken::current().is_ok() {
            return 3;
        }
        // Every token is "alive" (unknown): PIDs read from this /proc are not ours.
        if !stale.is_alive() {
            return 4;
        }
        0
    });
    if let Some(code) = verdict(child, Duration::from_secs(20), "a PID namespace") {
        assert_eq!(
            code, 0,
            "2: not PID 1; 3: a token from another namespace's /proc; 4: a death proven there"
        );
    }
}

#[test]
fn a_named_segment_from_another_pid_namespace_is_unknown_kept_and_refused() {
    let tag = format!("t{}_ns", std::process::id());
    // The inner creator writes its segment's name here and waits for `done`.
    let shared = AtomicArray::create(66).unwrap();
    const DONE: usize = 64;
    const FAILED: usize = 65;
    let child = in_new_pid_namespace(Duration::from_secs(30), || {
        // PID 1 of its namespace, with a procfs of that namespace (so it can name itself).
        if !private_mounts() || !mount_proc(c"") {
            shared.get(FAILED).unwrap().store(1, Ordering::SeqCst);
            return UNSUPPORTED;
        }
        let Ok(seg) = Segment::create_named(&tag, 4096, T) else {
            shared.get(FAILED).unwrap().store(2, Ordering::SeqCst);
            return 2;
        };
        store_name(&shared, seg.name().unwrap_or_default());
        let until = Instant::now() + Duration::from_secs(20);
        while shared.get(DONE).unwrap().load(Ordering::SeqCst) == 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(2));
        }
        drop(seg); // unlinks the record
        0
    });
    let until = Instant::now() + Duration::from_secs(10);
    let name = loop {
        let failed = shared.get(FAILED).unwrap().load(Ordering::SeqCst);
        let name = load_name(&shared, 64);
        if failed != 0 || !name.is_empty() || Instant::now() > until {
            break name;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let checks = (!name.is_empty()).then(|| {
        let info = registry::inspect(&name).map(|i| i.creator);
        let collected = registry::gc().map(|c| c.removed.contains(&name));
        let opened = Segment::open_named(&name, T).map(|_| ());
        let still_there = registry::inspect(&name).is_ok();
        (info, collected, opened, still_there)
    });
    shared.get(DONE).unwrap().store(1, Ordering::SeqCst);
    let Some(code) = verdict(
        child,
        Duration::from_secs(40),
        "a PID namespace with its own /proc",
    ) else {
        return;
    };
    assert_eq!(code, 0, "the inner creator failed");
    let (info, collected, opened, still_there) =
        checks.expect("the inner creator named no segment");
    assert_eq!(info.unwrap(), Some(CreatorState::Unknown));
    assert!(
        !collected.unwrap(),
        "gc removed a live segment of another namespace"
    );
    assert!(still_there);
    assert!(
        matches!(opened, Err(Error::ForeignPidNamespace { .. })),
        "{opened:?}"
    );
}

/// Rewrites the header of the memfd behind `seg` so that it claims another PID namespace, and
/// maps it again.
fn as_if_from_another_namespace(seg: &Segment) -> Segment {
    let fd: OwnedFd = seg.fd().try_clone_to_owned().unwrap();
    let mut bytes = [0u8; context_shmem::segment::HEADER_SIZE];
    // SAFETY: reads into a local buffer of exactly that size from a descriptor we own.
    let r = unsafe { libc::pread(fd.as_raw_fd(), bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    assert_eq!(r, bytes.len() as isize);
    let mut h = SegmentHeader::decode(&bytes).unwrap();
    assert_eq!(h.pid_ns, context_shmem::process::pid_namespace().unwrap());
    h.pid_ns = h.pid_ns.wrapping_add(1).max(1);
    let b = h.encode();
    // SAFETY: writes the header bytes at offset 0 of a memfd we own (no mapping involved).
    let w = unsafe { libc::pwrite(fd.as_raw_fd(), b.as_ptr().cast(), b.len(), 0) };
    assert_eq!(w, b.len() as isize);
    Segment::from_fd(fd, seg.type_id()).unwrap()
}

#[test]
fn channels_and_locks_from_another_pid_namespace_are_refused() {
    let ch = Channel::create(4096).unwrap();
    let foreign = Arc::new(as_if_from_another_namespace(ch.segment()));
    // Plain data is still shared: the segment itself opened.
    assert!(matches!(
        foreign.check_pid_namespace(),
        Err(Error::ForeignPidNamespace { .. })
    ));
    let r = Channel::from_segment(foreign);
    assert!(
        matches!(
            r,
            Err(ChannelError::Setup(Error::ForeignPidNamespace { .. }))
        ),
        "{:?}",
        r.err()
    );
    // Our own channel segment passes the same check.
    assert!(Channel::from_segment(Arc::clone(ch.segment())).is_ok());

    let lock = SharedLock::anonymous().unwrap();
    let foreign = Arc::new(as_if_from_another_namespace(lock.segment()));
    let r = SharedLock::open_in(foreign, 0);
    assert!(
        matches!(r, Err(Error::ForeignPidNamespace { .. })),
        "{:?}",
        r.err()
    );
    assert!(SharedLock::open_in(Arc::clone(lock.segment()), 0).is_ok());
}
