//! What travels on the channel besides proxy frames: the sequence-number suffix of every message
//! and the server's first message, the export table.

use serde::{Deserialize, Serialize};

use crate::codec::{Bincode, Codec};
use crate::frame::ObjectId;

/// Bytes of the sequence number appended to every message (little endian).
pub(crate) const SEQ_LEN: usize = 8;

/// Sequence number of the server's first message (the export table); calls count from 1.
pub(crate) const HELLO_SEQ: u64 = 0;

/// `"ctxxproc"`, little endian: the first field of the export table.
const MAGIC: u64 = u64::from_le_bytes(*b"ctxxproc");

/// Version of this wire format (suffix, table). Both sides must speak the same.
pub(crate) const WIRE_VERSION: u32 = 1;

/// Largest export table a client decodes (names are short; a table is far smaller).
pub(crate) type TableCodec = Bincode<{ 1 << 20 }>;

/// Splits a received message into the frame and its sequence number; `None` if it is too short to
/// carry one.
#[inline]
pub(crate) fn split_seq(msg: &[u8]) -> Option<(&[u8], u64)> {
    let at = msg.len().checked_sub(SEQ_LEN)?;
    let (frame, seq) = msg.split_at(at);
    let mut b = [0u8; SEQ_LEN];
    b.copy_from_slice(seq);
    Some((frame, u64::from_le_bytes(b)))
}

/// One exported object, as the server announces it: the name clients ask for, the object's wire
/// name, and the service it speaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Export {
    /// The name clients look the object up by.
    pub name: String,
    /// The object's wire name (its handle's numbers in the server's context).
    pub object: ObjectId,
    /// [`crate::Service::ID`] of the service it speaks.
    pub service_id: u64,
    /// [`crate::Service::NAME`] of that service (for error messages).
    pub service: String,
}

/// The server's first message on a channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Hello {
    magic: u64,
    version: u32,
    /// [`Codec::NAME`] of the codec the server's frames use.
    pub(crate) codec: String,
    /// The server process's pid (for diagnostics; liveness is checked by the channel).
    pub(crate) pid: u32,
    /// What the server exports.
    pub(crate) exports: Vec<Export>,
}

impl Hello {
    pub(crate) fn new(codec: &str, exports: Vec<Export>) -> Self {
        Self {
            magic: MAGIC,
            version: WIRE_VERSION,
            codec: codec.to_owned(),
            pid: std::process::id(),
            exports,
        }
    }

    /// The message: the encoded table, then [`HELLO_SEQ`].
    pub(crate) fn to_message(&self) -> Result<Vec<u8>, crate::CodecError> {
        let mut out = Vec::new();
        TableCodec::encode(self, &mut out)?;
        out.extend_from_slice(&HELLO_SEQ.to_le_bytes());
        Ok(out)
    }

    /// Checks and decodes a received first message.
    pub(crate) fn from_message(msg: &[u8]) -> Result<Self, String> {
        let (body, seq) = split_seq(msg).ok_or("the first message is too short")?;
        if seq != HELLO_SEQ {
            return Err(format!(
                "the first message has sequence number {seq}, not {HELLO_SEQ}"
            ));
        }
        let hello: Self =
            TableCodec::decode(body).map_err(|e| format!("malformed export table: {e}"))?;
        if hello.magic != MAGIC {
            return Err("the peer does not speak this protocol (bad magic)".to_owned());
        }
        if hello.version != WIRE_VERSION {
            return Err(format!(
                "the peer speaks wire version {}, this build {WIRE_VERSION}",
                hello.version
            ));
        }
        Ok(hello)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::codec::CodecErrorKind;
    use proptest::prelude::*;

    // Allocation is not measured here (a counting allocator needs `unsafe`, which this crate
    // denies; `tests/decode_fuzz.rs` measures the codecs with one). What bounds it is that the
    // table codec refuses a length prefix beyond its limit before allocating for it (bincode
    // claims the bytes first), which the second property checks for every string of the table.

    /// The longest string a table decoder may allocate for: a table is at most 1 MiB.
    const MAX_STRING: u64 = 1 << 20;

    fn export() -> impl Strategy<Value = Export> {
        (
            "[a-z]{0,12}",
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            any::<u64>(),
            "[a-z:]{0,20}",
        )
            .prop_map(
                |(name, context, slot, generation, service_id, service)| Export {
                    name,
                    object: ObjectId {
                        context,
                        slot,
                        generation,
                    },
                    service_id,
                    service,
                },
            )
    }

    fn hello() -> impl Strategy<Value = Hello> {
        ("[a-z0-9-]{0,12}", proptest::collection::vec(export(), 0..4))
            .prop_map(|(codec, exports)| Hello::new(&codec, exports))
    }

    /// Offsets of the length prefixes (fixed-width u64) in `h`'s encoded table: the codec name,
    /// the export list, and each export's two strings.
    fn length_prefixes(h: &Hello) -> Vec<usize> {
        let mut at = 8 + 4; // magic, version
        let mut v = vec![at];
        at += 8 + h.codec.len() + 4; // codec, pid
        v.push(at);
        at += 8;
        for e in &h.exports {
            v.push(at);
            at += 8 + e.name.len() + 16 + 8; // name, object, service id
            v.push(at);
            at += 8 + e.service.len();
        }
        v
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

        /// A peer's first message is untrusted: arbitrary bytes (with the right sequence number
        /// most of the time, so that the table decoder runs) give a table or an error, never a
        /// panic.
        #[test]
        fn arbitrary_first_messages_are_errors_or_tables(
            body in proptest::collection::vec(any::<u8>(), 0..256),
            seq in prop_oneof![4 => Just(HELLO_SEQ), 1 => any::<u64>()],
        ) {
            let mut msg = body;
            msg.extend_from_slice(&seq.to_le_bytes());
            // Error or value: a panic fails the property.
            let _ = Hello::from_message(&msg);
            let _ = Hello::from_message(&msg[..msg.len() % 8]);
        }

        /// A valid table with one length prefix forged (a bomb, or just wrong), bytes changed, or
        /// cut short: an error or a table, never a panic; a length beyond what the message holds
        /// is an error, and a string longer than the codec's limit is refused by the limit (before
        /// anything is allocated for it). The table itself round-trips.
        #[test]
        fn forged_tables_are_errors_or_tables(
            h in hello(),
            which in any::<proptest::sample::Index>(),
            len in prop_oneof![
                Just(u64::MAX),
                Just(u64::from(u32::MAX)),
                Just(1u64 << 40),
                Just(MAX_STRING),
                Just(MAX_STRING + 1),
                (1u64 << 16)..(64u64 << 20),
                0u64..10_000,
            ],
            forge in any::<bool>(),
            edits in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 0..3),
            cut in proptest::option::weighted(0.2, any::<proptest::sample::Index>()),
        ) {
            let mut msg = h.to_message().unwrap();
            prop_assert_eq!(&Hello::from_message(&msg).unwrap(), &h);
            let body_len = msg.len() - SEQ_LEN;
            let prefixes = length_prefixes(&h);
            // The offsets are those of the lengths (a check of this test's layout arithmetic).
            let mut lens = vec![h.codec.len(), h.exports.len()];
            lens.extend(h.exports.iter().flat_map(|e| [e.name.len(), e.service.len()]));
            for (&at, &l) in prefixes.iter().zip(&lens) {
                prop_assert_eq!(&msg[at..at + 8], &(l as u64).to_le_bytes());
            }
            if forge {
                let at = prefixes[which.index(prefixes.len())];
                msg[at..at + 8].copy_from_slice(&len.to_le_bytes());
            }
            for (i, b) in &edits {
                msg[i.index(body_len)] = *b;
            }
            if let Some(c) = cut {
                // Cut the table, keep the sequence number.
                let keep = c.index(body_len + 1);
                msg.drain(keep..body_len);
            }
            let r = Hello::from_message(&msg);
            if forge && len > msg.len() as u64 {
                // More bytes or elements than the message holds (every element takes bytes).
                prop_assert!(r.is_err(), "{r:?}");
                let string = which.index(prefixes.len()) != 1; // all but the export count
                if string && len > MAX_STRING && edits.is_empty() && cut.is_none() {
                    let e = TableCodec::decode::<Hello>(&msg[..body_len]).unwrap_err();
                    prop_assert_eq!(e.kind(), CodecErrorKind::Limit, "{}", e);
                }
            }
        }
    }

    #[test]
    fn hello_round_trips_and_rejects_garbage() {
        let h = Hello::new(
            "bincode-2",
            vec![Export {
                name: "counter".to_owned(),
                object: ObjectId {
                    context: 3,
                    slot: 1,
                    generation: 2,
                },
                service_id: 42,
                service: "x::Counter".to_owned(),
            }],
        );
        let msg = h.to_message().unwrap();
        assert_eq!(Hello::from_message(&msg).unwrap(), h);
        assert!(Hello::from_message(&msg[..4]).is_err());
        let mut bad = msg.clone();
        bad[0] ^= 1;
        assert!(Hello::from_message(&bad).is_err());
        let mut bad = msg.clone();
        let n = bad.len();
        bad[n - 1] = 9;
        assert!(Hello::from_message(&bad).is_err());
        for cut in 0..msg.len() {
            let _ = Hello::from_message(&msg[..cut]);
        }
    }

    #[test]
    fn split_seq_needs_eight_bytes() {
        assert_eq!(split_seq(&[1, 2, 3]), None);
        let mut m = vec![9u8, 9];
        m.extend_from_slice(&77u64.to_le_bytes());
        assert_eq!(split_seq(&m), Some((&[9u8, 9][..], 77)));
    }
}
