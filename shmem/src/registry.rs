//! The registry of named segments: list them, inspect one, and garbage-collect stale names.
//!
//! The registry *is* the set of record files `/dev/shm/ctxshm-*` that [`Segment::create_named`]
//! writes (see [`crate::segment`] for why the name is a record and the data a sealed memfd). Each
//! record carries the creator's PID, start time and PID namespace, the size, the type id and the
//! creation time, so listing needs no other bookkeeping and stays correct if a creator is
//! SIGKILLed. A record appears whole or not at all: it is written into an unnamed file
//! (`O_TMPFILE`) that is then linked under its name, so a creator killed while writing leaves
//! nothing behind.
//!
//! **What `gc` removes, and why that is safe.** A record is removed only when its creator is dead
//! (by [`ProcessToken`]: PID + start time, so a recycled PID does not keep a stale name alive), or
//! alive but no longer holding the segment ([`CreatorState::Stale`]: it `exec`ed or closed the
//! memfd, so the record can open nothing).
//! A PID means something only in its own PID namespace, so a record made in another namespace
//! (another container sharing `/dev/shm`) has a creator whose state is
//! [`CreatorState::Unknown`], and is never removed; so are records whose creator cannot be checked
//! (a `/proc` that hides it, or belongs to another namespace).
//! Nobody maps a record file (the data lives in the creator's memfd, which the kernel frees with its
//! last mapping), and a named segment can only be opened through its creator's descriptor, so a
//! record whose creator is dead or stale is useless to everybody: removing it cannot pull memory
//! from under a live process. Records that cannot be parsed are reported but never removed by `gc` (they may belong to
//! a newer layout version, or to somebody else).
//!
//! [`Segment::create_named`]: crate::Segment::create_named

use std::path::{Path, PathBuf};

use crate::segment::{TypeId, fnv, le32, le64};
use crate::{Error, ProcessToken};

/// Where named segments live.
pub const SHM_DIR: &str = "/dev/shm";
/// The prefix of every name this crate creates.
pub const PREFIX: &str = "ctxshm-";

const RECORD_MAGIC: [u8; 8] = *b"CTXSHMNM";
const RECORD_VERSION: u32 = 2;
/// Size of an encoded name record.
pub const RECORD_SIZE: usize = 80;

/// Checks a user tag: 1..=24 characters of `[a-z0-9_]`.
pub(crate) fn check_tag(tag: &str) -> Result<(), Error> {
    let ok = !tag.is_empty()
        && tag.len() <= 24
        && tag
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::BadName(format!(
            "bad tag {tag:?}: use 1 to 24 of [a-z0-9_]"
        )))
    }
}

/// Checks a full segment name: `ctxshm-<tag>-<32 lowercase hex digits>`.
pub(crate) fn check_name(name: &str) -> Result<(), Error> {
    let bad = || {
        Error::BadName(format!(
            "{name:?} is not a context-shmem segment name (ctxshm-<tag>-<32 hex>)"
        ))
    };
    let rest = name.strip_prefix(PREFIX).ok_or_else(bad)?;
    let (tag, hex) = rest.rsplit_once('-').ok_or_else(bad)?;
    check_tag(tag).map_err(|_| bad())?;
    if hex.len() != 32
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(bad());
    }
    Ok(())
}

/// The contents of a name record file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameRecord {
    /// Total segment size (header included).
    pub total_size: u64,
    /// Payload type id.
    pub type_id: TypeId,
    /// Creator PID.
    pub creator_pid: u32,
    /// Creator start time (clock ticks after boot).
    pub creator_start: u64,
    /// The memfd's descriptor number in the creator.
    pub fd: u32,
    /// Creation time, nanoseconds since the Unix epoch.
    pub created_unix_ns: u64,
    /// The nonce also stored in the segment's header.
    pub nonce: [u8; 16],
    /// The creator's PID namespace ([`crate::process::pid_namespace`]; 0 if unreadable).
    pub pid_ns: u32,
}

impl NameRecord {
    /// The creator's liveness token.
    #[must_use]
    pub fn creator_token(&self) -> ProcessToken {
        ProcessToken::new(self.creator_pid, self.creator_start)
    }

    /// Whether the creator lives, as far as this process can tell: [`CreatorState::Unknown`] for
    /// a record made in another PID namespace (or by a creator that could not read its own).
    #[must_use]
    ///
    /// A live creator whose descriptor no longer holds the segment (it `exec`ed, which closes
    /// the memfd, or closed it) is [`CreatorState::Stale`]: the record can open nothing any more.
    pub fn creator_state(&self) -> CreatorState {
        match crate::process::pid_namespace() {
            Some(ours) if ours == self.pid_ns => {
                if !self.creator_token().is_alive() {
                    CreatorState::Dead
                } else if crate::segment::record_target_holds(self) == Some(false) {
                    CreatorState::Stale
                } else {
                    CreatorState::Alive
                }
            }
            _ => CreatorState::Unknown,
        }
    }

    /// Encodes the record.
    #[must_use]
    pub fn encode(&self) -> [u8; RECORD_SIZE] {
        let mut b = [0u8; RECORD_SIZE];
        b[0..8].copy_from_slice(&RECORD_MAGIC);
        b[8..12].copy_from_slice(&RECORD_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.fd.to_le_bytes());
        b[16..24].copy_from_slice(&self.total_size.to_le_bytes());
        b[24..32].copy_from_slice(&self.type_id.0.to_le_bytes());
        b[32..36].copy_from_slice(&self.creator_pid.to_le_bytes());
        b[36..40].copy_from_slice(&self.pid_ns.to_le_bytes());
        b[40..48].copy_from_slice(&self.creator_start.to_le_bytes());
        b[48..56].copy_from_slice(&self.created_unix_ns.to_le_bytes());
        b[56..72].copy_from_slice(&self.nonce);
        let sum = fnv(&b[..72]);
        b[72..80].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// Decodes a record; any input gives a record or an error, never a panic.
    ///
    /// # Errors
    /// [`Error::BadHeader`] for a wrong length, magic, version or checksum, or values out of range.
    pub fn decode(b: &[u8]) -> Result<Self, Error> {
        if b.len() != RECORD_SIZE {
            return Err(Error::BadHeader("name record has the wrong length"));
        }
        if b[0..8] != RECORD_MAGIC {
            return Err(Error::BadHeader(
                "not a context-shmem name record (bad magic)",
            ));
        }
        if le32(&b[8..12]) != RECORD_VERSION {
            return Err(Error::BadHeader("unsupported name record version"));
        }
        if le64(&b[72..80]) != fnv(&b[..72]) {
            return Err(Error::BadHeader("name record checksum mismatch"));
        }
        let total_size = le64(&b[16..24]);
        if total_size < crate::segment::HEADER_SIZE as u64
            || total_size > crate::segment::MAX_SEGMENT_SIZE
        {
            return Err(Error::BadHeader("segment size out of range"));
        }
        let creator_pid = le32(&b[32..36]);
        if creator_pid == 0 || creator_pid > i32::MAX as u32 {
            return Err(Error::BadHeader("creator pid out of range"));
        }
        let fd = le32(&b[12..16]);
        if fd > i32::MAX as u32 {
            return Err(Error::BadHeader("descriptor number out of range"));
        }
        let mut nonce = [0u8; 16];
        nonce.copy_from_slice(&b[56..72]);
        Ok(Self {
            total_size,
            type_id: TypeId(le64(&b[24..32])),
            creator_pid,
            creator_start: le64(&b[40..48]),
            fd,
            created_unix_ns: le64(&b[48..56]),
            nonce,
            pid_ns: le32(&b[36..40]),
        })
    }
}

pub(crate) fn read_record(path: &Path, name: &str) -> Result<NameRecord, Error> {
    let bytes = crate::segment::read_small(path, RECORD_SIZE as u64 + 1).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound(name.to_owned())
        } else if e.kind() == std::io::ErrorKind::InvalidData {
            Error::BadHeader("the name record is not a regular file")
        } else {
            Error::Io {
                op: "read name record",
                source: e,
            }
        }
    })?;
    NameRecord::decode(&bytes)
}

/// Whether a record's creator lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreatorState {
    /// The creator runs: its segment can be opened.
    Alive,
    /// The creator has exited (proven: its PID is gone or belongs to another process); `gc`
    /// removes the record.
    Dead,
    /// The creator runs, but the descriptor the record names no longer holds the segment (it
    /// `exec`ed, which closes the memfd, or closed it): nobody can open it through this record
    /// any more, and `gc` removes the record.
    Stale,
    /// It cannot be told from here: the record was made in another PID namespace, or this
    /// process cannot read `/proc` for its own namespace. Never removed by `gc`.
    Unknown,
}

impl CreatorState {
    /// `"alive"`, `"dead"`, `"stale"` or `"unknown"`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Alive => "alive",
            Self::Dead => "dead",
            Self::Stale => "stale",
            Self::Unknown => "unknown",
        }
    }
}

/// One entry of [`list`].
#[derive(Debug, Clone)]
pub struct SegmentInfo {
    /// The segment's name (`ctxshm-...`).
    pub name: String,
    /// The record's path.
    pub path: PathBuf,
    /// The decoded record, or why it could not be decoded.
    pub record: Result<NameRecord, String>,
    /// Whether the creator lives (`None` for an undecodable record).
    pub creator: Option<CreatorState>,
}

/// Lists every named segment record under [`SHM_DIR`].
///
/// # Errors
/// The directory cannot be read.
pub fn list() -> Result<Vec<SegmentInfo>, Error> {
    list_in(Path::new(SHM_DIR))
}

/// [`list`] in another directory (for tests).
///
/// # Errors
/// The directory cannot be read.
pub fn list_in(dir: &Path) -> Result<Vec<SegmentInfo>, Error> {
    let mut out = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(|source| Error::Io {
        op: "read shm dir",
        source,
    })?;
    for entry in rd.flatten() {
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if !name.starts_with(PREFIX) {
            continue;
        }
        let path = entry.path();
        let record = if check_name(&name).is_ok() {
            read_record(&path, &name).map_err(|e| e.to_string())
        } else {
            Err("not a well-formed segment name".to_owned())
        };
        let creator = record.as_ref().ok().map(NameRecord::creator_state);
        out.push(SegmentInfo {
            name,
            path,
            record,
            creator,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Looks up one named segment.
///
/// # Errors
/// [`Error::BadName`], [`Error::NotFound`], [`Error::BadHeader`].
pub fn inspect(name: &str) -> Result<SegmentInfo, Error> {
    inspect_in(Path::new(SHM_DIR), name)
}

/// [`inspect`] in another directory (for tests).
///
/// # Errors
/// As for [`inspect`].
pub fn inspect_in(dir: &Path, name: &str) -> Result<SegmentInfo, Error> {
    check_name(name)?;
    let path = dir.join(name);
    let rec = read_record(&path, name)?;
    Ok(SegmentInfo {
        name: name.to_owned(),
        path,
        creator: Some(rec.creator_state()),
        record: Ok(rec),
    })
}

/// What [`gc`] did.
#[derive(Debug, Default)]
pub struct Collected {
    /// The names removed.
    pub removed: Vec<String>,
    /// Records of dead or stale creators that could not be removed, and why (for example `EPERM`: the
    /// record belongs to another user and `/dev/shm` is sticky).
    pub failed: Vec<(String, std::io::Error)>,
}

/// Removes the records of named segments whose creator is dead or no longer holds the segment
/// ([`CreatorState::Dead`], [`CreatorState::Stale`]); says
/// which it removed and which it could not. See the [module docs](self) for why this never takes
/// memory from a live process.
///
/// # Errors
/// The directory cannot be read. A removal that fails is reported in [`Collected::failed`].
pub fn gc() -> Result<Collected, Error> {
    gc_in(Path::new(SHM_DIR))
}

/// [`gc`] in another directory (for tests).
///
/// # Errors
/// As for [`gc`].
pub fn gc_in(dir: &Path) -> Result<Collected, Error> {
    let mut done = Collected::default();
    for info in list_in(dir)? {
        // As the listing found it a moment ago, which cannot have changed since: a dead
        // creator's token cannot come back to life, and a descriptor that lost its segment cannot
        // get it back (its nonce is random). (Undecodable records have no state.)
        if !matches!(info.creator, Some(CreatorState::Dead | CreatorState::Stale)) {
            continue;
        }
        match std::fs::remove_file(&info.path) {
            Ok(()) => done.removed.push(info.name),
            // Removed meanwhile (by another gc, say): nothing left to do.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => done.failed.push((info.name, e)),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::OpenOptionsExt;

    use super::*;

    #[test]
    fn names_and_tags() {
        assert!(check_tag("abc_1").is_ok());
        assert!(check_tag("").is_err());
        assert!(check_tag("A").is_err());
        assert!(check_tag("../x").is_err());
        let ok = format!("{PREFIX}t_1-{}", "0123456789abcdef0123456789abcdef");
        assert!(check_name(&ok).is_ok());
        assert!(check_name("ctxshm-t-xyz").is_err());
        assert!(check_name("other-t-0123456789abcdef0123456789abcdef").is_err());
        assert!(check_name(&format!("{PREFIX}t/../x-{}", "0".repeat(32))).is_err());
    }

    /// Review of 2026-12-03: anyone may create files in `/dev/shm`; a FIFO under a record's
    /// name must be an undecodable entry, not a `list`, `inspect` or `gc` that never returns.
    #[test]
    #[cfg_attr(
        miri,
        ignore = "mkfifo and file I/O are foreign calls Miri does not run"
    )]
    fn a_fifo_named_like_a_record_is_a_bad_entry_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let name = format!("{PREFIX}evil-{}", "0".repeat(32));
        let path = dir.path().join(&name);
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path that lives across the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let d = dir.path().to_owned();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let listed =
                list_in(&d).map(|v| v.into_iter().map(|i| i.record.is_err()).collect::<Vec<_>>());
            let inspected = inspect_in(&d, &name).map(|_| ());
            let collected = gc_in(&d);
            let _ = tx.send((listed, inspected, collected));
        });
        let got = rx.recv_timeout(std::time::Duration::from_secs(5));
        // Unblock an opener, so that a regression's thread ends.
        let _w = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path);
        let (listed, inspected, collected) = got.expect("a FIFO record blocked the registry");
        assert_eq!(listed.unwrap(), vec![true]);
        assert!(
            matches!(inspected, Err(Error::BadHeader(_))),
            "{inspected:?}"
        );
        let collected = collected.unwrap();
        assert!(collected.removed.is_empty() && collected.failed.is_empty());
    }

    #[test]
    fn record_roundtrip() {
        let r = NameRecord {
            total_size: 4096,
            type_id: TypeId(9),
            creator_pid: 42,
            creator_start: 1234,
            fd: 7,
            created_unix_ns: 99,
            nonce: [3; 16],
            pid_ns: 4_026_531_836,
        };
        assert_eq!(NameRecord::decode(&r.encode()).unwrap(), r);
        let mut bad = r.encode();
        bad[33] ^= 0xff;
        assert!(NameRecord::decode(&bad).is_err());
    }
}
