//! `ctx bench shmem`: the process-shared lock, the cross-process frame channel and bulk copies
//! through shared memory (`context-shmem`).
//!
//! Cases (each beside baselines measured in the same run, in interleaved trials):
//! - `lock_uncontended`: `SharedLock::guard` + protected increment + drop vs `parking_lot::Mutex`
//!   (target: within 2x);
//! - `channel_roundtrip_xproc`: 16-byte round trip to a forked echo child over the channel vs a Unix
//!   socketpair (target: ratio <= 0.1), a pipe pair, and the bare mechanism the channel is built on,
//!   a spin-then-futex ping-pong on a shared word (target: within 2x). All four echo children run
//!   at once (idle ones sleep in the kernel) and trials rotate through them; the parent is pinned
//!   to one CPU and the children to another (the placement the spin-based designs are for, and the
//!   only one that gives stable figures);
//! - `bulk_write_64mib_xproc`: a forked worker child locks a 64 MiB `SharedBuf<u8>` and copies into
//!   it (GB/s, timed in the child) vs an in-process 64 MiB memcpy (target: at least 0.8x); also,
//!   without targets, a child forked for the one fill (`..._fresh_child`: includes populating its
//!   page tables, which a fresh child lacks for shared mappings) and the parent's read of the
//!   buffer afterwards (`bulk_read_64mib_xproc`).
//!
//! Forking while `ctx` may have a progress thread: the children (in `context_shmem::benchkit`) only
//! run a loop over descriptors and shared memory created before the fork and leave with `_exit`;
//! they take no lock another thread could hold.

use std::hint::black_box;
use std::time::Instant;

use anyhow::Context as _;
use context_shmem::benchkit::{BulkWriter, Echo, NoForkBuf, Transport, bulk_write_xproc};
use context_shmem::{SharedBuf, SharedLock};

use super::placement::Placement;
use crate::bench::{Better, Runner, Target};

const MIB64: usize = 64 << 20;

/// Runs the suite.
pub fn run(r: &mut Runner) -> anyhow::Result<()> {
    lock_uncontended(r)?;
    channel_roundtrip(r)?;
    bulk(r)?;
    Ok(())
}

fn lock_uncontended(r: &mut Runner) -> anyhow::Result<()> {
    r.step("shmem lock_uncontended");
    let lock = SharedLock::anonymous().context("creating a shared lock")?;
    let mutex = parking_lot::Mutex::new(0u64);
    let mut protected = 0u64;
    let (case, base) = r.compare_ns(
        |n| {
            for _ in 0..n {
                if let Ok(g) = lock.guard(None) {
                    protected = black_box(protected + 1);
                    drop(g);
                }
            }
        },
        |n| {
            for _ in 0..n {
                let mut g = mutex.lock();
                *g = black_box(*g + 1);
            }
        },
    );
    r.row(
        "lock_uncontended",
        "ns_per_op",
        case,
        Better::Lower,
        "parking_lot_mutex",
        base,
        Some(Target::RatioAtMost(2.0)),
    );
    r.note("lock + increment + unlock, one thread; the shared lock lives in a sealed memfd");
    Ok(())
}

fn channel_roundtrip(r: &mut Runner) -> anyhow::Result<()> {
    r.step("shmem channel_roundtrip_xproc");
    let kinds = [
        ("channel", Transport::Channel),
        ("unix_socket", Transport::UnixSocket),
        ("pipe", Transport::Pipe),
        ("spin_futex_pingpong", Transport::SpinFutex),
    ];
    // The parent on one CPU, the echo children on another (see `super::placement`).
    let place = Placement::new()?;
    let child_cpu = place.partner_cpu();
    let mut echoes = Vec::new();
    for (name, t) in kinds {
        echoes.push(
            Echo::spawn_on(t, child_cpu)
                .with_context(|| format!("forking the {name} echo child"))?,
        );
    }
    let med = {
        let mut loops: Vec<_> = echoes
            .iter_mut()
            .map(|e| move |n: u64| e.roundtrips(n).map_err(anyhow::Error::from))
            .collect();
        let mut cases: Vec<crate::bench::Case<'_>> = kinds
            .iter()
            .zip(loops.iter_mut())
            .map(|((name, _), f)| (*name, f as &mut dyn FnMut(u64) -> anyhow::Result<()>))
            .collect();
        r.rotate_ns(&mut cases)?
    };
    drop(echoes);
    let case = med[0];
    let targets = [
        None,
        Some(Target::RatioAtMost(0.1)),
        None,
        Some(Target::RatioAtMost(2.0)),
    ];
    for i in 1..kinds.len() {
        r.row(
            "channel_roundtrip_xproc",
            "ns_per_op",
            case,
            Better::Lower,
            kinds[i].0,
            med[i],
            targets[i],
        );
        r.note(format!(
            "16-byte frame to a forked echo child and back; {}",
            place.describe("parent", "child")
        ));
    }
    Ok(())
}

fn bulk(r: &mut Runner) -> anyhow::Result<()> {
    r.step("shmem bulk_write_64mib_xproc");
    let buf = SharedBuf::<u8>::create(MIB64).context("creating a 64 MiB shared buffer")?;
    // `src` must be inherited by the writer children; `dst` and `copy` are excluded from children
    // so the forks do not leave their pages write-protected in the parent, which would slow the
    // parent's read and the memcpy baseline by a fault per page (see `NoForkBuf`).
    let src = vec![0x5au8; MIB64];
    let mut dst_buf = NoForkBuf::new(MIB64).context("allocating the read buffer")?;
    let mut copy_buf = NoForkBuf::new(MIB64).context("allocating the memcpy buffer")?;
    let dst = dst_buf.as_mut_slice();
    let copy = copy_buf.as_mut_slice();
    let mut worker = BulkWriter::spawn(&buf, &src).context("forking the bulk writer")?;
    // Warm up: the worker's page tables, the shared pages, the private buffers.
    worker.fill().context("bulk warm-up")?;
    bulk_write_xproc(&buf, &src, dst).context("bulk warm-up")?;
    copy.copy_from_slice(&src);
    let gbps = |ns: u64| MIB64 as f64 / ns.max(1) as f64; // bytes per ns == GB/s
    let (mut warm, mut fresh, mut rd, mut m) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..r.config().trials() {
        warm.push(gbps(worker.fill().context("bulk fill")?));
        let (write_ns, read_ns) = bulk_write_xproc(&buf, &src, dst).context("bulk run")?;
        fresh.push(gbps(write_ns));
        rd.push(gbps(read_ns));
        let t0 = Instant::now();
        copy.copy_from_slice(black_box(&src));
        black_box(&*copy);
        m.push(gbps(
            u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX),
        ));
    }
    drop(worker);
    anyhow::ensure!(
        *dst == src[..],
        "the parent did not read what the child wrote"
    );
    let &[warm, fresh, rd, memcpy] = r.paired_medians(vec![warm, fresh, rd, m]).as_slice() else {
        anyhow::bail!("bulk: expected one median per sample set")
    };
    r.row(
        "bulk_write_64mib_xproc",
        "gb_per_s",
        warm,
        Better::Higher,
        "memcpy_in_process",
        memcpy,
        Some(Target::RatioAtLeast(0.8)),
    );
    r.note("worker child: lock + copy 64 MiB into the shared buffer + unlock, timed in the child");
    r.row(
        "bulk_write_64mib_xproc_fresh_child",
        "gb_per_s",
        fresh,
        Better::Higher,
        "memcpy_in_process",
        memcpy,
        None,
    );
    r.note("a child forked for the one fill: includes populating its page tables for the buffer");
    r.row(
        "bulk_read_64mib_xproc",
        "gb_per_s",
        rd,
        Better::Higher,
        "memcpy_in_process",
        memcpy,
        None,
    );
    r.note("parent: lock + copy the 64 MiB the child wrote out of the shared buffer + unlock");
    Ok(())
}
