//! Segments across processes: truncation attempts cannot cause SIGBUS, garbage headers and records
//! are refused with clear errors, named segments and the registry (list/inspect/gc).
#![cfg(not(loom))]

mod common;

use std::os::fd::AsRawFd;
use std::time::Duration;

use common::{expect_ok, fork_child, kill9, load_name, store_name, wait_child, within};
use context_shmem::{Error, Segment, SharedBuf, TypeId, registry};

const T: TypeId = TypeId::of_name("tests::segments/v1");

/// Removes a file the test wrote into `/dev/shm` when dropped, so that a failing assertion does
/// not leave it behind (`gc` never removes undecodable records).
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Held by the tests that run the machine-wide `registry::gc()` or watch a record `gc` would
/// remove: one such test's `gc` must not remove another's record under its eyes.
static GC: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn gc_lock() -> std::sync::MutexGuard<'static, ()> {
    GC.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn unique_tag(what: &str) -> String {
    format!("t{}_{what}", std::process::id())
}

/// Reads every payload byte of a buffer under its lock (touches every page: would SIGBUS if the
/// backing file had shrunk).
fn sum_all(buf: &SharedBuf<u8>) -> u64 {
    let g = buf.lock(within(5)).unwrap();
    let mut v = vec![0u8; g.len()];
    g.read_into(0, &mut v).unwrap();
    v.iter().map(|&b| u64::from(b)).sum()
}

#[test]
fn memfd_truncation_by_a_peer_is_refused_and_nobody_faults() {
    let buf = SharedBuf::<u8>::create(1 << 20).unwrap();
    buf.lock(within(5)).unwrap().fill(1);
    let fd = buf.segment().fd().as_raw_fd();
    // The peer (a forked child holding the same descriptor) tries to shrink and to grow it.
    let child = fork_child(|| {
        // SAFETY: `fd` is a descriptor inherited from the parent; ftruncate has no memory effects
        // on this process.
        let shrink = unsafe { libc::ftruncate(fd, 0) };
        let e1 = std::io::Error::last_os_error().raw_os_error();
        // SAFETY: as above.
        let grow = unsafe { libc::ftruncate(fd, 1 << 30) };
        let e2 = std::io::Error::last_os_error().raw_os_error();
        if shrink == -1 && e1 == Some(libc::EPERM) && grow == -1 && e2 == Some(libc::EPERM) {
            0
        } else {
            1
        }
    });
    expect_ok(child, Duration::from_secs(10));
    assert_eq!(sum_all(&buf), 1 << 20);
}

#[test]
fn named_segment_truncation_attempts_cannot_fault_anyone() {
    let tag = unique_tag("trunc");
    let buf = SharedBuf::<u8>::create_named(&tag, 1 << 20).unwrap();
    buf.lock(within(5)).unwrap().fill(2);
    let name = buf.segment().name().unwrap().to_owned();
    let record = std::path::Path::new(registry::SHM_DIR).join(&name);
    let child = fork_child(|| {
        // A peer opens the segment by name, then attacks both the data and the name record.
        let Ok(other) = SharedBuf::<u8>::open_named(&name) else {
            return 1;
        };
        let Ok(f) = std::fs::OpenOptions::new().write(true).open(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            other.segment().fd().as_raw_fd()
        )) else {
            return 2;
        };
        // The data is a sealed memfd: the kernel refuses.
        match f.set_len(0) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
            _ => return 3,
        }
        // The record is a plain file: truncating it succeeds but nobody maps it.
        let Ok(r) = std::fs::OpenOptions::new().write(true).open(&record) else {
            return 4;
        };
        if r.set_len(0).is_err() {
            return 5;
        }
        if sum_all(&other) != 2 << 20 {
            return 6;
        }
        0
    });
    expect_ok(child, Duration::from_secs(10));
    // Still fully readable here, and new opens get a clear error instead of a crash.
    assert_eq!(sum_all(&buf), 2 << 20);
    assert!(matches!(
        SharedBuf::<u8>::open_named(&name),
        Err(Error::BadHeader(_))
    ));
}

#[test]
fn named_segment_roundtrip_and_clear_errors() {
    let tag = unique_tag("named");
    let buf = SharedBuf::<u64>::create_named(&tag, 8).unwrap();
    buf.lock(within(5)).unwrap().set(5, 55).unwrap();
    let name = buf.segment().name().unwrap().to_owned();
    assert!(name.starts_with("ctxshm-") && name.contains(&tag));
    // Mode 0600.
    let meta = std::fs::metadata(std::path::Path::new(registry::SHM_DIR).join(&name)).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o600
    );
    // Another process opens it by name and sees the data.
    let child = fork_child(|| match SharedBuf::<u64>::open_named(&name) {
        Ok(b) => match b.lock(within(5)).map(|g| g.get(5)) {
            Ok(Some(55)) => 0,
            _ => 2,
        },
        Err(_) => 1,
    });
    expect_ok(child, Duration::from_secs(10));
    // Wrong type, missing name, malformed name.
    assert!(matches!(
        SharedBuf::<u32>::open_named(&name),
        Err(Error::WrongType { .. })
    ));
    let missing = format!("ctxshm-{tag}-{}", "0".repeat(32));
    assert!(matches!(
        Segment::open_named(&missing, T),
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        Segment::open_named("../etc/passwd", T),
        Err(Error::BadName(_))
    ));
    assert!(matches!(
        Segment::open_named("ctxshm-x-123", T),
        Err(Error::BadName(_))
    ));
    // Listed while alive; the creator unlinks the name on drop.
    let listed = registry::list().unwrap();
    let me = listed.iter().find(|i| i.name == name).expect("listed");
    assert_eq!(me.creator, Some(registry::CreatorState::Alive));
    let rec = me.record.as_ref().unwrap();
    assert_eq!(rec.creator_pid, std::process::id());
    assert_eq!(
        registry::inspect(&name).unwrap().creator,
        Some(registry::CreatorState::Alive)
    );
    drop(buf);
    assert!(matches!(registry::inspect(&name), Err(Error::NotFound(_))));
}

#[test]
fn garbage_records_and_segments_are_refused() {
    let dir = std::path::Path::new(registry::SHM_DIR);
    let tag = unique_tag("garbage");
    let cases: [(&str, Vec<u8>); 3] = [
        ("a", vec![0xab; 80]),
        ("b", b"short".to_vec()),
        ("c", vec![0u8; 4096]),
    ];
    for (suffix, bytes) in &cases {
        let name = format!("ctxshm-{tag}{suffix}-{}", "f".repeat(32));
        let p = dir.join(&name);
        let _cleanup = RemoveOnDrop(p.clone());
        std::fs::write(&p, bytes).unwrap();
        let r = Segment::open_named(&name, T);
        assert!(matches!(r, Err(Error::BadHeader(_))), "{name}: {r:?}");
        // Listed as undecodable (gc never removes those: see the gc test).
        let info = registry::list()
            .unwrap()
            .into_iter()
            .find(|i| i.name == name)
            .unwrap();
        assert!(info.record.is_err());
        std::fs::remove_file(&p).unwrap();
    }
    // A sealed memfd with garbage content is refused by from_fd too.
    let seg = Segment::create_memfd(4096, T).unwrap();
    let fd = seg.fd().try_clone_to_owned().unwrap();
    // SAFETY: writes 8 bytes at offset 0 of a memfd we own, via pwrite: no mapping involved.
    let w = unsafe { libc::pwrite(fd.as_raw_fd(), b"XXXXXXXX".as_ptr().cast(), 8, 0) };
    assert_eq!(w, 8);
    assert!(matches!(Segment::from_fd(fd, T), Err(Error::BadHeader(_))));
}

/// Forks a child that creates a named segment tagged `tag`, passes its name back through the
/// returned array (see `load_name`), keeps the record (never drops the segment), then does
/// `then`; exits 1 if the segment could not be made.
fn child_with_named_segment(
    tag: &str,
    then: impl FnOnce() -> i32,
) -> (libc::pid_t, context_shmem::AtomicArray) {
    let ch = context_shmem::AtomicArray::create(64).unwrap();
    let child = fork_child(|| {
        let Ok(seg) = Segment::create_named(tag, 4096, T) else {
            return 1;
        };
        store_name(&ch, seg.name().unwrap_or_default());
        std::mem::forget(seg);
        then()
    });
    (child, ch)
}

#[test]
fn gc_removes_only_names_whose_creator_died() {
    let _gc = gc_lock();
    // A child creates a named segment and dies without unlinking, like a crash: its record stays.
    let tag = unique_tag("gc");
    let (child, ch) = child_with_named_segment(&tag, || 0);
    expect_ok(child, Duration::from_secs(10));
    let name = load_name(&ch, 64);
    let info = registry::inspect(&name).unwrap();
    assert_eq!(info.creator, Some(registry::CreatorState::Dead));
    assert!(matches!(
        Segment::open_named(&name, T),
        Err(Error::CreatorGone { .. })
    ));
    // A live creator's segment and an undecodable record survive gc.
    let live = Segment::create_named(&unique_tag("gclive"), 4096, T).unwrap();
    let junk = std::path::Path::new(registry::SHM_DIR)
        .join(format!("ctxshm-{tag}junk-{}", "e".repeat(32)));
    let _cleanup = RemoveOnDrop(junk.clone());
    std::fs::write(&junk, [0x55u8; 80]).unwrap();
    let removed = registry::gc().unwrap().removed;
    assert!(removed.contains(&name));
    assert!(!removed.iter().any(|n| Some(n.as_str()) == live.name()));
    assert!(registry::inspect(live.name().unwrap()).is_ok());
    assert!(matches!(registry::inspect(&name), Err(Error::NotFound(_))));
    assert!(junk.exists());
    std::fs::remove_file(&junk).unwrap();
}

/// Review of 2026-12-04: anyone may write a record in `/dev/shm`, and `open_named` opened
/// whatever descriptor of whichever process it named, read-write. Now the record must belong to
/// the creator's user and name one of our memfds.
#[test]
fn forged_records_cannot_make_open_named_open_other_descriptors() {
    // The forged records are stale: another test's `gc` would remove them.
    let _gc = gc_lock();
    let real = Segment::create_named(&unique_tag("forge"), 4096, T).unwrap();
    let rec = registry::inspect(real.name().unwrap())
        .unwrap()
        .record
        .unwrap();
    let dir = std::path::Path::new(registry::SHM_DIR);
    let tag = unique_tag("forged");
    let mut cleanup = Vec::new();
    let mut write = |suffix: &str, rec: &registry::NameRecord| {
        let name = format!("ctxshm-{tag}{suffix}-{}", "a".repeat(32));
        cleanup.push(RemoveOnDrop(dir.join(&name)));
        std::fs::write(dir.join(&name), rec.encode()).unwrap();
        name
    };
    // A live process's descriptor 0 (not a memfd of ours).
    let stdin = write("0", &registry::NameRecord { fd: 0, ..rec });
    // The real segment's descriptor, through a record owned by another user.
    let other = write("1", &rec);
    let c = std::ffi::CString::new(dir.join(&other).to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path that lives across the call. (Root may give files away; as
    // another user the chown fails and that half of the test checks nothing.)
    let chowned = unsafe { libc::chown(c.as_ptr(), 65534, 65534) } == 0;
    let r0 = Segment::open_named(&stdin, T);
    let r1 = Segment::open_named(&other, T);
    // The genuine record still opens.
    let r2 = Segment::open_named(real.name().unwrap(), T).map(|_| ());
    // Descriptor 0 does not hold the segment the record claims: the record is stale.
    assert!(
        matches!(&r0, Err(Error::NoLongerHeld { .. })),
        "{:?}",
        r0.err()
    );
    if chowned {
        assert!(
            matches!(&r1, Err(Error::BadHeader(m)) if m.contains("another user")),
            "{:?}",
            r1.err()
        );
    }
    r2.unwrap();
}

/// Review of 2026-12-04: a creator that `exec`s closes the segment's memfd (close-on-exec) but
/// lives on, so its record showed as alive, could open nothing, and `gc` kept it for the new
/// program's whole life. Now it is `Stale`, and `gc` removes it.
#[test]
fn a_creator_that_execs_leaves_a_stale_record_that_gc_removes() {
    let _gc = gc_lock();
    let tag = unique_tag("exec");
    let (child, ch) = child_with_named_segment(&tag, || {
        // SAFETY: NUL-terminated literals and a null-terminated argument vector; on success the
        // process image is replaced (the memfd, close-on-exec, goes with the old image).
        unsafe {
            libc::execl(
                c"/bin/sleep".as_ptr(),
                c"sleep".as_ptr(),
                c"30".as_ptr(),
                std::ptr::null::<libc::c_char>(),
            )
        };
        2
    });
    let read_name = || load_name(&ch, 64);
    let until = std::time::Instant::now() + Duration::from_secs(10);
    let mut state = None;
    while std::time::Instant::now() < until {
        let name = read_name();
        if !name.is_empty() {
            state = registry::inspect(&name).ok().and_then(|i| i.creator);
            if state == Some(registry::CreatorState::Stale) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let name = read_name();
    let opened = Segment::open_named(&name, T).map(|_| ());
    let collected = registry::gc().map(|c| c.removed.contains(&name));
    let gone = matches!(registry::inspect(&name), Err(Error::NotFound(_)));
    kill9(child);
    let _ = wait_child(child, Duration::from_secs(10));
    if !gone {
        let _ = std::fs::remove_file(std::path::Path::new(registry::SHM_DIR).join(&name));
    }
    assert_eq!(state, Some(registry::CreatorState::Stale), "{name}");
    assert!(
        matches!(opened, Err(Error::NoLongerHeld { .. })),
        "{opened:?}"
    );
    assert!(collected.unwrap(), "gc kept the stale record");
    assert!(gone);
}
