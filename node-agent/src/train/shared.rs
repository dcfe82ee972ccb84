//! Memory a worker agent shares with its program: the gradient and the
//! parameters of the flat vector, in one sealed memfd that both map. A
//! program that computes its gradient there and reads its parameters from
//! there hands the agent nothing to copy: the agent seals its pushes
//! straight from the gradient region and decrypts the servers' answers
//! straight into the parameter region, as the built-in worker does with its
//! own vectors (see [`crate::train::kv`], `share`).
//!
//! What the program can do to this memory, and why each is harmless:
//! - *write it at any time*, also while the agent encrypts from it or
//!   copies into it. The agent never decides anything from these bytes: it
//!   only moves them. The gradient goes to the cipher as it is (a program
//!   that changes it mid-push sends a gradient of its own making, which it
//!   could anyway; the servers check every value, and the record's tag is
//!   computed over the agent's private ciphertext). Answers are opened in
//!   a buffer of the agent's own and then copied here
//!   ([`crate::train::roles::link::exchange_into_shared`]):
//!   the record layer reads a record's content type and length from its
//!   plaintext, which must not be memory the program can change. The model
//!   file is pulled from the servers into private memory, not taken from
//!   here.
//! - *shrink or grow the file* (which would make the agent's accesses fault
//!   with SIGBUS): refused by the kernel, the memfd is sealed against both
//!   (and against removing the seals) before the program gets it.
//! - *punch holes* in it: those pages read as zeros, they do not fault.
//!
//! No mapping of this memory is executable on either side, and the agent's
//! key material never lives in it.
//!
//! The crate's unsafe code outside `fork` is here: mapping the file and
//! viewing the mapping as values, which no safe interface of nix offers.
#![allow(unsafe_code)]

use std::num::NonZeroUsize;
use std::os::fd::OwnedFd;
use std::ptr::NonNull;
use std::sync::Arc;

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

/// One region of the shared file, mapped into the agent.
pub struct Region {
    ptr: NonNull<f32>,
    /// Values (the mapping may be longer, to a whole page).
    floats: usize,
    /// Bytes mapped.
    mapped: usize,
}

// SAFETY: the mapping belongs to this value (unmapped on drop) and the
// agent's accesses go through `&self`/`&mut self` as for a `Vec<f32>`.
// Another process may write the same pages at any time; see `values`.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    /// The values. The program may change them while the slice lives (a
    /// race Rust's model does not describe): callers only move them (the
    /// cipher, copies, conversions) and never branch on them, so such a
    /// write changes values, never the agent's course.
    pub fn values(&self) -> &[f32] {
        // SAFETY: `ptr` maps `mapped >= 4 * floats` bytes, readable and
        // writable, page-aligned, for as long as `self` lives; the file's
        // seals keep every page of it backed (no SIGBUS). Every bit pattern
        // is an f32. Concurrent writes by the program: see above.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.floats) }
    }

    /// The values, to write (the agent's only access while it lasts; the
    /// program's writes are as in [`Region::values`]).
    pub fn values_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `values`; `&mut self` excludes the agent's other
        // accesses.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.floats) }
    }
}

impl AsRef<[f32]> for Region {
    fn as_ref(&self) -> &[f32] {
        self.values()
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `ptr` and `mapped` are this mapping's, and no slice of
        // it outlives `self`.
        if let Err(e) = unsafe { munmap(self.ptr.cast(), self.mapped) } {
            tracing::warn!("unmapping the memory shared with the program: {e}");
        }
    }
}

/// The shared file and the agent's two mappings of it.
pub struct Shared {
    /// What the program gets (a file descriptor passed over the KV socket).
    pub fd: OwnedFd,
    /// The gradient region, at offset 0 (shared with the link tasks while
    /// a step goes out).
    pub grads: Arc<Region>,
    /// The parameter region, at offset [`Shared::params_offset`].
    pub params: Region,
}

impl Shared {
    /// A sealed file of two regions of `floats` values each, zeroed, and
    /// the agent's mappings of them.
    pub fn new(floats: usize) -> std::io::Result<Shared> {
        let region = Self::region_bytes(floats)?;
        let fd = memfd_create("warden-kv", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)?;
        let total = region.checked_mul(2).ok_or_else(|| std::io::Error::other("shared memory too large"))?;
        nix::unistd::ftruncate(&fd, i64::try_from(total).map_err(std::io::Error::other)?)?;
        fcntl(&fd, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL))?;
        let map = |offset: usize| -> std::io::Result<Region> {
            let len = NonZeroUsize::new(region).ok_or_else(|| std::io::Error::other("empty shared region"))?;
            // SAFETY: a new shared mapping of the file's own pages (sized
            // and sealed above), at an address the kernel chooses.
            let ptr = unsafe {
                mmap(
                    None,
                    len,
                    ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                    MapFlags::MAP_SHARED,
                    &fd,
                    i64::try_from(offset).map_err(std::io::Error::other)?,
                )?
            };
            Ok(Region { ptr: ptr.cast(), floats, mapped: region })
        };
        let grads = map(0)?;
        let params = map(region)?;
        Ok(Shared { fd, grads: Arc::new(grads), params })
    }

    /// Where the parameter region starts in the file, in bytes.
    pub fn params_offset(&self) -> usize {
        self.grads.mapped
    }

    /// Bytes of one region: its values rounded up to whole pages (at least
    /// one), so the second region's mapping starts on a page.
    fn region_bytes(floats: usize) -> std::io::Result<usize> {
        // SAFETY: sysconf reads a constant of the system.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(1);
        floats
            .checked_mul(4)
            .and_then(|b| b.max(1).checked_next_multiple_of(page))
            .ok_or_else(|| std::io::Error::other("shared memory too large"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_regions_are_separate_zeroed_and_sealed() {
        let mut s = Shared::new(3000).unwrap();
        assert!(s.grads.values().iter().chain(s.params.values()).all(|v| *v == 0.0));
        Arc::get_mut(&mut s.grads).unwrap().values_mut()[2999] = 1.5;
        s.params.values_mut()[0] = -2.0;
        assert_eq!((s.grads.values()[2999], s.grads.values()[0]), (1.5, 0.0));
        assert_eq!((s.params.values()[0], s.params.values()[2999]), (-2.0, 0.0));
        assert_eq!(s.params_offset() % 4096, 0);
        // What the program could try: resizing fails (no SIGBUS for the
        // agent), and so does lifting the seals.
        assert_eq!(nix::unistd::ftruncate(&s.fd, 0), Err(nix::errno::Errno::EPERM));
        assert_eq!(nix::unistd::ftruncate(&s.fd, 1 << 30), Err(nix::errno::Errno::EPERM));
        assert_eq!(fcntl(&s.fd, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_WRITE)), Err(nix::errno::Errno::EPERM));
        // Another mapping of the file (the program's) sees the agent's writes.
        let total = 2 * s.params_offset();
        let len = NonZeroUsize::new(total).unwrap();
        let other = unsafe { mmap(None, len, ProtFlags::PROT_READ, MapFlags::MAP_SHARED, &s.fd, 0) }.unwrap();
        let seen = unsafe { std::slice::from_raw_parts(other.cast::<f32>().as_ptr(), total / 4) };
        assert_eq!((seen[2999], seen[s.params_offset() / 4]), (1.5, -2.0));
        unsafe { munmap(other, total) }.unwrap();
    }
}
