//! Context identities and typed object handles.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU64, Ordering};

/// A context's identity: unique in this process for its lifetime, never reused, and the global order
/// in which several contexts are entered at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContextId(NonZeroU64);

impl ContextId {
    pub(crate) fn fresh() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        // Relaxed: only uniqueness matters. 2^64 ids cannot be exhausted in practice (at one id per
        // nanosecond, 584 years); `get` would panic rather than wrap.
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Self(NonZeroU64::new(n).unwrap_or(NonZeroU64::MIN))
    }

    /// The raw number, for logs and wire formats.
    #[must_use]
    pub fn get(self) -> u64 {
        self.0.get()
    }

    /// Rebuilds an id from [`ContextId::get`] (for decoders); `None` for 0.
    #[must_use]
    pub fn from_raw(raw: u64) -> Option<Self> {
        NonZeroU64::new(raw).map(Self)
    }
}

impl fmt::Display for ContextId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A typed name for an object that lives in a context: context id, slot and generation.
///
/// A handle is `Copy + Send + Sync` and grants nothing by itself: the object is reached only through
/// a [`crate::Cx`], the proof that the thread holds the owning context. A handle used in the wrong
/// context, after its object was removed, or with a type it was not made for yields an
/// [`crate::AccessError`].
pub struct Handle<T: ?Sized> {
    pub(crate) context: ContextId,
    pub(crate) slot: u32,
    pub(crate) generation: u32,
    _type: PhantomData<fn() -> T>,
}

impl<T: ?Sized> Handle<T> {
    pub(crate) fn new(context: ContextId, slot: u32, generation: u32) -> Self {
        Self {
            context,
            slot,
            generation,
            _type: PhantomData,
        }
    }

    /// The context that owns the object.
    #[must_use]
    pub fn context(&self) -> ContextId {
        self.context
    }

    /// The same name with another type. Safe: using it checks the stored type and yields
    /// [`crate::AccessError::WrongType`] on a mismatch. Wire decoders use it to rebuild handles.
    #[must_use]
    pub fn cast<U: ?Sized>(self) -> Handle<U> {
        Handle::new(self.context, self.slot, self.generation)
    }

    /// The handle as three numbers (context, slot, generation), for wire formats.
    #[must_use]
    pub fn to_raw(self) -> (u64, u32, u32) {
        (self.context.get(), self.slot, self.generation)
    }

    /// Rebuilds a handle from [`Handle::to_raw`]; `None` if the context number is 0. A forged or
    /// stale handle is harmless: using it yields an error.
    #[must_use]
    pub fn from_raw(context: u64, slot: u32, generation: u32) -> Option<Self> {
        ContextId::from_raw(context).map(|c| Self::new(c, slot, generation))
    }
}

impl<T: ?Sized> Clone for Handle<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T: ?Sized> Copy for Handle<T> {}
impl<T: ?Sized> PartialEq for Handle<T> {
    fn eq(&self, other: &Self) -> bool {
        self.to_raw() == other.to_raw()
    }
}
impl<T: ?Sized> Eq for Handle<T> {}
impl<T: ?Sized> Hash for Handle<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.to_raw().hash(state);
    }
}
impl<T: ?Sized> fmt::Debug for Handle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Handle<{}>({}:{}v{})",
            std::any::type_name::<T>(),
            self.context,
            self.slot,
            self.generation
        )
    }
}
