//! The process-shared allocator: pure bookkeeping over a block of memory, with no system calls, so
//! that Miri can run it over a heap buffer.
//!
//! # Layout
//!
//! The heap is an array of `2^chunk_shift`-byte chunks starting at `base` (chunk-aligned). The first
//! `mgmt_chunks` chunks hold the management area, which is never unmapped while the heap lives:
//!
//! ```text
//! [Header][ChunkMeta; max_chunks][bitmap words; max_chunks * words_per_chunk] ... chunk data
//! ```
//!
//! Every chunk is either management, free, a *small chunk* carved into equal blocks of one size class
//! (occupancy: one bit per block in the chunk's bitmap, stored in the management area, not in the
//! chunk), or part of a *large run* of whole chunks. All bookkeeping lives in the management area, so a
//! chunk's memory can be returned to the system without touching anything another process might read.
//!
//! # Crash consistency by construction
//!
//! Every transition is a single atomic operation on one word, so a process killed at any instruction
//! leaves every word in a valid state. The worst it can do is *leak*: a bit set for a block nobody
//! holds, or a chunk left in a transitional state owned by its slot (`CLAIMING`, `FREEING`,
//! `RETIRING`, `PUNCHING`), which [`RawHeap::reclaim_slot`] returns once that process is known dead.
//!
//! Chunk state word (`ChunkMeta::state`), one `u64`:
//!
//! | kind (bits 0..8) | bits 8..16 | bits 16..32 | bits 32..64 | meaning |
//! |---|---|---|---|---|
//! | `FREE` (0) | 0 | 0 | 0 | unused; any process may claim it with a CAS |
//! | `MGMT` | 0 | 0 | 0 | management area, never allocated |
//! | `SMALL` | class | 0 | 0 | blocks of one class; bitmap bit = block in use |
//! | `LARGE_HEAD` | 0 | 0 | n chunks | first chunk of a live large block |
//! | `LARGE_TAIL` | 0 | 0 | distance to head | rest of a live large block |
//! | `CLAIMING` | 0 | slot | 0 | being claimed by `slot` (FREE -> SMALL/LARGE) |
//! | `FREEING` | 0 | slot | n chunks | large block being freed by `slot` |
//! | `RETIRING` | class | slot | 0 | small chunk checked for emptiness by `slot` |
//! | `PUNCHING` | 0 | slot | 0 | free chunk whose pages `slot` is returning to the system |
//! | `RELEASED` | 0 | 0 | 0 | its memory has been unmapped everywhere; never used again |
//!
//! Transitions (CAS unless noted): FREE -> CLAIMING -> SMALL | LARGE_TAIL/LARGE_HEAD (stores by the
//! claimer, who owns the chunk); LARGE_HEAD -> FREEING -> (tails FREE, then head FREE, stores by the
//! freer); SMALL -> RETIRING -> FREE | SMALL; FREE -> PUNCHING -> FREE; FREE -> RELEASED.
//!
//! Small blocks: allocation CASes a 0 bit to 1, then re-reads the chunk state; free clears the bit with
//! `fetch_and` and reports a double free if it was already clear. Retiring a small chunk CASes its
//! state to `RETIRING`, then reads the bitmap. The re-reads are read-modify-writes, which makes this
//! Dekker's pattern exact under acquire/release (argued in [`crate::protocol`], model-checked by
//! `tests/loom_alloc.rs`): either the retirer sees the new bit and restores `SMALL`, or the allocator
//! sees `RETIRING` (or anything but `SMALL(class)`) and clears its bit again. A bit is only ever
//! cleared by the process that set it (undo) or by a `free` of that block, so no block is handed out
//! twice.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::AllocError;
use crate::protocol::{self, Claim, Retire};

/// Magic number at the start of the management area ("ctxfpool").
const MAGIC: u64 = 0x6374_7866_706f_6f6c;
/// Layout version of the management area.
const VERSION: u64 = 1;
/// Smallest block, and the granularity of a chunk bitmap.
pub const MIN_BLOCK: usize = 16;
/// Largest block served from a small chunk; bigger requests take whole chunks.
pub const MAX_SMALL: usize = 32 * 1024;
/// Smallest chunk (so that every small class fits at least twice).
pub const MIN_CHUNK_SHIFT: u32 = 16;
/// Largest chunk.
pub const MAX_CHUNK_SHIFT: u32 = 30;

/// The size classes of small blocks. Each block of class `s` at index `i` of a chunk starts at
/// `i * s`, so its alignment is the lowest set bit of `s` (chunk bases are chunk-aligned).
pub const CLASSES: [u32; 40] = [
    16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024,
    1280, 1536, 1792, 2048, 2560, 3072, 3584, 4096, 5120, 6144, 7168, 8192, 10240, 12288, 14336,
    16384, 20480, 24576, 28672, 32768,
];
const NCLASS: usize = CLASSES.len();

const K_FREE: u64 = 0;
const K_MGMT: u64 = 1;
const K_SMALL: u64 = 2;
const K_HEAD: u64 = 3;
const K_TAIL: u64 = 4;
const K_CLAIMING: u64 = 5;
const K_FREEING: u64 = 6;
const K_RETIRING: u64 = 7;
const K_PUNCHING: u64 = 8;
const K_RELEASED: u64 = 9;

/// Set in `ChunkMeta::aux` when an allocator found the chunk full (a hint only).
const AUX_FULL: u64 = 1 << 63;

const fn st(kind: u64, class: u64, slot: u64, hi: u64) -> u64 {
    kind | (class << 8) | (slot << 16) | (hi << 32)
}
const fn kind(s: u64) -> u64 {
    s & 0xff
}
const fn class_of(s: u64) -> usize {
    ((s >> 8) & 0xff) as usize
}
const fn slot_of(s: u64) -> u16 {
    ((s >> 16) & 0xffff) as u16
}
const fn hi(s: u64) -> u64 {
    s >> 32
}

/// The shape of a heap: chunk size and chunk count. Each process keeps its own copy (it never reads
/// the geometry back from shared memory for its own decisions).
///
/// INVARIANTS: `MIN_CHUNK_SHIFT <= chunk_shift <= MAX_CHUNK_SHIFT`; `mgmt_chunks < max_chunks`;
/// `max_chunks << chunk_shift` fits in `usize`; `max_chunks <= u32::MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    chunk_shift: u32,
    max_chunks: u64,
    mgmt_chunks: u64,
}

#[repr(C)]
struct Header {
    magic: AtomicU64,
    version: AtomicU64,
    chunk_shift: AtomicU64,
    max_chunks: AtomicU64,
    mgmt_chunks: AtomicU64,
    /// Chunks `[0, limit)` are mapped in every process. Raised only after a growth barrier.
    limit: AtomicU64,
    /// A chunk index below which every chunk was recently seen in use (a hint).
    free_hint: AtomicU64,
    /// Per class: 1 + the chunk allocations of this class try first (0: none). A hint.
    class_hint: [AtomicU64; NCLASS],
}

#[repr(C)]
struct ChunkMeta {
    state: AtomicU64,
    /// Small chunks: index of a bitmap word likely to have a free bit, plus `AUX_FULL`. A hint.
    aux: AtomicU64,
}

const fn align_up(v: usize, a: usize) -> usize {
    (v + a - 1) & !(a - 1)
}

impl Geometry {
    /// A geometry of `max_chunks` chunks of `2^chunk_shift` bytes.
    ///
    /// # Errors
    /// [`AllocError::BadGeometry`] if the chunk size is outside 64 KiB..=1 GiB, or the chunk count
    /// leaves no room for data after the management area, or the total overflows.
    pub fn new(chunk_shift: u32, max_chunks: u64) -> Result<Self, AllocError> {
        if !(MIN_CHUNK_SHIFT..=MAX_CHUNK_SHIFT).contains(&chunk_shift)
            || max_chunks > u64::from(u32::MAX)
        {
            return Err(AllocError::BadGeometry);
        }
        (max_chunks as usize)
            .checked_mul(1usize << chunk_shift)
            .ok_or(AllocError::BadGeometry)?;
        let chunk = 1usize << chunk_shift;
        let words = Self::words_per_chunk_for(chunk_shift);
        let bytes = Self::meta_offset()
            .checked_add(
                (max_chunks as usize)
                    .checked_mul(size_of::<ChunkMeta>())
                    .ok_or(AllocError::BadGeometry)?,
            )
            .and_then(|v| v.checked_add((max_chunks as usize).checked_mul(words * 8)?))
            .ok_or(AllocError::BadGeometry)?;
        let mgmt_chunks = (align_up(bytes, chunk) / chunk) as u64;
        if mgmt_chunks >= max_chunks {
            return Err(AllocError::BadGeometry);
        }
        Ok(Self {
            chunk_shift,
            max_chunks,
            mgmt_chunks,
        })
    }

    fn words_per_chunk_for(shift: u32) -> usize {
        ((1usize << shift) / MIN_BLOCK).div_ceil(64)
    }
    fn meta_offset() -> usize {
        align_up(size_of::<Header>(), 64)
    }
    fn bitmap_offset(&self) -> usize {
        Self::meta_offset() + self.max_chunks as usize * size_of::<ChunkMeta>()
    }

    /// Bytes per chunk.
    #[must_use]
    pub fn chunk_size(&self) -> usize {
        1 << self.chunk_shift
    }
    /// Total chunks (management included).
    #[must_use]
    pub fn max_chunks(&self) -> u64 {
        self.max_chunks
    }
    /// Bytes the whole heap spans (management area included).
    #[must_use]
    pub fn span(&self) -> usize {
        (self.max_chunks as usize) << self.chunk_shift
    }
    /// Bytes of management area at the start of the heap (a whole number of chunks). This is the
    /// allocator's management-size query: it is known before any memory exists.
    #[must_use]
    pub fn management_size(&self) -> usize {
        (self.mgmt_chunks as usize) << self.chunk_shift
    }
    /// Chunks taken by the management area.
    #[must_use]
    pub fn mgmt_chunks(&self) -> u64 {
        self.mgmt_chunks
    }
}

/// Per-class and per-kind counts computed by scanning the bookkeeping (nothing is counted on the hot
/// path, so the figures are exact at a quiescent moment and crash-consistent by construction).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes per chunk.
    pub chunk_size: u64,
    /// Chunks mapped (management included).
    pub mapped_chunks: u64,
    /// Chunks of management area.
    pub mgmt_chunks: u64,
    /// Free chunks below the mapped limit.
    pub free_chunks: u64,
    /// Chunks carved into small blocks.
    pub small_chunks: u64,
    /// Chunks held by live large blocks.
    pub large_chunks: u64,
    /// Live large blocks.
    pub large_blocks: u64,
    /// Chunks returned to the system (their region was released).
    pub released_chunks: u64,
    /// Chunks in a transitional state (an operation in flight, or left by a dead process).
    pub transitional_chunks: u64,
    /// Live small blocks per class, indexed like [`CLASSES`].
    pub live_blocks: Vec<u64>,
    /// Bytes held by live blocks (small blocks at their class size, large at whole chunks).
    pub live_bytes: u64,
}

/// The result of [`RawHeap::check`].
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    /// Violations of the structure's invariants. Empty means consistent.
    pub problems: Vec<String>,
    /// Bits set beyond a class's block count (leaked by a crash racing a retirement; harmless).
    pub stray_bits: u64,
    /// Statistics gathered in the same pass.
    pub stats: Stats,
}

impl CheckReport {
    /// Whether no invariant is violated.
    #[must_use]
    pub fn is_consistent(&self) -> bool {
        self.problems.is_empty()
    }
}

/// A process's handle on a heap: the base address, its private geometry and the slot it writes into
/// transitional states. Plain data; `Copy` so each process can keep its own.
#[derive(Debug, Clone, Copy)]
pub struct RawHeap {
    base: NonNull<u8>,
    geo: Geometry,
    slot: u16,
}

// SAFETY: a RawHeap only reaches shared memory through atomics; the memory is owned by whoever
// created the heap and outlives every handle by the contract of `RawHeap::init`/`attach`.
unsafe impl Send for RawHeap {}
// SAFETY: as above; all methods take `&self` and use atomic operations only.
unsafe impl Sync for RawHeap {}

/// The class index for a request, or `None` for the large path.
fn class_for(size: usize, align: usize) -> Option<usize> {
    if size > MAX_SMALL || align > MAX_SMALL {
        return None;
    }
    let size = size.max(1);
    let start = if size <= 128 {
        size.div_ceil(16) - 1
    } else {
        7
    };
    (start..NCLASS).find(|&c| {
        let s = CLASSES[c] as usize;
        s >= size && (s & s.wrapping_neg()) >= align
    })
}

impl RawHeap {
    /// Initialises a heap in place over `[base, base + geo.span())` and returns the creator's handle
    /// (slot 0). Only the first `limit_chunks` chunks may be touched until [`RawHeap::raise_limit`].
    ///
    /// # Safety
    /// - `base` must be aligned to `geo.chunk_size()`;
    /// - the first `geo.management_size()` bytes and the first `limit_chunks` chunks must be mapped,
    ///   readable, writable and zero-filled, and must stay mapped (management area: for as long as any
    ///   handle is used) with no other Rust object living in them;
    /// - no other process may use the memory until this returns.
    pub unsafe fn init(
        base: NonNull<u8>,
        geo: Geometry,
        limit_chunks: u64,
    ) -> Result<Self, AllocError> {
        if base.as_ptr() as usize & (geo.chunk_size() - 1) != 0
            || limit_chunks <= geo.mgmt_chunks
            || limit_chunks > geo.max_chunks
        {
            return Err(AllocError::BadGeometry);
        }
        let h = Self { base, geo, slot: 0 };
        let hd = h.header();
        hd.chunk_shift
            .store(u64::from(geo.chunk_shift), Ordering::Relaxed);
        hd.max_chunks.store(geo.max_chunks, Ordering::Relaxed);
        hd.mgmt_chunks.store(geo.mgmt_chunks, Ordering::Relaxed);
        hd.limit.store(limit_chunks, Ordering::Relaxed);
        hd.free_hint.store(geo.mgmt_chunks, Ordering::Relaxed);
        for i in 0..geo.mgmt_chunks {
            h.meta(i)
                .state
                .store(st(K_MGMT, 0, 0, 0), Ordering::Relaxed);
        }
        hd.version.store(VERSION, Ordering::Relaxed);
        // Release: a process that sees the magic sees the initialised header.
        hd.magic.store(MAGIC, Ordering::Release);
        Ok(h)
    }

    /// The same heap as seen by another participant writing `slot` into transitional states.
    /// Slot 0 is the creator's; each concurrently live process must use its own slot.
    #[must_use]
    pub fn with_slot(self, slot: u16) -> Self {
        Self { slot, ..self }
    }

    /// This handle's slot.
    #[must_use]
    pub fn slot(&self) -> u16 {
        self.slot
    }

    /// The heap's geometry (this process's copy).
    #[must_use]
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// The base address.
    #[must_use]
    pub fn base(&self) -> NonNull<u8> {
        self.base
    }

    fn header(&self) -> &Header {
        // SAFETY: `base` is chunk-aligned (>= 64 KiB, so aligned for Header) and the management area
        // (which starts with the header) stays mapped while handles exist (contract of `init`).
        // Header holds only atomics, so a shared reference is sound even while other processes write.
        unsafe { &*self.base.as_ptr().cast::<Header>() }
    }

    fn meta(&self, i: u64) -> &ChunkMeta {
        debug_assert!(i < self.geo.max_chunks);
        let off = Geometry::meta_offset() + i as usize * size_of::<ChunkMeta>();
        // SAFETY: `i < max_chunks` (all callers loop below it or bound-check), so `off` lies inside
        // the management area (Geometry::new sized it), 16-aligned; ChunkMeta holds only atomics.
        unsafe { &*self.base.as_ptr().wrapping_add(off).cast::<ChunkMeta>() }
    }

    fn word(&self, i: u64, w: usize) -> &AtomicU64 {
        let words = Geometry::words_per_chunk_for(self.geo.chunk_shift);
        debug_assert!(i < self.geo.max_chunks && w < words);
        let off = self.geo.bitmap_offset() + (i as usize * words + w) * 8;
        // SAFETY: `i < max_chunks` and `w < words_per_chunk` (callers derive `w` from block indices
        // below the class's block count), so `off` is inside the management area, 8-aligned.
        unsafe { &*self.base.as_ptr().wrapping_add(off).cast::<AtomicU64>() }
    }

    /// Verifies that the management area carries this handle's magic and geometry (a cheap check a
    /// process makes before trusting a mapping it inherited or received).
    ///
    /// # Errors
    /// [`AllocError::Corrupt`] on any mismatch.
    pub fn verify_header(&self) -> Result<(), AllocError> {
        let h = self.header();
        let ok = h.magic.load(Ordering::Acquire) == MAGIC
            && h.version.load(Ordering::Relaxed) == VERSION
            && h.chunk_shift.load(Ordering::Relaxed) == u64::from(self.geo.chunk_shift)
            && h.max_chunks.load(Ordering::Relaxed) == self.geo.max_chunks
            && h.mgmt_chunks.load(Ordering::Relaxed) == self.geo.mgmt_chunks;
        if ok {
            Ok(())
        } else {
            Err(AllocError::Corrupt(
                "management header does not match".into(),
            ))
        }
    }

    /// Chunks `[0, limit)` are usable. Read from shared memory, clamped to this process's geometry.
    #[must_use]
    pub fn limit(&self) -> u64 {
        self.header()
            .limit
            .load(Ordering::Acquire)
            .min(self.geo.max_chunks)
    }

    /// Makes chunks below `limit` available to allocation.
    ///
    /// # Safety
    /// Chunks `[old limit, limit)` must be mapped (zero-filled, shared) in **every** process that
    /// uses this heap, now and in any process created later.
    pub unsafe fn raise_limit(&self, limit: u64) -> Result<(), AllocError> {
        if limit > self.geo.max_chunks {
            return Err(AllocError::BadGeometry);
        }
        self.header().limit.fetch_max(limit, Ordering::AcqRel);
        Ok(())
    }

    fn chunk_addr(&self, i: u64) -> usize {
        self.base.as_ptr() as usize + ((i as usize) << self.geo.chunk_shift)
    }

    /// A pointer with the heap's provenance at address `addr` (inside the heap).
    fn ptr_at(&self, addr: usize) -> NonNull<u8> {
        // `with_addr` keeps the base pointer's provenance (strict provenance, Miri-clean).
        self.base
            .with_addr(std::num::NonZeroUsize::new(addr).unwrap_or(std::num::NonZeroUsize::MIN))
    }

    /// Allocates `size` bytes aligned to `align` (a power of two).
    ///
    /// # Errors
    /// [`AllocError::OutOfMemory`] when no mapped chunk can serve the request;
    /// [`AllocError::BadLayout`] for a zero or non-power-of-two alignment or an alignment above the
    /// chunk size.
    pub fn alloc(&self, size: usize, align: usize) -> Result<NonNull<u8>, AllocError> {
        if align == 0 || !align.is_power_of_two() || align > self.geo.chunk_size() {
            return Err(AllocError::BadLayout);
        }
        match class_for(size, align) {
            Some(c) if (CLASSES[c] as usize) * 2 <= self.geo.chunk_size() => self.alloc_small(c),
            _ => {
                let n = size.max(1).div_ceil(self.geo.chunk_size()) as u64;
                self.alloc_large(n)
            }
        }
    }

    fn alloc_small(&self, c: usize) -> Result<NonNull<u8>, AllocError> {
        let hd = self.header();
        let limit = self.limit();
        let hint = hd.class_hint[c].load(Ordering::Relaxed);
        if hint > self.geo.mgmt_chunks && hint <= limit {
            if let Some(p) = self.try_chunk(hint - 1, c) {
                return Ok(p);
            }
        }
        // Slow path 1: another chunk of this class not known to be full.
        let want = st(K_SMALL, c as u64, 0, 0);
        for i in self.geo.mgmt_chunks..limit {
            let m = self.meta(i);
            if m.state.load(Ordering::Relaxed) == want
                && m.aux.load(Ordering::Relaxed) & AUX_FULL == 0
            {
                if let Some(p) = self.try_chunk(i, c) {
                    hd.class_hint[c].store(i + 1, Ordering::Relaxed);
                    return Ok(p);
                }
            }
        }
        // Slow path 2: a fresh chunk.
        let i = self.claim_run(1).ok_or(AllocError::OutOfMemory)?;
        let m = self.meta(i);
        m.aux.store(0, Ordering::Relaxed);
        // Release: whoever sees SMALL(c) sees aux reset. The bitmap is all clear here except for bits
        // being undone by a racing allocator (they clear only their own bits; see module docs).
        m.state.store(want, Ordering::Release);
        hd.class_hint[c].store(i + 1, Ordering::Relaxed);
        // The fresh chunk may be raced for, but it has blocks unless every one was taken meanwhile.
        self.try_chunk(i, c).map_or_else(|| self.alloc_small(c), Ok)
    }

    fn try_chunk(&self, i: u64, c: usize) -> Option<NonNull<u8>> {
        let want = st(K_SMALL, c as u64, 0, 0);
        let m = self.meta(i);
        if m.state.load(Ordering::Acquire) != want {
            return None;
        }
        let size = CLASSES[c] as usize;
        let nblocks = self.geo.chunk_size() / size;
        let nwords = nblocks.div_ceil(64);
        let start = (m.aux.load(Ordering::Relaxed) & !AUX_FULL) as usize % nwords;
        for k in 0..nwords {
            let w = (start + k) % nwords;
            let valid = if w == nwords - 1 && nblocks % 64 != 0 {
                (1u64 << (nblocks % 64)) - 1
            } else {
                u64::MAX
            };
            match protocol::claim_bit(self.word(i, w), &m.state, want, valid) {
                Claim::Got(b) => {
                    if w != start {
                        m.aux.store(w as u64, Ordering::Relaxed);
                    }
                    let idx = w * 64 + b as usize;
                    return Some(self.ptr_at(self.chunk_addr(i) + idx * size));
                }
                Claim::Full => {}
                Claim::Lost => return None,
            }
        }
        m.aux.store(AUX_FULL | start as u64, Ordering::Relaxed);
        None
    }

    /// Claims `n` consecutive free chunks (state CLAIMING(slot)); returns the first index.
    fn claim_run(&self, n: u64) -> Option<u64> {
        let hd = self.header();
        let limit = self.limit();
        let lo = self.geo.mgmt_chunks;
        if n == 0 || lo + n > limit {
            return None;
        }
        let hint = hd.free_hint.load(Ordering::Relaxed).clamp(lo, limit);
        // First from the hint, then once from the start (the hint may have skipped a freed chunk).
        for start in [hint, lo] {
            let mut i = start;
            while i + n <= limit {
                let mut j = 0;
                while j < n && self.meta(i + j).state.load(Ordering::Relaxed) == K_FREE {
                    j += 1;
                }
                if j < n {
                    i += j + 1;
                    continue;
                }
                let claim = st(K_CLAIMING, 0, u64::from(self.slot), 0);
                let mut got = 0;
                while got < n {
                    let m = self.meta(i + got);
                    if m.state
                        .compare_exchange(K_FREE, claim, Ordering::AcqRel, Ordering::Relaxed)
                        .is_err()
                    {
                        break;
                    }
                    got += 1;
                }
                if got == n {
                    if i == hint {
                        let _ = hd.free_hint.compare_exchange(
                            hint,
                            i + n,
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        );
                    }
                    return Some(i);
                }
                for k in 0..got {
                    self.meta(i + k).state.store(K_FREE, Ordering::Release);
                }
                i += got + 1;
            }
            if start == lo {
                break;
            }
        }
        None
    }

    fn alloc_large(&self, n: u64) -> Result<NonNull<u8>, AllocError> {
        if n >= self.geo.max_chunks || n > u64::from(u32::MAX) {
            return Err(AllocError::OutOfMemory);
        }
        let i = self.claim_run(n).ok_or(AllocError::OutOfMemory)?;
        for d in 1..n {
            self.meta(i + d)
                .state
                .store(st(K_TAIL, 0, 0, d), Ordering::Release);
        }
        self.meta(i)
            .state
            .store(st(K_HEAD, 0, 0, n), Ordering::Release);
        Ok(self.ptr_at(self.chunk_addr(i)))
    }

    /// The usable size of the live block at `ptr`.
    ///
    /// # Errors
    /// [`AllocError::ForeignPointer`] if `ptr` is not the start of a live block of this heap.
    pub fn usable_size(&self, ptr: NonNull<u8>) -> Result<usize, AllocError> {
        let (i, in_chunk) = self.locate(ptr)?;
        let s = self.meta(i).state.load(Ordering::Acquire);
        match kind(s) {
            K_SMALL | K_RETIRING if class_of(s) < NCLASS => {
                let size = CLASSES[class_of(s)] as usize;
                let idx = in_chunk / size;
                if in_chunk % size != 0 || idx >= self.geo.chunk_size() / size {
                    return Err(AllocError::ForeignPointer);
                }
                if self.word(i, idx / 64).load(Ordering::Acquire) & (1 << (idx % 64)) == 0 {
                    return Err(AllocError::ForeignPointer);
                }
                Ok(size)
            }
            K_HEAD if in_chunk == 0 => Ok((hi(s) as usize) << self.geo.chunk_shift),
            _ => Err(AllocError::ForeignPointer),
        }
    }

    fn locate(&self, ptr: NonNull<u8>) -> Result<(u64, usize), AllocError> {
        let addr = ptr.as_ptr() as usize;
        let base = self.base.as_ptr() as usize;
        let off = addr.checked_sub(base).ok_or(AllocError::ForeignPointer)?;
        let i = (off >> self.geo.chunk_shift) as u64;
        if i < self.geo.mgmt_chunks || i >= self.limit() {
            return Err(AllocError::ForeignPointer);
        }
        Ok((i, off & (self.geo.chunk_size() - 1)))
    }

    /// Frees the block at `ptr`.
    ///
    /// # Errors
    /// [`AllocError::ForeignPointer`] if `ptr` is not the start of a block of this heap;
    /// [`AllocError::DoubleFree`] if the block is not live. The heap is unchanged in both cases.
    /// A second free is caught while the block's address has not been handed out again; once a
    /// later allocation got the same address, a stale pointer names that block (as with any
    /// allocator: the usual ABA limit), and freeing it frees the new owner's block.
    pub fn free(&self, ptr: NonNull<u8>) -> Result<(), AllocError> {
        let (i, in_chunk) = self.locate(ptr)?;
        let m = self.meta(i);
        loop {
            let s = m.state.load(Ordering::Acquire);
            match kind(s) {
                K_SMALL | K_RETIRING if class_of(s) < NCLASS => {
                    let size = CLASSES[class_of(s)] as usize;
                    let idx = in_chunk / size;
                    if in_chunk % size != 0 || idx >= self.geo.chunk_size() / size {
                        return Err(AllocError::ForeignPointer);
                    }
                    let w = idx / 64;
                    if !protocol::free_bit(self.word(i, w), (idx % 64) as u32) {
                        return Err(AllocError::DoubleFree);
                    }
                    m.aux.store(w as u64, Ordering::Relaxed);
                    return Ok(());
                }
                K_HEAD if in_chunk == 0 => {
                    let n = hi(s);
                    let freeing = st(K_FREEING, 0, u64::from(self.slot), n);
                    if m.state
                        .compare_exchange(s, freeing, Ordering::AcqRel, Ordering::Relaxed)
                        .is_err()
                    {
                        continue; // raced with another free of the same pointer: look again
                    }
                    self.finish_large_free(i, n);
                    return Ok(());
                }
                K_FREE | K_FREEING | K_CLAIMING | K_PUNCHING if in_chunk == 0 => {
                    return Err(AllocError::DoubleFree);
                }
                _ => return Err(AllocError::ForeignPointer),
            }
        }
    }

    fn finish_large_free(&self, i: u64, n: u64) {
        let end = (i + n).min(self.geo.max_chunks);
        // Tails from the far end, so that the tails still standing always follow the head directly
        // (what `check` and `reclaim_slot` expect of a FREEING run).
        for j in (i + 1..end).rev() {
            self.meta(j).state.store(K_FREE, Ordering::Release);
        }
        self.meta(i).state.store(K_FREE, Ordering::Release);
        self.header().free_hint.fetch_min(i, Ordering::Relaxed);
    }

    /// Returns chunks that hold no live block to the free state, calling `punch(addr, len)` on each
    /// free chunk (while no other process can claim it) if given; `punch` says whether it returned
    /// the pages. Returns how many small chunks were retired plus how many free chunks `punch`
    /// returned. (A free chunk is punched again on every call: the state does not record a punch,
    /// and punching a hole is cheap.)
    pub fn trim(&self, mut punch: Option<&mut dyn FnMut(usize, usize) -> bool>) -> u64 {
        let mut done = 0;
        let slot = u64::from(self.slot);
        for i in self.geo.mgmt_chunks..self.limit() {
            let m = self.meta(i);
            let s = m.state.load(Ordering::Acquire);
            match kind(s) {
                K_SMALL => {
                    let retiring = st(K_RETIRING, class_of(s) as u64, slot, 0);
                    let words = Geometry::words_per_chunk_for(self.geo.chunk_shift);
                    let on_empty = || {
                        if let Some(p) = punch.as_mut() {
                            // Retired either way; a failed punch only keeps the pages.
                            let _ = p(self.chunk_addr(i), self.geo.chunk_size());
                        }
                    };
                    let r = protocol::retire(
                        &m.state,
                        s,
                        retiring,
                        (0..words).map(|w| self.word(i, w)),
                        on_empty,
                    );
                    if r == Retire::Retired {
                        self.header().free_hint.fetch_min(i, Ordering::Relaxed);
                        done += 1;
                    }
                }
                K_FREE => {
                    if let Some(p) = punch.as_mut() {
                        let punching = st(K_PUNCHING, 0, slot, 0);
                        if m.state
                            .compare_exchange(K_FREE, punching, Ordering::AcqRel, Ordering::Relaxed)
                            .is_ok()
                        {
                            let punched = p(self.chunk_addr(i), self.geo.chunk_size());
                            m.state.store(K_FREE, Ordering::Release);
                            done += u64::from(punched);
                        }
                    }
                }
                _ => {}
            }
        }
        done
    }

    /// Marks chunks `[from, to)` released if every one is free (retiring empty small chunks first).
    /// On failure no chunk is left released; empty small chunks it retired on the way stay free
    /// (as after [`RawHeap::trim`]).
    ///
    /// # Errors
    /// [`AllocError::InUse`] if a chunk in the range holds a live block or an operation in flight.
    pub fn release_chunks(&self, from: u64, to: u64) -> Result<(), AllocError> {
        if from < self.geo.mgmt_chunks || to > self.geo.max_chunks || from >= to {
            return Err(AllocError::BadGeometry);
        }
        let mut done = from;
        let mut ok = true;
        for i in from..to {
            let m = self.meta(i);
            let mut s = m.state.load(Ordering::Acquire);
            if kind(s) == K_SMALL {
                // Retire it if empty (same protocol as trim).
                let retiring = st(K_RETIRING, class_of(s) as u64, u64::from(self.slot), 0);
                let words = Geometry::words_per_chunk_for(self.geo.chunk_shift);
                let words = (0..words).map(|w| self.word(i, w));
                if protocol::retire(&m.state, s, retiring, words, || ()) == Retire::Retired {
                    s = K_FREE;
                }
            }
            if kind(s) == K_RELEASED {
                continue;
            }
            if m.state
                .compare_exchange(K_FREE, K_RELEASED, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                ok = false;
                done = i;
                break;
            }
            done = i + 1;
        }
        if ok {
            return Ok(());
        }
        for i in from..done {
            let _ = self.meta(i).state.compare_exchange(
                K_RELEASED,
                K_FREE,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
        Err(AllocError::InUse)
    }

    /// Repairs what a dead process left in transitional states: chunks it was claiming become free,
    /// a large block it was freeing is finished, a small chunk it was retiring is restored, a chunk it
    /// was punching becomes free. Returns how many chunks were repaired.
    ///
    /// Call only once the process that used `slot` is known to be dead (reaped), and before the slot
    /// is reused.
    pub fn reclaim_slot(&self, slot: u16) -> u64 {
        self.reclaim_slot_stepwise(slot, &mut || {})
    }

    /// [`RawHeap::reclaim_slot`], calling `step` after every store to shared memory (tests run
    /// other allocations there to probe the order of the stores).
    ///
    /// A dead run's head is freed **last**: while it is still `CLAIMING(slot)` / `FREEING(slot)` no
    /// other process can start a run at it, so the tails that carry this run's marker
    /// (`LARGE_TAIL` at distance `j - i`) are still the dead run's and nobody else writes them. They
    /// are found first, then freed from the far end (so the tails still standing always follow the
    /// head directly, as for `finish_large_free`). Freeing the head first would let a live process
    /// claim a new run at `i` and write tails that this loop would then free (two owners of a chunk;
    /// review F8).
    fn reclaim_slot_stepwise(&self, slot: u16, step: &mut dyn FnMut()) -> u64 {
        let mut n = 0;
        // Only below the limit: claims never reach past it, and reading the bookkeeping of the
        // whole reservation would commit its pages (shared memory allocates on a read fault too).
        let limit = self.limit();
        for i in self.geo.mgmt_chunks..limit {
            let m = self.meta(i);
            let s = m.state.load(Ordering::Acquire);
            let k = kind(s);
            if !matches!(k, K_CLAIMING | K_FREEING | K_RETIRING | K_PUNCHING) || slot_of(s) != slot
            {
                continue;
            }
            let new = match k {
                K_RETIRING => st(K_SMALL, class_of(s) as u64, 0, 0),
                _ => K_FREE,
            };
            // Tails of a large run this slot was claiming (it may have written some before dying:
            // the claim's length is not recorded, so up to the first chunk without the marker) or
            // freeing (at most its recorded length).
            let bound = match k {
                K_FREEING => i + hi(s).min(limit - i),
                K_CLAIMING => limit,
                _ => i + 1,
            };
            let mut end = i + 1;
            while end < bound {
                let ts = self.meta(end).state.load(Ordering::Acquire);
                if kind(ts) != K_TAIL || hi(ts) != end - i {
                    break;
                }
                end += 1;
            }
            for j in (i + 1..end).rev() {
                self.meta(j).state.store(K_FREE, Ordering::Release);
                step();
            }
            // The slot's process is dead, so nothing else changes the head: the CAS succeeds.
            if m.state
                .compare_exchange(s, new, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                n += 1;
                step();
                self.header().free_hint.fetch_min(i, Ordering::Relaxed);
            }
        }
        n
    }

    /// Statistics (a scan of the bookkeeping).
    #[must_use]
    pub fn stats(&self) -> Stats {
        self.check().stats
    }

    /// Verifies every invariant of the bookkeeping, reading shared memory as untrusted data (all
    /// indices come from this process's geometry). Exact when no other process is allocating; while
    /// others run, an operation in flight shows up as transitional: a tail seen without its head, or
    /// a head without its tails, is a problem only if the head is still what it was when the scan
    /// re-reads it.
    ///
    /// Reads the bookkeeping of the chunks below the limit only: that of the whole reservation
    /// would commit its pages (a read fault on shared memory allocates a page too), and claims never
    /// reach past the limit.
    #[must_use]
    pub fn check(&self) -> CheckReport {
        let mut r = CheckReport::default();
        if let Err(e) = self.verify_header() {
            r.problems.push(e.to_string());
            return r;
        }
        let limit = self.header().limit.load(Ordering::Acquire);
        if limit > self.geo.max_chunks || limit <= self.geo.mgmt_chunks {
            r.problems.push(format!(
                "limit {limit} outside ({}, {}]",
                self.geo.mgmt_chunks, self.geo.max_chunks
            ));
            return r;
        }
        let st_ = &mut r.stats;
        st_.chunk_size = self.geo.chunk_size() as u64;
        st_.mapped_chunks = limit;
        st_.mgmt_chunks = self.geo.mgmt_chunks;
        st_.live_blocks = vec![0; NCLASS];
        let words = Geometry::words_per_chunk_for(self.geo.chunk_shift);
        let mut i = 0;
        while i < limit {
            let s = self.meta(i).state.load(Ordering::Acquire);
            let k = kind(s);
            if i < self.geo.mgmt_chunks {
                if s != st(K_MGMT, 0, 0, 0) {
                    r.problems
                        .push(format!("chunk {i}: management chunk in state {s:#x}"));
                }
                i += 1;
                continue;
            }
            match k {
                K_FREE => st_.free_chunks += 1,
                K_SMALL | K_RETIRING => {
                    let c = class_of(s);
                    if c >= NCLASS || (k == K_SMALL && (s >> 16) != 0) {
                        r.problems
                            .push(format!("chunk {i}: bad small state {s:#x}"));
                    } else {
                        if k == K_SMALL {
                            st_.small_chunks += 1;
                        } else {
                            st_.transitional_chunks += 1;
                        }
                        let size = CLASSES[c] as usize;
                        let nblocks = self.geo.chunk_size() / size;
                        for w in 0..words {
                            let v = self.word(i, w).load(Ordering::Acquire);
                            let lo = w * 64;
                            let valid = if lo >= nblocks {
                                0
                            } else if nblocks - lo >= 64 {
                                u64::MAX
                            } else {
                                (1u64 << (nblocks - lo)) - 1
                            };
                            let live = u64::from((v & valid).count_ones());
                            st_.live_blocks[c] += live;
                            st_.live_bytes += live * size as u64;
                            r.stray_bits += u64::from((v & !valid).count_ones());
                        }
                    }
                }
                K_HEAD | K_FREEING | K_CLAIMING => {
                    let n = if k == K_CLAIMING { 0 } else { hi(s) };
                    if k == K_HEAD && (n == 0 || i + n > limit) {
                        r.problems.push(format!(
                            "chunk {i}: large block of {n} chunks overruns the limit {limit}"
                        ));
                    } else if k == K_HEAD {
                        st_.large_blocks += 1;
                        st_.large_chunks += n;
                        st_.live_bytes += n << self.geo.chunk_shift;
                    } else {
                        st_.transitional_chunks += 1;
                    }
                    // Tails must follow at their distances (a FREEING run may already be partly free,
                    // a CLAIMING run partly written).
                    let mut j = i + 1;
                    let end = if k == K_HEAD { i + n } else { limit };
                    while j < end.min(limit) {
                        let ts = self.meta(j).state.load(Ordering::Acquire);
                        if kind(ts) == K_TAIL && hi(ts) == j - i {
                            if k != K_HEAD {
                                st_.transitional_chunks += 1;
                            }
                            j += 1;
                        } else if k == K_HEAD {
                            // Freed meanwhile: a free turns the head into FREEING before it
                            // frees any tail, so a head that still reads the same is a problem.
                            if self.meta(i).state.load(Ordering::Acquire) == s {
                                r.problems.push(format!(
                                    "chunk {j}: expected tail {} of block at {i}, found {ts:#x}",
                                    j - i
                                ));
                            } else {
                                st_.transitional_chunks += 1;
                            }
                            break;
                        } else {
                            break;
                        }
                    }
                    i = j;
                    continue;
                }
                K_TAIL => {
                    // Claimed meanwhile: the scan read the head (FREE) before the claim, the
                    // tail after it. A head that now stands, or a tail that changed, is a run in
                    // flight; heads are freed last, so a tail never outlives its head.
                    let head = i.checked_sub(hi(s)).filter(|&h| h >= self.geo.mgmt_chunks);
                    let standing = head.is_some_and(|h| {
                        let hs = self.meta(h).state.load(Ordering::Acquire);
                        match kind(hs) {
                            K_CLAIMING => true,
                            K_HEAD | K_FREEING => hi(hs) > hi(s),
                            _ => false,
                        }
                    });
                    if standing || self.meta(i).state.load(Ordering::Acquire) != s {
                        st_.transitional_chunks += 1;
                    } else {
                        r.problems
                            .push(format!("chunk {i}: tail {} without its head", hi(s)));
                    }
                }
                K_PUNCHING => st_.transitional_chunks += 1,
                K_RELEASED => st_.released_chunks += 1,
                _ => r.problems.push(format!("chunk {i}: unknown state {s:#x}")),
            }
            i += 1;
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chunk-aligned, zeroed heap buffer standing in for a mapping (Miri runs these tests).
    struct Buf {
        _mem: Vec<u64>,
        base: NonNull<u8>,
    }

    impl Buf {
        fn new(geo: Geometry) -> Self {
            let chunk = geo.chunk_size();
            let mut mem = vec![0u64; (geo.span() + chunk) / 8];
            let p = mem.as_mut_ptr() as usize;
            let skip = align_up(p, chunk) - p;
            // `skip < chunk` and the buffer has `span + chunk` bytes, so `base` stays inside it.
            let base =
                NonNull::new(mem.as_mut_ptr().cast::<u8>().wrapping_add(skip)).expect("non-null");
            Self { _mem: mem, base }
        }
    }

    fn small_heap(chunks: u64) -> (Buf, RawHeap) {
        let geo = Geometry::new(16, chunks).expect("geometry");
        let buf = Buf::new(geo);
        // SAFETY: the buffer is zeroed, chunk-aligned and covers the whole span; it outlives `heap`
        // in every test (both are returned together and dropped at the end of the test).
        let heap = unsafe { RawHeap::init(buf.base, geo, chunks) }.expect("init");
        (buf, heap)
    }

    #[test]
    fn alloc_free_small_and_large() {
        let (_buf, h) = small_heap(8);
        let a = h.alloc(64, 8).expect("a");
        let b = h.alloc(64, 8).expect("b");
        assert_ne!(a, b);
        assert_eq!(h.usable_size(a), Ok(64));
        let big = h.alloc(100_000, 8).expect("big");
        assert_eq!(big.as_ptr() as usize % h.geometry().chunk_size(), 0);
        assert_eq!(h.usable_size(big), Ok(2 << 16));
        let s = h.stats();
        assert_eq!(s.live_blocks[3], 2);
        assert_eq!(s.large_blocks, 1);
        assert_eq!(s.large_chunks, 2);
        h.free(a).expect("free a");
        h.free(b).expect("free b");
        h.free(big).expect("free big");
        let r = h.check();
        assert!(r.is_consistent(), "{:?}", r.problems);
        assert_eq!(r.stats.live_bytes, 0);
    }

    #[test]
    fn double_free_and_foreign_are_errors() {
        let (_buf, h) = small_heap(8);
        let a = h.alloc(40, 8).expect("a");
        h.free(a).expect("first free");
        assert_eq!(h.free(a), Err(AllocError::DoubleFree));
        let b = h.alloc(40, 8).expect("b");
        // Interior pointer.
        let inner = NonNull::new(b.as_ptr().wrapping_add(1)).expect("non-null");
        assert_eq!(h.free(inner), Err(AllocError::ForeignPointer));
        // Management area and outside the heap.
        assert_eq!(h.free(h.base()), Err(AllocError::ForeignPointer));
        let x = Box::new(0u8);
        assert_eq!(h.free(NonNull::from(&*x)), Err(AllocError::ForeignPointer));
        let big = h.alloc(70_000, 8).expect("big");
        let tail = NonNull::new(big.as_ptr().wrapping_add(1 << 16)).expect("non-null");
        assert_eq!(h.free(tail), Err(AllocError::ForeignPointer));
        h.free(big).expect("free big");
        assert_eq!(h.free(big), Err(AllocError::DoubleFree));
        h.free(b).expect("free b");
        assert!(h.check().is_consistent());
    }

    #[test]
    fn alignment_is_honoured() {
        let (_buf, h) = small_heap(8);
        for align in [1, 2, 8, 16, 32, 64, 256, 4096] {
            let p = h.alloc(24, align).expect("alloc");
            assert_eq!(p.as_ptr() as usize % align, 0, "align {align}");
            h.free(p).expect("free");
        }
        assert_eq!(h.alloc(8, 3), Err(AllocError::BadLayout));
        assert_eq!(h.alloc(8, 1 << 20), Err(AllocError::BadLayout));
    }

    #[test]
    fn exhaustion_is_an_error_and_recovers() {
        let (_buf, h) = small_heap(4);
        let mgmt = h.geometry().mgmt_chunks();
        let free_chunks = 4 - mgmt;
        let mut v = Vec::new();
        while let Ok(p) = h.alloc(1 << 15, 8) {
            v.push(p);
        }
        assert_eq!(v.len() as u64, free_chunks * 2);
        assert_eq!(h.alloc(16, 8), Err(AllocError::OutOfMemory));
        for p in v {
            h.free(p).expect("free");
        }
        assert_eq!(h.trim(None), free_chunks);
        let big = h
            .alloc((free_chunks as usize) << 16, 8)
            .expect("all chunks as one block");
        h.free(big).expect("free");
        assert!(h.check().is_consistent());
    }

    #[test]
    fn release_requires_free_chunks_and_rolls_back() {
        let (_buf, h) = small_heap(8);
        let m = h.geometry().mgmt_chunks();
        let p = h.alloc(100, 8).expect("p");
        assert_eq!(h.release_chunks(m, 8), Err(AllocError::InUse));
        assert!(h.check().is_consistent());
        h.free(p).expect("free");
        h.release_chunks(m + 2, 8).expect("release");
        let s = h.stats();
        assert_eq!(s.released_chunks, 8 - m - 2);
        // Released chunks are never handed out.
        let big = h.alloc(3 << 16, 8);
        assert_eq!(big, Err(AllocError::OutOfMemory));
        assert!(h.check().is_consistent());
    }

    #[test]
    fn reclaim_repairs_a_dead_slot() {
        let (_buf, h) = small_heap(8);
        let dead = h.with_slot(3);
        let m = h.geometry().mgmt_chunks();
        // Simulate a death in the middle of a large claim and of a large free.
        let i = dead.claim_run(2).expect("claim");
        dead.meta(i + 1)
            .state
            .store(st(K_TAIL, 0, 0, 1), Ordering::Release);
        let big = h.alloc(1 << 16, 8).expect("big");
        let j = ((big.as_ptr() as usize - h.base().as_ptr() as usize) >> 16) as u64;
        dead.meta(j)
            .state
            .store(st(K_FREEING, 0, 3, 1), Ordering::Release);
        let r = h.check();
        assert!(r.is_consistent(), "{:?}", r.problems);
        assert_eq!(r.stats.transitional_chunks, 3);
        assert_eq!(h.reclaim_slot(3), 2);
        let r = h.check();
        assert!(r.is_consistent(), "{:?}", r.problems);
        assert_eq!(r.stats.free_chunks, 8 - m);
    }

    /// Review F8: while the master repairs a dead slot's large run, a live process allocates after
    /// every store the repair makes. The repair must never free a chunk of the live process's new
    /// block (the head of the dead run is freed last, so no new run can start at it earlier).
    #[test]
    fn reclaim_never_frees_a_chunk_claimed_meanwhile() {
        for dead_kind in [K_CLAIMING, K_FREEING] {
            let (_buf, h) = small_heap(8);
            let live = h.with_slot(2);
            let m = h.geometry().mgmt_chunks();
            // Fill the heap with one-chunk blocks, then give chunks m, m+1, m+2 to a dead run of
            // slot 3: head at m, one tail written at m+1, m+2 free (a claim of 2 that died before
            // writing its head, or a free of 2 whose process freed nothing yet).
            let mut blocks = Vec::new();
            while let Ok(p) = live.alloc(1 << 16, 8) {
                blocks.push(p);
            }
            let chunk_of =
                |p: NonNull<u8>| ((p.as_ptr() as usize - h.base().as_ptr() as usize) >> 16) as u64;
            blocks.retain(|&p| {
                if chunk_of(p) < m + 3 {
                    live.free(p).expect("free");
                    false
                } else {
                    true
                }
            });
            let head = match dead_kind {
                K_CLAIMING => st(K_CLAIMING, 0, 3, 0),
                _ => st(K_FREEING, 0, 3, 2),
            };
            h.meta(m).state.store(head, Ordering::Release);
            h.meta(m + 1)
                .state
                .store(st(K_TAIL, 0, 0, 1), Ordering::Release);
            let mut got = Vec::new();
            let repaired = h.reclaim_slot_stepwise(3, &mut || {
                if let Ok(p) = live.alloc(3 << 16, 8) {
                    got.push(p);
                }
            });
            assert_eq!(repaired, 1);
            // Every block handed out meanwhile is intact: head and all its tails.
            for &p in &got {
                let i = chunk_of(p);
                assert_eq!(live.usable_size(p), Ok(3 << 16));
                for d in 1..3 {
                    assert_eq!(
                        h.meta(i + d).state.load(Ordering::Acquire),
                        st(K_TAIL, 0, 0, d),
                        "{dead_kind}: tail {d} of a block claimed during the repair was freed"
                    );
                }
            }
            assert_eq!(got.len(), 1, "the repaired run is allocated once freed");
            let r = h.check();
            assert!(r.is_consistent(), "{dead_kind}: {:?}", r.problems);
            assert_eq!(r.stats.transitional_chunks, 0);
            for p in got.into_iter().chain(blocks) {
                live.free(p).expect("free");
            }
            let r = h.check();
            assert!(r.is_consistent(), "{dead_kind}: {:?}", r.problems);
            assert_eq!(r.stats.free_chunks, 8 - m);
        }
    }

    #[test]
    fn check_reports_corruption() {
        let (_buf, h) = small_heap(8);
        let m = h.geometry().mgmt_chunks();
        h.meta(m + 1)
            .state
            .store(st(K_TAIL, 0, 0, 1), Ordering::Release);
        assert!(!h.check().is_consistent());
        h.meta(m + 1).state.store(0xfe, Ordering::Release);
        assert!(!h.check().is_consistent());
    }

    #[test]
    fn check_reports_a_tail_its_head_does_not_cover() {
        let (_buf, h) = small_heap(8);
        let m = h.geometry().mgmt_chunks();
        // A one-chunk block at m, and a tail at distance 2 from it: no run covers that tail.
        h.meta(m)
            .state
            .store(st(K_HEAD, 1, 0, 0), Ordering::Release);
        h.meta(m + 2)
            .state
            .store(st(K_TAIL, 2, 0, 0), Ordering::Release);
        let r = h.check();
        assert!(
            r.problems.iter().any(|p| p.contains("without its head")),
            "{:?}",
            r.problems
        );
    }

    /// While another thread allocates and frees multi-chunk blocks, the scan meets runs being
    /// claimed and freed: they are transitional, never problems.
    #[test]
    fn check_sees_runs_in_flight_as_transitional() {
        let (_buf, h) = small_heap(64);
        let stop = std::sync::atomic::AtomicBool::new(false);
        let scans = if cfg!(miri) { 20 } else { 20_000 };
        std::thread::scope(|s| {
            let w = h.with_slot(1);
            let stop = &stop;
            s.spawn(move || {
                let mut k = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(p) = w.alloc([3 << 16, 20 << 16, 1 << 17][k % 3], 8) {
                        w.free(p).expect("free");
                    }
                    k += 1;
                }
            });
            for _ in 0..scans {
                let r = h.check();
                if !r.is_consistent() {
                    stop.store(true, Ordering::Relaxed);
                    panic!(
                        "problems reported for operations in flight: {:?}",
                        r.problems
                    );
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
        assert!(h.check().is_consistent());
    }

    /// `trim` counts a free chunk only if its punch returned the pages, and a retired small chunk
    /// either way.
    #[test]
    fn trim_counts_only_the_punches_that_worked() {
        let (_buf, h) = small_heap(8);
        let free = 8 - h.geometry().mgmt_chunks();
        let mut calls = 0;
        let mut refuse = |_: usize, _: usize| {
            calls += 1;
            false
        };
        assert_eq!(h.trim(Some(&mut refuse)), 0);
        assert_eq!(calls, free);
        assert_eq!(h.trim(Some(&mut |_: usize, _: usize| true)), free);
        let p = h.alloc(16, 8).expect("alloc");
        h.free(p).expect("free");
        // The empty small chunk is retired (counted) although its punch fails; the rest are not.
        assert_eq!(h.trim(Some(&mut |_: usize, _: usize| false)), 1);
        assert!(h.check().is_consistent());
    }

    #[test]
    fn threads_allocate_concurrently() {
        let (_buf, h) = small_heap(24);
        let rounds = if cfg!(miri) { 20 } else { 2000 };
        std::thread::scope(|s| {
            for t in 0..2u16 {
                let h = h.with_slot(t + 1);
                s.spawn(move || {
                    let mut live = Vec::new();
                    for k in 0..rounds {
                        let size = [16, 64, 200, 3000, 70_000][k % 5];
                        // Two threads racing for fresh chunks may exhaust this small heap; that
                        // is allowed, corruption is not.
                        let Ok(p) = h.alloc(size, 8) else { continue };
                        // SAFETY: p is a fresh block of at least 16 bytes owned by this thread.
                        unsafe { p.as_ptr().cast::<u64>().write(k as u64) };
                        live.push((p, k as u64));
                        if live.len() > 8 {
                            let (q, v) = live.swap_remove(k % live.len());
                            // SAFETY: q is a live block this thread wrote above.
                            assert_eq!(unsafe { q.as_ptr().cast::<u64>().read() }, v);
                            h.free(q).expect("free");
                        }
                        if k % 97 == 0 {
                            h.trim(None);
                        }
                    }
                    for (q, _) in live {
                        h.free(q).expect("free");
                    }
                });
            }
        });
        let r = h.check();
        assert!(r.is_consistent(), "{:?}", r.problems);
        assert_eq!(r.stats.live_bytes, 0);
    }

    #[cfg(not(miri))]
    mod model {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

            /// Random operation sequences against a model of live blocks: blocks never overlap, are
            /// aligned and big enough; frees of live blocks succeed; second frees fail; the checker
            /// and the statistics agree with the model after every step.
            #[test]
            fn operations_match_a_model(
                ops in proptest::collection::vec((0u8..6, 1usize..300_000, 0u32..14, any::<u16>()), 1..160)
            ) {
                let (_buf, h) = small_heap(40);
                let mut live: Vec<(NonNull<u8>, usize)> = Vec::new();
                let mut freed: Vec<NonNull<u8>> = Vec::new();
                for (op, size, align_log, pick) in ops {
                    let size = if op == 0 { size % 512 + 1 } else { size };
                    match op {
                        0..=2 => match h.alloc(size, 1 << align_log) {
                            Ok(p) => {
                                let a = p.as_ptr() as usize;
                                prop_assert_eq!(a % (1 << align_log), 0);
                                prop_assert!(h.usable_size(p).expect("live") >= size);
                                for &(q, qs) in &live {
                                    let b = q.as_ptr() as usize;
                                    prop_assert!(a + size <= b || b + qs <= a, "overlap");
                                }
                                live.push((p, size));
                            }
                            Err(AllocError::OutOfMemory) => {}
                            Err(e) => prop_assert!(false, "unexpected {e:?}"),
                        },
                        3 if !live.is_empty() => {
                            let (p, _) = live.swap_remove(usize::from(pick) % live.len());
                            prop_assert_eq!(h.free(p), Ok(()));
                            freed.push(p);
                        }
                        4 => {
                            if let Some(&p) = freed.last() {
                                if live.iter().all(|&(q, _)| q != p) {
                                    let r = h.free(p);
                                    prop_assert!(
                                        matches!(r, Err(AllocError::DoubleFree | AllocError::ForeignPointer)),
                                        "second free gave {r:?}"
                                    );
                                }
                            }
                        }
                        5 => {
                            h.trim(None);
                        }
                        _ => {}
                    }
                    let r = h.check();
                    prop_assert!(r.is_consistent(), "{:?}", r.problems);
                    prop_assert_eq!(r.stray_bits, 0);
                    let model_small = live.iter().filter(|(p, _)| h.usable_size(*p).expect("live") <= MAX_SMALL).count();
                    let stats_small: u64 = r.stats.live_blocks.iter().sum();
                    prop_assert_eq!(stats_small as usize, model_small);
                    prop_assert_eq!(r.stats.large_blocks as usize, live.len() - model_small);
                }
                for (p, _) in live {
                    prop_assert_eq!(h.free(p), Ok(()));
                }
                prop_assert_eq!(h.stats().live_bytes, 0);
            }
        }
    }
}
