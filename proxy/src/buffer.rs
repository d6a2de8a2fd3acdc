//! The cheat path: plain buffers copied directly between contexts, without serialization.
//!
//! A *plain buffer* is an object whose whole state is a slice of plain-old-data elements
//! ([`bytemuck::Pod`]: no pointers, no padding, every bit pattern valid). Nothing in it can point into
//! its own context, so its bytes may be copied straight into an object of another context: there is
//! nothing to translate, and that is the one case where skipping serialization keeps isolation.
//!
//! The mechanism is general:
//! 1. a type implements [`PlainBuffer`] (done here for [`Buffer`], `Vec<E>` and `Box<[E]>`);
//! 2. its service says so in [`crate::Serve::plain_access`] by returning
//!    `Some(plain_access::<T>())` ([`BufferService`] does; a hand-written service over its own plain
//!    type can too);
//! 3. [`copy`], [`Proxy::read_into`] and [`Proxy::write_from`] then work on its proxies: `copy`
//!    enters both contexts at once with [`context_core::enter_all`] (in the global order, so it cannot
//!    deadlock), borrows both objects and copies with `copy_from_slice` — a `memcpy`.
//!
//! The cheat path needs both contexts on the calling thread: free contexts (pinned ones only from
//! their own home thread). Otherwise it returns an error; the serialized methods ([`Proxy::read`],
//! [`Proxy::write`]) work everywhere.

use std::marker::PhantomData;
use std::ops::Range;

use bytemuck::Pod;
use context_core::Cx;
use serde::{Deserialize, Serialize};

use crate::codec::Codec;
use crate::error::CallError;
use crate::frame::ObjectId;
use crate::proxy::Proxy;
use crate::service::{Serve, Service};

/// An object that is a plain slice of [`Pod`] elements: safe to copy bytewise between contexts.
pub trait PlainBuffer: Send + 'static {
    /// The element type.
    type Elem: Pod;
    /// The contents.
    fn as_slice(&self) -> &[Self::Elem];
    /// The contents, mutably. The length never changes through this.
    fn as_mut_slice(&mut self) -> &mut [Self::Elem];
}

impl<E: Pod + Send> PlainBuffer for Vec<E> {
    type Elem = E;
    fn as_slice(&self) -> &[E] {
        self
    }
    fn as_mut_slice(&mut self) -> &mut [E] {
        self
    }
}

impl<E: Pod + Send> PlainBuffer for Box<[E]> {
    type Elem = E;
    fn as_slice(&self) -> &[E] {
        self
    }
    fn as_mut_slice(&mut self) -> &mut [E] {
        self
    }
}

/// A fixed-length buffer of plain elements: the standard object of the cheat path.
#[derive(Clone, PartialEq, Eq)]
pub struct Buffer<E: Pod = u8> {
    data: Box<[E]>,
}

impl<E: Pod> std::fmt::Debug for Buffer<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffer")
            .field("len", &self.data.len())
            .finish()
    }
}

impl<E: Pod> Buffer<E> {
    /// `len` zeroed elements.
    #[must_use]
    pub fn zeroed(len: usize) -> Self {
        Self {
            data: vec![E::zeroed(); len].into_boxed_slice(),
        }
    }

    /// The buffer's length in elements.
    #[must_use]
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the buffer is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

impl<E: Pod> From<Vec<E>> for Buffer<E> {
    fn from(v: Vec<E>) -> Self {
        Self {
            data: v.into_boxed_slice(),
        }
    }
}

impl<E: Pod + Send> PlainBuffer for Buffer<E> {
    type Elem = E;
    fn as_slice(&self) -> &[E] {
        &self.data
    }
    fn as_mut_slice(&mut self) -> &mut [E] {
        &mut self.data
    }
}

/// Direct byte access to a plain-buffer object, for the cheat path: runs `f` on the object's bytes
/// while the caller holds its context. Made by [`plain_access`]; stored in proxies of services that
/// return it from [`Serve::plain_access`].
#[derive(Clone, Copy)]
pub struct PlainAccess {
    pub(crate) elem_size: usize,
    pub(crate) view: ViewFn,
}

/// Runs a closure on a plain-buffer object's bytes, holding its context.
type ViewFn = fn(&Cx<'_>, ObjectId, &mut dyn FnMut(&mut [u8])) -> Result<(), CallError>;

impl std::fmt::Debug for PlainAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlainAccess")
            .field("elem_size", &self.elem_size)
            .finish()
    }
}

fn view_of<T: PlainBuffer>(
    cx: &Cx<'_>,
    object: ObjectId,
    f: &mut dyn FnMut(&mut [u8]),
) -> Result<(), CallError> {
    let handle = object
        .typed::<T>()
        .ok_or(crate::frame::FrameError::Mismatched)?;
    cx.with(handle, |b| f(bytemuck::cast_slice_mut(b.as_mut_slice())))
        .map_err(|e| CallError::from_access(e, std::any::type_name::<T>()))
}

/// The [`PlainAccess`] of a plain-buffer type, for [`Serve::plain_access`].
#[must_use]
pub fn plain_access<T: PlainBuffer>() -> PlainAccess {
    PlainAccess {
        elem_size: std::mem::size_of::<T::Elem>(),
        view: view_of::<T>,
    }
}

/// The service of plain buffers of `E`, served by every [`PlainBuffer`] with `Elem = E`. Its
/// serialized methods carry the bytes through frames; its proxies also take the cheat path.
pub struct BufferService<E: Pod = u8>(PhantomData<fn() -> E>);

/// A request to a [`BufferService`].
#[derive(Debug, Serialize, Deserialize)]
pub enum BufferRequest<'a> {
    /// The length in elements.
    Len,
    /// Read elements `start..end`, as bytes.
    Read {
        /// First element.
        start: u64,
        /// One past the last element.
        end: u64,
    },
    /// Write `bytes` (whole elements) starting at element `start`.
    Write {
        /// First element.
        start: u64,
        /// The elements' bytes, borrowed from the frame.
        #[serde(borrow, with = "serde_bytes")]
        bytes: &'a [u8],
    },
}

/// A response from a [`BufferService`].
#[derive(Debug, Serialize, Deserialize)]
pub enum BufferResponse {
    /// The length in elements.
    Len(u64),
    /// The bytes read.
    Read(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Written.
    Written,
    /// A range was out of bounds (or not whole elements).
    OutOfRange {
        /// Start, in elements.
        start: u64,
        /// End, in elements.
        end: u64,
        /// The buffer's length in elements.
        len: u64,
    },
}

impl<E: Pod> Service for BufferService<E> {
    const NAME: &'static str = "context_proxy::BufferService";
    type Request<'a> = BufferRequest<'a>;
    type Response = BufferResponse;
}

fn elem_range(start: u64, end: u64, len: usize) -> Option<Range<usize>> {
    let (s, e) = (usize::try_from(start).ok()?, usize::try_from(end).ok()?);
    (s <= e && e <= len).then_some(s..e)
}

impl<E: Pod, T: PlainBuffer<Elem = E>> Serve<T> for BufferService<E> {
    fn serve(object: &mut T, request: BufferRequest<'_>) -> BufferResponse {
        let data = object.as_mut_slice();
        let len = data.len();
        let size = std::mem::size_of::<E>();
        match request {
            BufferRequest::Len => BufferResponse::Len(len as u64),
            BufferRequest::Read { start, end } => match elem_range(start, end, len) {
                Some(r) => BufferResponse::Read(bytemuck::cast_slice::<E, u8>(&data[r]).to_vec()),
                None => BufferResponse::OutOfRange {
                    start,
                    end,
                    len: len as u64,
                },
            },
            BufferRequest::Write { start, bytes } => {
                let n = bytes.len().checked_div(size).unwrap_or(0);
                let end = start.saturating_add(n as u64);
                match elem_range(start, end, len) {
                    Some(r) if n * size == bytes.len() => {
                        bytemuck::cast_slice_mut::<E, u8>(&mut data[r]).copy_from_slice(bytes);
                        BufferResponse::Written
                    }
                    _ => BufferResponse::OutOfRange {
                        start,
                        end,
                        len: len as u64,
                    },
                }
            }
        }
    }

    fn plain_access() -> Option<crate::PlainAccess> {
        Some(plain_access::<T>())
    }
}

fn out_of_range(start: usize, end: usize, len: usize) -> CallError {
    CallError::OutOfRange {
        start: start as u64,
        end: end as u64,
        len: len as u64,
    }
}

fn byte_range(r: &Range<usize>, size: usize, len_bytes: usize) -> Result<Range<usize>, CallError> {
    let len = len_bytes.checked_div(size).unwrap_or(0);
    match (r.start.checked_mul(size), r.end.checked_mul(size)) {
        (Some(s), Some(e)) if s <= e && e <= len_bytes => Ok(s..e),
        _ => Err(out_of_range(r.start, r.end, len)),
    }
}

impl<E: Pod, C: Codec> Proxy<BufferService<E>, C> {
    /// The buffer's length in elements (serialized call).
    ///
    /// # Errors
    /// As for [`Proxy::call`].
    pub fn len(&self) -> Result<usize, CallError> {
        match self.call(BufferRequest::Len)? {
            BufferResponse::Len(n) => usize::try_from(n).map_err(|_| CallError::UnexpectedResponse),
            _ => Err(CallError::UnexpectedResponse),
        }
    }

    /// Whether the buffer is empty (serialized call).
    ///
    /// # Errors
    /// As for [`Proxy::call`].
    pub fn is_empty(&self) -> Result<bool, CallError> {
        self.len().map(|n| n == 0)
    }

    /// Reads elements `range` through a serialized call (the bytes travel in the reply frame).
    ///
    /// # Errors
    /// [`CallError::OutOfRange`], and as for [`Proxy::call`].
    pub fn read(&self, range: Range<usize>) -> Result<Vec<E>, CallError> {
        match self.call(BufferRequest::Read {
            start: range.start as u64,
            end: range.end as u64,
        })? {
            BufferResponse::Read(bytes) => {
                if std::mem::size_of::<E>() == 0 {
                    // No bytes travel for zero-sized elements; the target checked the range.
                    let n = range.end.saturating_sub(range.start);
                    return if bytes.is_empty() {
                        Ok(vec![E::zeroed(); n])
                    } else {
                        Err(CallError::UnexpectedResponse)
                    };
                }
                // Same layout (e.g. `E = u8`): reuse the decoded allocation.
                let bytes = match bytemuck::allocation::try_cast_vec::<u8, E>(bytes) {
                    Ok(v) => return Ok(v),
                    Err((_, bytes)) => bytes,
                };
                let mut out = vec![E::zeroed(); bytes.len() / std::mem::size_of::<E>().max(1)];
                let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut out);
                if dst.len() != bytes.len() {
                    return Err(CallError::UnexpectedResponse);
                }
                dst.copy_from_slice(&bytes);
                Ok(out)
            }
            BufferResponse::OutOfRange { start, end, len } => {
                Err(CallError::OutOfRange { start, end, len })
            }
            _ => Err(CallError::UnexpectedResponse),
        }
    }

    /// Writes `data` at element `start` through a serialized call (the bytes travel in the request
    /// frame and are decoded borrowed, then copied once into the buffer).
    ///
    /// # Errors
    /// [`CallError::OutOfRange`], and as for [`Proxy::call`].
    pub fn write(&self, start: usize, data: &[E]) -> Result<(), CallError> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        match self.call(BufferRequest::Write {
            start: start as u64,
            bytes,
        })? {
            BufferResponse::Written => Ok(()),
            BufferResponse::OutOfRange { start, end, len } => {
                Err(CallError::OutOfRange { start, end, len })
            }
            _ => Err(CallError::UnexpectedResponse),
        }
    }

    /// Cheat path: copies elements from `start` into `out` directly (one `memcpy` while holding the
    /// buffer's context).
    ///
    /// # Errors
    /// [`CallError::OutOfRange`]; [`CallError::Unsupported`] for a proxy over another transport;
    /// entering the context failed (a pinned context from another thread).
    pub fn read_into(&self, start: usize, out: &mut [E]) -> Result<(), CallError> {
        let end = start
            .checked_add(out.len())
            .ok_or_else(|| out_of_range(start, usize::MAX, 0))?;
        let dst: &mut [u8] = bytemuck::cast_slice_mut(out);
        with_one(self, |bytes, size| {
            let r = byte_range(&(start..end), size, bytes.len())?;
            dst.copy_from_slice(&bytes[r]);
            Ok(())
        })
    }

    /// Cheat path: copies `data` into the buffer at element `start` directly.
    ///
    /// # Errors
    /// As for [`Proxy::read_into`].
    pub fn write_from(&self, start: usize, data: &[E]) -> Result<(), CallError> {
        let end = start
            .checked_add(data.len())
            .ok_or_else(|| out_of_range(start, usize::MAX, 0))?;
        let src: &[u8] = bytemuck::cast_slice(data);
        with_one(self, |bytes, size| {
            let r = byte_range(&(start..end), size, bytes.len())?;
            bytes[r].copy_from_slice(src);
            Ok(())
        })
    }
}

fn no_plain() -> CallError {
    CallError::Unsupported("the cheat path needs an in-process proxy of a plain-buffer service")
}

fn with_one<S: Service, C: Codec>(
    p: &Proxy<S, C>,
    f: impl FnOnce(&mut [u8], usize) -> Result<(), CallError>,
) -> Result<(), CallError> {
    let (ctx, access) = p.plain().ok_or_else(no_plain)?;
    let object = p.object();
    context_core::enter_all(&[ctx], |cxs| {
        let mut f = Some(f);
        let mut result = Err(no_plain());
        (access.view)(&cxs[0], object, &mut |bytes| {
            if let Some(f) = f.take() {
                result = f(bytes, access.elem_size);
            }
        })?;
        result
    })?
}

/// Cheat path: copies elements `src_range` of `src` to `dst` starting at element `dst_start`, both
/// plain buffers of `E`, possibly in different contexts: enters both at once (global order) and
/// copies memory directly, no serialization. Copying within one buffer works too (`copy_within`).
///
/// # Errors
/// [`CallError::OutOfRange`]; [`CallError::Unsupported`] for proxies over other transports; the
/// object errors of [`Proxy::call`]; entering failed (closed, a pinned context from another thread).
pub fn copy<E: Pod, C1: Codec, C2: Codec>(
    src: &Proxy<BufferService<E>, C1>,
    src_range: Range<usize>,
    dst: &Proxy<BufferService<E>, C2>,
    dst_start: usize,
) -> Result<(), CallError> {
    copy_plain(src, src_range, dst, dst_start)
}

/// [`copy`] for any two services whose objects are plain buffers ([`Serve::plain_access`]), with
/// ranges in elements of the source. The element sizes must agree.
///
/// # Errors
/// As for [`copy`]; [`CallError::Unsupported`] if either proxy is not a plain buffer or the element
/// sizes differ.
pub fn copy_plain<A: Service, B: Service, C1: Codec, C2: Codec>(
    src: &Proxy<A, C1>,
    src_range: Range<usize>,
    dst: &Proxy<B, C2>,
    dst_start: usize,
) -> Result<(), CallError> {
    let (sctx, sacc) = src.plain().ok_or_else(no_plain)?;
    let (dctx, dacc) = dst.plain().ok_or_else(no_plain)?;
    if sacc.elem_size != dacc.elem_size {
        return Err(CallError::Unsupported(
            "plain buffers of different element sizes",
        ));
    }
    let size = sacc.elem_size;
    let n = src_range.end.saturating_sub(src_range.start);
    let dst_range = dst_start
        ..dst_start
            .checked_add(n)
            .ok_or_else(|| out_of_range(dst_start, usize::MAX, 0))?;
    let (so, dobj) = (src.object(), dst.object());

    if so == dobj && sctx.id() == dctx.id() {
        // One object: borrow it once and move within it.
        return context_core::enter_all(&[sctx], |cxs| {
            let mut result = Ok(());
            (sacc.view)(&cxs[0], so, &mut |bytes| {
                result = byte_range(&src_range, size, bytes.len()).and_then(|s| {
                    let d = byte_range(&dst_range, size, bytes.len())?;
                    bytes.copy_within(s, d.start);
                    Ok(())
                });
            })?;
            result
        })?;
    }

    context_core::enter_all(&[sctx, dctx], |cxs| {
        let (a, b) = cxs.split_at_mut(1);
        let mut result = Ok(());
        (sacc.view)(&a[0], so, &mut |s| {
            let outcome = (dacc.view)(&b[0], dobj, &mut |d| {
                result = byte_range(&src_range, size, s.len()).and_then(|sr| {
                    let dr = byte_range(&dst_range, size, d.len())?;
                    d[dr].copy_from_slice(&s[sr]);
                    Ok(())
                });
            });
            if let Err(e) = outcome {
                result = Err(e);
            }
        })?;
        result
    })?
}
