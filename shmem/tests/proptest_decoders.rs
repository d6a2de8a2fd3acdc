//! Property tests for every decoder of untrusted bytes: arbitrary input gives a value or an error,
//! never a panic; valid values round-trip.
#![cfg(not(loom))]

use context_shmem::TypeId;
use context_shmem::registry::{NameRecord, RECORD_SIZE};
use context_shmem::segment::{HEADER_SIZE, SegmentHeader, SegmentKind};
use proptest::prelude::*;

proptest! {
    #[test]
    fn segment_header_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = SegmentHeader::decode(&bytes);
    }

    #[test]
    fn segment_header_roundtrips(kind in 0u8..3, size in (HEADER_SIZE as u64)..(1u64 << 40), ty: u64, nonce: [u8; 16], pid_ns: u32) {
        let kind = [SegmentKind::Memfd, SegmentKind::Named, SegmentKind::File][kind as usize];
        let h = SegmentHeader { kind, total_size: size, type_id: TypeId(ty), nonce, pid_ns };
        prop_assert_eq!(SegmentHeader::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn segment_header_bit_flips_are_refused(size in (HEADER_SIZE as u64)..(1u64 << 40), ty: u64, bit in 0usize..(HEADER_SIZE * 8)) {
        let h = SegmentHeader { kind: SegmentKind::Memfd, total_size: size, type_id: TypeId(ty), nonce: [1; 16], pid_ns: 4_026_531_836 };
        let mut b = h.encode();
        b[bit / 8] ^= 1 << (bit % 8);
        // Every byte is covered by the magic, version or checksum (the reserved bytes are part of
        // the checksummed range).
        prop_assert!(SegmentHeader::decode(&b).is_err());
    }

    #[test]
    fn name_record_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = NameRecord::decode(&bytes);
    }

    #[test]
    fn name_record_decode_of_right_length_garbage(bytes in proptest::collection::vec(any::<u8>(), RECORD_SIZE)) {
        let _ = NameRecord::decode(&bytes);
    }

    #[test]
    fn name_record_roundtrips(size in (HEADER_SIZE as u64)..(1u64 << 40), ty: u64, pid in 1u32..(i32::MAX as u32),
                              start: u64, fd in 0u32..(i32::MAX as u32), t: u64, nonce: [u8; 16], pid_ns: u32) {
        let r = NameRecord { total_size: size, type_id: TypeId(ty), creator_pid: pid, creator_start: start, fd, created_unix_ns: t, nonce, pid_ns };
        prop_assert_eq!(NameRecord::decode(&r.encode()).unwrap(), r);
    }
}
