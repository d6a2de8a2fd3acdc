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
