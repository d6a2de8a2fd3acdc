//! Frames: a fixed 32-byte header and a codec-encoded body.
//!
//! Every message a transport moves is one frame. The header is checked on receipt before the body
//! is looked at:
//!
//! | offset | size | field        | check on receipt                                         |
//! |-------:|-----:|--------------|----------------------------------------------------------|
//! | 0      | 2    | magic `"cx"` | must match                                               |
//! | 2      | 1    | version      | must be [`VERSION`]                                      |
//! | 3      | 1    | kind         | must be a known [`FrameKind`], and the one expected      |
//! | 4      | 4    | body length  | little endian; must equal the bytes that follow, and be at most the codec's limit |
//! | 8      | 8    | service id   | requests: must be the target object's service            |
//! | 16     | 16   | object       | context id, slot, generation (little endian)             |
//!
//! Replies echo the service id and object of their request, so a transport that could mix up
//! replies is caught. Pure logic over byte slices: Miri runs these tests.

use serde::{Deserialize, Serialize};

use context_core::Handle;

use crate::codec::{Codec, CodecError};

/// Length of the frame header in bytes.
pub const HEADER_LEN: usize = 32;
/// The frame format version this crate writes and accepts.
pub const VERSION: u8 = 1;
const MAGIC: [u8; 2] = *b"cx";

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u8)]
pub enum FrameKind {
    /// A method call: the body is the service's request.
    Request = 1,
    /// A successful answer: the body is the service's response.
    Reply = 2,
    /// A failed call: the body is an encoded error.
    Error = 3,
}

/// An object's name on the wire: the three numbers of a [`Handle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ObjectId {
    /// The owning context's id.
    pub context: u64,
    /// Slot in the context's table.
    pub slot: u32,
    /// Generation of the slot.
    pub generation: u32,
}

impl ObjectId {
    /// The wire name of a handle.
    #[must_use]
    pub fn of<T: ?Sized>(h: Handle<T>) -> Self {
        let (context, slot, generation) = h.to_raw();
        Self {
            context,
            slot,
            generation,
        }
    }

    /// A typed handle again; `None` for context 0 (never a real context). A forged or stale one is
    /// harmless: using it yields an error.
    #[must_use]
    pub fn typed<T: ?Sized>(self) -> Option<Handle<T>> {
        Handle::from_raw(self.context, self.slot, self.generation)
    }
}

/// A checked frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the body is.
    pub kind: FrameKind,
    /// Body length in bytes.
    pub len: u32,
    /// [`crate::Service::ID`] of the service called.
    pub service: u64,
    /// The object called.
    pub object: ObjectId,
}

/// Why a frame was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[non_exhaustive]
pub enum FrameError {
    /// Fewer bytes than a header.
    #[error("frame of {0} bytes is shorter than its {HEADER_LEN}-byte header")]
    Short(usize),
    /// The first two bytes are not the magic.
    #[error("bad frame magic")]
    BadMagic,
    /// A version this build does not speak.
    #[error("frame version {0}, expected {VERSION}")]
    Version(u8),
    /// An unknown kind byte.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A known kind, but not the one expected here.
    #[error("unexpected frame kind {found:?}, expected {expected:?}")]
    UnexpectedKind {
        /// What the receiver expected.
        expected: FrameKind,
        /// What arrived.
        found: FrameKind,
    },
    /// The header's length does not match the bytes that follow it.
    #[error("header says {header} body bytes, frame has {actual}")]
    LengthMismatch {
        /// Length in the header.
        header: u64,
        /// Bytes actually present.
        actual: u64,
    },
    /// The body is longer than the codec's limit.
    #[error("frame body of {len} bytes is over the limit of {limit}")]
    TooLarge {
        /// Body length.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// A reply does not answer the request it came back for.
    #[error("reply does not match its request (service or object differ)")]
    Mismatched,
}

#[inline]
fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

#[inline]
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Writes a whole frame into `out` (cleared first): header, then `body` encoded with `C`.
///
/// # Errors
/// The codec failed, or the body is over `C::LIMIT` (or over `u32::MAX`). `out` is then empty.
#[inline]
pub fn encode<C: Codec, T: Serialize + ?Sized>(
    out: &mut Vec<u8>,
    kind: FrameKind,
    service: u64,
    object: ObjectId,
    body: &T,
) -> Result<(), EncodeFrameError> {
    // The header first, with a zero length (patched below): service and object are then not
    // kept across the codec's call.
    out.clear();
    out.extend_from_slice(&header(kind, 0, service, object));
    if let Err(e) = C::encode(body, out) {
        out.clear();
        return Err(EncodeFrameError::Codec(e));
    }
    let len = out.len() - HEADER_LEN;
    // One test on the common path: with a limit that fits a `u32` (every real one), the second
    // half folds away, and the first repeats the codec's own check of the same length.
    if len > C::LIMIT || u32::try_from(len).is_err() {
        return Err(too_large(out, len, C::LIMIT));
    }
    // The whole first word again, not only its length: the reader loads it as one word, which
    // a narrower store over it would keep from being forwarded from the store buffer.
    out[0..8].copy_from_slice(&first_word(kind, len as u32).to_le_bytes());
    Ok(())
}

/// The error of an [`encode`] whose body of `len` bytes is over `u32::MAX` (checked first) or
/// `limit`; empties `out`.
#[cold]
fn too_large(out: &mut Vec<u8>, len: usize, limit: usize) -> EncodeFrameError {
    out.clear();
    let limit = if u32::try_from(len).is_err() {
        u64::from(u32::MAX)
    } else {
        limit as u64
    };
    EncodeFrameError::Frame(FrameError::TooLarge {
        len: len as u64,
        limit,
    })
}

/// Why [`encode`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeFrameError {
    /// The codec failed.
    #[error(transparent)]
    Codec(CodecError),
    /// The encoded body does not fit a frame.
    #[error(transparent)]
    Frame(FrameError),
}

/// The header's first 8 bytes as a little-endian word: magic, version, kind, length.
#[inline]
fn first_word(kind: FrameKind, len: u32) -> u64 {
    u64::from(u16::from_le_bytes(MAGIC))
        | u64::from(VERSION) << 16
        | u64::from(kind as u8) << 24
        | u64::from(len) << 32
}

/// The header, built as four little-endian 8-byte words (the same bytes as field by field).
/// Whole words matter for speed: the reader loads the header right after it was written, and a
/// load that spans two smaller stores (e.g. slot and generation compared as one 8-byte word)
/// cannot be forwarded from the store buffer and stalls until they reach the cache.
#[inline]
fn header(kind: FrameKind, len: u32, service: u64, object: ObjectId) -> [u8; HEADER_LEN] {
    let last = u64::from(object.slot) | u64::from(object.generation) << 32;
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&first_word(kind, len).to_le_bytes());
    h[8..16].copy_from_slice(&service.to_le_bytes());
    h[16..24].copy_from_slice(&object.context.to_le_bytes());
    h[24..32].copy_from_slice(&last.to_le_bytes());
    h
}

/// The first four header bytes of a frame of `kind`: magic, version and kind.
const fn lead(kind: FrameKind) -> u32 {
    u16::from_le_bytes(MAGIC) as u32 | (VERSION as u32) << 16 | (kind as u32) << 24
}

/// Checks a received frame's header against its length and `limit`, and splits off the body.
///
/// # Errors
/// Every check in the [module table](self) that fails, as a [`FrameError`]. Never panics.
#[inline]
pub fn parse(frame: &[u8], limit: usize) -> Result<(Header, &[u8]), FrameError> {
    if frame.len() < HEADER_LEN {
        return Err(FrameError::Short(frame.len()));
    }
    // Magic, version and kind in one compare per kind, and the length, from the one 8-byte word
    // `encode` stored last; `lead_error` finds which check failed.
    let first = u64_at(frame, 0);
    let kind = match first as u32 {
        w if w == lead(FrameKind::Request) => FrameKind::Request,
        w if w == lead(FrameKind::Reply) => FrameKind::Reply,
        w if w == lead(FrameKind::Error) => FrameKind::Error,
        _ => return Err(lead_error(frame)),
    };
    parse_rest(frame, limit, kind, first)
}

/// The rest of [`parse`] once magic, version and kind (`kind`) have been checked: the length
/// from `first` (the header's first word) against `limit` and the frame, then the header.
#[inline(always)]
fn parse_rest(
    frame: &[u8],
    limit: usize,
    kind: FrameKind,
    first: u64,
) -> Result<(Header, &[u8]), FrameError> {
    let (h, body) = frame.split_at(HEADER_LEN);
    let len = (first >> 32) as u32;
    if u64::from(len) > limit as u64 {
        return Err(FrameError::TooLarge {
            len: u64::from(len),
            limit: limit as u64,
        });
    }
    if u64::from(len) != body.len() as u64 {
        return Err(FrameError::LengthMismatch {
            header: u64::from(len),
            actual: body.len() as u64,
        });
    }
    let object = ObjectId {
        context: u64_at(h, 16),
        slot: u32_at(h, 24),
        generation: u32_at(h, 28),
    };
    Ok((
        Header {
            kind,
            len,
            service: u64_at(h, 8),
            object,
        },
        body,
    ))
}

/// Which of the magic, version and kind checks the header of `frame` (at least a header long)
/// fails, in that order.
#[cold]
fn lead_error(frame: &[u8]) -> FrameError {
    if frame[0..2] != MAGIC {
        FrameError::BadMagic
    } else if frame[2] != VERSION {
        FrameError::Version(frame[2])
    } else {
        FrameError::UnknownKind(frame[3])
    }
}

/// [`parse`], then checks the kind.
///
/// # Errors
/// As for [`parse`], and [`FrameError::UnexpectedKind`].
#[inline]
pub fn parse_kind(
    frame: &[u8],
    limit: usize,
    expected: FrameKind,
) -> Result<(Header, &[u8]), FrameError> {
    // The common case in one compare: magic, version and the expected kind.
    if frame.len() >= HEADER_LEN {
        let first = u64_at(frame, 0);
        if first as u32 == lead(expected) {
            return parse_rest(frame, limit, expected, first);
        }
    }
    Err(kind_error(frame, limit, expected))
}

/// The error of a [`parse_kind`] whose frame does not start as one of kind `expected`: that of
/// [`parse`] if it fails, else [`FrameError::UnexpectedKind`].
#[cold]
fn kind_error(frame: &[u8], limit: usize, expected: FrameKind) -> FrameError {
    match parse(frame, limit) {
        Err(e) => e,
        Ok((h, _)) => FrameError::UnexpectedKind {
            expected,
            found: h.kind,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Bincode;

    const OBJ: ObjectId = ObjectId {
        context: 7,
        slot: 3,
        generation: 9,
    };

    #[test]
    fn roundtrip_and_every_check() {
        let mut out = Vec::new();
        encode::<Bincode, _>(&mut out, FrameKind::Request, 42, OBJ, &(5u64, "abc")).unwrap();
        let (h, body) = parse_kind(&out, 1024, FrameKind::Request).unwrap();
        assert_eq!(
            (h.kind, h.service, h.object, h.len as usize),
            (FrameKind::Request, 42, OBJ, body.len())
        );
        assert_eq!(
            Bincode::<1024>::decode::<(u64, &str)>(body).unwrap(),
            (5, "abc")
        );

        assert_eq!(parse(&out[..10], 1024), Err(FrameError::Short(10)));
        let mut bad = out.clone();
        bad[0] = b'X';
        assert_eq!(parse(&bad, 1024), Err(FrameError::BadMagic));
        let mut bad = out.clone();
        bad[2] = 2;
        assert_eq!(parse(&bad, 1024), Err(FrameError::Version(2)));
        let mut bad = out.clone();
        bad[3] = 9;
        assert_eq!(parse(&bad, 1024), Err(FrameError::UnknownKind(9)));
        assert!(matches!(
            parse_kind(&out, 1024, FrameKind::Reply),
            Err(FrameError::UnexpectedKind { .. })
        ));
        let mut bad = out.clone();
        bad.push(0);
        assert!(matches!(
            parse(&bad, 1024),
            Err(FrameError::LengthMismatch { .. })
        ));
        // A length-prefix bomb in the header: refused on the number alone.
        let mut bad = out.clone();
        bad[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            parse(&bad, 1024),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(parse(&out, 2), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn encode_refuses_bodies_over_the_limit() {
        let mut out = vec![1, 2, 3];
        let e = encode::<Bincode<8>, _>(&mut out, FrameKind::Reply, 1, OBJ, &[u64::MAX; 4])
            .unwrap_err();
        assert!(matches!(
            e,
            EncodeFrameError::Codec(_) | EncodeFrameError::Frame(FrameError::TooLarge { .. })
        ));
        assert!(out.is_empty());
    }
}
