//! Multi-process tests. Cargo's test harness is multi-threaded, so every test body that builds a pool
//! runs in a fresh single-threaded copy of this test binary (`isolated::run`), with a watchdog: a
//! hang fails the test instead of stalling CI.

#![cfg(not(loom))] // SharedMutex (context-shmem) is left out of the loom build.

#[macro_use]
mod common;

use std::ptr::NonNull;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use context_forkpool::{
    AllocError, Backing, DeathCause, DeathOutcome, DeathPolicy, Heap, JobContext, ListHead, Pool,
    PoolError, SharedBox, SharedList, SharedMutex, SharedVec, isolated, open_fd_count,
    open_memfd_count, resident_bytes,
};

use common::{T, small_pool};

/// Runs supervision ticks until `n` deaths were found (a killed process needs CPU time to finish
/// dying, which a loaded machine may delay), or 10 s pass.
fn supervise_until(pool: &mut Pool, n: usize) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut found = 0;
    while found < n && std::time::Instant::now() < deadline {
        found += pool.supervise();
        std::thread::sleep(Duration::from_millis(5));
    }
    found == n
}

// ---------------------------------------------------------------------------------------------
// Pointer structures built in one process, read and modified in others.

fn sum_list(_: &JobContext, l: &ListHead<u64>) -> u64 {
    l.iter().sum()
}

fn push_from_worker(cx: &JobContext, l: &mut ListHead<u64>) -> u64 {
    for i in 0..100 {
        if l.push_front(cx.heap(), 1_000_000 + i).is_err() {
            return u64::MAX;
        }
    }
    l.len()
}

fn double_all(_: &JobContext, l: &mut ListHead<u64>) -> u64 {
    l.for_each_mut(|v| *v *= 2);
    0
}

fn sum_slice(cx: &JobContext, v: &[u64]) -> u64 {
    // Each worker sums its half; used by broadcast.
    let n = v.len();
    let (lo, hi) = (
        n * cx.index() / cx.workers(),
        n * (cx.index() + 1) / cx.workers(),
    );
    v[lo..hi].iter().sum()
}

fn bump_box(cx: &JobContext, b: &mut [u64; 4]) -> u64 {
    b[cx.index()] += 7;
    b.iter().sum()
}

fn pointer_structures() -> anyhow::Result<()> {
    let mut pool = small_pool(2).build()?;
    let mut list = SharedList::new(pool.heap())?;
    for v in 1..=10_000u64 {
        list.push_front(v)?;
    }
    let expect: u64 = (1..=10_000u64).sum();
    ensure!(
        pool.run(0, sum_list, &list, T)? == expect,
        "worker 0 walked the master's list"
    );
    ensure!(
        pool.run(1, sum_list, &list, T)? == expect,
        "worker 1 walked the master's list"
    );
    // A worker extends the list with nodes it allocates itself; the master and the other worker see them.
    ensure!(pool.run_mut(1, push_from_worker, &mut list, T)? == 10_100);
    let added: u64 = (0..100).map(|i| 1_000_000 + i).sum();
    ensure!(
        list.iter().sum::<u64>() == expect + added,
        "master sees the worker's nodes"
    );
    ensure!(
        pool.run(0, sum_list, &list, T)? == expect + added,
        "worker 0 sees worker 1's nodes"
    );
    pool.run_mut(0, double_all, &mut list, T)?;
    ensure!(
        list.iter().sum::<u64>() == 2 * (expect + added),
        "master sees values changed by a worker"
    );

    let v = SharedVec::from_elem(pool.heap(), 3u64, 1 << 20)?;
    let parts: Vec<u64> = pool
        .broadcast(sum_slice, &v, T)
        .into_iter()
        .collect::<Result<_, _>>()?;
    ensure!(
        parts.iter().sum::<u64>() == 3 << 20,
        "halves summed by two workers"
    );

    let mut b = SharedBox::new(pool.heap(), [0u64; 4])?;
    pool.run_mut(0, bump_box, &mut b, T)?;
    pool.run_mut(1, bump_box, &mut b, T)?;
    ensure!(*b == [7, 7, 0, 0], "box modified by both workers: {:?}", *b);

    drop(list);
    drop(v);
    drop(b);
    let r = pool.heap().check();
    ensure!(r.is_consistent(), "{:?}", r.problems);
    ensure!(
        r.stats.live_bytes == 0,
        "everything freed, including worker-allocated nodes: {:?}",
        r.stats
    );
    Ok(())
}
isolated_test!(pointer_structures_cross_process, pointer_structures, 60);

// ---------------------------------------------------------------------------------------------
// A list refuses nodes from another pool's heap (review F2): such a node would dangle once that
// pool unmaps its memory. A job reaches a foreign `Heap` through a static the master set before
// forking (safe code).

static OTHER_HEAP: std::sync::OnceLock<Heap> = std::sync::OnceLock::new();

fn push_pop_foreign(cx: &JobContext, l: &mut ListHead<u64>) -> u64 {
    let Some(other) = OTHER_HEAP.get() else {
        return u64::MAX;
    };
    let mut bits = 0;
    if l.push_front(other, 2) == Err(AllocError::ForeignPointer) {
        bits |= 1;
    }
    if l.pop_front(other) == Err(AllocError::ForeignPointer) {
        bits |= 2;
    }
    // The pool's own heap still works, from the worker's handle.
    if l.push_front(cx.heap(), 5).is_ok() {
        bits |= 4;
    }
    if l.pop_front(cx.heap()) == Ok(Some(5)) {
        bits |= 8;
    }
    bits
}

fn foreign_list_nodes() -> anyhow::Result<()> {
    let other = small_pool(0).build()?;
    ensure!(
        OTHER_HEAP.set(other.heap().clone()).is_ok(),
        "static set once"
    );
    let mut pool = small_pool(1).build()?;
    let mut list = SharedList::new(pool.heap())?;
    list.push_front(1)?;
    let bits = pool.run_mut(0, push_pop_foreign, &mut list, T)?;
    ensure!(
        bits == 15,
        "foreign heap refused, own heap accepted: {bits:#b}"
    );
    ensure!(
        list.len() == 1 && list.iter().sum::<u64>() == 1,
        "list unchanged"
    );
    ensure!(
        other.heap().stats().live_bytes == 0,
        "nothing allocated from the other heap: {:?}",
        other.heap().stats()
    );
    ensure!(list.pop_front() == Some(1) && list.pop_front().is_none());
    drop(list);
    let r = pool.heap().check();
    ensure!(r.is_consistent(), "{:?}", r.problems);
    ensure!(r.stats.live_bytes == 0, "everything freed: {:?}", r.stats);
    Ok(())
}
isolated_test!(list_refuses_another_pools_heap, foreign_list_nodes, 60);

// ---------------------------------------------------------------------------------------------
// A panic in `broadcast_during`'s closure kills the workers before the unwinding ends the borrow
// of the argument (review F9).

fn read_until_set(_: &JobContext, flag: &std::sync::atomic::AtomicU64) -> u64 {
    while flag.load(std::sync::atomic::Ordering::Acquire) == 0 {
        std::hint::spin_loop();
    }
    1
}

fn during_panics() -> anyhow::Result<()> {
    let mut pool = small_pool(2).build()?;
    let flag = SharedBox::new(pool.heap(), std::sync::atomic::AtomicU64::new(0))?;
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        pool.broadcast_during(read_until_set, &flag, T, |_, _| {
            panic!("during panics (expected by this test)")
        })
    }));
    ensure!(unwound.is_err(), "the panic reached the caller");
    let deaths = pool.take_deaths();
    ensure!(
        deaths.len() == 2
            && deaths
                .iter()
                .all(|d| d.during_job && d.cause == DeathCause::KilledByPool),
        "both workers killed while the job ran: {deaths:?}"
    );
    drop(flag);
    // The pool works on with the replacements.
    let flag = SharedBox::new(pool.heap(), std::sync::atomic::AtomicU64::new(1))?;
    let res = pool.broadcast(read_until_set, &flag, T);
    ensure!(
        res.iter().all(|r| matches!(r, Ok(1))),
        "replacements run jobs: {res:?}"
    );
    Ok(())
}
isolated_test!(broadcast_during_panic_kills_workers, during_panics, 60);

// ---------------------------------------------------------------------------------------------
// Allocation from every process at once, with pattern checks and the invariant checker.

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// Allocates and frees `iters` blocks of mixed sizes, writing a unique tag into each block and
/// checking it before the free (two processes handed the same block would overwrite each other's
/// tag). Returns the number of operations, or `u64::MAX` on a detected overlap or error.
fn churn(heap: &Heap, who: u64, iters: u64, seed: u64) -> u64 {
    let mut s = seed | 1;
    let mut live: Vec<(NonNull<u8>, usize, u64)> = Vec::with_capacity(64);
    let mut ops = 0;
    for k in 0..iters {
        let r = xorshift(&mut s);
        if live.len() < 32 && (r & 1 == 0 || live.is_empty()) {
            let size = if r % 13 == 0 {
                70_000 + (r >> 8) as usize % 200_000
            } else {
                16 + (r >> 8) as usize % 3000
            };
            let Ok(p) = heap.alloc(std::alloc::Layout::from_size_align(size, 8).expect("layout"))
            else {
                continue; // exhaustion under pressure is allowed; corruption is not
            };
            let tag = (who << 48) | k;
            // SAFETY: p is a fresh block of at least `size` >= 8 bytes, exclusively ours.
            unsafe { p.as_ptr().cast::<u64>().write(tag) };
            // SAFETY: the last 8 bytes of the block, 8-aligned because size >= 8 and reads unaligned.
            unsafe {
                p.as_ptr()
                    .wrapping_add(size - 8)
                    .cast::<u64>()
                    .write_unaligned(!tag)
            };
            live.push((p, size, tag));
        } else {
            let (p, size, tag) = live.swap_remove((r >> 4) as usize % live.len());
            // SAFETY: our live block, written above.
            let a = unsafe { p.as_ptr().cast::<u64>().read() };
            // SAFETY: as above.
            let b = unsafe {
                p.as_ptr()
                    .wrapping_add(size - 8)
                    .cast::<u64>()
                    .read_unaligned()
            };
            if a != tag || b != !tag {
                return u64::MAX;
            }
            // SAFETY: our block, not used after this.
            if unsafe { heap.free(p) }.is_err() {
                return u64::MAX;
            }
        }
        ops += 1;
    }
    for (p, _, _) in live {
        // SAFETY: our blocks.
        if unsafe { heap.free(p) }.is_err() {
            return u64::MAX;
        }
    }
    ops
}

fn churn_job(cx: &JobContext, p: &[u64; 2]) -> u64 {
    churn(
        cx.heap(),
        cx.index() as u64 + 1,
        p[0],
        p[1] + cx.index() as u64,
    )
}

fn concurrent_alloc() -> anyhow::Result<()> {
    let mut pool = small_pool(2).chunk_shift(16).build()?;
    for round in 0..4u64 {
        let params = SharedBox::new(pool.heap(), [60_000u64, 0x9e37_79b9 * (round + 1)])?;
        let (res, mine) = pool.broadcast_during(churn_job, &params, T, |heap, _| {
            churn(heap, 99, 60_000, 0x1234_5678 + round)
        });
        ensure!(mine != u64::MAX, "master detected an overlapping block");
        for (w, r) in res.into_iter().enumerate() {
            let ops = r.with_context(|| format!("worker {w}"))?;
            ensure!(
                ops != u64::MAX,
                "worker {w} detected an overlapping block or a failed free"
            );
        }
        drop(params);
        let r = pool.heap().check();
        ensure!(r.is_consistent(), "round {round}: {:?}", r.problems);
        ensure!(
            r.stats.live_bytes == 0,
            "round {round}: all freed: {:?}",
            r.stats
        );
    }
    Ok(())
}
isolated_test!(allocation_from_all_processes_at_once, concurrent_alloc, 120);

// ---------------------------------------------------------------------------------------------
// SIGKILL a worker in the middle of allocating, many times.

/// Worker 0 claims and frees large multi-chunk runs until it is killed, so that most of its time is
/// spent in the allocator's transitional states (`CLAIMING` while a run is claimed and its tails
/// written, `FREEING` while they are freed); the others run `p[0]` mixed operations beside it.
fn churn_until_killed(cx: &JobContext, p: &[u64; 2]) -> u64 {
    if cx.index() == 0 {
        return claim_until_killed(cx.heap(), p[1]);
    }
    churn(
        cx.heap(),
        cx.index() as u64 + 1,
        p[0],
        p[1] + cx.index() as u64,
    )
}

/// Allocates, tags, checks and frees runs of 8 to 256 chunks (and the odd small block), forever;
/// returns `u64::MAX` on a detected overlap or error.
fn claim_until_killed(heap: &Heap, seed: u64) -> u64 {
    let chunk = heap.stats().chunk_size as usize;
    let mut s = seed | 1;
    for k in 0u64.. {
        let r = xorshift(&mut s);
        let size = if r % 8 == 0 {
            16 + (r >> 8) as usize % 3000
        } else {
            (8 + (r >> 8) as usize % 249) * chunk
        };
        let Ok(p) = heap.alloc(std::alloc::Layout::from_size_align(size, 8).expect("layout"))
        else {
            continue; // exhaustion under pressure is allowed; corruption is not
        };
        let tag = k | (1 << 48);
        // SAFETY: p is a fresh block of at least `size` >= 16 bytes, exclusively ours, 8-aligned.
        unsafe { p.as_ptr().cast::<u64>().write(tag) };
        let last = p.as_ptr().wrapping_add(size - 8).cast::<u64>();
        // SAFETY: the last 8 bytes of the block (written unaligned).
        unsafe { last.write_unaligned(!tag) };
        // SAFETY: as above, written just now.
        let a = unsafe { p.as_ptr().cast::<u64>().read() };
        // SAFETY: as above.
        let b = unsafe { last.read_unaligned() };
        if a != tag || b != !tag {
            return u64::MAX;
        }
        // SAFETY: our block, not used after this.
        if unsafe { heap.free(p) }.is_err() {
            return u64::MAX;
        }
    }
    unreachable!("killed first")
}

/// Whether `pid` is stopped (state `T` in `/proc/<pid>/stat`, after the command name).
fn is_stopped(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|st| {
        st.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['T', 't']))
    })
}

/// Sends `sig` to worker `pid`; never to a pid <= 0 (a worker not running is listed as 0, and
/// kill(0, ..) would signal our own process group).
fn signal(pid: i32, sig: libc::c_int) {
    if pid > 0 {
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Stops every worker (SIGSTOP, waiting until each shows as stopped), so that the heap can be read
/// while nothing changes it.
fn stop_all(pids: &[i32]) {
    for &pid in pids {
        signal(pid, libc::SIGSTOP);
    }
    for &pid in pids.iter().filter(|&&p| p > 0) {
        // Bounded: a worker that does not show as stopped is read while it runs (harmless here).
        for _ in 0..100_000 {
            if is_stopped(pid) {
                break;
            }
            std::thread::yield_now();
        }
    }
}

fn cont_all(pids: &[i32]) {
    for &pid in pids {
        signal(pid, libc::SIGCONT);
    }
}

/// Stops the workers until the heap shows an operation in flight (at most `tries` times) and
/// returns whether it did; the workers are left stopped either way.
fn stop_in_transition(heap: &Heap, pids: &[i32], tries: u32) -> bool {
    for t in 0..tries {
        if t > 0 {
            cont_all(pids);
            std::thread::yield_now();
        }
        stop_all(pids);
        if heap.stats().transitional_chunks > 0 {
            return true;
        }
    }
    false
}

fn sigkill_mid_allocation() -> anyhow::Result<()> {
    let mut pool = small_pool(2)
        .chunk_shift(16)
        .initial_region(256 << 20)
        .build()?;
    let (mut repaired, mut landed, mut resets) = (0, 0, 0);
    let rounds = 100u64;
    for round in 0..rounds {
        let params = SharedBox::new(pool.heap(), [30_000u64, round * 7919 + 1])?;
        let delay = Duration::from_micros(200 + (round * 331) % 2000);
        // Two rounds in three stop the workers until one is inside an allocator operation (most
        // likely worker 0, which spends most of its time in claims and frees of long runs) and
        // kill worker 0 there; the third kills it wherever it is.
        let probe = round % 3 != 2;
        let (res, in_transition) =
            pool.broadcast_during(churn_until_killed, &params, T, |heap, pids| {
                std::thread::sleep(delay);
                let seen = probe && stop_in_transition(heap, pids, 200);
                signal(pids[0], libc::SIGKILL); // a stopped process dies too
                if probe {
                    cont_all(&pids[1..]);
                }
                seen
            });
        drop(params);
        landed += u64::from(in_transition);
        match &res[0] {
            Err(PoolError::WorkerDied {
                cause: DeathCause::Ended(_),
                ..
            }) => {}
            other => bail!("round {round}: the killed worker gave {other:?}"),
        }
        let r1 = res[1]
            .as_ref()
            .map_err(|e| anyhow::anyhow!("worker 1: {e}"))?;
        ensure!(
            *r1 != u64::MAX,
            "round {round}: worker 1 saw an overlapping block"
        );
        for d in pool.take_deaths() {
            ensure!(d.outcome == DeathOutcome::Replaced, "round {round}: {d:?}");
            repaired += d.repaired_chunks;
        }
        let r = pool.heap().check();
        ensure!(r.is_consistent(), "round {round}: {:?}", r.problems);
        // Every job has ended and the dead worker's slot was reclaimed: nothing is in flight, so a
        // transitional chunk is one the death handling left behind (check accepts those).
        ensure!(
            r.stats.transitional_chunks == 0,
            "round {round}: the killed worker's operation was not repaired: {:?}",
            r.stats
        );
        ensure!(
            pool.worker_pids().iter().all(|&p| p > 0),
            "both workers alive after replacement"
        );
        // Killed workers leak the blocks they held (not attributable); reset before they fill the
        // heap, which would leave worker 0 nothing to claim.
        if r.stats.live_bytes > 96 << 20 {
            pool.reset()?;
            resets += 1;
        }
    }
    let leaked = pool.heap().stats().live_bytes;
    println!(
        "{rounds} kills, {landed} inside an operation: {repaired} chunks repaired, {resets} resets, \
         {leaked} bytes leaked by killed workers"
    );
    ensure!(
        repaired > 0,
        "{landed} kills landed inside an allocator operation, yet no chunk was repaired"
    );
    // The PostgreSQL-style reset reclaims what the killed workers leaked.
    pool.reset()?;
    let s = pool.heap().stats();
    ensure!(
        s.live_bytes == 0 && s.transitional_chunks == 0,
        "reset gives an empty heap: {s:?}"
    );
    let params = SharedBox::new(pool.heap(), [10_000u64, 5])?;
    for r in pool.broadcast(churn_job, &params, T) {
        ensure!(r? != u64::MAX);
    }
    Ok(())
}
isolated_test!(sigkill_workers_mid_allocation, sigkill_mid_allocation, 150);

fn spin_alloc(cx: &JobContext) -> u64 {
    churn(cx.heap(), 1, u64::MAX, 42)
}

/// SIGKILLs worker 0 in the middle of an allocating job; the job reports the death.
fn kill_worker_0_mid_job(pool: &mut Pool) -> anyhow::Result<()> {
    let (res, ()) = pool.broadcast_fn_during(spin_alloc, T, |_, pids| {
        std::thread::sleep(Duration::from_millis(20));
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(pids[0], libc::SIGKILL) };
    });
    ensure!(
        matches!(res[0], Err(PoolError::WorkerDied { .. })),
        "{:?}",
        res[0]
    );
    Ok(())
}

fn reset_policy() -> anyhow::Result<()> {
    let mut pool = small_pool(1).death_policy(DeathPolicy::Reset).build()?;
    // With an owner alive, the death poisons the pool.
    let keep = SharedBox::new(pool.heap(), 5u64)?;
    kill_worker_0_mid_job(&mut pool)?;
    ensure!(
        pool.poisoned().is_some(),
        "poisoned while an owner is alive"
    );
    ensure!(matches!(
        pool.run_fn(0, |_| 1, T),
        Err(PoolError::Poisoned(_))
    ));
    ensure!(matches!(pool.reset(), Err(PoolError::HandlesAlive(1))));
    drop(keep);
    pool.reset()?;
    ensure!(pool.run_fn(0, |_| 41, T)? == 41);
    // Without owners, a death during a job resets at once.
    kill_worker_0_mid_job(&mut pool)?;
    let d = pool.take_deaths();
    ensure!(
        d.last().map(|d| d.outcome.clone()) == Some(DeathOutcome::Reset),
        "{d:?}"
    );
    ensure!(pool.heap().stats().live_bytes == 0);
    ensure!(pool.run_fn(0, |_| 42, T)? == 42);
    Ok(())
}
isolated_test!(death_policy_reset, reset_policy, 60);

/// The allocator's scans (`stats`, `check`, the repair after a death) read the bookkeeping of the
/// chunks in use only. Reading that of the whole reservation (here 1 Mi chunks, 16 MiB of
/// bookkeeping) committed all of it: shared memory allocates a page on a read fault too.
fn scans_stay_sparse() -> anyhow::Result<()> {
    let pool = Pool::builder()
        .workers(0)
        .reserve(64 << 30)
        .chunk_shift(16)
        .initial_region(1 << 30)
        .build()?;
    let before = resident_bytes()?;
    for _ in 0..3 {
        ensure!(pool.heap().check().is_consistent());
    }
    let grown = resident_bytes()?.saturating_sub(before);
    ensure!(grown < 1 << 20, "the scans committed {} KiB", grown >> 10);
    Ok(())
}
isolated_test!(
    allocator_scans_do_not_commit_the_whole_reservation,
    scans_stay_sparse,
    60
);

/// A reset that cannot make its new files (here: the pool's directory was deleted) changes nothing:
/// the heap stays mapped with its data, the pool says why it is poisoned, and a later reset, once
/// the cause is gone, works. (It used to unmap the heap first: the next heap call crashed.)
fn failed_reset_keeps_the_heap() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("ctx-failed-reset-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut pool = small_pool(1)
        .backing(Backing::TempDir(dir.clone()))
        .build()?;
    // A raw block, not a typed owner (owners hold the heap, and a reset refuses while they live).
    let at = pool
        .heap()
        .alloc(std::alloc::Layout::new::<u64>())?
        .cast::<u64>();
    // SAFETY: a fresh block, 8 bytes and 8-aligned, in the master's mapping of the heap.
    unsafe { at.write(77) };
    std::fs::remove_dir(&dir)?;
    let r = pool.reset();
    ensure!(matches!(r, Err(PoolError::Region(_))), "{r:?}");
    let why = pool.poisoned().context("poisoned after a failed reset")?;
    ensure!(why.contains("reset failed"), "{why}");
    // The heap is mapped and unchanged: reading it, and the allocator's own state, are fine.
    // SAFETY: the block is still allocated and was written above.
    ensure!(unsafe { at.read() } == 77);
    ensure!(pool.heap().stats().live_bytes > 0);
    ensure!(matches!(
        pool.run_fn(0, |_| 1, T),
        Err(PoolError::Poisoned(_))
    ));
    std::fs::create_dir_all(&dir)?;
    pool.reset()?;
    ensure!(pool.poisoned().is_none());
    ensure!(
        pool.heap().stats().live_bytes == 0,
        "the second reset wiped the heap"
    );
    ensure!(pool.run_fn(0, |_| 9, T)? == 9);
    drop(pool);
    std::fs::remove_dir(&dir)?;
    Ok(())
}
isolated_test!(
    a_failed_reset_leaves_the_heap_mapped_and_can_be_retried,
    failed_reset_keeps_the_heap,
    60
);

/// A worker that stops answering a control operation (here a ping) between jobs cannot have left
/// shared data half-changed: under `DeathPolicy::Reset` it is replaced, not counted as a death
/// during a job (which would poison the pool while an owner is alive, or wipe the heap).
fn control_death_is_not_a_job_death() -> anyhow::Result<()> {
    let mut pool = small_pool(1)
        .death_policy(DeathPolicy::Reset)
        .control_timeout(Duration::from_millis(300))
        .build()?;
    let keep = SharedBox::new(pool.heap(), 5u64)?;
    let pid = pool.worker_pids()[0];
    // SAFETY: plain syscall on our own idle child.
    ensure!(unsafe { libc::kill(pid, libc::SIGSTOP) } == 0);
    let r = pool.ping(0);
    ensure!(
        matches!(r, Err(PoolError::Timeout { worker: 0, .. })),
        "{r:?}"
    );
    let d = pool.take_deaths();
    ensure!(
        d.len() == 1
            && d[0].pid == pid
            && !d[0].during_job
            && d[0].outcome == DeathOutcome::Replaced,
        "{d:?}"
    );
    ensure!(pool.poisoned().is_none(), "{:?}", pool.poisoned());
    ensure!(*keep == 5, "the heap was not wiped");
    ensure!(pool.run_fn(0, |_| 7, T)? == 7, "the replacement runs jobs");

    // A death during a job poisons the pool (an owner is alive) and leaves the slot without a
    // worker. Its old pid is reaped and may be reused: kill_worker must refuse, not signal it.
    kill_worker_0_mid_job(&mut pool)?;
    let d = pool.take_deaths();
    ensure!(d.len() == 1 && d[0].during_job, "{d:?}");
    ensure!(pool.poisoned().is_some());
    let k = pool.kill_worker(0);
    ensure!(
        matches!(
            k,
            Err(PoolError::WorkerDied {
                worker: 0,
                cause: DeathCause::ChannelLost,
                ..
            })
        ),
        "{k:?}"
    );
    drop(keep);
    pool.reset()?;
    ensure!(pool.run_fn(0, |_| 8, T)? == 8);
    Ok(())
}
isolated_test!(
    control_death_is_not_a_job_death_and_kill_spares_reaped_pids,
    control_death_is_not_a_job_death,
    60
);

// ---------------------------------------------------------------------------------------------
// Jobs: panics, timeouts, dead workers.

fn jobs_fail_cleanly() -> anyhow::Result<()> {
    let mut pool = small_pool(2).build()?;
    ensure!(matches!(
        pool.run_fn(0, |_| panic!("job panics on purpose"), T),
        Err(PoolError::JobPanicked { worker: 0 })
    ));
    ensure!(
        pool.run_fn(0, |cx| cx.index() as u64 + 10, T)? == 10,
        "worker survives a panicking job"
    );
    let pid = pool.worker_pids()[1];
    let r = pool.run(
        1,
        |_, _: &u64| loop {
            std::thread::sleep(Duration::from_millis(10));
        },
        &SharedBox::new(pool.heap(), 1u64)?,
        Duration::from_millis(200),
    );
    ensure!(
        matches!(r, Err(PoolError::Timeout { worker: 1, .. })),
        "{r:?}"
    );
    let d = pool.take_deaths();
    ensure!(
        d.len() == 1
            && d[0].cause == DeathCause::KilledByPool
            && d[0].outcome == DeathOutcome::Replaced,
        "{d:?}"
    );
    ensure!(pool.worker_pids()[1] != pid, "replaced by a new process");
    ensure!(pool.run_fn(1, |cx| cx.index() as u64, T)? == 1);
    // A worker that exits by itself is detected with its status.
    let r = pool.run_fn(0, |_| std::process::exit(7), T);
    ensure!(
        matches!(
            r,
            Err(PoolError::WorkerDied {
                cause: DeathCause::Ended(context_forkpool::ExitKind::Exited(7)),
                ..
            })
        ),
        "{r:?}"
    );
    // Killed from outside while idle: found by supervision.
    pool.kill_worker(1)?;
    ensure!(supervise_until(&mut pool, 1), "the killed worker is found");
    let d = pool.take_deaths();
    ensure!(d.len() == 2, "{d:?}");
    ensure!(
        matches!(
            d[1].cause,
            DeathCause::Ended(context_forkpool::ExitKind::Signaled(9))
        ),
        "{d:?}"
    );
    ensure!(
        pool.broadcast_fn(|cx| cx.index() as u64, T)
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?
            == vec![0, 1]
    );
    ensure!(matches!(
        pool.run_fn(5, |_| 0, T),
        Err(PoolError::NoSuchWorker(5))
    ));
    // An owner from another pool's heap is not mapped in these workers: refused, nothing sent.
    let other = small_pool(0).build()?;
    let foreign = SharedBox::new(other.heap(), 1u64)?;
    ensure!(matches!(
        pool.run(0, |_, v: &u64| *v, &foreign, T),
        Err(PoolError::ForeignArgument)
    ));
    ensure!(pool.run_fn(0, |_| 5, T)? == 5);
    ensure!(pool.ping(1)? < T);
    Ok(())
}
isolated_test!(jobs_panics_timeouts_and_deaths, jobs_fail_cleanly, 60);

// ---------------------------------------------------------------------------------------------
// Growth and release in every process, with resident memory measured in each.

fn rss_job(_: &JobContext) -> u64 {
    resident_bytes().unwrap_or(0)
}

fn touch(_: &JobContext, v: &[u64]) -> u64 {
    // Reads one word per page: maps every page into this process's resident set.
    v.iter().step_by(512).sum()
}

fn all_rss(pool: &mut Pool) -> anyhow::Result<Vec<u64>> {
    let mut v = vec![resident_bytes()?];
    for r in pool.broadcast_fn(rss_job, T) {
        v.push(r?);
    }
    Ok(v)
}

fn fill_region_zero(pool: &Pool) -> anyhow::Result<SharedVec<u8>> {
    // Take every free chunk of the first region so that later blocks land in the grown ones.
    let free = pool.heap().stats().free_chunks as usize * pool.heap().geometry().chunk_size();
    Ok(SharedVec::with_capacity(pool.heap(), free)?)
}

fn growth_and_release() -> anyhow::Result<()> {
    const MIB: usize = 1 << 20;
    let mut pool = Pool::builder()
        .workers(2)
        .reserve(1 << 30)
        .initial_region(16 * MIB)
        .control_timeout(T)
        .build()?;
    let _filler = fill_region_zero(&pool)?;
    ensure!(
        matches!(
            SharedVec::<u64>::with_capacity(pool.heap(), MIB),
            Err(AllocError::OutOfMemory)
        ),
        "first region full"
    );

    for method in ["close+remap", "punch-hole"] {
        let idx = pool.grow(64 * MIB)?;
        // 48 MiB in the new region, written by the master, read by both workers.
        let v = SharedVec::from_elem(pool.heap(), 1u64, 6 * MIB)?;
        for r in pool.broadcast(touch, &v, T) {
            ensure!(
                r? == (6 * MIB / 512) as u64,
                "worker reads the grown region"
            );
        }
        let before = all_rss(&mut pool)?;
        if method == "close+remap" {
            ensure!(
                matches!(
                    pool.release_region(idx),
                    Err(PoolError::Alloc(AllocError::InUse))
                ),
                "live block"
            );
            drop(v);
            pool.release_region(idx)?;
        } else {
            drop(v);
            ensure!(pool.punch_free() >= 48, "free chunks punched");
        }
        let after = all_rss(&mut pool)?;
        println!("{method}: rss before {before:?} after {after:?}");
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            ensure!(
                b.saturating_sub(*a) >= 40 * MIB as u64,
                "{method}: process {i} rss {b} -> {a}"
            );
        }
        let r = pool.heap().check();
        ensure!(r.is_consistent(), "{:?}", r.problems);
    }
    // Released chunks are never handed out again; new growth still works after a release.
    let s = pool.heap().stats();
    ensure!(s.released_chunks == 64, "{s:?}");
    pool.grow(16 * MIB)?;
    let v = SharedVec::from_elem(pool.heap(), 2u64, MIB)?;
    ensure!(pool.run(1, touch, &v, T)? == 2 * (MIB / 512) as u64);
    Ok(())
}
isolated_test!(growth_and_release_in_every_process, growth_and_release, 90);

fn sum_worker_alloc(cx: &JobContext, v: &[u64]) -> u64 {
    // Allocates in the worker too: the new region must be usable from here.
    let Ok(b) = SharedBox::new(cx.heap(), 5u64) else {
        return u64::MAX;
    };
    v.iter().step_by(512).sum::<u64>() + *b
}

fn growth_with_a_dead_worker() -> anyhow::Result<()> {
    const MIB: usize = 1 << 20;
    let mut pool = Pool::builder()
        .workers(2)
        .reserve(1 << 30)
        .initial_region(16 * MIB)
        .control_timeout(T)
        .build()?;
    let _filler = fill_region_zero(&pool)?;
    // Worker 1 dies unnoticed; the growth barrier finds it, replaces it, and still holds.
    pool.kill_worker(1)?;
    let idx = pool.grow(32 * MIB)?;
    let d = pool.take_deaths();
    ensure!(
        d.len() == 1 && d[0].worker == 1 && d[0].outcome == DeathOutcome::Replaced,
        "{d:?}"
    );
    let v = SharedVec::from_elem(pool.heap(), 1u64, 2 * MIB)?;
    for r in pool.broadcast(sum_worker_alloc, &v, T) {
        ensure!(
            r? == (2 * MIB / 512) as u64 + 5,
            "every worker, replacement included, reads and allocates in the new region"
        );
    }
    drop(v);
    // The same on release: the replacement is forked after the master unmapped.
    pool.kill_worker(0)?;
    pool.release_region(idx)?;
    let d = pool.take_deaths();
    ensure!(d.len() == 1 && d[0].worker == 0, "{d:?}");
    ensure!(pool.run_fn(0, |_| 9, T)? == 9);
    ensure!(pool.heap().check().is_consistent());
    Ok(())
}
isolated_test!(
    growth_and_release_with_a_dead_worker,
    growth_with_a_dead_worker,
    60
);

/// A death found by the growth barrier, with the allocator found inconsistent, resets the pool in
/// the middle of the barrier. The reset re-creates every region (new descriptors) and re-forks every
/// worker from the master, which has the new region: the barrier stops there and the region is
/// usable everywhere.
fn growth_across_a_reset() -> anyhow::Result<()> {
    const MIB: usize = 1 << 20;
    let mut pool = Pool::builder()
        .workers(3)
        .reserve(1 << 30)
        .initial_region(16 * MIB)
        .control_timeout(T)
        .build()?;
    let _ = pool.kill_worker(0);
    // Scribble the allocator's magic (fault injection) so the death's consistency check fails.
    // SAFETY: the allocator header (an AtomicU64 first) is at the base of the first region, mapped
    // in this process; no worker is running a job.
    let magic = unsafe { &*(pool.base_address() as *const std::sync::atomic::AtomicU64) };
    magic.fetch_xor(1, std::sync::atomic::Ordering::SeqCst);
    let idx = pool.grow(32 * MIB)?;
    let d = pool.take_deaths();
    ensure!(
        d.len() == 1 && d[0].worker == 0 && d[0].outcome == DeathOutcome::Reset,
        "only the killed worker died, and it reset the pool: {d:?}"
    );
    ensure!(pool.heap().check().is_consistent());
    let v = SharedVec::from_elem(pool.heap(), 1u64, 3 * MIB)?;
    for r in pool.broadcast(sum_worker_alloc, &v, T) {
        ensure!(
            r? == (3 * MIB / 512) as u64 + 5,
            "the new region works everywhere"
        );
    }
    drop(v);
    pool.release_region(idx)?;
    ensure!(pool.take_deaths().is_empty());
    Ok(())
}
isolated_test!(growth_barrier_across_a_reset, growth_across_a_reset, 60);

fn temp_file_backing_punch() -> anyhow::Result<()> {
    const MIB: usize = 1 << 20;
    let mut pool = Pool::builder()
        .workers(1)
        .reserve(1 << 30)
        .initial_region(64 * MIB)
        .backing(Backing::TempDir(std::env::temp_dir()))
        .control_timeout(T)
        .build()?;
    let v = SharedVec::from_elem(pool.heap(), 1u64, 4 * MIB)?;
    ensure!(pool.run(0, touch, &v, T)? == (4 * MIB / 512) as u64);
    let before = all_rss(&mut pool)?;
    drop(v);
    ensure!(pool.punch_free() >= 32);
    let after = all_rss(&mut pool)?;
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        ensure!(
            b.saturating_sub(*a) >= 24 * MIB as u64,
            "temp-file backing, process {i}: rss {b} -> {a}"
        );
    }
    Ok(())
}
isolated_test!(
    temp_file_backing_returns_memory,
    temp_file_backing_punch,
    60
);

// ---------------------------------------------------------------------------------------------
// No descriptor or memfd leaks after drop or crashes; workers die with the master.

fn no_children_left() -> bool {
    // SAFETY: plain syscall; WNOHANG never blocks.
    let r = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
    r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD)
}

fn fd_leaks() -> anyhow::Result<()> {
    let (fds, memfds) = (open_fd_count()?, open_memfd_count()?);
    {
        let mut pool = small_pool(2).build()?;
        ensure!(open_memfd_count()? == memfds + 1);
        let a = pool.grow(16 << 20)?;
        pool.grow(16 << 20)?;
        pool.release_region(a)?;
        ensure!(
            open_memfd_count()? == memfds + 2,
            "released region's memfd closed"
        );
        let _b = SharedBox::new(pool.heap(), 1u32)?;
    }
    ensure!(
        open_fd_count()? == fds && open_memfd_count()? == memfds,
        "after drop"
    );
    ensure!(no_children_left(), "every worker reaped");
    {
        let mut pool = small_pool(2).build()?;
        pool.kill_worker(0)?;
        pool.kill_worker(1)?;
        ensure!(
            supervise_until(&mut pool, 2),
            "both killed workers are found"
        );
        ensure!(pool.run_fn(0, |_| 3, T)? == 3);
        let _ = pool.run_fn(1, |_| std::process::abort(), T);
    }
    ensure!(
        open_fd_count()? == fds && open_memfd_count()? == memfds,
        "after crashes and drop"
    );
    ensure!(no_children_left(), "every worker reaped after crashes");
    let dir = std::env::temp_dir();
    {
        let mut pool = small_pool(1).backing(Backing::TempDir(dir)).build()?;
        let v = SharedVec::from_elem(pool.heap(), 9u64, 1000)?;
        ensure!(
            pool.run(0, |_, s: &[u64]| s.iter().sum(), &v, T)? == 9000,
            "temp-file backing works"
        );
    }
    ensure!(open_fd_count()? == fds, "temp-file backing closed");
    Ok(())
}
isolated_test!(no_fd_or_memfd_leaks, fd_leaks, 60);

fn master_dies() -> anyhow::Result<()> {
    let pool = small_pool(2).build()?;
    println!("{:?}", pool.worker_pids());
    use std::io::Write;
    std::io::stdout().flush()?;
    let me = std::process::id() as i32;
    // SAFETY: plain syscall: the master kills itself without any cleanup.
    unsafe { libc::kill(me, libc::SIGKILL) };
    std::thread::sleep(Duration::from_secs(5));
    bail!("still alive")
}

/// A grandchild that keeps the output pipes open after the isolated child has ended does not hold
/// `isolated::run` until it ends: the output is taken after the grace period, marked as cut.
#[test]
fn output_pipes_held_by_a_grandchild_do_not_hold_the_run() {
    fn entry() -> i32 {
        // The grandchild inherits stdout and stderr and outlives this process.
        let Ok(sleeper) = std::process::Command::new("sleep").arg("30").spawn() else {
            return 3;
        };
        println!("grandchild {}", sleeper.id());
        0
    }
    let t0 = std::time::Instant::now();
    let out = isolated::run(entry, Duration::from_secs(60)).expect("run");
    let took = t0.elapsed();
    let pid: Option<i32> = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("grandchild ")?.trim().parse().ok());
    if let Some(pid) = pid {
        // SAFETY: plain syscall; the sleeper is still running (it sleeps 30 s), so the pid is its.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(pid.is_some(), "{out:?}");
    assert!(out.stdout.ends_with(isolated::OUTPUT_CUT), "{out:?}");
    assert!(
        took < isolated::OUTPUT_GRACE + Duration::from_secs(8),
        "took {took:?}"
    );
}

#[test]
fn workers_die_with_the_master() {
    fn entry() -> i32 {
        master_dies().map_or(1, |()| 0)
    }
    let out = isolated::run(entry, Duration::from_secs(30)).expect("run");
    assert_eq!(out.signal, Some(libc::SIGKILL), "{out:?}");
    let pids: Vec<i32> = out
        .stdout
        .trim()
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .map(|p| p.trim().parse().expect("pid"))
        .collect();
    assert_eq!(pids.len(), 2, "{out:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for pid in pids {
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Gone, or a zombie waiting for init to reap it.
            let state = stat
                .rsplit_once(") ")
                .map(|(_, r)| r.chars().next().unwrap_or('?'));
            if stat.is_empty() || state == Some('Z') {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "worker {pid} outlived its master: {stat}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn refuses_to_fork_from_a_multi_threaded_process() {
    // The harness runs this test on a thread of its own; make sure there is a second one anyway.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let t = std::thread::spawn(move || rx.recv());
    match small_pool(1).build() {
        Err(PoolError::MultiThreaded { threads }) => assert!(threads >= 2),
        other => panic!("expected MultiThreaded, got {other:?}"),
    }
    drop(tx);
    let _ = t.join();
    assert!(matches!(
        small_pool(5000).build(),
        Err(PoolError::TooManyWorkers(5000))
    ));
    // A heap without workers needs no fork and is allowed anywhere.
    let pool = small_pool(0).build().expect("no workers");
    let b = SharedBox::new(pool.heap(), 5u8).expect("box");
    assert_eq!(*b, 5);
}

// ---------------------------------------------------------------------------------------------
// A process-shared mutex (context-shmem's lock) in the fixed-address heap.

fn add_under_lock(_: &JobContext, m: &SharedMutex<[u64; 2]>) -> u64 {
    for _ in 0..20_000 {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let Ok(mut g) = m.lock(Some(deadline)) else {
            return u64::MAX;
        };
        g[0] += 1;
        g[1] = g[0];
    }
    0
}

fn die_holding(cx: &JobContext, m: &SharedMutex<[u64; 2]>) -> u64 {
    if cx.index() != 0 {
        return 0;
    }
    let Ok(mut g) = m.lock(None) else {
        return u64::MAX;
    };
    g[0] = 999; // half of an update: g[1] is not written yet
    loop {
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn shared_mutex() -> anyhow::Result<()> {
    let mut pool = small_pool(2).build()?;
    let m = SharedBox::new(pool.heap(), SharedMutex::new([0u64; 2]))?;
    let (res, mine) = pool.broadcast_during(add_under_lock, &m, T, |_, _| {
        let mut n = 0;
        for _ in 0..20_000 {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            if let Ok(mut g) = m.lock(Some(deadline)) {
                g[0] += 1;
                g[1] = g[0];
                n += 1;
            }
        }
        n
    });
    ensure!(mine == 20_000, "master increments");
    for r in res {
        ensure!(r? == 0, "worker increments");
    }
    {
        let g = m.lock(None)?;
        ensure!(
            *g == [60_000, 60_000],
            "no lost update across three processes: {:?}",
            *g
        );
    }
    // A worker dies holding the lock: the master gets it with owner_died and repairs the value.
    let (res, repaired) = pool.broadcast_during(die_holding, &m, T, |_, pids| {
        while !m.is_locked() {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(20));
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(pids[0], libc::SIGKILL) };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut g = m.lock(Some(deadline)).map_err(|e| anyhow::anyhow!("{e}"))?;
        let died = g.owner_died();
        let seen = *g;
        g[1] = g[0];
        g.mark_consistent();
        anyhow::Ok((died, seen))
    });
    let (died, seen) = repaired?;
    ensure!(died, "the next holder is told the owner died");
    ensure!(
        seen == [999, 60_000],
        "the half-done update is visible for repair: {seen:?}"
    );
    ensure!(
        matches!(res[0], Err(PoolError::WorkerDied { .. })),
        "{:?}",
        res[0]
    );
    ensure!(*m.lock(None)? == [999, 999]);
    ensure!(
        !m.lock(None)?.owner_died(),
        "repaired: later holders see a healthy lock"
    );
    Ok(())
}
isolated_test!(shared_mutex_across_processes, shared_mutex, 60);

#[test]
fn bad_configurations_are_clear_errors() {
    let mib = 1usize << 20;
    let heap_only = || Pool::builder().workers(0).reserve(1 << 30);
    assert!(matches!(
        heap_only().initial_region(64 * mib + 4096).build(),
        Err(PoolError::Region(
            context_forkpool::RegionError::BadSize { .. }
        ))
    ));
    // The first region must hold more than the allocator's management area.
    assert!(matches!(
        heap_only().initial_region(mib).build(),
        Err(PoolError::Region(
            context_forkpool::RegionError::BadSize { .. }
        ))
    ));
    assert!(matches!(
        heap_only().initial_region(2 << 30).build(),
        Err(PoolError::Region(
            context_forkpool::RegionError::ReservationFull { .. }
        ))
    ));
    assert!(matches!(
        heap_only().chunk_shift(12).build(),
        Err(PoolError::Alloc(AllocError::BadGeometry))
    ));
    let missing = std::env::temp_dir().join("context-forkpool-no-such-dir");
    assert!(matches!(
        heap_only()
            .initial_region(64 * mib)
            .backing(Backing::TempDir(missing))
            .build(),
        Err(PoolError::Region(context_forkpool::RegionError::Os { .. }))
    ));
    let mut pool = heap_only().initial_region(64 * mib).build().expect("heap");
    assert!(matches!(
        pool.grow(mib + 1),
        Err(PoolError::Region(
            context_forkpool::RegionError::BadSize { .. }
        ))
    ));
    assert!(matches!(
        pool.release_region(0),
        Err(PoolError::Region(
            context_forkpool::RegionError::BadSize { .. }
        ))
    ));
    assert!(matches!(
        pool.release_region(7),
        Err(PoolError::Region(
            context_forkpool::RegionError::NoSuchRegion(7)
        ))
    ));
    // Exhaustion is an error, and the heap stays usable.
    let big = SharedVec::<u8>::with_capacity(pool.heap(), 2 << 30);
    assert!(matches!(big, Err(AllocError::OutOfMemory)));
    let idx = pool.grow(64 * mib).expect("grow");
    let v = SharedVec::<u8>::with_capacity(pool.heap(), 48 * mib).expect("fits after growth");
    assert!(pool.heap().contains(v.as_ptr()));
    drop(v);
    pool.release_region(idx).expect("release");
}

/// A holder that panics (a job's panic is caught and the process lives on) marks the value for the
/// next holder as a death does; a panic already unwinding when the lock was taken does not.
#[test]
fn shared_mutex_reports_a_holder_that_panicked() {
    let pool = Pool::builder()
        .workers(0)
        .reserve(1 << 30)
        .initial_region(64 << 20)
        .build()
        .expect("pool without workers");
    let m = SharedBox::new(pool.heap(), SharedMutex::new([0u64; 2])).expect("mutex");
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut g = m.lock(None).expect("lock");
        g[0] = 1;
        panic!("half-way through an update, on purpose");
    }));
    assert!(r.is_err());
    {
        let mut g = m.lock(None).expect("lock");
        assert!(g.owner_died(), "the next holder is told");
        assert_eq!(*g, [1, 0]);
        g[1] = 1;
        g.mark_consistent();
    }
    assert!(!m.lock(None).expect("lock").owner_died(), "repaired");
    // Taken and released inside a destructor while another panic unwinds: no mark.
    struct Touch<'a>(&'a SharedMutex<[u64; 2]>);
    impl Drop for Touch<'_> {
        fn drop(&mut self) {
            self.0.lock(None).expect("lock")[0] += 1;
        }
    }
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _t = Touch(&m);
        panic!("unrelated, on purpose");
    }));
    assert!(r.is_err());
    let g = m.lock(None).expect("lock");
    assert!(!g.owner_died());
    assert_eq!(*g, [2, 1]);
}
