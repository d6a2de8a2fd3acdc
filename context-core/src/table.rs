//! The object table of a context: slots with generations, borrow flags and poison flags.
//!
//! Pure bookkeeping over heap memory (Miri runs its tests). The table is only ever touched by the
//! thread that holds its context; [`crate::Cx`] enforces that before calling in here.
//!
//! Objects are stored as raw pointers from `Box::into_raw` rather than as `Box`es so that moving a
//! slot (when the slot vector grows) never asserts uniqueness over an object that a caller further up
//! the stack is still mutating through a `&mut T` (the borrow flag guarantees that caller is the only
//! one; a moved `Box` would invalidate its reference under Rust's aliasing rules).

use std::any::{Any, TypeId};
use std::ptr::NonNull;

use crate::error::AccessError;
use crate::handle::{ContextId, Handle};

struct Entry {
    /// INVARIANT: from `Box::into_raw`, owned by this entry; freed exactly once, by `take_box`.
    object: NonNull<dyn Any>,
    type_id: TypeId,
    type_name: &'static str,
    /// 0, or the call chain (`handoff::current_chain`) on whose stack a `&mut` to the object is live.
    borrower: u64,
    /// A panic unwound through a borrow of the object.
    poisoned: bool,
}

struct Slot {
    generation: u32,
    entry: Option<Entry>,
}

/// The table. Not `Send`: it may hold objects that are not `Send` (pinned contexts).
pub(crate) struct Table {
    context: ContextId,
    slots: Vec<Slot>,
    free: Vec<u32>,
    live: usize,
}

impl Table {
    pub(crate) fn new(context: ContextId) -> Self {
        Self {
            context,
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.live
    }

    pub(crate) fn insert<T: 'static>(&mut self, value: T) -> Result<Handle<T>, AccessError> {
        let slot_index = match self.free.pop() {
            Some(i) => i,
            None => {
                let i =
                    u32::try_from(self.slots.len()).map_err(|_| AccessError::Full(self.context))?;
                if i == u32::MAX {
                    return Err(AccessError::Full(self.context));
                }
                self.slots.push(Slot {
                    generation: 0,
                    entry: None,
                });
                i
            }
        };
        let boxed: Box<dyn Any> = Box::new(value);
        let entry = Entry {
            object: NonNull::from(Box::leak(boxed)),
            type_id: TypeId::of::<T>(),
            type_name: std::any::type_name::<T>(),
            borrower: 0,
            poisoned: false,
        };
        let slot = &mut self.slots[slot_index as usize];
        slot.entry = Some(entry);
        self.live += 1;
        Ok(Handle::new(self.context, slot_index, slot.generation))
    }

    #[inline]
    fn entry_mut<T: ?Sized>(&mut self, h: Handle<T>) -> Result<&mut Entry, AccessError> {
        if h.context != self.context {
            return Err(AccessError::WrongContext {
                handle: h.context,
                context: self.context,
            });
        }
        match self.slots.get_mut(h.slot as usize) {
            Some(Slot {
                generation,
                entry: Some(e),
            }) if *generation == h.generation => Ok(e),
            _ => Err(AccessError::Stale(self.context)),
        }
    }

    #[inline]
    fn check_type<T: 'static>(e: &Entry) -> Result<(), AccessError> {
        if e.type_id == TypeId::of::<T>() {
            Ok(())
        } else {
            Err(AccessError::WrongType {
                expected: std::any::type_name::<T>(),
                found: e.type_name,
            })
        }
    }

    pub(crate) fn contains<T: 'static>(&mut self, h: Handle<T>) -> bool {
        self.entry_mut(h)
            .is_ok_and(|e| Self::check_type::<T>(e).is_ok())
    }

    /// Marks the object borrowed by call chain `me` (never 0) and returns a pointer to it. The
    /// caller must call [`Table::end_borrow`] with the same handle when done (a drop guard does).
    #[inline]
    pub(crate) fn begin_borrow<T: 'static>(
        &mut self,
        h: Handle<T>,
        me: u64,
    ) -> Result<NonNull<T>, AccessError> {
        let context = self.context;
        let e = self.entry_mut(h)?;
        Self::check_type::<T>(e)?;
        // One test on the common path (free and unpoisoned); the cold branch tells which.
        if e.borrower != 0 || e.poisoned {
            return Err(if e.borrower == me {
                AccessError::Busy(context)
            } else if e.borrower != 0 {
                crate::waits::note_in_use(me, e.borrower);
                AccessError::InUse(context)
            } else {
                AccessError::Poisoned(context)
            });
        }
        e.borrower = me;
        // The type id was checked above, so the object is a `T`.
        Ok(e.object.cast::<T>())
    }

    /// Ends a borrow from [`Table::begin_borrow`]; `poison` marks the object poisoned.
    ///
    /// The handle was checked when the borrow began, and a borrowed object cannot be removed nor its
    /// slot reused meanwhile (`remove` refuses it, and `clear` runs only after `check_no_borrows`),
    /// so only the slot's index is looked up again: the slot vector may have moved (an insert
    /// during the borrow), the slot has not.
    #[inline]
    pub(crate) fn end_borrow<T: ?Sized>(&mut self, h: Handle<T>, poison: bool) {
        if let Some(Slot { entry: Some(e), .. }) = self.slots.get_mut(h.slot as usize) {
            e.borrower = 0;
            e.poisoned |= poison;
        }
    }

    pub(crate) fn clear_poison<T: 'static>(&mut self, h: Handle<T>) -> Result<bool, AccessError> {
        let e = self.entry_mut(h)?;
        Self::check_type::<T>(e)?;
        Ok(std::mem::replace(&mut e.poisoned, false))
    }

    pub(crate) fn remove<T: 'static>(&mut self, h: Handle<T>) -> Result<T, AccessError> {
        let context = self.context;
        let e = self.entry_mut(h)?;
        Self::check_type::<T>(e)?;
        if e.borrower != 0 {
            return Err(AccessError::Busy(context));
        }
        let slot = &mut self.slots[h.slot as usize];
        let entry = slot.entry.take().ok_or(AccessError::Stale(context))?;
        // A slot whose generation would wrap is retired instead of reused, so an old handle can
        // never name a new object.
        match slot.generation.checked_add(1) {
            Some(g) => {
                slot.generation = g;
                self.free.push(h.slot);
            }
            None => slot.generation = u32::MAX,
        }
        self.live -= 1;
        let boxed = Self::take_box(entry);
        match boxed.downcast::<T>() {
            Ok(b) => Ok(*b),
            // Unreachable: the type id was checked. Dropping the box is still correct.
            Err(_) => Err(AccessError::Stale(context)),
        }
    }

    fn take_box(entry: Entry) -> Box<dyn Any> {
        // SAFETY: `entry.object` came from `Box::leak` of a `Box<dyn Any>` (INVARIANT on `Entry`),
        // and the entry is consumed here, so the box is rebuilt exactly once.
        unsafe { Box::from_raw(entry.object.as_ptr()) }
    }

    /// Fails with `Busy` if any object is borrowed (closing then would free it under its user).
    pub(crate) fn check_no_borrows(&self) -> Result<(), AccessError> {
        let busy = self
            .slots
            .iter()
            .any(|s| s.entry.as_ref().is_some_and(|e| e.borrower != 0));
        if busy {
            Err(AccessError::Busy(self.context))
        } else {
            Ok(())
        }
    }

    /// Takes every object out of the table, which is then empty (closing a context). Generations
    /// move on as for `remove`, so a handle from before can never name an object added later.
    /// Borrowed objects are taken too: closing happens only from a scope that holds no borrow.
    ///
    /// The objects are returned rather than dropped: their destructors are user code, which may
    /// re-enter the context and use the table, so they must run with no `&mut Table` live.
    pub(crate) fn take_all(&mut self) -> Vec<Box<dyn Any>> {
        let mut out = Vec::with_capacity(self.live);
        self.free.clear();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if let Some(entry) = slot.entry.take() {
                out.push(Self::take_box(entry));
                slot.generation = slot.generation.saturating_add(1);
            }
            if slot.generation != u32::MAX {
                // `slots.len()` fits in u32 (checked by `insert`).
                self.free.push(i as u32);
            }
        }
        // Reused lowest index first, as before.
        self.free.reverse();
        self.live = 0;
        out
    }
}

/// Drops `objects` one by one, going on past a destructor that panics (so every object is
/// dropped here, on this thread, even then), and returns the first panic's payload.
pub(crate) fn drop_all(objects: Vec<Box<dyn Any>>) -> Option<Box<dyn Any + Send>> {
    let mut first = None;
    for o in objects {
        if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(o))) {
            if first.is_none() {
                first = Some(p);
            } else {
                crate::handoff::discard_payload(p);
            }
        }
    }
    first
}

impl Drop for Table {
    fn drop(&mut self) {
        // Normally empty by now (closing empties it, on the home thread for a pinned context).
        // A panic here would abort if we are already unwinding, so a destructor's panic ends here.
        if let Some(p) = drop_all(self.take_all()) {
            crate::handoff::discard_payload(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: u64 = 1;
    const OTHER: u64 = 2;

    #[test]
    fn borrowed_by_this_thread_is_busy_by_another_in_use() {
        let mut t = table();
        let h = t.insert(1u8).unwrap();
        t.begin_borrow(h, OTHER).unwrap();
        assert_eq!(t.begin_borrow(h, ME), Err(AccessError::InUse(t.context)));
        assert_eq!(t.begin_borrow(h, OTHER), Err(AccessError::Busy(t.context)));
        t.end_borrow(h, false);
        assert!(t.begin_borrow(h, ME).is_ok());
    }

    fn table() -> Table {
        Table::new(ContextId::fresh())
    }

    #[test]
    fn insert_borrow_remove() {
        let mut t = table();
        let h = t.insert(String::from("x")).unwrap();
        let p = t.begin_borrow(h, ME).unwrap();
        // SAFETY: the borrow flag is set, nothing else reaches the object.
        unsafe { (*p.as_ptr()).push('y') };
        assert_eq!(t.begin_borrow(h, ME), Err(AccessError::Busy(t.context)));
        t.end_borrow(h, false);
        assert_eq!(t.remove(h).unwrap(), "xy");
        assert_eq!(t.len(), 0);
        assert_eq!(t.remove(h), Err(AccessError::Stale(t.context)));
    }

    #[test]
    fn stale_after_slot_reuse() {
        let mut t = table();
        let a = t.insert(1u32).unwrap();
        t.remove(a).unwrap();
        let b = t.insert(2u32).unwrap();
        assert_eq!(a.slot, b.slot);
        assert!(!t.contains(a));
        assert!(t.contains(b));
        assert!(matches!(t.begin_borrow(a, ME), Err(AccessError::Stale(_))));
    }

    #[test]
    fn wrong_type_and_wrong_context() {
        let mut t = table();
        let h = t.insert(5u8).unwrap();
        let err = t.begin_borrow(h.cast::<u16>(), ME).unwrap_err();
        assert!(matches!(
            err,
            AccessError::WrongType {
                expected: "u16",
                found: "u8"
            }
        ));
        let mut other = table();
        assert!(matches!(
            other.begin_borrow(h, ME),
            Err(AccessError::WrongContext { .. })
        ));
    }

    #[test]
    fn poison_and_clear() {
        let mut t = table();
        let h = t.insert(vec![1]).unwrap();
        t.begin_borrow(h, ME).unwrap();
        t.end_borrow(h, true);
        assert!(matches!(
            t.begin_borrow(h, ME),
            Err(AccessError::Poisoned(_))
        ));
        assert_eq!(t.clear_poison(h), Ok(true));
        assert!(t.begin_borrow(h, ME).is_ok());
    }

    #[test]
    fn growth_keeps_borrowed_object_valid() {
        let mut t = table();
        let h = t.insert(vec![0u64; 4]).unwrap();
        let p = t.begin_borrow(h, ME).unwrap();
        for i in 0..1000u64 {
            t.insert(i).unwrap();
        }
        // SAFETY: still borrowed exclusively; objects live in their own boxes, not in the slot vector.
        unsafe { (&mut *p.as_ptr())[3] = 7 };
        // What `end_borrow` relies on: a borrowed object's slot is neither emptied nor reused.
        assert!(matches!(t.remove(h), Err(AccessError::Busy(_))));
        assert!(matches!(t.check_no_borrows(), Err(AccessError::Busy(_))));
        t.end_borrow(h, false);
        assert_eq!(t.remove(h).unwrap(), vec![0, 0, 0, 7]);
        assert_eq!(t.len(), 1000);
    }

    #[test]
    fn clear_drops_everything() {
        use std::rc::Rc;
        let marker = Rc::new(());
        let mut t = table();
        for _ in 0..10 {
            t.insert(Rc::clone(&marker)).unwrap();
        }
        assert_eq!(Rc::strong_count(&marker), 11);
        let h = t.insert(Rc::clone(&marker)).unwrap();
        assert!(drop_all(t.take_all()).is_none());
        assert_eq!(Rc::strong_count(&marker), 1);
        assert_eq!(t.len(), 0);
        // The generation moved on: the old handle is stale, also for the object that reuses its slot.
        let again = t.insert(Rc::clone(&marker)).unwrap();
        assert_eq!(again.slot, 0);
        assert_eq!(t.remove(h), Err(AccessError::Stale(t.context)));
        assert!(t.remove(again).is_ok());
    }

    #[test]
    fn drop_all_goes_on_past_a_panicking_destructor() {
        use std::rc::Rc;
        struct Bomb;
        impl Drop for Bomb {
            fn drop(&mut self) {
                panic!("destructor panics on purpose");
            }
        }
        let marker = Rc::new(());
        let mut t = table();
        t.insert(Bomb).unwrap();
        t.insert(Rc::clone(&marker)).unwrap();
        t.insert(Bomb).unwrap();
        t.insert(Rc::clone(&marker)).unwrap();
        let p = drop_all(t.take_all()).expect("the first panic is returned");
        assert_eq!(
            p.downcast_ref::<&str>(),
            Some(&"destructor panics on purpose")
        );
        assert_eq!(
            Rc::strong_count(&marker),
            1,
            "the objects after each bomb were dropped"
        );
    }
}
