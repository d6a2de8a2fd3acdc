//! Fixed-address regions: one `PROT_NONE` reservation, and blank shared files mapped
//! `MAP_SHARED | MAP_FIXED` into it one after another.
//!
//! The limits are documented in the crate docs.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;

use crate::error::RegionError;
use crate::sys;

/// What backs the regions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Backing {
    /// Anonymous memory files (`memfd_create`), sealed against resizing. The default.
    #[default]
    Memfd,
    /// Unnamed (`O_TMPFILE`) files in this directory, e.g. a tmpfs or a disk-backed filesystem for
    /// regions larger than RAM.
    TempDir(PathBuf),
}

/// One mapped region, as the master knows it (private bookkeeping; never read from shared memory).
#[derive(Debug)]
pub(crate) struct Region {
    /// Offset from the reservation base.
    pub(crate) off: usize,
    /// Length in bytes.
    pub(crate) len: usize,
    /// The backing file while the region is mapped; `None` once released.
    pub(crate) fd: Option<OwnedFd>,
}

/// The master's reservation and regions.
#[derive(Debug)]
pub(crate) struct Regions {
    base: usize,
    reserve_len: usize,
    next_off: usize,
    backing: Backing,
    regions: Vec<Region>,
    label: CString,
    leaked: bool,
}

impl Regions {
    /// Reserves `reserve_len` bytes aligned to `align` (a power of two).
    pub(crate) fn reserve(
        reserve_len: usize,
        align: usize,
        backing: Backing,
    ) -> Result<Self, RegionError> {
        if reserve_len == 0 || reserve_len % sys::page_size() != 0 {
            return Err(RegionError::BadSize {
                size: reserve_len as u64,
                why: "reservation must be whole pages",
            });
        }
        let over = reserve_len.checked_add(align).ok_or(RegionError::BadSize {
            size: reserve_len as u64,
            why: "reservation overflows the address space",
        })?;
        let raw = sys::reserve(over).map_err(RegionError::os("mmap(PROT_NONE) reservation"))?;
        let base = (raw + align - 1) & !(align - 1);
        // Trim the alignment slack on both sides so only [base, base + reserve_len) stays reserved.
        if base > raw {
            // SAFETY: [raw, base) is part of the reservation we just made and holds nothing.
            unsafe { sys::unmap(raw, base - raw) }.map_err(RegionError::os("munmap"))?;
        }
        let end = base + reserve_len;
        if raw + over > end {
            // SAFETY: [end, raw + over) is the tail of our fresh reservation and holds nothing.
            unsafe { sys::unmap(end, raw + over - end) }.map_err(RegionError::os("munmap"))?;
        }
        let label = CString::new(format!("context-forkpool-{}", sys::getpid())).unwrap_or_default();
        Ok(Self {
            base,
            reserve_len,
            next_off: 0,
            backing,
            regions: Vec::new(),
            label,
            leaked: false,
        })
    }

    pub(crate) fn base(&self) -> usize {
        self.base
    }

    pub(crate) fn reserve_len(&self) -> usize {
        self.reserve_len
    }

    /// Bytes mapped or released so far (the next region starts here).
    pub(crate) fn next_off(&self) -> usize {
        self.next_off
    }

    pub(crate) fn regions(&self) -> &[Region] {
        &self.regions
    }

    fn new_file(&self, len: usize) -> Result<OwnedFd, RegionError> {
        let fd = match &self.backing {
            Backing::Memfd => sys::memfd(&self.label).map_err(RegionError::os("memfd_create"))?,
            Backing::TempDir(dir) => {
                sys::tmpfile_in(dir).map_err(RegionError::os("open(O_TMPFILE)"))?
            }
        };
        sys::set_len(&fd, len as u64).map_err(RegionError::os("ftruncate"))?;
        if self.backing == Backing::Memfd {
            sys::seal(&fd).map_err(RegionError::os("fcntl(F_ADD_SEALS)"))?;
        }
        Ok(fd)
    }

    /// Creates a blank file of `len` bytes and maps it at the next free address of the reservation.
    /// Returns the region index. Other processes must map it too before anyone touches it.
    pub(crate) fn add(&mut self, len: usize) -> Result<usize, RegionError> {
        if len == 0 || len % sys::page_size() != 0 {
            return Err(RegionError::BadSize {
                size: len as u64,
                why: "regions must be whole pages",
            });
        }
        let left = self.reserve_len - self.next_off;
        if len > left {
            return Err(RegionError::ReservationFull {
                needed: len as u64,
                left: left as u64,
            });
        }
        let fd = self.new_file(len)?;
        let off = self.next_off;
        // SAFETY: [base + off, base + off + len) lies inside our reservation past every region, so it
        // holds only PROT_NONE reservation and no Rust object; the file is `len` bytes long.
        unsafe { sys::map_shared_fixed(self.base + off, len, fd.as_raw_fd()) }
            .map_err(RegionError::os("mmap(MAP_SHARED | MAP_FIXED)"))?;
        self.next_off += len;
        self.regions.push(Region {
            off,
            len,
            fd: Some(fd),
        });
        Ok(self.regions.len() - 1)
    }

    /// Unmaps region `idx` in this process (maps the reservation back over it) and closes its file.
    ///
    /// # Safety
    /// No live object of this process may be in the region, and every other process must have
    /// stopped using it.
    pub(crate) unsafe fn release(&mut self, idx: usize) -> Result<(), RegionError> {
        let r = self
            .regions
            .get_mut(idx)
            .filter(|r| r.fd.is_some())
            .ok_or(RegionError::NoSuchRegion(idx))?;
        // SAFETY: the range is one of our regions inside the reservation; the caller guarantees
        // nothing lives there.
        unsafe { sys::map_over_reserved(self.base + r.off, r.len) }
            .map_err(RegionError::os("mmap(PROT_NONE | MAP_FIXED)"))?;
        r.fd = None;
        Ok(())
    }

    /// Returns the pages of `[addr, addr + len)` (inside a mapped region) to the system:
    /// `fallocate(PUNCH_HOLE)` on the backing file, falling back to `madvise(MADV_REMOVE)`.
    ///
    /// # Safety
    /// The range must hold no live data: it reads back as zeroes in every process afterwards.
    pub(crate) unsafe fn punch(&self, addr: usize, len: usize) -> Result<(), RegionError> {
        let off = addr
            .checked_sub(self.base)
            .ok_or(RegionError::NoSuchRegion(usize::MAX))?;
        let r = self
            .regions
            .iter()
            .find(|r| r.fd.is_some() && off >= r.off && off + len <= r.off + r.len)
            .ok_or(RegionError::NoSuchRegion(usize::MAX))?;
        let fd =
            r.fd.as_ref()
                .map(AsRawFd::as_raw_fd)
                .ok_or(RegionError::NoSuchRegion(usize::MAX))?;
        match sys::punch_hole(fd, (off - r.off) as u64, len as u64) {
            Ok(()) => Ok(()),
            // SAFETY: the range is inside a mapped shared region and holds no live data (contract).
            Err(_) => unsafe { sys::madvise_remove(addr, len) }
                .map_err(RegionError::os("madvise(MADV_REMOVE)")),
        }
    }

    /// Replaces every live region by a fresh blank file mapped at the same address with the same
    /// size (the pool's reset).
    ///
    /// All new files are made first; each is then mapped straight over its old mapping
    /// (`MAP_FIXED` replaces it in one step). So a failure (no space for the files, a deleted
    /// directory, too many descriptors) leaves every region as it was, mapped and readable, and the
    /// reset can be tried again.
    ///
    /// # Errors
    /// [`RegionError::Os`] from creating a file (nothing changed) or from a mapping. A mapping
    /// that fails is put back over the old file, so every region stays mapped; only if that fails
    /// too (the kernel refusing to map a range it mapped a moment ago) can a region be left
    /// unmapped, which the error then says.
    ///
    /// # Safety
    /// No process may use any region during the call, and no live object may be in them.
    pub(crate) unsafe fn recreate(&mut self) -> Result<(), RegionError> {
        let mut fresh = Vec::new();
        for (i, r) in self.regions.iter().enumerate() {
            if r.fd.is_some() {
                fresh.push((i, self.new_file(r.len)?));
            }
        }
        for (i, fd) in fresh {
            let r = &mut self.regions[i];
            let addr = self.base + r.off;
            // SAFETY: the range is one of our regions inside our reservation; nothing lives there
            // (contract); the file is `r.len` bytes long.
            if let Err(e) = unsafe { sys::map_shared_fixed(addr, r.len, fd.as_raw_fd()) } {
                let old = r.fd.as_ref().map_or(-1, AsRawFd::as_raw_fd);
                // SAFETY: as above; `old` is the region's own file, still open and `r.len` long.
                return Err(match unsafe { sys::map_shared_fixed(addr, r.len, old) } {
                    Ok(()) => RegionError::os("mmap(MAP_SHARED | MAP_FIXED)")(e),
                    Err(_) => RegionError::os(
                        "mmap(MAP_SHARED | MAP_FIXED): the region could not be mapped again",
                    )(e),
                });
            }
            r.fd = Some(fd);
        }
        Ok(())
    }
}

impl Regions {
    /// Keeps the reservation mapped after drop (owners outlived the pool); files are still closed.
    pub(crate) fn leak(&mut self) {
        self.leaked = true;
    }
}

impl Drop for Regions {
    fn drop(&mut self) {
        if self.leaked {
            return;
        }
        // SAFETY: the reservation is ours; the owner (the pool) drops us last, after every typed owner
        // and handle into the regions is gone (they hold the heap, which the pool checks).
        let _ = unsafe { sys::unmap(self.base, self.reserve_len) };
    }
}

/// A worker's view: it maps and unmaps regions at the offsets the master sends.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WorkerRegions {
    pub(crate) base: usize,
    pub(crate) reserve_len: usize,
}

impl WorkerRegions {
    fn check(&self, off: usize, len: usize) -> std::io::Result<()> {
        let ps = sys::page_size();
        match off.checked_add(len) {
            Some(end) if end <= self.reserve_len && off % ps == 0 && len % ps == 0 && len > 0 => {
                Ok(())
            }
            _ => Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    /// Maps `fd` at `base + off`.
    ///
    /// # Safety
    /// The range must be reserved in this process (the inherited reservation) with nothing live in
    /// it, and `fd` at least `len` bytes long.
    pub(crate) unsafe fn map(&self, off: usize, len: usize, fd: &OwnedFd) -> std::io::Result<()> {
        self.check(off, len)?;
        // SAFETY: bounds checked above against the reservation; the caller guarantees the rest.
        unsafe { sys::map_shared_fixed(self.base + off, len, fd.as_raw_fd()) }
    }

    /// Maps the reservation back over `base + off`.
    ///
    /// # Safety
    /// Nothing in this process may use the range afterwards.
    pub(crate) unsafe fn unmap(&self, off: usize, len: usize) -> std::io::Result<()> {
        self.check(off, len)?;
        // SAFETY: bounds checked above; the caller guarantees nothing uses the range.
        unsafe { sys::map_over_reserved(self.base + off, len) }
    }
}
