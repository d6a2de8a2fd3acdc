//! A bounded, frame-oriented duplex channel between two processes, in one shared segment.
//!
//! Each direction is a single-producer single-consumer ring of frames. A frame is a 4-byte header
//! word (`0` = nothing here, `len + 1` = a committed frame of `len` bytes) followed by the payload,
//! rounded up to 8 bytes so every header is 8-aligned; payloads wrap around the ring end. (A 4-byte
//! header, not 8: a 60-byte frame then fills exactly one cache line.) The producer copies the
//! payload (which may come in several parts, [`Endpoint::send_parts`]) into
//! free space, stores 0 into the header word *after* the frame
//! (where the next frame will start, so stale bytes there can never look like a header), and then
//! *commits* the frame by storing its header (Release); the consumer polls the header word at its
//! own position (Acquire), copies the payload into the caller's buffer and frees the space by
//! advancing `head` (Release). So a frame is either entirely visible or not at all, even if the
//! producer is killed mid-copy: the rings are crash-consistent by construction.
//!
//! **Only the producer writes ring bytes; the consumer writes only `head`.** Invariant: the header
//! word at the producer's position is 0 whenever no commit is in progress (the ring starts zeroed,
//! and each commit zeroes the next position before publishing the frame), and every header word
//! between `head` and that position is a committed header. Hence a process taking over a dead
//! producer's side can find the send position by walking committed headers from any `head` it
//! loaded, stale or not, while the live consumer keeps receiving: nothing it reads can change under
//! it (review F5). And a process taking over a dead consumer's side finds the frame the dead
//! consumer was reading intact at `head` and receives it again, whole (at-least-once delivery;
//! review F6). The price is 8 bytes of ring: a frame needs its own bytes plus the next header word
//! free, so the largest frame is `capacity - 16` bytes. Polling the header itself, rather than a separate `tail` word, saves the
//! consumer one cache-line transfer per frame; the producer reloads `head` only when its cached
//! copy says the ring is full.
//!
//! **Pre-touch.** Right after a commit the producer also stores 0 into the first word of each of the
//! next cache lines beyond its position, as many lines as the frame just sent spanned (up to 4),
//! where those words are free space. The next frame's bytes spill into those lines, and the
//! consumer holds them from the previous lap: without the pre-touch the next commit (an `xchg`,
//! which waits for every earlier store) waits for those lines' transfers on top of the transfer of
//! the line the consumer polls; with it, the transfers happen while the producer waits for its
//! answer anyway. (Measured: about 7% off a small cross-process proxy call with one line; for
//! 120-byte frames both ways, touching as many lines as the last frame took 15% off the round
//! trip compared with one line, and cost nothing measurable for one-line frames.) It is harmless
//! to the protocol: the words lie beyond the producer's position, where the consumer reads
//! nothing, a later frame overwrites them before they can be read, and a walk of the committed
//! headers stops at the producer's position before them. (Padding frames to whole cache lines was
//! tried too and measured no faster.)
//!
//! **Waiting.** A side that finds the ring empty (or full) spins for an adaptive number of polls
//! (grown when spinning paid off, shrunk when it had to sleep), yields the CPU a few times (the
//! peer may be waiting for it on a busy machine), then announces itself in a
//! `sleeping` word and sleeps on a futex sequence word that the other side bumps (store-load
//! pattern on `sleeping` and the header/`head` word, all `SeqCst`, so no wake-up is lost). Sleeps are bounded (10 ms
//! slices): between slices the waiter checks the peer's liveness token and close flag, so a dead
//! peer becomes [`ChannelError::PeerDead`] instead of a hang. Every wait also takes a deadline.
//!
//! **Untrusted memory.** Each side keeps its own position privately (read from the segment and
//! validated once, at attach); header lengths and the peer's `head` read from the segment are
//! checked against the ring capacity this process computed from its own view of the segment size,
//! and `head` must never move backwards; a violation is [`ChannelError::Corrupt`], never an
//! out-of-bounds access. A wait ends as soon as the word it watches changes, so a side that must
//! wait again checks the deadline first: a peer that keeps changing that word without making room
//! (or without committing a frame) cannot hold a send or a receive past its deadline, and the
//! common case, one wait, reads no clock.

use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::segment::{Segment, TypeId};
use crate::sync::{self, AtomicU32, AtomicU64, Ordering};
use crate::{Error, ProcessToken};

const CHANNEL_TYPE: TypeId = TypeId::of_name("context-shmem::Channel/v2");
const CHANNEL_MAGIC: u32 = 0x4354_5843; // "CTXC"
const CTRL_SIZE: usize = 256;
const RING_HDR: usize = 256;
/// Smallest ring capacity accepted.
pub const MIN_CAPACITY: usize = 64;
/// Largest ring capacity accepted (1 GiB).
pub const MAX_CAPACITY: usize = 1 << 30;
const SLEEP_SLICE: Duration = Duration::from_millis(10);
const SPIN_MIN: u32 = 64;
const SPIN_MAX: u32 = 1 << 15;
/// `sched_yield` polls after the spin and before the futex sleep.
const YIELDS: u32 = 8;

/// Errors of channel operations.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The deadline passed.
    #[error("timed out")]
    TimedOut,
    /// The peer process died (its liveness token no longer matches a running process).
    #[error("the peer process (pid {pid}) died")]
    PeerDead {
        /// The dead peer's PID.
        pid: u32,
    },
    /// The peer closed its end (and, on receive, every frame it sent has been received).
    #[error("the peer closed the channel")]
    Closed,
    /// The frame does not fit the ring even when empty; or, on a bounded receive
    /// ([`Endpoint::recv_append_max`]), the frame received is over the bound (and was dropped).
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge {
        /// The frame's length.
        len: usize,
        /// The largest frame this channel carries.
        max: usize,
    },
    /// The caller's buffer is smaller than the next frame; the frame stays queued.
    #[error("receive buffer too small: the next frame has {needed} bytes")]
    BufferTooSmall {
        /// The next frame's length.
        needed: usize,
    },
    /// The shared ring state is inconsistent (a misbehaving peer, or memory corruption).
    #[error("channel state is corrupt: {0}")]
    Corrupt(&'static str),
    /// The requested ring capacity is not a power of two in `MIN_CAPACITY..=MAX_CAPACITY`.
    #[error("channel capacity {0} is not a power of two between 64 B and 1 GiB")]
    BadCapacity(usize),
    /// That side is already attached by a live process.
    #[error("that side of the channel is taken by a live process")]
    SideTaken,
    /// Setting up the channel failed.
    #[error(transparent)]
    Setup(#[from] Error),
}

/// One end of a [`Channel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Sends on ring 0, receives on ring 1.
    A,
    /// Sends on ring 1, receives on ring 0.
    B,
}

/// The channel's control block at payload offset 0.
#[repr(C)]
struct Ctrl {
    magic: AtomicU32,
    _r: AtomicU32,
    cap: AtomicU64,
    tokens: [AtomicU64; 2],
    closed: [AtomicU32; 2],
}

/// A ring's header; fields on separate cache lines by role.
#[repr(C, align(64))]
struct RingHdr {
    /// Consumer position (bytes consumed, ever). Written by the consumer.
    head: AtomicU64,
    _p0: [u64; 7],
    /// Producer position (bytes published, ever). Written by the producer.
    tail: AtomicU64,
    _p1: [u64; 7],
    /// Futex: bumped by the producer to wake a sleeping consumer.
    data_seq: AtomicU32,
    /// 1 while the consumer is (about to be) asleep.
    consumer_sleeping: AtomicU32,
    _p2: [u32; 14],
    /// Futex: bumped by the consumer to wake a producer waiting for space.
    space_seq: AtomicU32,
    /// 1 while the producer is (about to be) asleep.
    producer_sleeping: AtomicU32,
    _p3: [u32; 14],
}

const _: () = assert!(std::mem::size_of::<RingHdr>() == RING_HDR);
const _: () = assert!(std::mem::size_of::<Ctrl>() <= CTRL_SIZE);

/// A duplex frame channel in a sealed memfd segment. Create it, share it (fork, or send
/// [`Self::segment`]'s descriptor), and have each process attach one [`Side`] with
/// [`Self::endpoint`].
#[derive(Clone, Debug)]
pub struct Channel {
    seg: Arc<Segment>,
    // INVARIANTS: `cap` is a power of two in [MIN_CAPACITY, MAX_CAPACITY], computed from this
    // process's own view of the segment size, and the segment holds CTRL_SIZE + 2 * (RING_HDR + cap)
    // payload bytes.
    cap: usize,
    // INVARIANTS: `(cap - 1) & !7`, the mask that turns a ring position into the offset of its
    // 8-aligned header word (kept so that each header lookup is one `and`).
    header_mask: usize,
    // INVARIANTS: `ctrl` points to the control block at payload offset 0 and `rings[i]` to ring
    // `i`'s header (64-aligned), followed by its `cap` data bytes, all inside `seg`'s mapping
    // (computed once, with bounds and alignment checked, by `Channel::new`). The mapping lives as
    // long as `seg`, which every copy of these pointers travels with.
    ctrl: NonNull<Ctrl>,
    rings: [NonNull<RingHdr>; 2],
}

// SAFETY: the pointers only name memory of the mapping that `seg` (an `Arc<Segment>`, itself Send
// and Sync) keeps alive; through them this module makes only shared references to atomics (which
// are Sync) and raw copies governed by the ring protocol, never `&`/`&mut` to plain bytes.
unsafe impl Send for Channel {}
// SAFETY: as for Send: `&Channel` gives access to atomics and to raw pointers only.
unsafe impl Sync for Channel {}

fn seg_payload(cap: usize) -> usize {
    CTRL_SIZE + 2 * (RING_HDR + cap)
}

impl Channel {
    /// A new channel whose rings hold `capacity` bytes each (a power of two, 64 B to 1 GiB).
    /// The largest frame is `capacity - 16` bytes.
    ///
    /// # Errors
    /// A bad capacity, or OS errors creating the segment.
    pub fn create(capacity: usize) -> Result<Self, ChannelError> {
        if !capacity.is_power_of_two() || !(MIN_CAPACITY..=MAX_CAPACITY).contains(&capacity) {
            return Err(ChannelError::BadCapacity(capacity));
        }
        let seg = Arc::new(Segment::create_memfd(seg_payload(capacity), CHANNEL_TYPE)?);
        let ch = Self::new(seg, capacity);
        let ctrl = ch.ctrl();
        ctrl.cap.store(capacity as u64, Ordering::SeqCst);
        ctrl.magic.store(CHANNEL_MAGIC, Ordering::SeqCst);
        Ok(ch)
    }

    /// Opens a channel segment received from another process. The capacity is derived from this
    /// process's view of the segment size and must match the one stored inside.
    ///
    /// # Errors
    /// Wrong type, an inconsistent control block, or a segment made in another PID namespace
    /// ([`Segment::check_pid_namespace`]: the sides' liveness tokens would be misread).
    pub fn from_segment(seg: Arc<Segment>) -> Result<Self, ChannelError> {
        if seg.type_id() != CHANNEL_TYPE {
            return Err(Error::WrongType {
                expected: CHANNEL_TYPE,
                found: seg.type_id(),
            }
            .into());
        }
        seg.check_pid_namespace()?;
        let cap = seg
            .payload_len()
            .checked_sub(CTRL_SIZE + 2 * RING_HDR)
            .ok_or(ChannelError::Corrupt("segment too small"))?
            / 2;
        if !cap.is_power_of_two() || !(MIN_CAPACITY..=MAX_CAPACITY).contains(&cap) {
            return Err(ChannelError::Corrupt(
                "segment size does not describe a channel",
            ));
        }
        let ch = Self::new(seg, cap);
        let ctrl = ch.ctrl();
        if ctrl.magic.load(Ordering::SeqCst) != CHANNEL_MAGIC
            || ctrl.cap.load(Ordering::SeqCst) != cap as u64
        {
            return Err(ChannelError::Corrupt(
                "control block does not match the segment",
            ));
        }
        Ok(ch)
    }

    /// The type id of channel segments.
    #[must_use]
    pub fn type_id() -> TypeId {
        CHANNEL_TYPE
    }

    /// The segment (to send its descriptor to the peer process).
    #[must_use]
    pub fn segment(&self) -> &Arc<Segment> {
        &self.seg
    }

    /// Bytes per ring.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// The largest frame payload (`capacity - 16`: the header, and the next frame's header word).
    #[must_use]
    pub fn max_frame(&self) -> usize {
        self.cap - 16
    }

    /// The channel over `seg`, whose payload holds `seg_payload(cap)` bytes (`cap` a valid
    /// capacity, checked by the callers): computes the control block and ring pointers once, so
    /// that sending and receiving do no bounds checks on the segment.
    fn new(seg: Arc<Segment>, cap: usize) -> Self {
        let ctrl = seg
            .payload_ptr(0, std::mem::size_of::<Ctrl>(), 8)
            .unwrap_or_else(|_| unreachable!("callers checked the segment size"))
            .cast::<Ctrl>();
        let ring = |i: usize| {
            let off = CTRL_SIZE + i * (RING_HDR + cap);
            // In bounds and 64-aligned (payload starts 64-aligned; CTRL_SIZE, RING_HDR and cap are
            // multiples of 64), checked here once.
            seg.payload_ptr(off, RING_HDR + cap, 64)
                .unwrap_or_else(|_| unreachable!("callers checked the segment size"))
                .cast::<RingHdr>()
        };
        let rings = [ring(0), ring(1)];
        Self {
            seg,
            cap,
            header_mask: (cap - 1) & !7,
            ctrl,
            rings,
        }
    }

    fn ctrl(&self) -> &Ctrl {
        // SAFETY: in bounds and aligned (INVARIANTS: checked in `new`), kept mapped by `self.seg`
        // for as long as `&self` lives; all fields are atomics.
        unsafe { self.ctrl.as_ref() }
    }

    /// Ring `i`'s header and the pointer to its `cap` data bytes. `i` must be 0 or 1.
    fn ring(&self, i: usize) -> (&RingHdr, *mut u8) {
        // `i & 1 == i` for the 0 or 1 callers pass; the mask only spares the bounds check (a
        // compare and a branch on every send and receive).
        let p = self.rings[i & 1];
        // SAFETY: in bounds and 64-aligned (INVARIANTS), kept mapped by `self.seg` for as long as
        // `&self` lives; the header is all atomics (padding arrays are never read).
        let hdr = unsafe { p.as_ref() };
        // The data follows the header: RING_HDR + cap bytes are in bounds (INVARIANTS).
        let data = p.as_ptr().cast::<u8>().wrapping_add(RING_HDR);
        (hdr, data)
    }

    /// The frame header word (4 bytes, 8-aligned) at position `pos` of ring `data` (0 = nothing
    /// here; `len + 1` = a committed frame). `data` must be the data pointer returned by [`Self::ring`].
    fn header(&self, data: *mut u8, pos: u64) -> &AtomicU32 {
        let off = (pos as usize) & self.header_mask;
        // SAFETY: `data` points to `cap` bytes of one of our rings, 64-aligned (INVARIANTS and
        // `ring`); `off` is a multiple of 8 below `cap` (a power of two >= 64; `header_mask` is
        // `(cap - 1) & !7`, INVARIANTS), so the 4 bytes are in bounds and aligned. The reference
        // is tied to `&self`, which keeps the segment mapped. Header words are only accessed atomically while they can hold a header (payload
        // bytes that later become a header position are synchronized through `head`).
        unsafe { &*data.wrapping_add(off).cast::<AtomicU32>() }
    }

    /// Attaches this process as `side`. A side held by a dead process may be taken over (its
    /// rings are consistent: a frame becomes visible only when its header is committed, and the
    /// new producer finds its position by walking the committed headers).
    ///
    /// # Errors
    /// [`ChannelError::SideTaken`] if a live process holds that side; [`ChannelError::Corrupt`]
    /// if the ring positions are inconsistent; setup errors if `/proc` is unavailable.
    pub fn endpoint(&self, side: Side) -> Result<Endpoint, ChannelError> {
        let me = ProcessToken::current().map_err(|source| Error::Io {
            op: "/proc/self/stat",
            source,
        })?;
        let i = side as usize;
        let slot = &self.ctrl().tokens[i];
        let old = slot.load(Ordering::SeqCst);
        let free = match ProcessToken::from_bits(old) {
            None => true,
            Some(t) => t != me && !t.is_alive(),
        };
        if !free
            || slot
                .compare_exchange(old, me.to_bits(), Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
        {
            return Err(ChannelError::SideTaken);
        }
        let (tx, rx) = if side == Side::A { (0, 1) } else { (1, 0) };
        let attach = || -> Result<(u64, u64, u64), ChannelError> {
            // Positions are read from shared memory once, here, and validated; afterwards each
            // side keeps its own position privately.
            let rx_head = self.ring(rx).0.head.load(Ordering::Acquire);
            let tx_head = self.ring(tx).0.head.load(Ordering::Acquire);
            if rx_head % 8 != 0 || tx_head % 8 != 0 {
                return Err(ChannelError::Corrupt("misaligned ring position"));
            }
            // Our send position: after the last committed frame (the previous owner of this side
            // may have died between committing a header and publishing `tail`). The walk is exact
            // even while a live consumer advances `head` (so `tx_head` may already be stale): the
            // consumer never writes ring bytes, the dead producer writes nothing more, and the
            // header word after its last committed frame is 0 (module docs, invariant).
            let mut tail = tx_head;
            let (_, data) = self.ring(tx);
            for _ in 0..self.cap / 8 {
                let used = usize::try_from(tail.wrapping_sub(tx_head)).unwrap_or(usize::MAX);
                if used >= self.cap {
                    break;
                }
                let h = self.header(data, tail).load(Ordering::Acquire);
                if h == 0 {
                    break;
                }
                let need = frame_need(u64::from(h - 1), self.cap)
                    .ok_or(ChannelError::Corrupt("committed frame length out of range"))?;
                tail = tail.wrapping_add(need as u64);
            }
            if usize::try_from(tail.wrapping_sub(tx_head)).map_or(true, |u| u > self.cap) {
                return Err(ChannelError::Corrupt("committed frames exceed the ring"));
            }
            Ok((rx_head, tx_head, tail))
        };
        let (rx_head, tx_head, tx_tail) = match attach() {
            Ok(v) => v,
            Err(e) => {
                slot.store(old, Ordering::SeqCst);
                return Err(e);
            }
        };
        self.ring(tx).0.tail.store(tx_tail, Ordering::SeqCst);
        self.ctrl().closed[i].store(0, Ordering::SeqCst);
        Ok(Endpoint {
            ch: self.clone(),
            side: i,
            tx,
            rx,
            spin: 2048,
            tx_tail,
            tx_head,
            rx_head,
            me: me.to_bits(),
        })
    }
}

/// Cache-line size (see the pre-touch in the module docs).
const LINE: usize = 64;

/// Most lines pre-touched after a send (larger frames are dominated by their copy).
const MAX_PRETOUCH: usize = 4;

/// Bytes of a frame's header word (the payload follows it; the word itself is 8-aligned).
const HDR: usize = 4;

/// Bytes a frame of `len` payload bytes occupies: the 4-byte header plus the payload, rounded up to
/// 8 bytes so every header is 8-aligned. `None` if the frame is longer than the largest frame,
/// `cap - 16` bytes (so that it fits the ring together with the next frame's header word, which
/// the producer zeroes before committing).
fn frame_need(len: u64, cap: usize) -> Option<usize> {
    let len = usize::try_from(len).ok()?;
    if len > cap - 16 {
        return None;
    }
    // `len <= cap - 16 < 1 GiB`, so this does not overflow; `need + 8 <= cap`.
    Some((len + HDR + 7) & !7)
}

/// One process's end of a [`Channel`]: sends frames on one ring, receives on the other.
/// Methods take `&mut self`: one sender and one receiver per direction.
#[derive(Debug)]
pub struct Endpoint {
    ch: Channel,
    side: usize,
    tx: usize,
    rx: usize,
    /// Current spin budget (adaptive).
    spin: u32,
    /// Our send position (private: never re-read from shared memory).
    tx_tail: u64,
    /// Last `head` of the send ring we loaded (Acquire); never ahead of the real one.
    tx_head: u64,
    /// Our receive position (private).
    rx_head: u64,
    /// Our token as published in `tokens[side]`; cleared from there on drop.
    me: u64,
}

enum Wait {
    Data,
    Space,
}

impl Endpoint {
    fn peer(&self) -> usize {
        // `side` is 0 or 1; the mask tells the compiler so, which spares the bounds checks of the
        // `closed` and `tokens` lookups.
        (self.side ^ 1) & 1
    }

    /// The largest frame payload.
    #[must_use]
    pub fn max_frame(&self) -> usize {
        self.ch.max_frame()
    }

    /// Whether the other side is attached by a live process that has not closed its end:
    /// `Ok(false)` if nobody holds it (never attached, or given back) or its holder closed it.
    /// A peer that is attaching right now may still show as not attached: callers that wait for
    /// a peer poll this.
    ///
    /// # Errors
    /// [`ChannelError::PeerDead`] if the process holding it died.
    pub fn peer_attached(&self) -> Result<bool, ChannelError> {
        let peer = self.peer();
        // Closed, or held by a dead process (an error), as every wait of this side checks it.
        if check_peer(&self.ch, peer)? {
            return Ok(false);
        }
        Ok(self.ch.ctrl().tokens[peer].load(Ordering::SeqCst) != 0)
    }

    /// Sends one frame, waiting for space until `deadline` (backpressure).
    ///
    /// # Errors
    /// `FrameTooLarge`, `TimedOut`, `PeerDead`, `Closed`, `Corrupt`.
    #[inline]
    pub fn send(&mut self, frame: &[u8], deadline: Option<Instant>) -> Result<(), ChannelError> {
        self.send_with(frame.len(), deadline, |data, cap, at| {
            // SAFETY: as in `send_with`'s contract for `write`: `at < cap`, `frame.len() == len`.
            unsafe { ring_write(data, cap, at, frame) };
        })
    }

    /// Sends one frame made of `parts` laid end to end (a header and a body, say), without
    /// assembling it first; otherwise exactly [`Endpoint::send`].
    ///
    /// # Errors
    /// As for [`Endpoint::send`].
    #[inline]
    pub fn send_parts(
        &mut self,
        parts: &[&[u8]],
        deadline: Option<Instant>,
    ) -> Result<(), ChannelError> {
        let len = parts
            .iter()
            .try_fold(0usize, |n, p| n.checked_add(p.len()))
            .unwrap_or(usize::MAX);
        self.send_with(len, deadline, |data, cap, mut at| {
            for part in parts {
                // SAFETY: as in `send_with`'s contract for `write`: `at < cap` (masked), and the
                // parts' lengths add up to `len`, so each `part.len() <= len < cap`.
                unsafe { ring_write(data, cap, at, part) };
                at = (at + part.len()) & (cap - 1);
            }
        })
    }

    /// Sends one frame of `len` payload bytes, which `write(data, cap, at)` copies into the ring
    /// at data offset `at` (wrapping at `cap`): `write` must write exactly `len` bytes, through
    /// [`ring_write`]. The common send, which finds room at once, stays here, inlined into its
    /// caller; waiting for room is out of line ([`Endpoint::wait_for_room`]).
    #[inline(always)]
    fn send_with(
        &mut self,
        len: usize,
        deadline: Option<Instant>,
        write: impl FnOnce(*mut u8, usize, usize),
    ) -> Result<(), ChannelError> {
        let cap = self.ch.cap;
        let need = frame_need(len as u64, cap)
            .ok_or(ChannelError::FrameTooLarge { len, max: cap - 16 })?;
        let peer = self.peer();
        if self.ch.ctrl().closed[peer].load(Ordering::SeqCst) != 0 {
            return Err(ChannelError::Closed);
        }
        let tail = self.tx_tail;
        // `room`: the frame plus the next frame's header word, which we zero before committing.
        // The consumer's `head` only grows, so a cached (older) value underestimates the free
        // space: reload it (one cache-line transfer) only when the cached value says full.
        let used = usize::try_from(tail.wrapping_sub(self.tx_head)).unwrap_or(usize::MAX);
        if used > cap || cap - used < need + 8 {
            self.wait_for_room(need, deadline)?;
        }
        let (hdr, data) = self.ch.ring(self.tx);
        let pos = (tail as usize) & (cap - 1);
        // The bytes [tail, tail + need + 8) are free (the consumer released them: `tx_head` came
        // from an Acquire load, now or earlier), so nobody reads or writes them until we commit
        // the header; `write` copies the `len < need` payload bytes after the header word.
        write(data, cap, (pos + HDR) & (cap - 1));
        let new_tail = tail.wrapping_add(need as u64);
        // Clear the next frame's header word (free space, see `room`) before the commit: the
        // consumer reads it only after acquiring our header below, so it sees 0 or a later commit,
        // never stale bytes of an earlier lap.
        self.ch.header(data, new_tail).store(0, Ordering::Relaxed);
        // Commit: the header store (SeqCst >= Release) publishes the payload; the consumer polls
        // this very word. SeqCst also orders it before the `consumer_sleeping` load (store-load
        // pattern with the consumer's sleep announcement).
        // `len < cap <= 1 GiB` (`frame_need`), so `len + 1` fits the word.
        self.ch
            .header(data, tail)
            .store(len as u32 + 1, Ordering::SeqCst);
        self.tx_tail = new_tail;
        hdr.tail.store(new_tail, Ordering::Relaxed); // informational (diagnostics)
        // Pre-touch (module docs): the first words of the lines after the one our position is in
        // now, as many as this frame spanned (the next frame is likely of its size; at most
        // `MAX_PRETOUCH`), while nobody waits on them, as far as they are free space (`tx_head`
        // may be stale: that only underestimates the free space). The k-th line boundary after
        // our new position lies `k * LINE - into_line` bytes past it, and its word is free space
        // if that is at most `free`, the bytes after the next frame's header word up to the
        // consumer's (cached) position: so for `k * LINE <= free + into_line`. The room check
        // above (or `wait_for_room`) left `new_tail - tx_head + 8 <= cap`, so nothing here
        // underflows.
        let free = cap - (new_tail.wrapping_sub(self.tx_head) as usize) - 8;
        let into_line = (new_tail as usize) & (LINE - 1);
        let lines = need
            .div_ceil(LINE)
            .min(MAX_PRETOUCH)
            .min((free + into_line) / LINE);
        let mut at = new_tail.wrapping_add((LINE - into_line) as u64);
        for _ in 0..lines {
            self.ch.header(data, at).store(0, Ordering::Relaxed);
            at = at.wrapping_add(LINE as u64);
        }
        if hdr.consumer_sleeping.load(Ordering::SeqCst) != 0 {
            wake(&hdr.data_seq);
        }
        Ok(())
    }

    /// Waits until the send ring has room for a frame occupying `need` bytes (plus the next
    /// frame's header word): on return, `tail - tx_head + need + 8 <= cap`. Checks the close
    /// flag on every round, and the deadline before every wait but the first.
    #[inline(never)]
    fn wait_for_room(
        &mut self,
        need: usize,
        deadline: Option<Instant>,
    ) -> Result<(), ChannelError> {
        let cap = self.ch.cap;
        let peer = self.peer();
        let ch = &self.ch;
        let spin = &mut self.spin;
        let head_cache = &mut self.tx_head;
        let tail = self.tx_tail;
        let (hdr, _) = ch.ring(self.tx);
        let room = need + 8;
        let mut waited = false;
        loop {
            if ch.ctrl().closed[peer].load(Ordering::SeqCst) != 0 {
                return Err(ChannelError::Closed);
            }
            let mut head = *head_cache;
            let mut used = usize::try_from(tail.wrapping_sub(head)).unwrap_or(usize::MAX);
            if used > cap || cap - used < room {
                let before = used;
                head = hdr.head.load(Ordering::Acquire);
                *head_cache = head;
                used = usize::try_from(tail.wrapping_sub(head)).unwrap_or(usize::MAX);
                if used > cap || head % 8 != 0 {
                    return Err(ChannelError::Corrupt("ring positions out of range"));
                }
                // `head` only grows (module docs), so the space in use can only shrink.
                if used > before {
                    return Err(ChannelError::Corrupt(
                        "the consumer's position moved backwards",
                    ));
                }
            }
            if cap - used >= room {
                return Ok(());
            }
            // A wait ends as soon as `head` moves, which need not free enough room: before waiting
            // again, check the deadline, so that a consumer that keeps moving `head` a little
            // cannot keep us here past it. (Only here: a clock read costs a good part of a whole
            // round trip, and the common send finds room at once or after one wait.)
            if waited && deadline_passed(deadline) {
                return Err(ChannelError::TimedOut);
            }
            let changed = |o| hdr.head.load(o) != head;
            wait(ch, peer, spin, Wait::Space, changed, hdr, deadline)?;
            waited = true;
        }
    }

    /// Receives one frame into `buf`, waiting until `deadline`; returns its length. Frames the
    /// peer sent before closing or dying are still delivered.
    ///
    /// # Errors
    /// `BufferTooSmall` (the frame stays queued), `TimedOut`, `PeerDead`, `Closed`, `Corrupt`.
    #[inline]
    pub fn recv(
        &mut self,
        buf: &mut [u8],
        deadline: Option<Instant>,
    ) -> Result<usize, ChannelError> {
        let (len, need) = self.next_frame(deadline)?;
        if len > buf.len() {
            return Err(ChannelError::BufferTooSmall { needed: len });
        }
        // SAFETY: `next_frame` returned `len` and `need` for the frame at our position;
        // `buf[..len]` is `len` private writable bytes.
        unsafe { self.take_frame(len, need, buf.as_mut_ptr()) };
        Ok(len)
    }

    /// Receives one frame and appends it to `buf` (growing it as needed, up to the largest frame),
    /// waiting until `deadline`; returns its length. Otherwise exactly [`Endpoint::recv`], without
    /// `BufferTooSmall`.
    ///
    /// # Errors
    /// `TimedOut`, `PeerDead`, `Closed`, `Corrupt`.
    pub fn recv_append(
        &mut self,
        buf: &mut Vec<u8>,
        deadline: Option<Instant>,
    ) -> Result<usize, ChannelError> {
        self.recv_append_max(buf, usize::MAX, deadline)
    }

    /// [`Endpoint::recv_append`] for frames of at most `max` bytes: a longer frame is dropped
    /// unread, with nothing allocated for it, and reported as [`ChannelError::FrameTooLarge`], so
    /// a peer cannot make this process allocate more than `max` (the ring's size is the peer's
    /// choice when the peer created the channel).
    ///
    /// # Errors
    /// `FrameTooLarge` (the frame is gone), `TimedOut`, `PeerDead`, `Closed`, `Corrupt`.
    #[inline]
    pub fn recv_append_max(
        &mut self,
        buf: &mut Vec<u8>,
        max: usize,
        deadline: Option<Instant>,
    ) -> Result<usize, ChannelError> {
        let (len, need) = self.next_frame(deadline)?;
        if len > max {
            self.release(need);
            return Err(ChannelError::FrameTooLarge { len, max });
        }
        buf.reserve(len);
        let spare = buf.spare_capacity_mut();
        // SAFETY: as in `recv`; `spare` has at least `len` writable bytes (reserved above).
        unsafe { self.take_frame(len, need, spare.as_mut_ptr().cast::<u8>()) };
        // SAFETY: the `len` bytes after the old length were initialized by the copy above, and
        // `buf.len() + len <= buf.capacity()` (reserved).
        unsafe { buf.set_len(buf.len() + len) };
        Ok(len)
    }

    /// Waits until a frame is committed at our receive position and validates its header:
    /// `(len, need)`, the payload's length and the bytes the frame occupies. Inlined into the
    /// receives (the wait itself stays out of line): the two lengths then stay in registers.
    #[inline(always)]
    fn next_frame(&mut self, deadline: Option<Instant>) -> Result<(usize, usize), ChannelError> {
        let cap = self.ch.cap;
        let peer = self.peer();
        let ch = &self.ch;
        let spin = &mut self.spin;
        let head = self.rx_head;
        let (hdr, data) = ch.ring(self.rx);
        let word = ch.header(data, head);
        let mut waited = false;
        loop {
            let h = word.load(Ordering::SeqCst);
            if h != 0 {
                let len = u64::from(h - 1);
                let need = frame_need(len, cap)
                    .ok_or(ChannelError::Corrupt("frame length out of range"))?;
                // `frame_need` checked `len <= cap - 16`, so this conversion is lossless (and
                // `len < need`).
                return Ok((len as usize, need));
            }
            if ch.ctrl().closed[peer].load(Ordering::SeqCst) != 0 {
                // Re-check: a frame committed just before the close must still be delivered.
                if word.load(Ordering::SeqCst) == 0 {
                    return Err(ChannelError::Closed);
                }
                continue;
            }
            // As in `send_parts`: a wait ends when the header word changes, so before waiting
            // again check the deadline (a producer that keeps flipping the word between 0 and a
            // value cannot keep us here past it); the common receive, which finds its frame after
            // one wait, reads no clock.
            if waited && deadline_passed(deadline) {
                return Err(ChannelError::TimedOut);
            }
            let changed = |o| word.load(o) != 0;
            wait(ch, peer, spin, Wait::Data, changed, hdr, deadline)?;
            waited = true;
        }
    }

    /// Copies the payload of the frame at our receive position to `dst`, then frees the frame:
    /// the copy and [`Endpoint::release`] in one, which looks the ring up once.
    ///
    /// # Safety
    /// [`Endpoint::next_frame`] returned `(len, need)` for that frame and it was not released
    /// since; `dst` points to `len` writable bytes nobody else accesses.
    #[inline]
    unsafe fn take_frame(&mut self, len: usize, need: usize, dst: *mut u8) {
        let cap = self.ch.cap;
        let (hdr, data) = self.ch.ring(self.rx);
        let pos = (self.rx_head as usize) & (cap - 1);
        // SAFETY: the frame [head, head + need) was committed by the header `next_frame` loaded
        // (SeqCst >= Acquire), the producer does not touch it until we advance `head`;
        // `(pos + HDR) & (cap - 1) < cap`, `len < cap` (validated by `frame_need`); `dst` is ours
        // (caller). A misbehaving producer in another process could write those bytes during the
        // copy all the same. That memory is outside what the compiler knows of (a mapping shared
        // with another process), and the copy is one `memcpy` through raw pointers into our own
        // buffer, from which nothing is assumed: the worst a racing writer gets is garbage bytes,
        // and every frame is checked as untrusted input after the copy. Volatile loads, which
        // `Segment`'s header checks use, would say the same more formally, at the price of the
        // bulk path's memcpy speed (one load per byte); we keep the memcpy.
        unsafe { ring_read(data, cap, (pos + HDR) & (cap - 1), dst, len) };
        advance_head(hdr, &mut self.rx_head, need);
    }

    /// Frees the frame at our receive position (`need` bytes, from [`Endpoint::next_frame`]).
    #[inline]
    fn release(&mut self, need: usize) {
        let (hdr, _) = self.ch.ring(self.rx);
        advance_head(hdr, &mut self.rx_head, need);
    }
}

/// Frees `need` bytes at the receive position `rx_head` of the ring whose header is `hdr` (the
/// consumer's side of [`Endpoint::release`]).
#[inline(always)]
fn advance_head(hdr: &RingHdr, rx_head: &mut u64, need: usize) {
    // The ring bytes are left as they are (the consumer never writes them; module docs): a
    // process that takes over after we die before the store below receives this frame again,
    // whole.
    let new_head = rx_head.wrapping_add(need as u64);
    *rx_head = new_head;
    // Release (SeqCst): the producer reuses the space only after an Acquire load of this, which
    // orders our reads before its writes. SeqCst also orders it before the `producer_sleeping`
    // load (store-load pattern with the producer's sleep announcement).
    hdr.head.store(new_head, Ordering::SeqCst);
    if hdr.producer_sleeping.load(Ordering::SeqCst) != 0 {
        wake(&hdr.space_seq);
    }
}

/// Waits until `changed` (a frame header for data, the consumer's `head` for space, no longer
/// holding the value the caller saw) returns true.
/// Kept out of line: it is the slow path, and the fast path of `send`/`recv` stays small.
#[allow(clippy::too_many_arguments)] // the borrowed pieces of one endpoint, split for the borrow checker
#[inline(never)]
fn wait(
    ch: &Channel,
    peer: usize,
    spin: &mut u32,
    what: Wait,
    changed: impl Fn(Ordering) -> bool,
    hdr: &RingHdr,
    deadline: Option<Instant>,
) -> Result<(), ChannelError> {
    let (seq, sleeping) = match what {
        Wait::Data => (&hdr.data_seq, &hdr.consumer_sleeping),
        Wait::Space => (&hdr.space_seq, &hdr.producer_sleeping),
    };
    for _ in 0..*spin {
        if changed(Ordering::Acquire) {
            *spin = (*spin * 2).min(SPIN_MAX);
            return Ok(());
        }
        sync::spin_pause();
    }
    *spin = (*spin / 2).max(SPIN_MIN);
    // Before sleeping, give the CPU away a few times: on an oversubscribed machine the peer may be
    // waiting for exactly our CPU, and a yield hands it over for far less than a futex round trip.
    for _ in 0..YIELDS {
        std::thread::yield_now();
        if changed(Ordering::Acquire) {
            return Ok(());
        }
    }
    loop {
        let left = sync::remaining(deadline);
        if left == Some(Duration::ZERO) {
            return Err(ChannelError::TimedOut);
        }
        if check_peer(ch, peer)? {
            return Ok(());
        }
        let s = seq.load(Ordering::SeqCst);
        sleeping.store(1, Ordering::SeqCst);
        if changed(Ordering::SeqCst) {
            sleeping.store(0, Ordering::SeqCst);
            return Ok(());
        }
        let slice = left.map_or(SLEEP_SLICE, |l| l.min(SLEEP_SLICE));
        sync::futex_wait(seq, s, Some(slice));
        sleeping.store(0, Ordering::SeqCst);
        if changed(Ordering::SeqCst) {
            return Ok(());
        }
    }
}

/// Bumps the futex word `seq` and wakes the peer sleeping on it (which announced itself in its
/// `sleeping` word). Out of line: the common send or receive finds its peer awake.
#[cold]
#[inline(never)]
fn wake(seq: &AtomicU32) {
    seq.fetch_add(1, Ordering::SeqCst);
    sync::futex_wake(seq, 1);
}

/// Whether `deadline` has passed (never, for `None`). Reads the clock: for retry paths only.
fn deadline_passed(deadline: Option<Instant>) -> bool {
    sync::remaining(deadline) == Some(Duration::ZERO)
}

/// `Ok(true)` if the peer closed (the caller's loop delivers what is left, then reports
/// Closed), `Err(PeerDead)` if it died.
fn check_peer(ch: &Channel, peer: usize) -> Result<bool, ChannelError> {
    let ctrl = ch.ctrl();
    if ctrl.closed[peer].load(Ordering::SeqCst) != 0 {
        return Ok(true);
    }
    if let Some(t) = ProcessToken::from_bits(ctrl.tokens[peer].load(Ordering::SeqCst)) {
        if !t.is_alive() {
            return Err(ChannelError::PeerDead { pid: t.pid() });
        }
    }
    Ok(false)
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.ch.ctrl().closed[self.side].store(1, Ordering::SeqCst);
        // Give the side back so it can be attached again (by this process or another). Only our
        // own token is cleared: if the side was taken over (we were presumed dead), the new
        // holder's token stays. `closed` is set first, so a peer that sees the token gone also
        // sees the close.
        let _ = self.ch.ctrl().tokens[self.side].compare_exchange(
            self.me,
            0,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        for i in 0..2 {
            let (hdr, _) = self.ch.ring(i);
            hdr.data_seq.fetch_add(1, Ordering::SeqCst);
            sync::futex_wake(&hdr.data_seq, i32::MAX);
            hdr.space_seq.fetch_add(1, Ordering::SeqCst);
            sync::futex_wake(&hdr.space_seq, i32::MAX);
        }
    }
}

/// Copies `src` into the ring at `pos`, wrapping at `cap`.
///
/// # Safety
/// `data` points to `cap` writable bytes, `pos < cap`, `src.len() <= cap`, and no other party
/// accesses the destination bytes during the call.
#[inline]
unsafe fn ring_write(data: *mut u8, cap: usize, pos: usize, src: &[u8]) {
    let first = src.len().min(cap - pos);
    let dst = data.wrapping_add(pos);
    if (8..=16).contains(&first) {
        // A short part (a sequence number, say) without the call into `memcpy`: two 8-byte words,
        // overlapping when `first < 16`.
        let (a, b) = (src.as_ptr(), src.as_ptr().wrapping_add(first - 8));
        // SAFETY: `a` starts 8 readable bytes inside `src` (`8 <= first <= src.len()`); unaligned
        // reads are allowed.
        let x = unsafe { a.cast::<u64>().read_unaligned() };
        // SAFETY: `b = a + first - 8` also starts 8 readable bytes inside `src`.
        let y = unsafe { b.cast::<u64>().read_unaligned() };
        // SAFETY: `dst` starts 8 bytes inside [pos, pos + first), within the ring
        // (`pos + first <= cap`) and exclusive (caller); unaligned writes are allowed.
        unsafe { dst.cast::<u64>().write_unaligned(x) };
        // SAFETY: `dst + first - 8` likewise (`first >= 8`).
        unsafe { dst.wrapping_add(first - 8).cast::<u64>().write_unaligned(y) };
    } else {
        // SAFETY: `pos + first <= cap` (caller: pos < cap), destination exclusive (caller); the
        // source is a private slice.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, first) };
    }
    if first < src.len() {
        // SAFETY: the rest (`src.len() - first`, at most `pos` bytes since `src.len() <= cap`)
        // goes to the start of the ring, also exclusive.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr().wrapping_add(first),
                data,
                src.len() - first,
            );
        }
    }
}

/// Copies `len` bytes from the ring at `pos`, wrapping at `cap`, to `dst`.
///
/// # Safety
/// `data` points to `cap` readable bytes, `pos < cap`, `len <= cap`, nobody writes the source
/// bytes during the call, and `dst` points to `len` writable bytes nobody else accesses.
#[inline]
unsafe fn ring_read(data: *const u8, cap: usize, pos: usize, dst: *mut u8, len: usize) {
    let first = len.min(cap - pos);
    // SAFETY: `pos + first <= cap`, source not written concurrently, destination ours (caller).
    unsafe { std::ptr::copy_nonoverlapping(data.wrapping_add(pos), dst, first) };
    if first < len {
        // SAFETY: the wrapped rest, from the ring's start, within `cap` (caller); `dst` has `len`
        // bytes.
        unsafe { std::ptr::copy_nonoverlapping(data, dst.wrapping_add(first), len - first) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_wrap_and_keep_boundaries() {
        let ch = Channel::create(64).unwrap();
        let mut a = ch.endpoint(Side::A).unwrap();
        assert!(matches!(ch.endpoint(Side::A), Err(ChannelError::SideTaken)));
        // Same process may not take B either? It may: B is free. (Tests run both ends here.)
        let mut b = ch.endpoint(Side::B).unwrap();
        let mut buf = [0u8; 64];
        for i in 0..200u32 {
            let msg: Vec<u8> = (0..(i % 37) as u8).collect();
            a.send(&msg, None).unwrap();
            let n = b.recv(&mut buf, None).unwrap();
            assert_eq!(&buf[..n], &msg[..]);
        }
        assert!(matches!(
            a.send(&[0u8; 49], None),
            Err(ChannelError::FrameTooLarge { .. })
        ));
        assert_eq!(a.max_frame(), 48);
        a.send(&[7u8; 48], None).unwrap();
        assert_eq!(b.recv(&mut buf, None).unwrap(), 48);
        assert_eq!(&buf[..48], &[7u8; 48]);
    }

    /// Frames sent in parts arrive whole, into a slice or appended to a vector; frame sizes are
    /// the 4-byte header plus the payload, rounded up to 8.
    #[test]
    fn parts_and_appending_receives() {
        assert_eq!(frame_need(60, 4096), Some(64));
        assert_eq!(frame_need(61, 4096), Some(72));
        assert_eq!(frame_need(0, 4096), Some(8));
        assert_eq!(frame_need(4096 - 16, 4096), Some(4088));
        assert_eq!(frame_need(4096 - 15, 4096), None);
        let ch = Channel::create(4096).unwrap();
        let mut a = ch.endpoint(Side::A).unwrap();
        let mut b = ch.endpoint(Side::B).unwrap();
        let mut buf = vec![0u8; 4096];
        let mut got = Vec::new();
        for i in 0..500usize {
            let len = (i * 7) % 200;
            let msg: Vec<u8> = (0..len).map(|x| (x + i) as u8).collect();
            let (x, y) = msg.split_at(len / 3);
            a.send_parts(&[x, y], None).unwrap();
            if i % 2 == 0 {
                let n = b.recv(&mut buf, None).unwrap();
                assert_eq!(&buf[..n], &msg[..]);
            } else {
                got.clear();
                got.push(0xee);
                let n = b.recv_append(&mut got, None).unwrap();
                assert_eq!((n, &got[1..]), (len, &msg[..]));
            }
        }
        a.send_parts(&[&vec![9u8; 4000], &[8u8; 80]], None).unwrap();
        assert!(matches!(
            a.send_parts(&[&[0u8; 4000], &[0u8; 81]], None),
            Err(ChannelError::FrameTooLarge {
                len: 4081,
                max: 4080
            })
        ));
        got.clear();
        assert_eq!(b.recv_append(&mut got, None).unwrap(), 4080);
        assert!(got[..4000].iter().all(|&x| x == 9) && got[4000..].iter().all(|&x| x == 8));
    }

    #[test]
    fn a_dropped_side_can_be_attached_again() {
        let ch = Channel::create(64).unwrap();
        let mut b = ch.endpoint(Side::B).unwrap();
        let mut buf = [0u8; 64];
        for round in 0..3u8 {
            let mut a = ch.endpoint(Side::A).unwrap();
            assert!(matches!(ch.endpoint(Side::A), Err(ChannelError::SideTaken)));
            a.send(&[round; 5], None).unwrap();
            drop(a);
            assert_eq!(b.recv(&mut buf, None).unwrap(), 5);
            assert_eq!(&buf[..5], &[round; 5]);
        }
        drop(b);
        let _b = ch.endpoint(Side::B).unwrap();
    }

    /// A token for this PID that is certainly dead (another start time).
    fn dead_token() -> u64 {
        let me = ProcessToken::current().unwrap();
        ProcessToken::new(me.pid(), u64::from(me.start_ticks()) + 1).to_bits()
    }

    fn numbered(i: u32) -> Vec<u8> {
        let len = 4 + (i % 21) as usize;
        let mut v = vec![u8::try_from(i % 251).unwrap(); len];
        v[..4].copy_from_slice(&i.to_le_bytes());
        v
    }

    /// Review F5: a new producer takes over a dead producer's side while the live consumer is
    /// still receiving that producer's frames. Every frame must arrive once, in order, intact.
    #[test]
    fn producer_takeover_while_the_consumer_receives() {
        const TOTAL: u32 = 60;
        for round in 0..150u32 {
            let ch = Channel::create(256).unwrap();
            let mut a = ch.endpoint(Side::A).unwrap();
            let mut b = ch.endpoint(Side::B).unwrap();
            let before = 2 + round % 6;
            for i in 0..before {
                a.send(&numbered(i), None).unwrap();
            }
            // The old producer "dies": its token no longer names a live process.
            ch.ctrl().tokens[0].store(dead_token(), Ordering::SeqCst);
            drop(a);
            let consumer = std::thread::spawn(move || {
                let mut buf = [0u8; 256];
                let give_up = Instant::now() + Duration::from_secs(20);
                let mut i = 0;
                while i < TOTAL {
                    match b.recv(&mut buf, Some(give_up)) {
                        Ok(n) => {
                            assert_eq!(&buf[..n], &numbered(i)[..], "frame {i}");
                            i += 1;
                        }
                        // Between the death and the takeover the side looks closed or dead.
                        Err(ChannelError::Closed | ChannelError::PeerDead { .. }) => {
                            assert!(Instant::now() < give_up);
                            std::thread::yield_now();
                        }
                        Err(e) => panic!("frame {i}: {e}"),
                    }
                }
            });
            let mut a2 = ch.endpoint(Side::A).unwrap();
            let deadline = Some(Instant::now() + Duration::from_secs(20));
            for i in before..TOTAL {
                a2.send(&numbered(i), deadline).unwrap();
            }
            consumer.join().unwrap();
        }
    }

    /// Review F6: `recv` writes nothing but `head`, so a consumer killed after reading a frame
    /// and before moving `head` leaves the frame intact; whoever takes over receives it whole.
    #[test]
    fn consumer_killed_before_moving_head_leaves_the_frame_intact() {
        let ch = Channel::create(256).unwrap();
        let mut a = ch.endpoint(Side::A).unwrap();
        let mut b = ch.endpoint(Side::B).unwrap();
        a.send(&numbered(7), None).unwrap();
        a.send(&numbered(8), None).unwrap();
        let head0 = ch.ring(0).0.head.load(Ordering::SeqCst);
        let mut buf = [0u8; 256];
        let n = b.recv(&mut buf, None).unwrap();
        assert_eq!(&buf[..n], &numbered(7)[..]);
        // The state of a consumer killed just before its `head` store: everything but `head`.
        ch.ring(0).0.head.store(head0, Ordering::SeqCst);
        ch.ctrl().tokens[1].store(dead_token(), Ordering::SeqCst);
        std::mem::forget(b); // a killed process runs no destructor
        let mut b2 = ch.endpoint(Side::B).unwrap();
        for i in [7, 8] {
            let n = b2.recv(&mut buf, None).unwrap();
            assert_eq!(&buf[..n], &numbered(i)[..]);
        }
        // The producer carries on from where it was.
        a.send(&numbered(9), None).unwrap();
        let n = b2.recv(&mut buf, None).unwrap();
        assert_eq!(&buf[..n], &numbered(9)[..]);
    }

    #[test]
    fn backpressure_times_out_and_small_buffer_keeps_frame() {
        let ch = Channel::create(64).unwrap();
        let mut a = ch.endpoint(Side::A).unwrap();
        let mut b = ch.endpoint(Side::B).unwrap();
        a.send(&[1u8; 40], None).unwrap();
        let soon = Some(Instant::now() + Duration::from_millis(20));
        assert!(matches!(
            a.send(&[2u8; 40], soon),
            Err(ChannelError::TimedOut)
        ));
        let mut small = [0u8; 8];
        assert!(matches!(
            b.recv(&mut small, None),
            Err(ChannelError::BufferTooSmall { needed: 40 })
        ));
        let mut big = [0u8; 64];
        assert_eq!(b.recv(&mut big, None).unwrap(), 40);
        let soon = Some(Instant::now() + Duration::from_millis(20));
        assert!(matches!(
            b.recv(&mut big, soon),
            Err(ChannelError::TimedOut)
        ));
    }

    /// Runs `f` while another thread keeps flipping `word` between `a` and `b` (a misbehaving
    /// peer), and returns what `f` returned with how long it took.
    fn with_flipping<T>(word: &AtomicU64, a: u64, b: u64, f: impl FnOnce() -> T) -> (T, Duration) {
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut v = a;
                // Bounded, so a regression fails the assertion below instead of hanging the suite.
                let until = Instant::now() + Duration::from_secs(5);
                while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                    v = if v == a { b } else { a };
                    word.store(v, Ordering::SeqCst);
                    std::hint::spin_loop();
                }
            });
            let t0 = Instant::now();
            let r = f();
            let took = t0.elapsed();
            stop.store(true, Ordering::Relaxed);
            (r, took)
        })
    }

    #[test]
    fn a_consumer_that_keeps_moving_head_cannot_hold_a_send_past_its_deadline() {
        let ch = Channel::create(64).unwrap();
        let mut a = ch.endpoint(Side::A).unwrap();
        let _b = ch.endpoint(Side::B).unwrap();
        a.send(&[1u8; 40], None).unwrap(); // 48 bytes used: no room for another 40
        let (hdr, _) = ch.ring(0);
        // 0 <-> 8: every value is in range, none frees enough room, and every change ends a wait.
        let (r, took) = with_flipping(&hdr.head, 0, 8, || {
            a.send(&[2u8; 40], Some(Instant::now() + Duration::from_millis(50)))
        });
        // Moving back from 8 to 0 is caught as corruption; if the flips are too fast to be seen
        // as a move back, the deadline ends the send.
        assert!(
            matches!(r, Err(ChannelError::TimedOut | ChannelError::Corrupt(_))),
            "{r:?}"
        );
        assert!(took < Duration::from_secs(1), "the send took {took:?}");
    }

    #[test]
    fn a_consumer_position_that_moves_back_is_corruption() {
        let ch = Channel::create(64).unwrap();
        let mut a = ch.endpoint(Side::A).unwrap();
        let mut b = ch.endpoint(Side::B).unwrap();
        a.send(&[1u8; 16], None).unwrap(); // 24 bytes: tail 24
        let mut buf = [0u8; 64];
        assert_eq!(b.recv(&mut buf, None).unwrap(), 16); // head 24
        a.send(&[2u8; 32], None).unwrap(); // 40 bytes, after reloading head = 24: tail 64
        // Back to 16: in range (8-aligned, 48 bytes in use), but behind what the producer saw.
        ch.ring(0).0.head.store(16, Ordering::SeqCst);
        let soon = Some(Instant::now() + Duration::from_millis(20));
        let r = a.send(&[3u8; 16], soon);
        assert!(matches!(r, Err(ChannelError::Corrupt(_))), "{r:?}");
    }

    #[test]
    fn a_bounded_receive_drops_a_longer_frame_without_allocating_for_it() {
        let ch = Channel::create(4096).unwrap();
        let mut a = ch.endpoint(Side::A).unwrap();
        let mut b = ch.endpoint(Side::B).unwrap();
        a.send(&[1u8; 3000], None).unwrap();
        a.send(&[2u8; 10], None).unwrap();
        let mut buf = Vec::new();
        assert!(matches!(
            b.recv_append_max(&mut buf, 100, None),
            Err(ChannelError::FrameTooLarge {
                len: 3000,
                max: 100
            })
        ));
        assert_eq!(
            buf.capacity(),
            0,
            "nothing was allocated for the dropped frame"
        );
        assert_eq!(b.recv_append_max(&mut buf, 100, None).unwrap(), 10);
        assert_eq!(buf, [2u8; 10]);
    }

    #[test]
    fn close_delivers_pending_then_reports_closed() {
        let ch = Channel::create(256).unwrap();
        let mut a = ch.endpoint(Side::A).unwrap();
        let mut b = ch.endpoint(Side::B).unwrap();
        a.send(b"last words", None).unwrap();
        drop(a);
        let mut buf = [0u8; 32];
        assert_eq!(b.recv(&mut buf, None).unwrap(), 10);
        assert!(matches!(b.recv(&mut buf, None), Err(ChannelError::Closed)));
        assert!(matches!(b.send(b"x", None), Err(ChannelError::Closed)));
    }

    #[test]
    fn threads_stream_many_frames() {
        let ch = Channel::create(1024).unwrap();
        let mut a = ch.endpoint(Side::A).unwrap();
        let mut b = ch.endpoint(Side::B).unwrap();
        let t = std::thread::spawn(move || {
            for i in 0..20_000u32 {
                let len = (i % 100) as usize;
                let msg = vec![(i % 251) as u8; len];
                a.send(&msg, None).unwrap();
            }
        });
        let mut buf = [0u8; 128];
        for i in 0..20_000u32 {
            let n = b.recv(&mut buf, None).unwrap();
            assert_eq!(n, (i % 100) as usize);
            assert!(buf[..n].iter().all(|&x| x == (i % 251) as u8));
        }
        t.join().unwrap();
    }

    /// The ring size of the corrupt-state property.
    const FUZZ_CAP: usize = 128;

    /// A header word as a peer could leave it: a length in range, one just past the largest frame,
    /// the largest value, or anything.
    fn fuzz_header_word() -> impl proptest::strategy::Strategy<Value = u32> {
        use proptest::prelude::*;
        let cap = FUZZ_CAP as u32;
        // The word holds `len + 1`; 0 means no frame.
        prop_oneof![
            (0..=cap - 16).prop_map(|len| len + 1),
            (cap - 15..=cap).prop_map(|len| len + 1),
            Just(u32::MAX),
            any::<u32>(),
        ]
    }

    proptest::proptest! {
        /// The frame decoder reads positions, headers and lengths from shared memory a peer
        /// controls: arbitrary values give frames no longer than the largest frame (`cap - 16`)
        /// that fit the caller's buffer, or errors; never a panic, an out-of-bounds access, an
        /// allocation beyond the ring's size or a hang. Positions are 8-aligned (misaligned ones
        /// are refused at attach, which would end the case before any frame is read) and the
        /// header word at the receive position is drawn from the interesting ranges.
        #[test]
        fn corrupt_ring_state_is_an_error_not_a_panic(
            head_word in 0u64..(FUZZ_CAP as u64 / 8),
            wraps in proptest::prelude::any::<u64>(),
            word in fuzz_header_word(),
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), FUZZ_CAP),
            tx_bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), FUZZ_CAP),
            tx_head_word in 0u64..(FUZZ_CAP as u64 / 8),
            tx_committed in proptest::prelude::any::<bool>(),
            tail: u64,
            buf_len in 0usize..=2 * FUZZ_CAP,
            ops in proptest::collection::vec(0u8..4, 1..6),
        ) {
            let cap = FUZZ_CAP;
            let max_frame = cap - 16;
            let ch = Channel::create(cap).unwrap();
            // Side B receives on ring 0 and sends on ring 1.
            // Positions count bytes ever sent, so any multiple of `cap` may precede the offset.
            let base = wraps.wrapping_mul(cap as u64);
            let head = base.wrapping_add(head_word * 8);
            let tx_head = base.wrapping_add(tx_head_word * 8);
            let fill = |r: usize, bytes: &[u8], head: u64| {
                let (hdr, data) = ch.ring(r);
                hdr.head.store(head, Ordering::SeqCst);
                hdr.tail.store(tail, Ordering::SeqCst);
                for (i, x) in bytes.iter().enumerate() {
                    // SAFETY: `i < cap`, inside the ring of a channel only this test uses.
                    unsafe { data.wrapping_add(i).write_volatile(*x) };
                }
            };
            fill(0, &bytes, head);
            fill(1, &tx_bytes, tx_head);
            let (_, data) = ch.ring(0);
            ch.header(data, head).store(word, Ordering::SeqCst);
            if !tx_committed {
                // Half the cases commit nothing on our send ring, so that attach (which walks its frames)
                // succeeds and the receive path is reached.
                let (_, data) = ch.ring(1);
                ch.header(data, tx_head).store(0, Ordering::SeqCst);
            }
            let soon = || Some(Instant::now());
            let Ok(mut b) = ch.endpoint(Side::B) else {
                return Ok(());
            };
            let mut buf = vec![0u8; buf_len];
            for op in ops {
                let mut v = Vec::new();
                let r = match op {
                    0 => b.recv(&mut buf, soon()).inspect(|&n| {
                        assert!(n <= buf_len, "{n} bytes into a buffer of {buf_len}");
                    }),
                    1 => b.recv_append(&mut v, soon()),
                    2 => b.recv_append_max(&mut v, usize::MAX, soon()),
                    _ => b.recv_append_max(&mut v, 24, soon()).inspect(|&n| {
                        assert!(n <= 24, "{n} bytes under a bound of 24");
                    }),
                };
                proptest::prop_assert!(
                    v.capacity() <= cap,
                    "{} bytes reserved for a ring of {cap}: {r:?}",
                    v.capacity()
                );
                match r {
                    Ok(n) => {
                        proptest::prop_assert!(n <= max_frame, "a frame of {n} bytes: {op}");
                        if op != 0 {
                            proptest::prop_assert_eq!(v.len(), n);
                        }
                    }
                    // The frame stays queued; the next operation may take it with a larger buffer.
                    Err(ChannelError::BufferTooSmall { needed }) => {
                        proptest::prop_assert!(op == 0 && needed > buf_len && needed <= max_frame, "{needed}");
                    }
                    Err(ChannelError::FrameTooLarge { len, max }) => {
                        proptest::prop_assert!(op == 3 && len > max && len <= max_frame, "{len} > {max}");
                    }
                    Err(_) => break,
                }
            }
            let _ = b.send(&[1, 2, 3], soon());
        }
    }
}
