//! The one place that picks the synchronization primitives, so that `--cfg loom` swaps them all for
//! loom's model-checked versions (the convention of tokio's `loom` module).
//!
//! Only the lock protocol ([`crate::LocalLock`]) goes through here: it is what the loom models check.

#[cfg(loom)]
pub(crate) use loom::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, Ordering},
    },
    thread::{Thread, current, park},
};

#[cfg(not(loom))]
pub(crate) use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, Ordering},
    },
    thread::{Thread, current, park, park_timeout},
};

/// Locks a queue mutex. A poisoned queue mutex cannot happen: nothing that may panic runs while it
/// is held (only `VecDeque` operations, whose allocation failure aborts rather than unwinds). We still
/// take the data rather than panic, because the queue is valid after every single operation.
pub(crate) fn lock_queue<T>(m: &Mutex<T>) -> impl std::ops::DerefMut<Target = T> + '_ {
    #[cfg(loom)]
    {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }
    #[cfg(not(loom))]
    {
        m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One pause inside a spin loop. Under loom a spin must yield, or the model never ends.
#[inline]
pub(crate) fn spin_pause() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    std::hint::spin_loop();
}
