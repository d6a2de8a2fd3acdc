//! Shared-memory segments: sealed memfd, named, file-backed.
//!
//! Every segment starts with a 64-byte [header](SegmentHeader) (magic, layout version, kind, total
//! size, type id, nonce) followed by the payload. The header is written once, before anybody else can
//! see the segment, and validated (copied out, then checked against sizes this process holds
//! privately) by everybody who opens it.
//!
//! # Truncation and SIGBUS
//!
//! Touching a page of a `MAP_SHARED` mapping beyond the end of its file raises `SIGBUS`. So a peer
//! that could shrink the file under us could crash us. What actually protects each kind:
//!
//! - **memfd** ([`Segment::create_memfd`], [`Segment::from_fd`]): sealed with `F_SEAL_SHRINK |
//!   F_SEAL_GROW | F_SEAL_SEAL` before anybody else gets the descriptor. `ftruncate` on it fails with
//!   `EPERM` for every process, and seals cannot be removed. Receivers refuse a descriptor without
//!   these seals. This is a kernel guarantee, not a convention.
//! - **named** ([`Segment::create_named`], [`Segment::open_named`]): the *data* is a sealed memfd too.
//!   The name in `/dev/shm` (`ctxshm-<tag>-<128 random bits>`, created `O_EXCL`, mode 0600) is a
//!   small record file that says which process created the memfd and under which descriptor number;
//!   openers reach the memfd through `/proc/<creator>/fd/<n>` (the same inode, seals included) after
//!   checking the creator's liveness token and then the nonce in the memfd's own header. Nobody maps
//!   the record file, so truncating or scribbling on it cannot fault anyone: later opens get a clear
//!   error. Consequences, by design: a named segment can be *opened* only while its creator lives
//!   (mappings stay valid afterwards; the memory is freed by the kernel with its last mapping), the
//!   creator unlinks the name when it drops the segment, and a crashed creator leaves only the small
//!   record file, which [`crate::registry::gc`] removes.
//! - **file-backed** ([`Segment::create_file`], [`Segment::open_file`]): regular files cannot be
//!   sealed. Opening checks the size with `fstat` before mapping, but a process that truncates the
//!   file *afterwards* can still cause `SIGBUS`. Use file-backed segments only for files no untrusted
//!   process can write (for example in a 0700 directory you own); use memfd or named segments
//!   otherwise. This crate installs no SIGBUS handler (nothing global).

use std::fmt;
use std::fs::File;
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use crate::{Error, ProcessToken};

const SEGMENT_MAGIC: [u8; 8] = *b"CTXSHM\0\x01";
const LAYOUT_VERSION: u32 = 2;
/// Bytes of header before the payload (also the payload's alignment guarantee).
pub const HEADER_SIZE: usize = 64;
/// Largest segment this crate creates or opens (1 TiB): a sanity bound on sizes read from outside.
pub const MAX_SEGMENT_SIZE: u64 = 1 << 40;
const REQUIRED_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// A 64-bit identifier of the type (layout) stored in a segment, checked on open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TypeId(pub u64);

impl TypeId {
    /// A stable id from a name (FNV-1a 64). Put a version in the name when the layout changes.
    #[must_use]
    pub const fn of_name(name: &str) -> Self {
        let b = name.as_bytes();
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut i = 0;
        while i < b.len() {
            h ^= b[i] as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
            i += 1;
        }
        Self(h)
    }
}

impl fmt::Display for TypeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#018x}", self.0)
    }
}

/// Which kind of segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentKind {
    /// Anonymous sealed memfd.
    Memfd,
    /// Sealed memfd reachable by a name under `/dev/shm`.
    Named,
    /// A regular file mapped with memmap2.
    File,
}

impl SegmentKind {
    fn code(self) -> u32 {
        match self {
            Self::Memfd => 1,
            Self::Named => 2,
            Self::File => 3,
        }
    }

    fn from_code(c: u32) -> Option<Self> {
        match c {
            1 => Some(Self::Memfd),
            2 => Some(Self::Named),
            3 => Some(Self::File),
            _ => None,
        }
    }
}

/// The decoded segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Kind recorded at creation.
    pub kind: SegmentKind,
    /// Total size in bytes, header included.
    pub total_size: u64,
    /// Type id of the payload.
    pub type_id: TypeId,
    /// Random bytes chosen at creation (ties a name record to its memfd).
    pub nonce: [u8; 16],
    /// The creator's PID namespace ([`crate::process::pid_namespace`]; 0 if it could not be
    /// read). Process tokens in the segment (lock owners, channel sides) mean something only to
    /// processes of this namespace.
    pub pid_ns: u32,
}

impl SegmentHeader {
    /// Encodes into the on-segment form.
    #[must_use]
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(&SEGMENT_MAGIC);
        b[8..12].copy_from_slice(&LAYOUT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.kind.code().to_le_bytes());
        b[16..24].copy_from_slice(&self.total_size.to_le_bytes());
        b[24..32].copy_from_slice(&self.type_id.0.to_le_bytes());
        b[32..48].copy_from_slice(&self.nonce);
        b[48..52].copy_from_slice(&self.pid_ns.to_le_bytes());
        let sum = fnv(&b[..56]);
        b[56..64].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// Decodes and validates a header read from a segment.
    ///
    /// # Errors
    /// [`Error::BadHeader`] for a short buffer, wrong magic, unknown version or kind, bad checksum,
    /// or a size out of range.
    pub fn decode(b: &[u8]) -> Result<Self, Error> {
        let b: &[u8; HEADER_SIZE] = b
            .get(..HEADER_SIZE)
            .and_then(|s| s.try_into().ok())
            .ok_or(Error::BadHeader("header too short"))?;
        if b[0..8] != SEGMENT_MAGIC {
            return Err(Error::BadHeader("not a context-shmem segment (bad magic)"));
        }
        if le32(&b[8..12]) != LAYOUT_VERSION {
            return Err(Error::BadHeader("unsupported layout version"));
        }
        if le64(&b[56..64]) != fnv(&b[..56]) {
            return Err(Error::BadHeader("header checksum mismatch"));
        }
        let kind = SegmentKind::from_code(le32(&b[12..16]))
            .ok_or(Error::BadHeader("unknown segment kind"))?;
        let total_size = le64(&b[16..24]);
        if total_size < HEADER_SIZE as u64 || total_size > MAX_SEGMENT_SIZE {
            return Err(Error::BadHeader("segment size out of range"));
        }
        let mut nonce = [0u8; 16];
        nonce.copy_from_slice(&b[32..48]);
        Ok(Self {
            kind,
            total_size,
            type_id: TypeId(le64(&b[24..32])),
            nonce,
            pid_ns: le32(&b[48..52]),
        })
    }
}

pub(crate) fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

pub(crate) fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

pub(crate) fn fnv(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &x in b {
        h ^= u64::from(x);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Writes a name record so that it appears at `path` whole or not at all: into an unnamed file in
/// `dir` (`O_TMPFILE`), which is then linked under its name (`linkat` through `/proc/self/fd`,
/// which needs no privilege and fails if the name exists). A creator killed before the link
/// leaves nothing: the kernel frees the unnamed file with its descriptor. Where the file system
/// has no `O_TMPFILE`, the record is created `O_EXCL` under its name and written in place (a
/// crash mid-write then leaves an unreadable record, which `ctx shm ls` shows).
fn publish_record(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let tmp = std::fs::OpenOptions::new()
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .open(dir);
    let mut f = match tmp {
        Ok(f) => f,
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
            ) =>
        {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(path)
                .map_err(io("create name record"))?;
            if let Err(e) = f.write_all(bytes).and_then(|()| f.sync_data()) {
                let _ = std::fs::remove_file(path);
                return Err(Error::Io {
                    op: "write name record",
                    source: e,
                });
            }
            return Ok(());
        }
        Err(e) => return Err(io("create name record")(e)),
    };
    f.write_all(bytes)
        .and_then(|()| f.sync_data())
        .map_err(io("write name record"))?;
    let from = std::ffi::CString::new(format!("/proc/self/fd/{}", f.as_raw_fd()))
        .map_err(|_| Error::BadHeader("descriptor path"))?;
    let to = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::BadName("the segment directory's path holds a NUL byte".to_owned()))?;
    // SAFETY: two NUL-terminated paths that live across the call; AT_FDCWD with absolute or
    // relative paths; AT_SYMLINK_FOLLOW resolves the /proc magic link to the unnamed file.
    let r = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if r != 0 {
        return Err(last_err("link name record"));
    }
    Ok(())
}

/// Owner-side state of a named segment: the record file to unlink.
struct NamedOwner {
    path: PathBuf,
    creator_pid: u32,
}

/// A mapped shared-memory segment (see the [module docs](self) for the kinds and their guarantees).
///
/// The payload is reached only through the typed views of this crate ([`crate::SharedLock`],
/// [`crate::SharedBuf`], [`crate::AtomicArray`], [`crate::Channel`]): the segment itself never
/// hands out references to bytes another process may be writing.
pub struct Segment {
    map: memmap2::MmapRaw,
    // INVARIANTS: `len` is the mapped length, read from our own `fstat` (not from shared memory),
    // `>= HEADER_SIZE`; the mapping starts page-aligned.
    len: usize,
    file: File,
    kind: SegmentKind,
    header: SegmentHeader,
    name: Option<String>,
    owner: Option<NamedOwner>,
}

impl fmt::Debug for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Segment")
            .field("kind", &self.kind)
            .field("len", &self.len)
            .field("type_id", &self.header.type_id)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { op, source }
}

fn last_err(op: &'static str) -> Error {
    Error::Io {
        op,
        source: std::io::Error::last_os_error(),
    }
}

fn random_nonce() -> Result<[u8; 16], Error> {
    let mut n = [0u8; 16];
    let mut got = 0;
    while got < n.len() {
        let rest = &mut n[got..];
        // SAFETY: `rest` is writable for `rest.len()` bytes; flags 0 = urandom source, may block
        // only before the pool is initialized at boot.
        let r = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(r) {
            Ok(k) => got += k,
            Err(_) => {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINTR) {
                    return Err(Error::Io {
                        op: "getrandom",
                        source: e,
                    });
                }
            }
        }
    }
    Ok(n)
}

fn total_for(payload_len: usize) -> Result<usize, Error> {
    let total = payload_len
        .checked_add(HEADER_SIZE)
        .ok_or(Error::TooLarge)?;
    if total as u64 > MAX_SEGMENT_SIZE {
        return Err(Error::TooLarge);
    }
    Ok(total)
}

/// The name every memfd of this crate gets; `/proc/<pid>/fd/<n>` shows it as
/// `/memfd:context-shmem (deleted)`.
const MEMFD_NAME: &std::ffi::CStr = c"context-shmem";

/// Whether the descriptor behind `/proc/<pid>/fd/<n>` (`link`) is a memfd of this crate, by the
/// link's target, without opening it.
///
/// # Errors
/// Reading the link failed (`ENOENT`: the descriptor is closed; `EACCES`: not ours to look at).
fn links_to_our_memfd(link: &str) -> std::io::Result<bool> {
    let target = std::fs::read_link(link)?;
    let shown = [b"/memfd:".as_slice(), MEMFD_NAME.to_bytes()].concat();
    Ok(target.as_os_str().as_encoded_bytes().starts_with(&shown))
}

fn new_memfd(total: usize) -> Result<File, Error> {
    // SAFETY: the name is a NUL-terminated constant; the flags are valid for memfd_create.
    let fd = unsafe {
        libc::memfd_create(
            MEMFD_NAME.as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(last_err("memfd_create"));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = File::from(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    file.set_len(total as u64).map_err(io("ftruncate memfd"))?;
    Ok(file)
}

fn seal(file: &File) -> Result<(), Error> {
    // SAFETY: `file` is an open memfd created with MFD_ALLOW_SEALING; F_ADD_SEALS takes an int.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, REQUIRED_SEALS) };
    if r < 0 {
        return Err(last_err("F_ADD_SEALS"));
    }
    Ok(())
}

fn check_sealed(file: &File) -> Result<(), Error> {
    // SAFETY: `file` is an open descriptor; F_GET_SEALS has no argument and fails with EINVAL on
    // files that do not support seals.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 || seals & REQUIRED_SEALS != REQUIRED_SEALS {
        return Err(Error::Unsealed);
    }
    Ok(())
}

fn map(file: &File, len: usize) -> Result<memmap2::MmapRaw, Error> {
    memmap2::MmapOptions::new()
        .len(len)
        .map_raw(file)
        .map_err(io("mmap"))
}

fn fstat_len(file: &File) -> Result<usize, Error> {
    let len = file.metadata().map_err(io("fstat"))?.len();
    if len < HEADER_SIZE as u64 || len > MAX_SEGMENT_SIZE {
        return Err(Error::BadHeader("segment file size out of range"));
    }
    usize::try_from(len).map_err(|_| Error::TooLarge)
}

impl Segment {
    fn finish_create(
        file: File,
        kind: SegmentKind,
        total: usize,
        type_id: TypeId,
    ) -> Result<Self, Error> {
        let header = SegmentHeader {
            kind,
            total_size: total as u64,
            type_id,
            nonce: random_nonce()?,
            pid_ns: crate::process::pid_namespace().unwrap_or(0),
        };
        let map = map(&file, total)?;
        let seg = Self {
            map,
            len: total,
            file,
            kind,
            header,
            name: None,
            owner: None,
        };
        let bytes = header.encode();
        // SAFETY:
        // - the destination is the first HEADER_SIZE bytes of our own mapping (`len >= HEADER_SIZE`
        //   by construction in `total_for`), writable (mapped read-write);
        // - nobody else can reach the segment yet (fresh memfd or O_EXCL file not yet published), so
        //   this plain copy races with nothing.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), seg.map.as_mut_ptr(), HEADER_SIZE) };
        Ok(seg)
    }

    /// Copies the header out of the mapping.
    fn read_header_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        for (i, out) in b.iter_mut().enumerate() {
            // SAFETY: `i < HEADER_SIZE <= len` (INVARIANTS), the mapping is readable; a volatile
            // byte read of shared memory is the sanctioned way to read memory another process may
            // write, and any value is a valid u8.
            *out = unsafe { self.map.as_ptr().wrapping_add(i).read_volatile() };
        }
        b
    }

    fn open_validated(file: File, kind: SegmentKind, type_id: TypeId) -> Result<Self, Error> {
        let len = fstat_len(&file)?;
        let map = map(&file, len)?;
        let mut seg = Self {
            map,
            len,
            file,
            kind,
            header: SegmentHeader {
                kind,
                total_size: 0,
                type_id,
                nonce: [0; 16],
                pid_ns: 0,
            },
            name: None,
            owner: None,
        };
        let header = SegmentHeader::decode(&seg.read_header_bytes())?;
        if header.total_size != len as u64 {
            return Err(Error::WrongSize {
                expected: len as u64,
                found: header.total_size,
            });
        }
        if header.type_id != type_id {
            return Err(Error::WrongType {
                expected: type_id,
                found: header.type_id,
            });
        }
        seg.header = header;
        Ok(seg)
    }

    /// A new anonymous segment with `payload_len` bytes of zeroed payload, in a memfd sealed against
    /// shrinking and growing.
    ///
    /// # Errors
    /// Size too large, or the OS refused (`memfd_create`, `ftruncate`, sealing, `mmap`).
    pub fn create_memfd(payload_len: usize, type_id: TypeId) -> Result<Self, Error> {
        let total = total_for(payload_len)?;
        let file = new_memfd(total)?;
        seal(&file)?;
        Self::finish_create(file, SegmentKind::Memfd, total, type_id)
    }

    /// Maps a memfd segment received from another process. Refuses descriptors that are not sealed
    /// against shrinking and growing, and validates the header and its type id.
    ///
    /// # Errors
    /// [`Error::Unsealed`], [`Error::BadHeader`], [`Error::WrongType`], [`Error::WrongSize`], or an
    /// OS error.
    pub fn from_fd(fd: OwnedFd, type_id: TypeId) -> Result<Self, Error> {
        let file = File::from(fd);
        check_sealed(&file)?;
        Self::open_validated(file, SegmentKind::Memfd, type_id)
    }

    /// Sends this segment's descriptor over a Unix socket (SCM_RIGHTS), with one byte of data.
    /// Never raises `SIGPIPE` (`MSG_NOSIGNAL`): a peer that hung up is an `EPIPE` error, not the
    /// end of a process whose `SIGPIPE` disposition is the default.
    ///
    /// # Errors
    /// The send failed.
    pub fn send_fd(&self, sock: &UnixStream) -> Result<(), Error> {
        use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
        let fds = [self.file.as_raw_fd()];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let iov = [IoSlice::new(b"S")];
        sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None).map_err(
            |e| Error::Io {
                op: "sendmsg",
                source: e.into(),
            },
        )?;
        Ok(())
    }

    /// Receives a segment descriptor sent with [`Self::send_fd`] and opens it with [`Self::from_fd`].
    ///
    /// # Errors
    /// Nothing or not exactly one descriptor received, or any error of [`Self::from_fd`].
    pub fn recv_fd(sock: &UnixStream, type_id: TypeId) -> Result<Self, Error> {
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
        let mut byte = [0u8; 1];
        let mut iov = [IoSliceMut::new(&mut byte)];
        let mut space = nix::cmsg_space!([RawFd; 4]);
        let msg = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| Error::Io {
            op: "recvmsg",
            source: e.into(),
        })?;
        let mut received: Vec<OwnedFd> = Vec::new();
        for c in msg.cmsgs().map_err(|e| Error::Io {
            op: "recvmsg cmsgs",
            source: e.into(),
        })? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for fd in fds {
                    // SAFETY: the kernel just installed `fd` in our table for this message; nobody
                    // else owns it. Wrapping it at once means every received fd gets closed.
                    received.push(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
                }
            }
        }
        if received.len() != 1 {
            return Err(Error::BadHeader(
                "expected exactly one descriptor in the message",
            ));
        }
        let fd = received
            .pop()
            .ok_or(Error::BadHeader("no descriptor received"))?;
        Self::from_fd(fd, type_id)
    }

    /// Creates a named segment: a sealed memfd holding the data plus a record file
    /// `/dev/shm/ctxshm-<tag>-<32 hex digits>` (created `O_EXCL`, mode 0600) naming it. The creator
    /// unlinks the name when it drops the segment. `tag` is 1 to 24 characters of `[a-z0-9_]`.
    ///
    /// # Errors
    /// A bad tag, size too large, or an OS error.
    pub fn create_named(tag: &str, payload_len: usize, type_id: TypeId) -> Result<Self, Error> {
        Self::create_named_in(
            Path::new(crate::registry::SHM_DIR),
            tag,
            payload_len,
            type_id,
        )
    }

    pub(crate) fn create_named_in(
        dir: &Path,
        tag: &str,
        payload_len: usize,
        type_id: TypeId,
    ) -> Result<Self, Error> {
        crate::registry::check_tag(tag)?;
        let total = total_for(payload_len)?;
        let file = new_memfd(total)?;
        seal(&file)?;
        let mut seg = Self::finish_create(file, SegmentKind::Named, total, type_id)?;
        let me = ProcessToken::current().map_err(io("/proc/self/stat"))?;
        // The record names its creator by pid and start time; a record with a made-up start
        // time (0) would read as a dead creator at once, and `gc` would delete the name of a
        // live segment. So a failed read (descriptors exhausted, say) fails the creation.
        let start = crate::process::own_start_ticks().ok_or_else(|| {
            io("/proc/self/stat")(std::io::Error::other(
                "cannot read this process's start time for the name record",
            ))
        })?;
        let hex: String = random_nonce()?.iter().map(|b| format!("{b:02x}")).collect();
        let name = format!("{}{tag}-{hex}", crate::registry::PREFIX);
        let path = dir.join(&name);
        let record = crate::registry::NameRecord {
            total_size: total as u64,
            type_id,
            creator_pid: me.pid(),
            creator_start: start,
            fd: u32::try_from(seg.file.as_raw_fd()).map_err(|_| Error::BadHeader("negative fd"))?,
            created_unix_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
            nonce: seg.header.nonce,
            pid_ns: seg.header.pid_ns,
        };
        publish_record(dir, &path, &record.encode())?;
        seg.name = Some(name);
        seg.owner = Some(NamedOwner {
            path,
            creator_pid: me.pid(),
        });
        Ok(seg)
    }

    /// Opens a named segment by its full name (`ctxshm-...`), as listed by [`crate::registry::list`].
    ///
    /// # Errors
    /// [`Error::BadName`], [`Error::NotFound`], [`Error::BadHeader`] (garbage or truncated record,
    /// a record owned by another user than its creator, or naming a descriptor that is not one of
    /// our memfds), [`Error::CreatorGone`] (the creator exited: the name is stale),
    /// [`Error::ForeignPidNamespace`] (made in another PID namespace: its creator's PID cannot be
    /// checked or reached from here), [`Error::WrongType`], [`Error::WrongSize`],
    /// [`Error::Unsealed`].
    pub fn open_named(name: &str, type_id: TypeId) -> Result<Self, Error> {
        Self::open_named_in(Path::new(crate::registry::SHM_DIR), name, type_id)
    }

    pub(crate) fn open_named_in(dir: &Path, name: &str, type_id: TypeId) -> Result<Self, Error> {
        crate::registry::check_name(name)?;
        let rec = crate::registry::read_record(&dir.join(name), name)?;
        if rec.type_id != type_id {
            return Err(Error::WrongType {
                expected: type_id,
                found: rec.type_id,
            });
        }
        match rec.creator_state() {
            crate::registry::CreatorState::Alive => {}
            crate::registry::CreatorState::Dead => {
                return Err(Error::CreatorGone {
                    pid: rec.creator_pid,
                });
            }
            crate::registry::CreatorState::Stale => {
                return Err(Error::NoLongerHeld {
                    pid: rec.creator_pid,
                });
            }
            crate::registry::CreatorState::Unknown => {
                return Err(Error::ForeignPidNamespace {
                    ours: crate::process::pid_namespace(),
                    theirs: Some(rec.pid_ns).filter(|&n| n != 0),
                });
            }
        }
        // Anyone may write a record in `/dev/shm`. A record must belong to the user the creator
        // runs as (the owner of `/proc/<pid>`), so that a forged one cannot make this process
        // (root, say) open another user's descriptors; and what it names must be one of our
        // memfds, opened without blocking and without taking a terminal, before anything else.
        let proc_dir = format!("/proc/{}", rec.creator_pid);
        let record_uid = std::fs::symlink_metadata(dir.join(name))
            .map_err(io("stat name record"))?
            .uid();
        let creator_uid = std::fs::metadata(&proc_dir)
            .map_err(io("stat /proc/<creator>"))?
            .uid();
        if record_uid != creator_uid {
            return Err(Error::BadHeader(
                "the name record belongs to another user than the process it names",
            ));
        }
        let proc_path = format!("{proc_dir}/fd/{}", rec.fd);
        if !links_to_our_memfd(&proc_path).map_err(io("read /proc/<creator>/fd/<n>"))? {
            return Err(Error::BadHeader(
                "the name record does not point at a context-shmem memfd",
            ));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&proc_path)
            .map_err(io("open /proc/<creator>/fd/<n>"))?;
        check_sealed(&file)?;
        let mut seg = Self::open_validated(file, SegmentKind::Named, type_id)?;
        if seg.header.nonce != rec.nonce || seg.header.total_size != rec.total_size {
            return Err(Error::BadHeader(
                "name record does not match the segment it points to",
            ));
        }
        seg.name = Some(name.to_owned());
        Ok(seg)
    }

    /// Creates a file-backed segment at `path` (must not exist; mode 0600). See the
    /// [module docs](self) on truncation: only for files no untrusted process can write.
    ///
    /// # Errors
    /// The file exists, size too large, or an OS error.
    pub fn create_file(path: &Path, payload_len: usize, type_id: TypeId) -> Result<Self, Error> {
        let total = total_for(payload_len)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(path)
            .map_err(io("create segment file"))?;
        file.set_len(total as u64)
            .map_err(io("ftruncate segment file"))?;
        Self::finish_create(file, SegmentKind::File, total, type_id)
    }

    /// Opens a file-backed segment, validating size (by `fstat`, before mapping) and header.
    ///
    /// # Errors
    /// As for [`Self::from_fd`], except that files are not sealed.
    pub fn open_file(path: &Path, type_id: TypeId) -> Result<Self, Error> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(io("open segment file"))?;
        Self::open_validated(file, SegmentKind::File, type_id)
    }

    /// Fills in this process's page tables for the whole segment now (`MADV_POPULATE_READ`,
    /// Linux 5.14+), instead of one minor fault per 4 KiB page on first touch. A forked child does
    /// not inherit page-table entries of shared mappings, so a child about to write a large buffer
    /// saves most of its first-touch cost with one call. Read-populating lets the kernel's
    /// fault-around map several pages per step: for 64 MiB in a forked child on this (loaded)
    /// machine it took about 5 ms against 13 ms for `MADV_POPULATE_WRITE`, and populate + copy
    /// together about 20 ms against 25 ms (and 50-130 ms with no prefault at all).
    ///
    /// # Errors
    /// The kernel refused (for example `EINVAL` before 5.14); the segment is still usable.
    pub fn prefault(&self) -> Result<(), Error> {
        // SAFETY: the range is exactly our own mapping (`len` bytes from its start, page-aligned);
        // MADV_POPULATE_READ only populates page tables (the memfd is already sized and sealed
        // against shrinking, so no page is beyond EOF) and never changes contents.
        let r = unsafe {
            libc::madvise(
                self.map.as_mut_ptr().cast(),
                self.len,
                libc::MADV_POPULATE_READ,
            )
        };
        if r != 0 {
            return Err(last_err("madvise(MADV_POPULATE_READ)"));
        }
        Ok(())
    }

    /// The payload's size in bytes.
    #[must_use]
    pub fn payload_len(&self) -> usize {
        self.len - HEADER_SIZE
    }

    /// The type id recorded in the header.
    #[must_use]
    pub fn type_id(&self) -> TypeId {
        self.header.type_id
    }

    /// The kind of segment.
    #[must_use]
    pub fn kind(&self) -> SegmentKind {
        self.kind
    }

    /// The PID namespace of the process that created the segment, as its header records it
    /// (`None` if the creator could not read it).
    #[must_use]
    pub fn creator_pid_namespace(&self) -> Option<u32> {
        Some(self.header.pid_ns).filter(|&n| n != 0)
    }

    /// Checks that this process is in the PID namespace the segment's creator was in. Process
    /// tokens stored in the segment (a lock's owner, a channel side) are PIDs of that namespace:
    /// compared from another one, a live process could look dead and have its lock taken. So the
    /// shared lock (and so [`crate::SharedBuf`]) and the channel call this when they attach;
    /// lock-free data ([`crate::AtomicArray`], raw payload access) needs no such check.
    ///
    /// # Errors
    /// [`Error::ForeignPidNamespace`] when the namespaces differ or either is unknown.
    pub fn check_pid_namespace(&self) -> Result<(), Error> {
        let ours = crate::process::pid_namespace();
        match (ours, self.creator_pid_namespace()) {
            (Some(a), Some(b)) if a == b => Ok(()),
            (ours, theirs) => Err(Error::ForeignPidNamespace { ours, theirs }),
        }
    }

    /// The name of a named segment.
    #[must_use]
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The descriptor behind the mapping (memfd or file).
    #[must_use]
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Reads `out.len()` payload bytes from `offset`, byte by byte with volatile reads, into `out`.
    /// For diagnostics (a dump of a segment another process is writing); typed access goes through
    /// the views.
    ///
    /// # Errors
    /// [`Error::OutOfBounds`] if `offset + out.len()` exceeds the payload.
    pub fn snapshot(&self, offset: usize, out: &mut [u8]) -> Result<(), Error> {
        let p = self.payload_ptr(offset, out.len(), 1)?;
        for (i, b) in out.iter_mut().enumerate() {
            // SAFETY: `payload_ptr` checked `offset + out.len()` against our private length, so
            // `p + i` is in the mapping; a volatile u8 read of shared memory is sound for any value.
            *b = unsafe { p.as_ptr().wrapping_add(i).read_volatile() };
        }
        Ok(())
    }

    /// A pointer to `len` payload bytes at `offset`, checked against the privately held size and
    /// for `align`.
    pub(crate) fn payload_ptr(
        &self,
        offset: usize,
        len: usize,
        align: usize,
    ) -> Result<NonNull<u8>, Error> {
        let size = self.payload_len();
        let end = offset
            .checked_add(len)
            .ok_or(Error::OutOfBounds { offset, len, size })?;
        if end > size {
            return Err(Error::OutOfBounds { offset, len, size });
        }
        let start = HEADER_SIZE + offset;
        // SAFETY: `start <= HEADER_SIZE + size == self.len`, so the result is within (or one past)
        // the mapping, which is a single allocation from mmap.
        let p = unsafe { self.map.as_mut_ptr().add(start) };
        if align == 0 || (p as usize) % align != 0 {
            return Err(Error::Misaligned { offset, align });
        }
        NonNull::new(p).ok_or(Error::OutOfBounds { offset, len, size })
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        if let Some(o) = &self.owner {
            // Only the creating process unlinks (not a forked child that happens to drop a copy).
            if o.creator_pid == std::process::id() {
                let _ = std::fs::remove_file(&o.path);
            }
        }
    }
}

/// Whether the descriptor a live creator's record names still holds that segment (its header,
/// read without mapping anything, has the record's nonce): `Some(false)` when the descriptor is
/// closed or holds anything else; `None` when this process cannot tell (it may not look into
/// the creator's descriptors, or `/proc` does not show the creator).
pub(crate) fn record_target_holds(rec: &crate::registry::NameRecord) -> Option<bool> {
    use std::os::unix::fs::FileExt;
    let proc_dir = format!("/proc/{}", rec.creator_pid);
    // Under `hidepid` a missing creator directory proves nothing about its descriptors.
    std::fs::metadata(&proc_dir).ok()?;
    let path = format!("{proc_dir}/fd/{}", rec.fd);
    match links_to_our_memfd(&path) {
        Ok(true) => {}
        Ok(false) => return Some(false),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Some(false),
        Err(_) => return None,
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&path)
        .ok()?;
    let mut header = [0u8; HEADER_SIZE];
    file.read_exact_at(&mut header, 0).ok()?;
    Some(SegmentHeader::decode(&header).is_ok_and(|h| h.nonce == rec.nonce))
}

/// Reads at most `limit` bytes of a small regular file (name records).
///
/// Opened non-blocking and checked to be a regular file before anything is read: the directory
/// (`/dev/shm`) is writable by every user, and a FIFO planted under a record's name would
/// otherwise block `open` until someone writes to it (a `list` or `gc` that never returns).
///
/// # Errors
/// `InvalidData` for anything but a regular file; the OS's errors otherwise.
pub(crate) fn read_small(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.file_type().is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    let mut v = Vec::new();
    f.take(limit).read_to_end(&mut v)?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: TypeId = TypeId::of_name("test-segment-v1");

    /// Review of 2026-12-04: a creator killed while writing its name record left a truncated
    /// record that `gc` never removes. The kill here is `SIGXFSZ`, sent by the kernel in the
    /// middle of the record's write: the file size limit (64 bytes) admits the segment's memfd
    /// (64 bytes, an empty payload) but not the 80-byte record.
    #[test]
    #[cfg_attr(
        miri,
        ignore = "fork, rlimits and file I/O are foreign calls Miri does not run"
    )]
    fn a_creator_killed_while_writing_its_record_leaves_no_record() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_owned();
        // SAFETY: the child sets limits and signal dispositions of its own, creates the segment
        // (simple work on a fresh process) and leaves with `_exit`; it never returns into the
        // test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let size = libc::rlimit {
                rlim_cur: HEADER_SIZE as libc::rlim_t,
                rlim_max: HEADER_SIZE as libc::rlim_t,
            };
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: a valid rlimit that lives across the call.
            unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
            // SAFETY: the default disposition of a signal; no handler involved.
            unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_DFL) };
            // SAFETY: a valid rlimit that lives across the call.
            unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &size) };
            let r = Segment::create_named_in(&d, "killed", 0, T);
            // Not reached when the kernel kills us mid-write, as it should.
            // SAFETY: `_exit` ends the child at once.
            unsafe { libc::_exit(if r.is_ok() { 3 } else { 4 }) };
        }
        let mut status = 0;
        let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            // SAFETY: `status` is a valid out-pointer; WNOHANG never blocks.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if r == pid {
                break;
            }
            assert!(std::time::Instant::now() < until, "the child hung");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGXFSZ,
            "the child was not killed mid-write (status {status:#x})"
        );
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "a crashed creator left {left:?}");
    }

    #[test]
    fn header_roundtrip_and_rejections() {
        let h = SegmentHeader {
            kind: SegmentKind::Memfd,
            total_size: 4096,
            type_id: T,
            nonce: [7; 16],
            pid_ns: 4_026_531_836,
        };
        assert_eq!(SegmentHeader::decode(&h.encode()).unwrap(), h);
        let mut bad = h.encode();
        bad[20] ^= 1;
        assert!(matches!(
            SegmentHeader::decode(&bad),
            Err(Error::BadHeader(_))
        ));
        assert!(matches!(
            SegmentHeader::decode(&[0u8; 10]),
            Err(Error::BadHeader(_))
        ));
    }

    #[test]
    fn memfd_is_sealed_and_reopens_by_fd() {
        let seg = Segment::create_memfd(1000, T).unwrap();
        assert_eq!(seg.payload_len(), 1000);
        check_sealed(&seg.file).unwrap();
        // Truncation is refused by the kernel.
        let e = seg.file.set_len(10).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        let dup = seg.fd().try_clone_to_owned().unwrap();
        let again = Segment::from_fd(dup, T).unwrap();
        assert_eq!(again.payload_len(), 1000);
        let dup = seg.fd().try_clone_to_owned().unwrap();
        assert!(matches!(
            Segment::from_fd(dup, TypeId(1)),
            Err(Error::WrongType { .. })
        ));
    }

    #[test]
    fn unsealed_fd_is_refused() {
        let f = new_memfd(4096).unwrap();
        assert!(matches!(
            Segment::from_fd(OwnedFd::from(f), T),
            Err(Error::Unsealed)
        ));
        let tmp = tempfile::tempfile().unwrap();
        assert!(matches!(
            Segment::from_fd(OwnedFd::from(tmp), T),
            Err(Error::Unsealed)
        ));
    }

    #[test]
    fn bounds_are_checked_against_private_size() {
        let seg = Segment::create_memfd(100, T).unwrap();
        assert!(seg.payload_ptr(0, 100, 8).is_ok());
        assert!(matches!(
            seg.payload_ptr(1, 100, 1),
            Err(Error::OutOfBounds { .. })
        ));
        assert!(matches!(
            seg.payload_ptr(usize::MAX, 2, 1),
            Err(Error::OutOfBounds { .. })
        ));
        assert!(matches!(
            seg.payload_ptr(1, 4, 4),
            Err(Error::Misaligned { .. })
        ));
    }

    #[test]
    fn fd_passing_over_a_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let seg = Segment::create_memfd(64, T).unwrap();
        seg.send_fd(&a).unwrap();
        let got = Segment::recv_fd(&b, T).unwrap();
        assert_eq!(got.payload_len(), 64);
        assert_eq!(got.kind(), SegmentKind::Memfd);
    }

    #[test]
    fn file_backed_roundtrip_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("seg");
        let seg = Segment::create_file(&p, 512, T).unwrap();
        drop(seg);
        assert_eq!(Segment::open_file(&p, T).unwrap().payload_len(), 512);
        let g = dir.path().join("garbage");
        std::fs::write(&g, vec![0xabu8; 4096]).unwrap();
        assert!(matches!(
            Segment::open_file(&g, T),
            Err(Error::BadHeader(_))
        ));
        let short = dir.path().join("short");
        std::fs::write(&short, b"tiny").unwrap();
        assert!(matches!(
            Segment::open_file(&short, T),
            Err(Error::BadHeader(_))
        ));
    }
}
