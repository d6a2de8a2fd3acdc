//! Multi-process tests of the crash-safe shared lock: SIGKILL the holder 1000 times at random
//! points, recover each time, and check the guarded invariant.
#![cfg(not(loom))]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{
    Rng, expect_ok, fork_child, kill9, spin_for, wait_child, wait_while_child_runs, within,
};
use context_core::{Acquired, Context, LockError, RawContextLock};
use context_shmem::{AtomicArray, BufGuard, SharedBuf, SharedLock};

/// The invariant: element 0 == element 1. The child increments 0, dawdles, then copies it to 1,
/// all under the lock, so a holder killed in between leaves `b + 1 == a`.
fn check_and_repair(g: &mut BufGuard<'_, u64>, died: &mut u32) {
    let a = g.get(0).unwrap();
    let b = g.get(1).unwrap();
    if g.owner_died() {
        *died += 1;
        assert!(a == b || a == b + 1, "impossible torn state a={a} b={b}");
        g.set(1, a).unwrap();
        g.mark_consistent();
    } else {
        assert_eq!(a, b, "invariant broken without an owner-died report");
    }
}

/// The holder: takes the lock over and over; sets `acquired` once it got the lock the first time.
fn child_loop(buf: &SharedBuf<u64>, acquired: &AtomicU64) -> i32 {
    for i in 0..5_000_000u64 {
        let Ok(mut g) = buf.lock(within(10)) else {
            return 3;
        };
        if i == 0 {
            acquired.store(1, Ordering::SeqCst);
        }
        if g.owner_died() {
            let a = g.get(0).unwrap_or(0);
            let _ = g.set(1, a);
            g.mark_consistent();
        }
        let a = g.get(0).unwrap_or(0);
        let _ = g.set(0, a + 1);
        for _ in 0..100 {
            std::hint::spin_loop();
        }
        let _ = g.set(1, a + 1);
        drop(g);
    }
    0
}

#[test]
fn sigkill_the_holder_1000_times() {
    let buf = SharedBuf::<u64>::create(2).unwrap();
    let flag = AtomicArray::create(1).unwrap();
    let acquired = flag.get(0).unwrap();
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut died = 0u32;
    let mut contended_rounds = 0u32;
    for round in 0..1000u32 {
        acquired.store(0, Ordering::SeqCst);
        let pid = fork_child(|| child_loop(&buf, acquired));
        // The random delay starts once the child is in its loop, so the kill lands while it takes
        // and holds the lock (not while it is still starting up).
        wait_while_child_runs(
            pid,
            Duration::from_secs(20),
            "the child's first lock",
            || acquired.load(Ordering::SeqCst) != 0,
        );
        spin_for(Duration::from_micros(50 + rng.below(300)));
        if round % 2 == 1 {
            // Contend: wait for the lock while a helper thread kills the child at a random moment,
            // so the death may happen while we are queued (found by the waiter's liveness checks).
            let delay = Duration::from_micros(rng.below(400));
            let killer = std::thread::spawn(move || {
                spin_for(delay);
                kill9(pid);
            });
            match buf.lock(within(20)) {
                Ok(mut g) => {
                    contended_rounds += 1;
                    check_and_repair(&mut g, &mut died);
                }
                Err(e) => panic!("round {round}: lock failed while contending: {e}"),
            }
            killer.join().unwrap();
        } else {
            kill9(pid);
        }
        let st = wait_child(pid, Duration::from_secs(20));
        assert!(
            libc::WIFSIGNALED(st),
            "round {round}: child exited on its own (status {st:#x})"
        );
        let mut g = buf
            .lock(within(20))
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        check_and_repair(&mut g, &mut died);
    }
    eprintln!("1000 SIGKILLs: {died} owner-died recoveries, {contended_rounds} rounds contended");
    // The test must actually have killed holders mid-critical-section many times.
    assert!(
        died > 100,
        "only {died} owner deaths observed in 1000 rounds"
    );
    assert!(contended_rounds == 500);
    let g = buf.lock(within(5)).unwrap();
    assert!(!g.owner_died());
    assert_eq!(g.get(0), g.get(1));
}

#[test]
fn unrepaired_owner_death_becomes_not_recoverable() {
    let buf = SharedBuf::<u64>::create(2).unwrap();
    let pid = fork_child(|| {
        let Ok(g) = buf.lock(within(5)) else { return 2 };
        std::mem::forget(g); // hold it and die
        // SAFETY: ends the child; the lock stays held by a dead process.
        unsafe { libc::_exit(0) }
    });
    expect_ok(pid, Duration::from_secs(10));
    {
        let g = buf.lock(within(5)).unwrap();
        assert!(g.owner_died());
        // Dropped without mark_consistent.
    }
    assert!(matches!(
        buf.lock(within(5)),
        Err(context_shmem::Error::Lock(LockError::NotRecoverable))
    ));
}

#[test]
fn waiter_in_another_process_learns_of_death() {
    // The parent holds nothing; child 1 takes the lock and dies; child 2 (already waiting) must get
    // OwnerDied within its deadline, and report it by exit code 42.
    let lock = SharedLock::anonymous().unwrap();
    let flag = AtomicArray::create(1).unwrap();
    let holder = fork_child(|| {
        if lock.lock(within(5)).is_err() {
            return 2;
        }
        flag.get(0).unwrap().store(1, Ordering::SeqCst);
        loop {
            spin_for(Duration::from_millis(1));
        }
    });
    wait_while_child_runs(holder, Duration::from_secs(20), "the holder's lock", || {
        flag.get(0).unwrap().load(Ordering::SeqCst) != 0
    });
    let waiter = fork_child(|| match lock.lock(within(20)) {
        Ok(Acquired::OwnerDied) => 42,
        Ok(_) => 1,
        Err(_) => 2,
    });
    // Kill the holder once the waiter is in line.
    wait_while_child_runs(
        waiter,
        Duration::from_secs(20),
        "the waiter's ticket",
        || lock.raw().pending_tickets() > 0,
    );
    kill9(holder);
    let _ = wait_child(holder, Duration::from_secs(10));
    let st = wait_child(waiter, Duration::from_secs(30));
    assert!(libc::WIFEXITED(st));
    assert_eq!(libc::WEXITSTATUS(st), 42);
}

#[test]
fn context_over_shared_lock_excludes_across_processes() {
    let lock = SharedLock::anonymous().unwrap();
    let counter = AtomicArray::create(1).unwrap();
    let ctx = Context::with_lock("xproc", lock.clone());
    let work = |ctx: &Context<SharedLock>| -> bool {
        for _ in 0..2000 {
            // A deliberately non-atomic read-modify-write: only the lock makes it correct.
            let r = ctx.enter(|_cx| {
                let c = counter.get(0).unwrap();
                let v = c.load(Ordering::Relaxed);
                std::hint::spin_loop();
                c.store(v + 1, Ordering::Relaxed);
            });
            if r.is_err() {
                return false;
            }
        }
        true
    };
    let child = fork_child(|| if work(&ctx) { 0 } else { 1 });
    assert!(work(&ctx));
    expect_ok(child, Duration::from_secs(60));
    assert_eq!(counter.get(0).unwrap().load(Ordering::SeqCst), 4000);
    assert!(!lock.is_locked());
}

/// Three processes contend for the lock while the parent SIGKILLs a random one (holder or queued
/// waiter) and replaces it, 150 times. Every contender checks the invariant whenever it gets the
/// lock without an owner-died report; dead waiters' tickets must not stall the others for long.
#[test]
fn sigkill_random_contenders_holders_and_waiters() {
    let buf = SharedBuf::<u64>::create(2).unwrap();
    let report = AtomicArray::create(2).unwrap(); // [0]: invariant violations, [1]: lock errors
    let contender = || {
        for _ in 0..5_000_000u64 {
            let Ok(mut g) = buf.lock(within(20)) else {
                report.get(1).unwrap().fetch_add(1, Ordering::SeqCst);
                return 3;
            };
            let a = g.get(0).unwrap_or(0);
            let b = g.get(1).unwrap_or(0);
            if g.owner_died() {
                let _ = g.set(1, a);
                g.mark_consistent();
            } else if a != b {
                report.get(0).unwrap().fetch_add(1, Ordering::SeqCst);
            }
            let _ = g.set(0, a + 1);
            for _ in 0..200 {
                std::hint::spin_loop();
            }
            let _ = g.set(1, a + 1);
            drop(g);
        }
        0
    };
    let mut rng = Rng(0x0bad_cafe_1234_5678);
    let mut kids: Vec<libc::pid_t> = (0..3).map(|_| fork_child(contender)).collect();
    let before = buf.lock(within(20)).unwrap().get(0).unwrap();
    for _ in 0..150 {
        // Kill every 2-12 ms: slower than the waiters' liveness polling (5 ms slices), so the
        // survivors get to recover between kills; faster kills can starve all progress.
        spin_for(Duration::from_micros(2_000 + rng.below(10_000)));
        let i = rng.below(3) as usize;
        kill9(kids[i]);
        let _ = wait_child(kids[i], Duration::from_secs(20));
        kids[i] = fork_child(contender);
    }
    for k in kids {
        kill9(k);
        let _ = wait_child(k, Duration::from_secs(20));
    }
    let mut died = 0;
    let mut g = buf.lock(within(20)).unwrap();
    check_and_repair(&mut g, &mut died);
    let after = g.get(0).unwrap();
    drop(g);
    let violations = report.get(0).unwrap().load(Ordering::SeqCst);
    let errors = report.get(1).unwrap().load(Ordering::SeqCst);
    eprintln!("contenders: {before} -> {after}, {violations} violations, {errors} lock errors");
    assert_eq!(violations, 0, "invariant violations");
    assert_eq!(errors, 0, "lock errors (timeouts)");
    assert!(
        after > before + 150,
        "too little progress: {before} -> {after}"
    );
    eprintln!(
        "3 contenders, 150 SIGKILLs: {} critical sections completed",
        after - before
    );
}
