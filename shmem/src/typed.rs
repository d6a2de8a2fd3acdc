//! Typed data in shared memory: the [`ShmSafe`] trait, lock-guarded buffers ([`SharedBuf`]) and
//! atomic views ([`AtomicArray`]).

use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use context_core::{Acquired, RawContextLock};

use crate::segment::{Segment, TypeId};
use crate::{Error, SharedLock};

/// Types that may be placed in memory shared between processes and copied in and out of it.
///
/// Derive it with `#[derive(ShmSafe)]`, which refuses types that are not `#[repr(C)]`, fields that
/// are not `ShmSafe`, and padding:
///
/// ```
/// use context_shmem::ShmSafe;
/// #[derive(Clone, Copy, ShmSafe)]
/// #[repr(C)]
/// struct Point { x: u32, y: u32, tag: [u8; 8] }
/// ```
///
/// A struct without `#[repr(C)]` is refused (its layout may differ between builds):
///
/// ```compile_fail
/// use context_shmem::ShmSafe;
/// #[derive(Clone, Copy, ShmSafe)]
/// struct NoRepr { x: u32 }
/// ```
///
/// A field that is not `ShmSafe` (here a reference: a pointer into one process) is refused:
///
/// ```compile_fail,E0277
/// use context_shmem::ShmSafe;
/// #[derive(Clone, Copy, ShmSafe)]
/// #[repr(C)]
/// struct HasRef { r: &'static u32 }
/// ```
///
/// `bool` is not `ShmSafe` either (only 0 and 1 are valid, a peer may write 2):
///
/// ```compile_fail,E0277
/// use context_shmem::ShmSafe;
/// #[derive(Clone, Copy, ShmSafe)]
/// #[repr(C)]
/// struct HasBool { b: bool, pad: [u8; 3] }
/// ```
///
/// Padding is refused (it would copy uninitialized bytes into shared memory):
///
/// ```compile_fail,E0080
/// use context_shmem::ShmSafe;
/// #[derive(Clone, Copy, ShmSafe)]
/// #[repr(C)]
/// struct Padded { a: u8, b: u32 }
/// ```
///
/// # Safety
///
/// Implementors guarantee:
/// - **No process-local meaning**: no pointers, references, or handles (descriptors, thread ids)
///   whose meaning differs between processes; positions are offsets.
/// - **Every bit pattern is valid**: any `size_of::<Self>()` bytes form a valid value (a peer may
///   write anything, and a writer may die halfway through a copy).
/// - **No padding**: every byte belongs to a field, so copying a value never exposes uninitialized
///   bytes.
/// - **Fixed layout**: `#[repr(C)]`/`#[repr(transparent)]` (or a primitive), so every process built
///   from the same definition agrees on it.
pub unsafe trait ShmSafe: Copy + Send + Sync + 'static {}

macro_rules! shm_safe_prims {
    ($($t:ty),*) => { $(
        // SAFETY: a primitive integer/float: no pointers, no padding, every bit pattern valid, fixed
        // layout.
        unsafe impl ShmSafe for $t {}
    )* };
}
shm_safe_prims!(u8, u16, u32, u64, u128, i8, i16, i32, i64, i128, f32, f64);

// SAFETY: an array of ShmSafe elements has no padding between elements (size is a multiple of
// alignment), and inherits the other properties element-wise.
unsafe impl<T: ShmSafe, const N: usize> ShmSafe for [T; N] {}

// SAFETY: zero-sized, no bytes at all.
unsafe impl ShmSafe for () {}

/// Offset of the element count in a [`SharedBuf`] payload (after the lock, 64-byte rounded).
const BUF_LEN_OFF: usize = SharedLock::SIZE.next_multiple_of(64);
/// Offset of the elements (after the count, 64-byte rounded).
const BUF_DATA_OFF: usize = BUF_LEN_OFF + 64;

fn buf_type_id<T>() -> TypeId {
    // Same build on both sides (type names are not stable across compilers): combine name, size and
    // alignment so a mismatch is caught at open.
    let name = format!(
        "context-shmem::SharedBuf<{}>/{}/{}",
        std::any::type_name::<T>(),
        std::mem::size_of::<T>(),
        std::mem::align_of::<T>()
    );
    TypeId(crate::segment::fnv(name.as_bytes()))
}

/// A fixed-length array of `T` in a shared segment, guarded by a crash-safe [`SharedLock`] that
/// lives in the same segment.
///
/// All access goes through a [`BufGuard`] (the lock held), which copies values in and out: no
/// reference into the shared elements is ever handed out, and under the lock no cooperating process
/// writes concurrently, so the copies race with nothing. Because `T: ShmSafe`, whatever a writer
/// that died halfway left behind is still a valid `T` (the guard reports `owner_died`).
pub struct SharedBuf<T: ShmSafe> {
    lock: SharedLock,
    // INVARIANTS: points to `len` contiguous `T`s inside `lock.segment()`'s mapping (checked against
    // the segment's privately held size in `from_segment`), aligned for `T`.
    data: NonNull<T>,
    len: usize,
    _t: PhantomData<T>,
}

// SAFETY: the elements are only touched under the shared lock; `T: Send + Sync`; the segment is
// kept mapped by the lock handle.
unsafe impl<T: ShmSafe> Send for SharedBuf<T> {}
// SAFETY: as for Send.
unsafe impl<T: ShmSafe> Sync for SharedBuf<T> {}

impl<T: ShmSafe> std::fmt::Debug for SharedBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBuf")
            .field("len", &self.len)
            .field("lock", &self.lock)
            .finish()
    }
}

impl<T: ShmSafe> Clone for SharedBuf<T> {
    fn clone(&self) -> Self {
        Self {
            lock: self.lock.clone(),
            data: self.data,
            len: self.len,
            _t: PhantomData,
        }
    }
}

fn payload_for<T>(len: usize) -> Result<usize, Error> {
    len.checked_mul(std::mem::size_of::<T>())
        .and_then(|b| b.checked_add(BUF_DATA_OFF))
        .ok_or(Error::TooLarge)
}

impl<T: ShmSafe> SharedBuf<T> {
    /// A new buffer of `len` zeroed elements in a fresh sealed memfd segment.
    ///
    /// # Errors
    /// Size overflow, OS errors.
    pub fn create(len: usize) -> Result<Self, Error> {
        let seg = Segment::create_memfd(payload_for::<T>(len)?, buf_type_id::<T>())?;
        Self::init(Arc::new(seg), len)
    }

    /// A new buffer in a named segment (see [`Segment::create_named`]).
    ///
    /// # Errors
    /// As for [`Segment::create_named`].
    pub fn create_named(tag: &str, len: usize) -> Result<Self, Error> {
        let seg = Segment::create_named(tag, payload_for::<T>(len)?, buf_type_id::<T>())?;
        Self::init(Arc::new(seg), len)
    }

    /// Opens a named buffer created by another process.
    ///
    /// # Errors
    /// As for [`Segment::open_named`] and [`Self::from_segment`].
    pub fn open_named(name: &str) -> Result<Self, Error> {
        Self::from_segment(Arc::new(Segment::open_named(name, buf_type_id::<T>())?))
    }

    /// The type id a segment must carry to be opened as a `SharedBuf<T>`.
    #[must_use]
    pub fn type_id() -> TypeId {
        buf_type_id::<T>()
    }

    fn init(seg: Arc<Segment>, len: usize) -> Result<Self, Error> {
        let len_word = Self::len_word(&seg)?;
        len_word.store(len as u64, std::sync::atomic::Ordering::Release);
        let lock = SharedLock::create_in(Arc::clone(&seg), 0)?;
        Self::finish(lock, len)
    }

    fn len_word(seg: &Segment) -> Result<&AtomicU64, Error> {
        let p = seg.payload_ptr(BUF_LEN_OFF, 8, 8)?;
        // SAFETY: in bounds and 8-aligned (checked by `payload_ptr`), inside a mapping that lives
        // as long as `seg`; only ever accessed atomically, so a shared reference is sound.
        Ok(unsafe { p.cast::<AtomicU64>().as_ref() })
    }

    /// Opens a buffer in a segment another process created (received by fd, or by name). The
    /// element count stored in the segment is untrusted: it is checked against this process's own
    /// view of the segment's size.
    ///
    /// # Errors
    /// Wrong type id, a stored count that does not fit the segment, and what opening its lock
    /// gives ([`SharedLock::open_in`]): [`Error::ForeignPidNamespace`] for a segment made in
    /// another PID namespace, [`Error::BadHeader`] if no lock was initialized there,
    /// [`Error::LockFull`] if every process slot of the lock is taken by a live process.
    pub fn from_segment(seg: Arc<Segment>) -> Result<Self, Error> {
        if seg.type_id() != buf_type_id::<T>() {
            return Err(Error::WrongType {
                expected: buf_type_id::<T>(),
                found: seg.type_id(),
            });
        }
        let stored = Self::len_word(&seg)?.load(std::sync::atomic::Ordering::Acquire);
        let len =
            usize::try_from(stored).map_err(|_| Error::BadHeader("element count out of range"))?;
        if payload_for::<T>(len).map_or(true, |need| need > seg.payload_len()) {
            return Err(Error::BadHeader("element count does not fit the segment"));
        }
        let lock = SharedLock::open_in(seg, 0)?;
        Self::finish(lock, len)
    }

    fn finish(lock: SharedLock, len: usize) -> Result<Self, Error> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or(Error::TooLarge)?;
        let data = lock
            .segment()
            .payload_ptr(BUF_DATA_OFF, bytes, std::mem::align_of::<T>())?
            .cast::<T>();
        Ok(Self {
            lock,
            data,
            len,
            _t: PhantomData,
        })
    }

    /// Number of elements.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer has no elements.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The segment (to send its descriptor, or to learn its name).
    #[must_use]
    pub fn segment(&self) -> &Arc<Segment> {
        self.lock.segment()
    }

    /// The lock guarding the elements.
    #[must_use]
    pub fn shared_lock(&self) -> &SharedLock {
        &self.lock
    }

    /// Locks the buffer, waiting until `deadline`.
    ///
    /// # Errors
    /// [`Error::Lock`] with `TimedOut` or `NotRecoverable`.
    pub fn lock(&self, deadline: Option<Instant>) -> Result<BufGuard<'_, T>, Error> {
        let a = self.lock.lock(deadline).map_err(Error::Lock)?;
        Ok(BufGuard {
            buf: self,
            owner_died: a == Acquired::OwnerDied,
            _not_send: PhantomData,
        })
    }

    /// Locks the buffer if it is idle.
    ///
    /// # Errors
    /// [`Error::Lock`] with `WouldBlock` or `NotRecoverable`.
    pub fn try_lock(&self) -> Result<BufGuard<'_, T>, Error> {
        let a = self.lock.try_lock().map_err(Error::Lock)?;
        Ok(BufGuard {
            buf: self,
            owner_died: a == Acquired::OwnerDied,
            _not_send: PhantomData,
        })
    }
}

/// Access to a [`SharedBuf`] while holding its lock. Releases on drop. Not `Send`: the lock is
/// released where it was taken.
///
/// ```compile_fail,E0277
/// fn needs_send<T: Send>(_: T) {}
/// let buf = context_shmem::SharedBuf::<u64>::create(1).unwrap();
/// needs_send(buf.lock(None).unwrap());
/// ```
///
/// If the previous holder died holding the lock, [`Self::owner_died`] is true: repair the contents,
/// then call [`Self::mark_consistent`], or the buffer becomes unrecoverable when this guard drops.
pub struct BufGuard<'a, T: ShmSafe> {
    buf: &'a SharedBuf<T>,
    owner_died: bool,
    _not_send: PhantomData<*const ()>,
}

impl<T: ShmSafe> std::fmt::Debug for BufGuard<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufGuard")
            .field("len", &self.buf.len)
            .field("owner_died", &self.owner_died)
            .finish()
    }
}

impl<T: ShmSafe> BufGuard<'_, T> {
    /// Whether the previous holder died holding the lock (the contents may be half-updated).
    #[must_use]
    pub fn owner_died(&self) -> bool {
        self.owner_died
    }

    /// Declares the contents repaired after [`Self::owner_died`].
    pub fn mark_consistent(&mut self) {
        // SAFETY: this guard holds the lock.
        unsafe { self.buf.lock.mark_consistent() };
        self.owner_died = false;
    }

    /// Number of elements.
    #[must_use]
    pub fn len(&self) -> usize {
        self.buf.len
    }

    /// Whether the buffer has no elements.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.buf.len == 0
    }

    fn check(&self, start: usize, n: usize) -> Result<(), Error> {
        match start.checked_add(n) {
            Some(end) if end <= self.buf.len => Ok(()),
            _ => Err(Error::OutOfBounds {
                offset: start,
                len: n,
                size: self.buf.len,
            }),
        }
    }

    /// Copies element `i` out (`None` if out of bounds).
    #[must_use]
    pub fn get(&self, i: usize) -> Option<T> {
        self.check(i, 1).ok()?;
        // SAFETY: `i < len` (checked), so the element is inside the buffer (INVARIANTS on `data`),
        // aligned; the lock is held so no cooperating process writes it now; any bit pattern is a
        // valid T (ShmSafe).
        Some(unsafe { self.buf.data.as_ptr().wrapping_add(i).read() })
    }

    /// Stores `v` at element `i`.
    ///
    /// # Errors
    /// [`Error::OutOfBounds`].
    pub fn set(&mut self, i: usize, v: T) -> Result<(), Error> {
        self.check(i, 1)?;
        // SAFETY: in bounds and aligned as for `get`; the lock is held, so nobody else accesses it;
        // T is Copy without Drop, so overwriting without dropping is right.
        unsafe { self.buf.data.as_ptr().wrapping_add(i).write(v) };
        Ok(())
    }

    /// Copies `out.len()` elements starting at `start` into `out`.
    ///
    /// # Errors
    /// [`Error::OutOfBounds`].
    pub fn read_into(&self, start: usize, out: &mut [T]) -> Result<(), Error> {
        self.check(start, out.len())?;
        // SAFETY: source range `[start, start + out.len())` is in bounds (checked) and aligned; the
        // destination is a distinct private slice; the lock is held (no concurrent writer); any bit
        // pattern is a valid T.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.buf.data.as_ptr().wrapping_add(start),
                out.as_mut_ptr(),
                out.len(),
            )
        };
        Ok(())
    }

    /// Copies `src` into the elements starting at `start`.
    ///
    /// # Errors
    /// [`Error::OutOfBounds`].
    pub fn write_from(&mut self, start: usize, src: &[T]) -> Result<(), Error> {
        self.check(start, src.len())?;
        // SAFETY: destination range in bounds (checked) and aligned, inside the writable mapping;
        // the source is a private slice that cannot overlap shared memory we hold exclusively; the
        // lock is held (no concurrent access by cooperating processes).
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr(),
                self.buf.data.as_ptr().wrapping_add(start),
                src.len(),
            )
        };
        Ok(())
    }

    /// Sets every element to `v`.
    pub fn fill(&mut self, v: T) {
        // Elements of a zero-sized type occupy no bytes, so any stored count "fits" the segment,
        // however large a peer made it: writing them is nothing, and looping over 2^64 of them
        // would be a hang.
        if std::mem::size_of::<T>() == 0 {
            return;
        }
        for i in 0..self.buf.len {
            // SAFETY: `i < len`; otherwise as for `set`.
            unsafe { self.buf.data.as_ptr().wrapping_add(i).write(v) };
        }
    }
}

impl<T: ShmSafe> Drop for BufGuard<'_, T> {
    fn drop(&mut self) {
        // SAFETY: this guard holds the lock (created only after a successful acquisition) and
        // releases it exactly once.
        unsafe { self.buf.lock.unlock() };
    }
}

/// An array of `AtomicU64` in a shared segment: the lock-free view. Handing out `&AtomicU64` into
/// shared memory is sound because every access to it, in every process, is atomic.
#[derive(Clone)]
pub struct AtomicArray {
    seg: Arc<Segment>,
    // INVARIANTS: `len` AtomicU64s at payload offset 0 of `seg`, 8-aligned, in bounds.
    data: NonNull<AtomicU64>,
    len: usize,
}

// SAFETY: only atomics are reachable through `data`; the segment is Send + Sync.
unsafe impl Send for AtomicArray {}
// SAFETY: as for Send.
unsafe impl Sync for AtomicArray {}

impl std::fmt::Debug for AtomicArray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AtomicArray")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

const ATOMIC_ARRAY_TYPE: TypeId = TypeId::of_name("context-shmem::AtomicArray<u64>/v1");

impl AtomicArray {
    /// `len` zeroed atomics in a fresh sealed memfd segment.
    ///
    /// # Errors
    /// Size overflow, OS errors.
    pub fn create(len: usize) -> Result<Self, Error> {
        let bytes = len.checked_mul(8).ok_or(Error::TooLarge)?;
        Self::from_segment(Arc::new(Segment::create_memfd(bytes, ATOMIC_ARRAY_TYPE)?))
    }

    /// Views a segment (of [`Self::type_id`]) as atomics; the length comes from this process's own
    /// view of the segment size.
    ///
    /// # Errors
    /// Wrong type id.
    pub fn from_segment(seg: Arc<Segment>) -> Result<Self, Error> {
        if seg.type_id() != ATOMIC_ARRAY_TYPE {
            return Err(Error::WrongType {
                expected: ATOMIC_ARRAY_TYPE,
                found: seg.type_id(),
            });
        }
        let len = seg.payload_len() / 8;
        let data = seg.payload_ptr(0, len * 8, 8)?.cast();
        Ok(Self { seg, data, len })
    }

    /// The type id of atomic-array segments.
    #[must_use]
    pub fn type_id() -> TypeId {
        ATOMIC_ARRAY_TYPE
    }

    /// Element `i` (`None` if out of bounds).
    #[must_use]
    pub fn get(&self, i: usize) -> Option<&AtomicU64> {
        if i >= self.len {
            return None;
        }
        // SAFETY: `i < len` and the INVARIANTS on `data`; the segment lives as long as `self`; only
        // atomic operations are possible through `&AtomicU64`.
        Some(unsafe { &*self.data.as_ptr().wrapping_add(i) })
    }

    /// Number of elements.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no elements.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The segment.
    #[must_use]
    pub fn segment(&self) -> &Arc<Segment> {
        &self.seg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review of 2026-12-03: elements of a zero-sized type take no bytes, so any stored count
    /// fits the segment; one a peer set to `u64::MAX` must not turn `fill` into a 2^64 loop.
    #[test]
    fn a_huge_count_of_zero_sized_elements_is_not_a_hang() {
        let buf = SharedBuf::<()>::create(3).unwrap();
        SharedBuf::<()>::len_word(buf.segment())
            .unwrap()
            .store(u64::MAX, std::sync::atomic::Ordering::Release);
        let other = SharedBuf::<()>::from_segment(Arc::clone(buf.segment())).unwrap();
        assert_eq!(other.len() as u64, u64::MAX);
        let mut g = other.lock(None).unwrap();
        g.fill(());
        assert_eq!(g.get(usize::MAX - 1), Some(()));
    }
}
