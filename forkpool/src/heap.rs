//! The shared heap handle and the typed owners built on it: [`SharedBox`], [`SharedVec`] and
//! [`SharedList`]. Pointers stored inside them are plain machine pointers, valid in every process of
//! the pool because every process maps the regions at the same addresses.

use std::alloc::Layout;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::Arc;

use crate::alloc::{CheckReport, Geometry, RawHeap, Stats};
use crate::error::AllocError;

/// Types that may live in the shared heap and be read by other processes.
///
/// # Safety
/// An implementor must:
/// - hold no pointer or handle that is only meaningful in one process (no `Box`, `Vec`, `String`,
///   `Arc`, file descriptor, process-local address); pointers into the shared heap are allowed;
/// - need no `Drop` (the owners free memory without running destructors of the contents);
/// - be valid for every value a process killed half-way through updating it can leave behind: every
///   field is a plain number, an atomic, or another `ShareSafe` type. (An update is a store of a
///   whole field, so a torn value is one a field can hold; `AtomicBool` holds only 0 or 1,
///   which is all such a store writes.)
///
/// Process-local types are refused at compile time:
///
/// ```compile_fail,E0277
/// fn f(heap: &context_forkpool::Heap) {
///     // Vec's buffer lives in the creating process's private heap.
///     let _ = context_forkpool::SharedBox::new(heap, vec![1u8]);
/// }
/// ```
///
/// ```compile_fail,E0277
/// fn f(heap: &context_forkpool::Heap) {
///     let _ = context_forkpool::SharedBox::new(heap, Box::new(1u8));
/// }
/// ```
pub unsafe trait ShareSafe: Sized + 'static {}

macro_rules! share_safe {
    ($($t:ty),*) => { $(
        // SAFETY: a plain number or atomic: no pointers, no drop glue, every bit pattern valid.
        unsafe impl ShareSafe for $t {}
    )* };
}
share_safe!(
    u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize, f32, f64
);
share_safe!(
    std::sync::atomic::AtomicU8,
    std::sync::atomic::AtomicU16,
    std::sync::atomic::AtomicU32,
    std::sync::atomic::AtomicU64,
    std::sync::atomic::AtomicUsize,
    std::sync::atomic::AtomicI32,
    std::sync::atomic::AtomicI64,
    std::sync::atomic::AtomicBool
);
// SAFETY: an array of ShareSafe elements inherits every property element-wise.
unsafe impl<T: ShareSafe, const N: usize> ShareSafe for [T; N] {}
// SAFETY: tuples of ShareSafe fields inherit every property field-wise.
unsafe impl<A: ShareSafe, B: ShareSafe> ShareSafe for (A, B) {}

/// A handle on the pool's shared heap. Cheap to clone; every typed owner holds one, which is how the
/// pool knows whether a reset would leave dangling owners.
///
/// The raw allocator underneath is not reachable from it, so nothing can copy it out of the count
/// and use it after the pool unmapped the heap:
///
/// ```compile_fail,E0599
/// fn f(pool: context_forkpool::Pool) {
///     let raw = *pool.heap().raw();
///     drop(pool);
///     let _ = raw.alloc(16, 8);
/// }
/// ```
#[derive(Clone, Debug)]
pub struct Heap {
    /// Never handed out: a [`RawHeap`] is `Copy` and not counted by `handle_count`, so a copy could
    /// outlive the mapping (the pool unmaps it when the last `Heap` goes), and its safe `free` could
    /// free a block a typed owner still uses (review F1).
    raw: Arc<RawHeap>,
}

impl Heap {
    pub(crate) fn from_raw(raw: RawHeap) -> Self {
        Self { raw: Arc::new(raw) }
    }

    pub(crate) fn handle_count(&self) -> usize {
        Arc::strong_count(&self.raw)
    }

    /// Allocates a block for `layout` and frees it at once: the cost of one allocation round trip
    /// (benchmarks). Safe because the block is never visible to the caller.
    ///
    /// # Errors
    /// As [`Heap::alloc`], then as [`Heap::free`] (which cannot fail for a block just allocated
    /// unless the bookkeeping is corrupt).
    pub fn alloc_free_round_trip(&self, layout: Layout) -> Result<(), AllocError> {
        let p = std::hint::black_box(self.raw.alloc(layout.size(), layout.align())?);
        self.raw.free(p)
    }

    /// Allocates a block for `layout` (contents unspecified: zero on fresh pages, old data on reuse).
    ///
    /// # Errors
    /// [`AllocError::OutOfMemory`], or [`AllocError::BadLayout`] for alignments above the chunk size.
    pub fn alloc(&self, layout: Layout) -> Result<NonNull<u8>, AllocError> {
        self.raw.alloc(layout.size(), layout.align())
    }

    /// Frees a block from [`Heap::alloc`] (from any process of the pool).
    ///
    /// # Errors
    /// [`AllocError::DoubleFree`] or [`AllocError::ForeignPointer`]; the heap is unchanged then.
    ///
    /// # Safety
    /// Nobody may use the block after this call, and `ptr` must not be freed again (the allocator
    /// detects a double free while the address has not been handed out again, and foreign
    /// pointers, but not a use after free, and not a stale pointer to a block re-allocated at the
    /// same address).
    pub unsafe fn free(&self, ptr: NonNull<u8>) -> Result<(), AllocError> {
        self.raw.free(ptr)
    }

    /// The usable size of the live block starting at `ptr`: how a layer that reads block
    /// addresses from shared memory checks one before using it (the shared contexts do).
    ///
    /// # Errors
    /// [`AllocError::ForeignPointer`] if `ptr` is not the start of a live block of this heap.
    #[cfg_attr(loom, allow(dead_code))] // shared contexts are left out of the loom build
    pub(crate) fn usable_size(&self, ptr: NonNull<u8>) -> Result<usize, AllocError> {
        self.raw.usable_size(ptr)
    }

    /// The heap's span as (start address, length in bytes), for callers that check many pointers.
    #[cfg_attr(loom, allow(dead_code))] // shared contexts are left out of the loom build
    pub(crate) fn span(&self) -> (usize, usize) {
        (
            self.raw.base().as_ptr() as usize,
            self.raw.geometry().span(),
        )
    }

    /// Statistics, from a scan of the bookkeeping.
    #[must_use]
    pub fn stats(&self) -> Stats {
        self.raw.stats()
    }

    /// Checks every invariant of the bookkeeping.
    #[must_use]
    pub fn check(&self) -> CheckReport {
        self.raw.check()
    }

    /// The heap's geometry (chunk size, management size).
    #[must_use]
    pub fn geometry(&self) -> Geometry {
        self.raw.geometry()
    }

    /// Whether `ptr` points into this heap's span.
    #[must_use]
    pub fn contains<T: ?Sized>(&self, ptr: *const T) -> bool {
        let a = ptr.cast::<u8>() as usize;
        let b = self.raw.base().as_ptr() as usize;
        a >= b && a - b < self.raw.geometry().span()
    }
}

/// A value of type `T` in the shared heap, owned by this handle (the analogue of `Box`).
///
/// Workers see it through [`crate::Pool::run`] (`&T`) and [`crate::Pool::run_mut`] (`&mut T`), which
/// hold the borrow until the job has ended (or its worker has been killed), so the usual aliasing
/// rules hold across processes too.
pub struct SharedBox<T: ShareSafe> {
    ptr: NonNull<T>,
    heap: Heap,
}

impl<T: ShareSafe> SharedBox<T> {
    /// Moves `value` into the shared heap.
    ///
    /// # Errors
    /// [`AllocError::OutOfMemory`] or [`AllocError::BadLayout`].
    pub fn new(heap: &Heap, value: T) -> Result<Self, AllocError> {
        const { assert!(!std::mem::needs_drop::<T>(), "ShareSafe types need no drop") };
        let p = heap.alloc(Layout::new::<T>())?.cast::<T>();
        // SAFETY: `p` is a fresh block of the heap, sized and aligned for T, owned by nobody else.
        unsafe { p.as_ptr().write(value) };
        Ok(Self {
            ptr: p,
            heap: heap.clone(),
        })
    }

    /// The address in the shared heap (the same in every process of the pool).
    #[must_use]
    pub fn as_ptr(&self) -> *mut T {
        self.ptr.as_ptr()
    }

    /// Gives up ownership; the block stays allocated (free it with [`Heap::free`]).
    #[must_use]
    pub fn into_raw(self) -> NonNull<T> {
        let p = self.ptr;
        std::mem::forget(self);
        p
    }

    /// Takes ownership of a block holding a `T`.
    ///
    /// # Safety
    /// `ptr` must come from [`SharedBox::into_raw`] (or an allocation of `Layout::new::<T>()` holding
    /// an initialised `T`) of this heap, and nobody else may own it.
    pub unsafe fn from_raw(heap: &Heap, ptr: NonNull<T>) -> Self {
        Self {
            ptr,
            heap: heap.clone(),
        }
    }
}

impl<T: ShareSafe> std::ops::Deref for SharedBox<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the block holds an initialised T owned by this handle; other processes only reach it
        // through jobs that borrow this box (see the type docs), so no one writes it while `&T` lives
        // except through T's own atomics.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T: ShareSafe> std::ops::DerefMut for SharedBox<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as for Deref, and `&mut self` excludes every other borrow, including jobs.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T: ShareSafe> Drop for SharedBox<T> {
    fn drop(&mut self) {
        // SAFETY: this handle owns the block and is going away; T needs no drop.
        let r = unsafe { self.heap.free(self.ptr.cast()) };
        debug_assert!(r.is_ok(), "SharedBox free failed: {r:?}");
    }
}

impl<T: ShareSafe + std::fmt::Debug> std::fmt::Debug for SharedBox<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SharedBox").field(&**self).finish()
    }
}

/// A growable array in the shared heap (the analogue of `Vec`). Workers see it as `&[T]` /
/// `&mut [T]`; only the owner can change its length.
pub struct SharedVec<T: ShareSafe> {
    ptr: NonNull<T>,
    len: usize,
    cap: usize,
    heap: Heap,
}

impl<T: ShareSafe> SharedVec<T> {
    /// An empty vector with room for `cap` elements.
    ///
    /// # Errors
    /// [`AllocError::OutOfMemory`] or [`AllocError::BadLayout`] (size overflow).
    pub fn with_capacity(heap: &Heap, cap: usize) -> Result<Self, AllocError> {
        const { assert!(!std::mem::needs_drop::<T>(), "ShareSafe types need no drop") };
        let layout = Layout::array::<T>(cap.max(1)).map_err(|_| AllocError::BadLayout)?;
        let ptr = heap.alloc(layout)?.cast::<T>();
        Ok(Self {
            ptr,
            len: 0,
            cap: cap.max(1),
            heap: heap.clone(),
        })
    }

    /// A vector of `len` copies of `value`.
    ///
    /// # Errors
    /// As [`SharedVec::with_capacity`].
    pub fn from_elem(heap: &Heap, value: T, len: usize) -> Result<Self, AllocError>
    where
        T: Copy,
    {
        let mut v = Self::with_capacity(heap, len)?;
        for i in 0..len {
            // SAFETY: i < cap; the slot is inside the block and uninitialised or a plain old value.
            unsafe { v.ptr.as_ptr().wrapping_add(i).write(value) };
        }
        v.len = len;
        Ok(v)
    }

    /// Appends an element, moving the contents to a bigger block when full.
    ///
    /// # Errors
    /// [`AllocError::OutOfMemory`]; the vector is unchanged then.
    pub fn push(&mut self, value: T) -> Result<(), AllocError> {
        if self.len == self.cap {
            let cap = self.cap.checked_mul(2).ok_or(AllocError::BadLayout)?;
            let layout = Layout::array::<T>(cap).map_err(|_| AllocError::BadLayout)?;
            let new = self.heap.alloc(layout)?.cast::<T>();
            // SAFETY: both blocks hold at least `len` elements and are distinct allocations.
            unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr(), new.as_ptr(), self.len) };
            // SAFETY: the old block is ours and no longer referenced.
            let r = unsafe { self.heap.free(self.ptr.cast()) };
            debug_assert!(r.is_ok());
            self.ptr = new;
            self.cap = cap;
        }
        // SAFETY: len < cap, so the slot is inside the block.
        unsafe { self.ptr.as_ptr().wrapping_add(self.len).write(value) };
        self.len += 1;
        Ok(())
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

    /// Address of the first element (the same in every process).
    #[must_use]
    pub fn as_ptr(&self) -> *const T {
        self.ptr.as_ptr()
    }
}

impl<T: ShareSafe> std::ops::Deref for SharedVec<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `len` initialised elements in our block; aliasing as for SharedBox.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: ShareSafe> std::ops::DerefMut for SharedVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as for Deref, exclusive through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: ShareSafe> Drop for SharedVec<T> {
    fn drop(&mut self) {
        // SAFETY: we own the block and it is going away.
        let r = unsafe { self.heap.free(self.ptr.cast()) };
        debug_assert!(r.is_ok(), "SharedVec free failed: {r:?}");
    }
}

/// A node of a [`ListHead`]: a value and a plain pointer to the next node (in the shared heap).
#[repr(C)]
pub struct ListNode<T> {
    /// The value.
    pub value: T,
    next: *mut ListNode<T>,
}

/// A singly linked list living entirely in the shared heap: the head and every node. Any process can
/// walk it by following plain pointers; any process holding `&mut` can push nodes it allocates from
/// its own [`Heap`] handle (see [`crate::JobContext::heap`]).
#[repr(C)]
pub struct ListHead<T> {
    head: *mut ListNode<T>,
    len: u64,
}

// SAFETY: the head and nodes hold only values of T (ShareSafe) and pointers into the shared heap,
// which are valid in every process of the pool; a half-finished push leaves either the old head or a
// fully written node linked (the node is written before it is linked).
unsafe impl<T: ShareSafe> ShareSafe for ListHead<T> {}
// SAFETY: the list is shared read-only through `&ListHead` (walking), mutated only through `&mut`.
unsafe impl<T: ShareSafe + Sync> Sync for ListHead<T> {}
// SAFETY: as above: moving exclusive access to another thread is fine for ShareSafe contents.
unsafe impl<T: ShareSafe + Send> Send for ListHead<T> {}

impl<T: ShareSafe> ListHead<T> {
    /// Number of nodes.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the list is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.head.is_null()
    }

    /// Pushes a value at the front, allocating the node from `heap`.
    ///
    /// `heap` must be a handle on the heap this list lives in (any process's): a node from another
    /// pool's heap would dangle once that pool unmaps its memory.
    ///
    /// # Errors
    /// [`AllocError::ForeignPointer`] when the list does not live in `heap`;
    /// [`AllocError::OutOfMemory`]. The list is unchanged then.
    pub fn push_front(&mut self, heap: &Heap, value: T) -> Result<(), AllocError> {
        // A ListHead exists only inside a heap (built by SharedList::new, reached by jobs), so the
        // head's own address names the one heap its nodes may come from.
        if !heap.contains(self as *const Self) {
            return Err(AllocError::ForeignPointer);
        }
        let node = heap
            .alloc(Layout::new::<ListNode<T>>())?
            .cast::<ListNode<T>>();
        // SAFETY: fresh block sized and aligned for a node, owned by us until linked.
        unsafe {
            node.as_ptr().write(ListNode {
                value,
                next: self.head,
            })
        };
        self.head = node.as_ptr();
        // A process killed between the two stores leaves `len` one short: never trust it to be
        // exact (saturating here and in pop_front).
        self.len = self.len.saturating_add(1);
        Ok(())
    }

    /// Removes the front value, freeing its node into `heap` (a handle on the heap this list lives
    /// in). `Ok(None)` when the list is empty.
    ///
    /// # Errors
    /// [`AllocError::ForeignPointer`] when the list does not live in `heap`; the list is unchanged.
    pub fn pop_front(&mut self, heap: &Heap) -> Result<Option<T>, AllocError>
    where
        T: Copy,
    {
        if !heap.contains(self as *const Self) {
            return Err(AllocError::ForeignPointer);
        }
        let Some(node) = NonNull::new(self.head) else {
            return Ok(None);
        };
        // SAFETY: non-null heads point at live nodes of this list (structure invariant).
        let n = unsafe { node.as_ref() };
        let (value, next) = (n.value, n.next);
        self.head = next;
        self.len = self.len.saturating_sub(1);
        // SAFETY: the node is unlinked and owned by nobody now.
        let r = unsafe { heap.free(node.cast()) };
        // Nodes come from the head's heap (push_front checks it), so this cannot fail unless the
        // bookkeeping is corrupt; then the node is leaked rather than panicking.
        let _ = r;
        Ok(Some(value))
    }

    /// Walks the list.
    pub fn iter(&self) -> ListIter<'_, T> {
        ListIter {
            next: self.head,
            _list: PhantomData,
        }
    }

    /// Walks the list mutably (values only; the links stay as they are).
    pub fn for_each_mut(&mut self, mut f: impl FnMut(&mut T)) {
        let mut p = self.head;
        while let Some(mut n) = NonNull::new(p) {
            // SAFETY: `&mut self` gives exclusive access to every node; `n` is a live node.
            let node = unsafe { n.as_mut() };
            f(&mut node.value);
            p = node.next;
        }
    }

    fn free_all(&mut self, heap: &Heap) {
        let mut p = self.head;
        while let Some(n) = NonNull::new(p) {
            // SAFETY: live node of this list, exclusively ours.
            p = unsafe { (*n.as_ptr()).next };
            // SAFETY: unlinked from the walk above; nobody else owns it.
            let r = unsafe { heap.free(n.cast()) };
            // A node that is not a live block of `heap` (impossible since push_front checks the
            // heap, short of corruption) is leaked: never panic in a destructor over shared data.
            let _ = r;
        }
        self.head = std::ptr::null_mut();
        self.len = 0;
    }
}

/// Iterator over a [`ListHead`].
pub struct ListIter<'a, T> {
    next: *const ListNode<T>,
    _list: PhantomData<&'a ListHead<T>>,
}

impl<'a, T> Iterator for ListIter<'a, T> {
    type Item = &'a T;
    fn next(&mut self) -> Option<&'a T> {
        // SAFETY: non-null links point at live nodes for as long as the list is borrowed.
        let node = unsafe { self.next.as_ref()? };
        self.next = node.next;
        Some(&node.value)
    }
}

/// The owner of a [`ListHead`] in the shared heap; frees every node on drop.
///
/// It derefs to `&ListHead` only: `&mut ListHead` is reachable in the owner's process only through
/// these methods (and in a job through [`crate::Pool::run_mut`]), so two lists of different pools
/// cannot swap their nodes (which would leave nodes of one pool's heap in the other's):
///
/// ```compile_fail,E0596
/// fn f(a: &mut context_forkpool::SharedList<u64>, b: &mut context_forkpool::SharedList<u64>) {
///     std::mem::swap(&mut **a, &mut **b);
/// }
/// ```
pub struct SharedList<T: ShareSafe> {
    head: SharedBox<ListHead<T>>,
}

impl<T: ShareSafe> SharedList<T> {
    /// An empty list.
    ///
    /// # Errors
    /// [`AllocError::OutOfMemory`].
    pub fn new(heap: &Heap) -> Result<Self, AllocError> {
        Ok(Self {
            head: SharedBox::new(
                heap,
                ListHead {
                    head: std::ptr::null_mut(),
                    len: 0,
                },
            )?,
        })
    }

    /// Pushes at the front (allocating from this owner's heap handle).
    ///
    /// # Errors
    /// [`AllocError::OutOfMemory`].
    pub fn push_front(&mut self, value: T) -> Result<(), AllocError> {
        let heap = self.head.heap.clone();
        self.head.push_front(&heap, value)
    }

    /// Removes the front value (freeing its node into this owner's heap).
    pub fn pop_front(&mut self) -> Option<T>
    where
        T: Copy,
    {
        let heap = self.head.heap.clone();
        // The head lives in `heap` (SharedList::new put it there), so the check cannot fail.
        self.head.pop_front(&heap).ok().flatten()
    }

    /// Walks the list mutably (values only).
    pub fn for_each_mut(&mut self, f: impl FnMut(&mut T)) {
        self.head.for_each_mut(f);
    }
}

impl<T: ShareSafe> std::ops::Deref for SharedList<T> {
    type Target = ListHead<T>;
    fn deref(&self) -> &ListHead<T> {
        &self.head
    }
}

impl<T: ShareSafe> Drop for SharedList<T> {
    fn drop(&mut self) {
        let heap = self.head.heap.clone();
        self.head.free_all(&heap);
    }
}

/// Something a job can borrow: a typed owner whose target lives in the shared heap.
///
/// # Safety
/// `parts` must return an address (and metadata) such that `target`/`target_mut` rebuild a reference
/// to memory in the shared heap that stays valid while `self` is borrowed.
pub unsafe trait JobArg {
    /// What the job sees.
    type Target: ?Sized;
    /// Address and metadata (length for slices).
    fn parts(&self) -> (usize, usize);
    /// Rebuilds a shared reference in a worker.
    ///
    /// # Safety
    /// `(addr, meta)` must come from `parts` of a value borrowed for `'a` in the master.
    unsafe fn target<'a>(addr: usize, meta: usize) -> &'a Self::Target;
    /// Rebuilds an exclusive reference in a worker.
    ///
    /// # Safety
    /// As `target`, with the value borrowed mutably for `'a`.
    unsafe fn target_mut<'a>(addr: usize, meta: usize) -> &'a mut Self::Target;
}

// SAFETY: the box's block holds a T for as long as the box lives.
unsafe impl<T: ShareSafe> JobArg for SharedBox<T> {
    type Target = T;
    fn parts(&self) -> (usize, usize) {
        (self.ptr.as_ptr() as usize, 0)
    }
    unsafe fn target<'a>(addr: usize, _: usize) -> &'a T {
        // SAFETY: contract: `addr` is a live, borrowed T in the shared heap, mapped here too.
        unsafe { &*(addr as *const T) }
    }
    unsafe fn target_mut<'a>(addr: usize, _: usize) -> &'a mut T {
        // SAFETY: as above, borrowed exclusively.
        unsafe { &mut *(addr as *mut T) }
    }
}

// SAFETY: `len` initialised elements at `ptr` for as long as the vector lives and is borrowed.
unsafe impl<T: ShareSafe> JobArg for SharedVec<T> {
    type Target = [T];
    fn parts(&self) -> (usize, usize) {
        (self.ptr.as_ptr() as usize, self.len)
    }
    unsafe fn target<'a>(addr: usize, len: usize) -> &'a [T] {
        // SAFETY: contract: `len` live elements at `addr`, borrowed.
        unsafe { std::slice::from_raw_parts(addr as *const T, len) }
    }
    unsafe fn target_mut<'a>(addr: usize, len: usize) -> &'a mut [T] {
        // SAFETY: as above, borrowed exclusively.
        unsafe { std::slice::from_raw_parts_mut(addr as *mut T, len) }
    }
}

// SAFETY: delegates to the head box.
unsafe impl<T: ShareSafe> JobArg for SharedList<T> {
    type Target = ListHead<T>;
    fn parts(&self) -> (usize, usize) {
        self.head.parts()
    }
    unsafe fn target<'a>(addr: usize, meta: usize) -> &'a ListHead<T> {
        // SAFETY: forwarded contract.
        unsafe { <SharedBox<ListHead<T>> as JobArg>::target(addr, meta) }
    }
    unsafe fn target_mut<'a>(addr: usize, meta: usize) -> &'a mut ListHead<T> {
        // SAFETY: forwarded contract.
        unsafe { <SharedBox<ListHead<T>> as JobArg>::target_mut(addr, meta) }
    }
}
