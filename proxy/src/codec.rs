//! The codec: how request and response bodies become bytes, behind a trait of our own.
//!
//! [`Codec`] is the only place that names a serialization crate. The default, [`Bincode`], is
//! bincode 2.0.1 through its serde API with a hard decode limit; [`Postcard`] (feature `postcard`)
//! shows the swap is one line: `Proxy<S, Postcard>` instead of `Proxy<S>` (or
//! `type P<S> = Proxy<S, Postcard>;`). Errors from either crate are wrapped in the opaque
//! [`CodecError`], so no third-party type leaks into our API.
//!
//! # Allocation bound
//! Decoding never allocates more than the codec's limit for one byte string (`String`, `Vec<u8>`):
//! bincode checks each length prefix against the limit before it allocates, and the frame layer
//! rejects bodies over the limit before the codec sees them. Sequences of other types are
//! pre-allocated by serde with a cautious size hint (at most 1 MiB per sequence, whatever the length
//! prefix claims) and grow only as real elements are decoded. So for a limit of a few MiB or more
//! (the default is 16 MiB) the peak allocation of one decode stays within the limit;
//! `tests/decode_fuzz.rs` checks exactly that (4 MiB limit, counting allocator, child process), and
//! fails on a 4 MiB + 1 byte string bomb when the codec's limit is raised above the bound.
//!
//! # Time bound
//! Both codecs decode through a wrapper (`bounded.rs`) that lets the length-prefixed sequences
//! and maps of one value yield at most one element per input byte, plus 4096: otherwise a
//! sequence of a zero-sized type (`Vec<()>`), whose elements read no bytes, would loop for as
//! many elements as its prefix claims (2^64 from 8 bytes). Real input never comes near the
//! bound; the wrapper costs about 1% of a small serialized call.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::bounded::{BoundedSeed, Budget};

/// A serialization format for frame bodies.
///
/// Implementations must never panic on any input, must not read past `bytes`, must reject trailing
/// bytes, must bound allocation by [`Codec::LIMIT`] and decoding time by the input's length, as
/// described in the [module docs](self).
pub trait Codec: Send + Sync + 'static {
    /// Largest body, in bytes, this codec encodes or decodes. The frame layer enforces it too.
    const LIMIT: usize;
    /// A short name, for diagnostics.
    const NAME: &'static str;

    /// Appends the encoding of `value` to `out`.
    ///
    /// # Errors
    /// The value cannot be represented, or its encoding is longer than [`Codec::LIMIT`] (`out` is
    /// then truncated back to its original length).
    fn encode<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), CodecError>;

    /// Decodes a value from exactly `bytes`, borrowing from them where the type allows (`&str`,
    /// `&[u8]`).
    ///
    /// # Errors
    /// Malformed input, input over the limit, or bytes left over after the value.
    fn decode<'de, T: Deserialize<'de>>(bytes: &'de [u8]) -> Result<T, CodecError>;

    /// Decodes a value from exactly `bytes` and hands it straight to `then`, returning what `then`
    /// returns: [`Codec::decode`] for a value that is used at once. The default calls `decode`;
    /// a codec may override it so that the value reaches `then` without being moved through
    /// memory first.
    ///
    /// # Errors
    /// As for [`Codec::decode`]; `then` does not run.
    #[inline(always)]
    fn decode_then<'de, T: Deserialize<'de>, R>(
        bytes: &'de [u8],
        then: impl FnOnce(T) -> R,
    ) -> Result<R, CodecError> {
        Self::decode(bytes).map(then)
    }
}

/// The default body limit: 16 MiB. Services that move larger payloads pick a larger one, e.g.
/// `Proxy<BufferService, Bincode<{ 256 << 20 }>>`.
pub const DEFAULT_LIMIT: usize = 16 << 20;

/// bincode 2.0.1 (serde API; standard configuration with fixed-width little-endian integers, which
/// encode and decode faster than varints and cost a few bytes per frame in-process), decoding with
/// `with_limit::<LIMIT>()`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Bincode<const LIMIT: usize = DEFAULT_LIMIT>;

/// What went wrong in the codec. Opaque: the message is for humans, the kind for code.
#[derive(Clone, PartialEq, Eq)]
pub struct CodecError {
    kind: CodecErrorKind,
    message: Box<str>,
}

/// The broad class of a [`CodecError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CodecErrorKind {
    /// The value could not be encoded.
    Encode,
    /// The bytes are not a valid encoding of the expected type.
    Decode,
    /// A length or the whole encoding is over the codec's limit.
    Limit,
    /// A valid value was followed by unread bytes.
    TrailingBytes,
}

impl CodecError {
    pub(crate) fn new(kind: CodecErrorKind, message: impl fmt::Display) -> Self {
        Self {
            kind,
            message: message.to_string().into_boxed_str(),
        }
    }

    /// The class of error.
    #[must_use]
    pub fn kind(&self) -> CodecErrorKind {
        self.kind
    }
}

impl fmt::Debug for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CodecError({:?}: {})", self.kind, self.message)
    }
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            CodecErrorKind::Encode => "encode failed",
            CodecErrorKind::Decode => "decode failed",
            CodecErrorKind::Limit => "size limit exceeded",
            CodecErrorKind::TrailingBytes => "trailing bytes after value",
        };
        write!(f, "{what}: {}", self.message)
    }
}

impl std::error::Error for CodecError {}

/// Truncates `out` back to `start` if the encoding grew past `limit`.
#[inline]
fn check_encoded(out: &mut Vec<u8>, start: usize, limit: usize) -> Result<(), CodecError> {
    let len = out.len() - start;
    if len > limit {
        return Err(over_limit(out, start, len, limit));
    }
    Ok(())
}

#[cold]
fn over_limit(out: &mut Vec<u8>, start: usize, len: usize, limit: usize) -> CodecError {
    out.truncate(start);
    CodecError::new(
        CodecErrorKind::Limit,
        format_args!("encoding is {len} bytes, limit {limit}"),
    )
}

#[inline]
fn check_consumed(read: usize, total: usize) -> Result<(), CodecError> {
    if read == total {
        Ok(())
    } else {
        Err(trailing(read, total))
    }
}

#[cold]
fn trailing(read: usize, total: usize) -> CodecError {
    CodecError::new(
        CodecErrorKind::TrailingBytes,
        format_args!("{} of {total} bytes unread", total - read),
    )
}

impl<const LIMIT: usize> Codec for Bincode<LIMIT> {
    const LIMIT: usize = LIMIT;
    const NAME: &'static str = "bincode-2";

    #[inline]
    fn encode<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
        let start = out.len();
        let config = bincode::config::standard()
            .with_fixed_int_encoding()
            .with_limit::<LIMIT>();
        if let Err(e) = bincode::serde::encode_into_std_write(value, out, config) {
            out.truncate(start);
            return Err(CodecError::new(CodecErrorKind::Encode, e));
        }
        check_encoded(out, start, LIMIT)
    }

    #[inline]
    fn decode<'de, T: Deserialize<'de>>(bytes: &'de [u8]) -> Result<T, CodecError> {
        Self::decode_then(bytes, |value| value)
    }

    #[inline(always)]
    fn decode_then<'de, T: Deserialize<'de>, R>(
        bytes: &'de [u8],
        then: impl FnOnce(T) -> R,
    ) -> Result<R, CodecError> {
        if bytes.len() > LIMIT {
            return Err(CodecError::new(
                CodecErrorKind::Limit,
                format_args!("{} bytes, limit {LIMIT}", bytes.len()),
            ));
        }
        let config = bincode::config::standard()
            .with_fixed_int_encoding()
            .with_limit::<LIMIT>();
        let budget = Budget::for_input(bytes.len());
        let seed = BoundedSeed::<T>::new(&budget);
        match bincode::serde::seed_decode_from_slice(seed, bytes, config) {
            Ok((value, read)) if read == bytes.len() => Ok(then(value)),
            Ok((_, read)) => Err(trailing(read, bytes.len())),
            Err(bincode::error::DecodeError::LimitExceeded) => Err(CodecError::new(
                CodecErrorKind::Limit,
                format_args!("a length prefix claims more than {LIMIT} bytes"),
            )),
            Err(e) => Err(CodecError::new(CodecErrorKind::Decode, e)),
        }
    }
}

/// postcard 1.x (feature `postcard`). postcard has no limit setting of its own; it checks every
/// length prefix against the bytes actually left before it allocates, and the frame layer caps the
/// body at `LIMIT`.
#[cfg(feature = "postcard")]
#[derive(Debug, Clone, Copy, Default)]
pub struct Postcard<const LIMIT: usize = DEFAULT_LIMIT>;

#[cfg(feature = "postcard")]
impl<const LIMIT: usize> Codec for Postcard<LIMIT> {
    const LIMIT: usize = LIMIT;
    const NAME: &'static str = "postcard-1";

    fn encode<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
        let start = out.len();
        let buf = std::mem::take(out);
        match postcard::to_extend(value, buf) {
            Ok(buf) => {
                *out = buf;
                check_encoded(out, start, LIMIT)
            }
            // `to_extend` consumed the buffer; the caller's earlier bytes are lost with it, so report
            // the failure (callers only ever encode into a buffer they own and reset on error).
            Err(e) => Err(CodecError::new(CodecErrorKind::Encode, e)),
        }
    }

    fn decode<'de, T: Deserialize<'de>>(bytes: &'de [u8]) -> Result<T, CodecError> {
        if bytes.len() > LIMIT {
            return Err(CodecError::new(
                CodecErrorKind::Limit,
                format_args!("{} bytes, limit {LIMIT}", bytes.len()),
            ));
        }
        let budget = Budget::for_input(bytes.len());
        let mut de = postcard::Deserializer::from_bytes(bytes);
        let decoded =
            serde::de::DeserializeSeed::deserialize(BoundedSeed::<T>::new(&budget), &mut de)
                .and_then(|value| de.finalize().map(|rest| (value, rest)));
        match decoded {
            Ok((value, rest)) => {
                check_consumed(bytes.len() - rest.len(), bytes.len()).map(|()| value)
            }
            Err(e) => Err(CodecError::new(CodecErrorKind::Decode, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bounded::SLACK;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Small<'a> {
        n: u64,
        tag: &'a str,
        #[serde(with = "serde_bytes")]
        raw: &'a [u8],
    }

    fn roundtrip<C: Codec>() {
        let v = Small {
            n: 7,
            tag: "sixteen-byte-str",
            raw: &[1, 2, 3],
        };
        let mut out = vec![0xAA];
        C::encode(&v, &mut out).unwrap();
        let back: Small<'_> = C::decode(&out[1..]).unwrap();
        assert_eq!(back, v);
        // Borrowed, not copied: the decoded str points into the buffer.
        assert!(out.as_ptr_range().contains(&back.tag.as_ptr()));
        let mut longer = out[1..].to_vec();
        longer.push(0);
        assert_eq!(
            C::decode::<Small<'_>>(&longer).unwrap_err().kind(),
            CodecErrorKind::TrailingBytes
        );
        assert_eq!(
            C::decode::<Small<'_>>(&out[1..3]).unwrap_err().kind(),
            CodecErrorKind::Decode
        );
        // `decode_then` hands over the same value, and runs nothing on bad input.
        let n = C::decode_then(&out[1..], |s: Small<'_>| {
            assert_eq!(s, v);
            s.n
        });
        assert_eq!(n, Ok(7));
        for bad in [&longer[..], &out[1..3]] {
            let e = C::decode_then(bad, |_: Small<'_>| panic!("`then` ran on bad input"));
            assert_eq!(
                e.unwrap_err().kind(),
                C::decode::<Small<'_>>(bad).unwrap_err().kind()
            );
        }
    }

    #[test]
    fn bincode_roundtrip_borrows_and_rejects_trailing() {
        roundtrip::<Bincode>();
    }

    #[cfg(feature = "postcard")]
    #[test]
    fn postcard_roundtrip_borrows_and_rejects_trailing() {
        roundtrip::<Postcard>();
    }

    /// Decodes on a thread and fails if that takes more than a few seconds: a regression of
    /// the sequence budget would otherwise loop for 2^64 elements.
    fn decode_within<C: Codec, T: for<'de> Deserialize<'de> + Send + 'static>(
        bytes: Vec<u8>,
    ) -> Result<T, CodecError> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(C::decode::<T>(&bytes));
        });
        rx.recv_timeout(std::time::Duration::from_secs(5))
            .expect("the decode did not finish within 5 s")
    }

    /// A length prefix of `u64::MAX` elements, then nothing: each element of a zero-sized type
    /// reads no bytes.
    fn zst_bomb<C: Codec>() {
        let prefix_only = {
            let mut out = Vec::new();
            // The same value's prefix, as each format writes it: a one-element `Vec<()>`, whose
            // encoding is exactly its length prefix, with the length patched to the maximum.
            C::encode(&vec![(); 1], &mut out).unwrap();
            if out.len() == 8 {
                u64::MAX.to_le_bytes().to_vec() // bincode: fixed 8-byte lengths
            } else {
                vec![0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01] // postcard: varint
            }
        };
        let e = decode_within::<C, Vec<()>>(prefix_only.clone()).unwrap_err();
        assert_eq!(e.kind(), CodecErrorKind::Decode, "{e}");
        // Nested inside another value, and as map keys, too.
        let mut nested = Vec::new();
        C::encode(&(7u8, vec![(); 1]), &mut nested).unwrap();
        let mut bomb = nested[..1].to_vec();
        bomb.extend_from_slice(&prefix_only);
        assert!(decode_within::<C, (u8, Vec<()>)>(bomb).is_err());
        assert!(decode_within::<C, std::collections::BTreeMap<(), ()>>(prefix_only).is_err());
        // Real values are untouched by the budget: zero-sized elements up to the body's length
        // plus the slack, and sequences of one-byte elements as long as the body.
        let mut few = Vec::new();
        C::encode(&vec![(); SLACK], &mut few).unwrap();
        assert_eq!(C::decode::<Vec<()>>(&few).unwrap().len(), SLACK);
        let mut many = Vec::new();
        let long: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        C::encode(&long, &mut many).unwrap();
        assert_eq!(C::decode::<Vec<u8>>(&many).unwrap(), long);
    }

    #[test]
    fn bincode_zero_sized_sequence_bombs_are_refused() {
        zst_bomb::<Bincode>();
    }

    #[test]
    fn postcard_zero_sized_sequence_bombs_are_refused() {
        zst_bomb::<Postcard>();
    }

    #[test]
    fn bincode_limit_applies_both_ways() {
        let big = vec![0u8; 100];
        let mut out = vec![9];
        let e = Bincode::<64>::encode(&serde_bytes::Bytes::new(&big), &mut out).unwrap_err();
        assert_eq!(e.kind(), CodecErrorKind::Limit);
        assert_eq!(out, [9], "a failed encode leaves the buffer as it was");
        // A length prefix of u64::MAX for a String: refused before any allocation.
        let bomb = [0xFD, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F];
        let e = Bincode::<1024>::decode::<String>(&bomb).unwrap_err();
        assert_eq!(e.kind(), CodecErrorKind::Limit);
    }
}

/// How `#[service]` requests carry `&str` arguments (used by the macro's output; not a public
/// API): encoded as a string, decoded borrowed from the frame as bytes and then checked here,
/// with a word-at-a-time ASCII fast path before the full UTF-8 check. The full check costs more
/// than the rest of decoding a small request when the string sits unaligned in the frame, which
/// it does. bincode and postcard encode strings and byte strings identically; a self-describing
/// format hands the string to [`serde::de::Visitor::visit_borrowed_str`] instead, which is accepted as is.
#[doc(hidden)]
pub mod borrowed_str {
    use std::fmt;

    use serde::de::{Error, Visitor};
    use serde::{Deserializer, Serializer};

    /// Serializes `s` as a string.
    ///
    /// # Errors
    /// Those of the serializer.
    #[inline]
    pub fn serialize<S: Serializer>(s: &str, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(s)
    }

    /// Deserializes a string borrowed from the input.
    ///
    /// # Errors
    /// The input holds no borrowed string, or its bytes are not UTF-8.
    #[inline]
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<&'de str, D::Error> {
        deserializer.deserialize_bytes(StrVisitor)
    }

    struct StrVisitor;

    impl<'de> Visitor<'de> for StrVisitor {
        type Value = &'de str;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a borrowed UTF-8 string")
        }

        #[inline]
        fn visit_borrowed_str<E: Error>(self, v: &'de str) -> Result<&'de str, E> {
            Ok(v)
        }

        #[inline]
        fn visit_borrowed_bytes<E: Error>(self, v: &'de [u8]) -> Result<&'de str, E> {
            utf8(v).ok_or_else(|| E::custom("string is not valid UTF-8"))
        }
    }

    /// `v` as a `&str` if it is UTF-8. The crate's one unsafe block: `str::from_utf8` checks
    /// byte by byte when the string starts unaligned, which costs more than the rest of decoding
    /// a small request; `is_ascii` checks a word at a time.
    #[inline]
    #[allow(unsafe_code)]
    pub(crate) fn utf8(v: &[u8]) -> Option<&str> {
        if is_ascii(v) {
            // SAFETY: every byte is below 0x80 (checked just above), and a sequence of such bytes
            // is valid UTF-8 (each is a one-byte code point).
            Some(unsafe { std::str::from_utf8_unchecked(v) })
        } else {
            std::str::from_utf8(v).ok()
        }
    }

    /// `v.is_ascii()`, with 8 to 16 bytes (short names and tags) checked as two overlapping
    /// words: the standard check's word loop and tail cost about twice as many instructions there.
    #[inline]
    fn is_ascii(v: &[u8]) -> bool {
        const HIGH: u64 = 0x8080_8080_8080_8080;
        if v.len() <= 16 {
            if let (Some(a), Some(b)) = (v.first_chunk::<8>(), v.last_chunk::<8>()) {
                return (u64::from_ne_bytes(*a) | u64::from_ne_bytes(*b)) & HIGH == 0;
            }
        }
        v.is_ascii()
    }

    #[cfg(test)]
    mod tests {
        use super::{is_ascii, utf8};

        #[test]
        fn short_ascii_check_agrees_with_the_standard_one() {
            let base = *b"0123456789abcdefghij";
            for len in 0..=base.len() {
                assert!(is_ascii(&base[..len]), "{len}");
                for pos in 0..len {
                    let mut v = base[..len].to_vec();
                    v[pos] |= 0x80;
                    assert!(!is_ascii(&v), "{len} {pos}");
                }
            }
        }

        #[test]
        fn agrees_with_the_standard_check() {
            let cases: [&[u8]; 8] = [
                b"",
                b"sixteen-byte-tag",
                "h\u{e9}llo w\u{f6}rld, \u{1f600}".as_bytes(),
                b"\xff",
                b"abc\xc3",
                b"0123456789abcdef\x80",
                b"\xed\xa0\x80",
                b"plain ascii that is longer than a couple of machine words",
            ];
            for c in cases {
                assert_eq!(utf8(c), std::str::from_utf8(c).ok(), "{c:?}");
            }
        }
    }
}
