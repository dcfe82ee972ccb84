//! What root does to paths that a less privileged user can write.
//!
//! The agent is root until it drops to the job's uid, and part of its set-up
//! happens where job users own things: a checkpoint series left by an earlier
//! job (its files belong to that job's uid), the job directory of a process.
//! A path-based `chown` or `chmod` there would follow a symbolic link (or hit
//! a hard link) planted by that user and hand any file on the host, `/etc`
//! say, to the job. So everything here works on file descriptors:
//!
//! - the last component of a directory path is opened relative to its
//!   parent's descriptor with `O_NOFOLLOW | O_DIRECTORY`, and ownership and
//!   mode change with `fchown`/`fchmod` on what was opened, never by name;
//! - a tree is walked with `openat` from descriptor to descriptor, entries
//!   examined with `fstatat(AT_SYMLINK_NOFOLLOW)`, files opened
//!   `O_NOFOLLOW | O_NONBLOCK` and checked again with `fstat` before their
//!   owner changes;
//! - a symbolic link where a directory or file is expected, a regular file
//!   with more than one hard link (hard-linking a file one does not own is
//!   what `fs.protected_hardlinks` forbids, but a host may have it off), and
//!   any other kind of file are errors that name the path.
//!
//! The directories above the one named (the parent of a checkpoint root,
//! say) are the administrator's: they are opened as named.
//!
//! `docs/security.md` lists every place where root touches such paths.

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{Mode, SFlag, fchmod, fstat, fstatat, mkdirat};
use nix::unistd::{Gid, Uid, fchown};

/// How deep [`hand_over_tree`] walks: a checkpoint series holds step
/// directories that hold files; anything deeper was not made by warden.
pub const MAX_DEPTH: u32 = 4;

/// Why a privileged file operation was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PrivFsError {
    /// A symbolic link stands where a directory or file was expected.
    #[error(
        "{0} is a symbolic link; refusing to follow it as root (a job user may have planted it): remove it, or point the setting at the real directory"
    )]
    Link(PathBuf),
    /// A regular file has more than one hard link.
    #[error(
        "{0} has more than one hard link; refusing to change its owner as root (a job user may have linked another file there): remove it"
    )]
    HardLinked(PathBuf),
    /// Something other than a directory or regular file.
    #[error("{path} is {kind}, not something warden makes; remove it")]
    Unexpected {
        /// Where.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// A socket a running process still listens on.
    #[error(
        "{0} is the socket of a process that is still running (another agent for this job's process?); stop it first"
    )]
    Live(PathBuf),
    /// Nested deeper than [`MAX_DEPTH`].
    #[error("{0} is nested deeper than warden nests its files; remove it")]
    TooDeep(PathBuf),
    /// A system call failed.
    #[error("{what} {path}: {errno}")]
    Sys {
        /// What was attempted.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// What the system said.
        #[source]
        errno: Errno,
    },
}

fn sys<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(Errno) -> PrivFsError + 'a {
    move |errno| PrivFsError::Sys { what, path: path.to_path_buf(), errno }
}

fn sys_io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PrivFsError + 'a {
    move |e| sys(what, path)(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
}

/// Who should own what is made or handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

impl Owner {
    /// root:root.
    pub const ROOT: Owner = Owner { uid: 0, gid: 0 };

    fn ids(self) -> (Option<Uid>, Option<Gid>) {
        (Some(Uid::from_raw(self.uid)), Some(Gid::from_raw(self.gid)))
    }
}

fn kind_of(mode: u32) -> &'static str {
    match SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFDIR => "a directory",
        SFlag::S_IFREG => "a regular file",
        SFlag::S_IFLNK => "a symbolic link",
        SFlag::S_IFIFO => "a named pipe",
        SFlag::S_IFSOCK => "a socket",
        SFlag::S_IFCHR | SFlag::S_IFBLK => "a device",
        _ => "of an unknown type",
    }
}

fn is(mode: u32, kind: SFlag) -> bool {
    mode & SFlag::S_IFMT.bits() == kind.bits()
}

/// Opens directory `name` inside `parent` without following a link.
fn open_dir_at(parent: impl AsFd, name: &OsStr, path: &Path) -> Result<OwnedFd, PrivFsError> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    match openat(&parent, name, flags, Mode::empty()) {
        Ok(fd) => Ok(fd),
        // With O_DIRECTORY, Linux reports a link as "not a directory".
        Err(Errno::ELOOP | Errno::ENOTDIR) => match fstatat(&parent, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if is(st.st_mode, SFlag::S_IFLNK) => Err(PrivFsError::Link(path.to_path_buf())),
            Ok(st) => Err(PrivFsError::Unexpected { path: path.to_path_buf(), kind: kind_of(st.st_mode) }),
            Err(e) => Err(sys("examining", path)(e)),
        },
        Err(e) => Err(sys("opening", path)(e)),
    }
}

/// Makes directory `name` in `parent` with `owner` and `mode` already set
/// when it appears under its name, so that no other process (another agent
/// of the job, another job) ever sees it with the mode the umask left: it
/// is made under a temporary name, given its owner and mode, then renamed
/// into place with `RENAME_NOREPLACE`. Returns whether this call made it
/// (false: it existed, and is left as it is).
fn make_dir_at(
    parent: &OwnedFd,
    name: &OsStr,
    path: &Path,
    mode: u32,
    owner: Option<Owner>,
) -> Result<bool, PrivFsError> {
    use nix::fcntl::{RenameFlags, renameat2};
    use nix::unistd::{UnlinkatFlags, unlinkat};
    match fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(_) => return Ok(false),
        Err(Errno::ENOENT) => {}
        Err(e) => return Err(sys("examining", path)(e)),
    }
    let mut temp = std::ffi::OsString::from(".warden-new-");
    temp.push(format!("{}-{:016x}", std::process::id(), crate::secure_random::u64()));
    mkdirat(parent, temp.as_os_str(), Mode::from_bits_truncate(0o700)).map_err(sys("creating", path))?;
    let placed = open_dir_at(parent, &temp, path)
        .and_then(|dir| {
            if let Some(o) = owner {
                let (u, g) = o.ids();
                fchown(&dir, u, g).map_err(sys("changing the owner of", path))?;
            }
            fchmod(&dir, Mode::from_bits_truncate(mode)).map_err(sys("changing the mode of", path))
        })
        .and_then(|()| match renameat2(parent, temp.as_os_str(), parent, name, RenameFlags::RENAME_NOREPLACE) {
            Ok(()) => Ok(true),
            Err(Errno::EEXIST) => Ok(false),
            Err(e) => Err(sys("creating", path)(e)),
        });
    if !matches!(placed, Ok(true)) {
        let _ = unlinkat(parent, temp.as_os_str(), UnlinkatFlags::RemoveDir);
    }
    placed
}

/// Makes the missing directories of `dir`, each root's and 0711: a job's
/// uid must pass through them to its own directory, and may not list them.
/// The directories that exist are the administrator's and opened as named.
fn make_parents(dir: &Path) -> Result<(), PrivFsError> {
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.as_os_str().is_empty() && !d.exists()).collect();
    for d in missing.into_iter().rev() {
        let (Some(parent), Some(name)) = (d.parent(), d.file_name()) else { continue };
        let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
        let fd = nix::fcntl::open(parent, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(sys("opening", parent))?;
        make_dir_at(&fd, name, d, 0o711, None)?;
    }
    Ok(())
}

/// Splits `path` into its parent (opened as named, creating it and its
/// parents when missing) and its last component.
fn parent_and_name(path: &Path) -> Result<(OwnedFd, &OsStr), PrivFsError> {
    let name = path
        .file_name()
        .filter(|n| !n.is_empty() && *n != "..")
        .ok_or(PrivFsError::Unexpected { path: path.to_path_buf(), kind: "not a path that ends in a name" })?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    make_parents(parent)?;
    let fd = nix::fcntl::open(parent, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(sys("opening", parent))?;
    Ok((fd, name))
}

/// Makes directory `path` (its parents as named) if missing, opens it
/// without following a link in its last component, and gives it `owner`
/// (when given) and `mode`. Returns the open directory, so that the caller
/// can go on from the descriptor.
pub fn ensure_dir(path: &Path, mode: u32, owner: Option<Owner>) -> Result<OwnedFd, PrivFsError> {
    let (parent, name) = parent_and_name(path)?;
    let made = make_dir_at(&parent, name, path, mode, owner)?;
    let dir = open_dir_at(&parent, name, path)?;
    // One made just now already has its owner and mode.
    if !made {
        if let Some(o) = owner {
            let (u, g) = o.ids();
            fchown(&dir, u, g).map_err(sys("changing the owner of", path))?;
        }
        fchmod(&dir, Mode::from_bits_truncate(mode)).map_err(sys("changing the mode of", path))?;
    }
    Ok(dir)
}

/// Makes directory `path` (its parents as named) with `owner` and `mode`
/// if it is missing; an existing one is left as it is, but must be a
/// directory and not a link.
pub fn ensure_dir_if_missing(path: &Path, mode: u32, owner: Option<Owner>) -> Result<OwnedFd, PrivFsError> {
    let (parent, name) = parent_and_name(path)?;
    make_dir_at(&parent, name, path, mode, owner)?;
    open_dir_at(&parent, name, path)
}

/// Gives directory `path` and everything in it to `owner`: directories
/// 0700, files 0600, walked by descriptor (see the module doc). The
/// directory is made if missing. Used when a job takes over a checkpoint
/// series that an earlier job's uid owns.
pub fn hand_over_tree(path: &Path, owner: Owner) -> Result<(), PrivFsError> {
    let dir = ensure_dir(path, 0o700, Some(owner))?;
    hand_over_entries(dir, path, owner, MAX_DEPTH)
}

fn hand_over_entries(dir: OwnedFd, path: &Path, owner: Owner, depth: u32) -> Result<(), PrivFsError> {
    let (u, g) = owner.ids();
    let mut entries = Dir::from_fd(dir).map_err(sys("reading", path))?;
    let names: Vec<Vec<u8>> = entries
        .iter()
        .map(|e| e.map(|e| e.file_name().to_bytes().to_vec()))
        .collect::<Result<_, _>>()
        .map_err(sys("reading", path))?;
    for name in names.iter().filter(|n| n.as_slice() != b"." && n.as_slice() != b"..") {
        let name = OsStr::from_bytes(name);
        let child = path.join(name);
        let st = fstatat(&entries, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(sys("examining", &child))?;
        let mode = st.st_mode;
        if is(mode, SFlag::S_IFDIR) {
            if depth == 0 {
                return Err(PrivFsError::TooDeep(child));
            }
            let fd = open_dir_at(&entries, name, &child)?;
            fchown(&fd, u, g).map_err(sys("changing the owner of", &child))?;
            fchmod(&fd, Mode::from_bits_truncate(0o700)).map_err(sys("changing the mode of", &child))?;
            hand_over_entries(fd, &child, owner, depth - 1)?;
        } else if is(mode, SFlag::S_IFREG) {
            // O_NONBLOCK: should a pipe take the file's place after the
            // check above, opening it does not wait for a writer.
            let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
            let fd = match openat(&entries, name, flags, Mode::empty()) {
                Err(Errno::ELOOP) => return Err(PrivFsError::Link(child)),
                other => other.map_err(sys("opening", &child))?,
            };
            let st = fstat(&fd).map_err(sys("examining", &child))?;
            if !is(st.st_mode, SFlag::S_IFREG) {
                return Err(PrivFsError::Unexpected { path: child, kind: kind_of(st.st_mode) });
            }
            if st.st_nlink > 1 {
                return Err(PrivFsError::HardLinked(child));
            }
            fchown(&fd, u, g).map_err(sys("changing the owner of", &child))?;
            fchmod(&fd, Mode::from_bits_truncate(0o600)).map_err(sys("changing the mode of", &child))?;
        } else if is(mode, SFlag::S_IFLNK) {
            return Err(PrivFsError::Link(child));
        } else {
            return Err(PrivFsError::Unexpected { path: child, kind: kind_of(mode) });
        }
    }
    Ok(())
}

/// Binds a Unix-domain stream listener at `path`, 0600 and `owner`'s (when
/// given), so that only the owner (and root) may connect. Its directory is
/// made as [`ensure_dir`] makes parents when missing (root's, 0711), and
/// named through its descriptor (`/proc/self/fd/N/NAME`), which also lifts
/// the 108-byte limit of a socket address. Made by root in a directory of
/// root's, the socket cannot be removed or replaced by its owner. A socket
/// already at `path` is replaced if nothing listens on it any more (an
/// earlier run's), refused if something does; any other kind of file is
/// refused and left as it is.
///
/// The owner is given with `fchownat` by name: a socket has no descriptor
/// of its inode to `fchown`. That is safe where only root makes entries,
/// and where another user may, the socket belongs to that user anyway.
pub fn bind_socket(path: &Path, owner: Option<Owner>) -> Result<std::os::unix::net::UnixListener, PrivFsError> {
    use nix::unistd::{UnlinkatFlags, fchownat, unlinkat};
    use std::os::fd::AsRawFd;
    let (dir, name) = parent_and_name(path)?;
    let at = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
    match fstatat(&dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Err(Errno::ENOENT) => {}
        Ok(st) if is(st.st_mode, SFlag::S_IFSOCK) => match std::os::unix::net::UnixStream::connect(&at) {
            Ok(_) => return Err(PrivFsError::Live(path.to_path_buf())),
            Err(_) => unlinkat(&dir, name, UnlinkatFlags::NoRemoveDir).map_err(sys("removing", path))?,
        },
        Ok(st) if is(st.st_mode, SFlag::S_IFLNK) => return Err(PrivFsError::Link(path.to_path_buf())),
        Ok(st) => return Err(PrivFsError::Unexpected { path: path.to_path_buf(), kind: kind_of(st.st_mode) }),
        Err(e) => return Err(sys("examining", path)(e)),
    }
    let listener = std::os::unix::net::UnixListener::bind(&at).map_err(sys_io("binding", path))?;
    // Until these two calls the socket is root's (or ours) with the umask's
    // mode: nobody else may connect in between.
    nix::sys::stat::fchmodat(&dir, name, Mode::from_bits_truncate(0o600), nix::sys::stat::FchmodatFlags::FollowSymlink)
        .map_err(sys("changing the mode of", path))?;
    if let Some(o) = owner {
        let (u, g) = o.ids();
        fchownat(&dir, name, u, g, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(sys("changing the owner of", path))?;
    }
    listener.set_nonblocking(true).map_err(sys_io("configuring", path))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    fn scratch() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    /// Agents of one job, and jobs on one host, make the same parents at
    /// once; a directory visible under its name before its mode is set
    /// shuts the job's uid out of it for that moment. Watched with inotify:
    /// every directory appears by a rename, complete, never by a mkdir
    /// under its own name.
    #[test]
    fn directories_appear_under_their_name_only_with_their_mode_set() {
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        let tmp = scratch();
        let watch = Inotify::init(InitFlags::IN_NONBLOCK).unwrap();
        watch.add_watch(tmp.path(), AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO).unwrap();
        let made = ensure_dir(&tmp.path().join("jobs/one/worker-0"), 0o700, None).unwrap();
        drop(made);
        ensure_dir_if_missing(&tmp.path().join("root"), 0o711, None).unwrap();
        let events = watch.read_events().unwrap();
        let names: Vec<(String, bool)> = events
            .iter()
            .filter_map(|e| {
                Some((e.name.as_ref()?.to_string_lossy().into_owned(), e.mask.contains(AddWatchFlags::IN_MOVED_TO)))
            })
            .filter(|(n, _)| !n.starts_with(".warden-new-"))
            .collect();
        assert_eq!(names, [("jobs".to_string(), true), ("root".to_string(), true)]);
        assert_eq!(std::fs::metadata(tmp.path().join("jobs")).unwrap().mode() & 0o777, 0o711);
        assert_eq!(std::fs::metadata(tmp.path().join("jobs/one")).unwrap().mode() & 0o777, 0o711);
        assert_eq!(std::fs::metadata(tmp.path().join("root")).unwrap().mode() & 0o777, 0o711);
        let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 2, "no temporary directory is left behind: {left:?}");
    }

    #[test]
    fn a_link_in_place_of_the_directory_is_refused_and_its_target_untouched() {
        let tmp = scratch();
        let target = tmp.path().join("target");
        std::fs::create_dir(&target).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
        let link = tmp.path().join("series");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = ensure_dir(&link, 0o700, None).unwrap_err();
        assert!(matches!(err, PrivFsError::Link(_)), "{err}");
        assert_eq!(std::fs::metadata(&target).unwrap().permissions().mode() & 0o777, 0o755);
        let err = hand_over_tree(&link, Owner { uid: nix::unistd::getuid().as_raw(), gid: 0 }).unwrap_err();
        assert!(matches!(err, PrivFsError::Link(_)), "{err}");
        assert_eq!(std::fs::metadata(&target).unwrap().permissions().mode() & 0o777, 0o755);
    }

    #[test]
    fn links_and_hard_links_inside_a_tree_are_refused() {
        let me = Owner { uid: nix::unistd::getuid().as_raw(), gid: nix::unistd::getgid().as_raw() };
        let tmp = scratch();
        let outside = tmp.path().join("outside");
        std::fs::write(&outside, b"secret").unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o644)).unwrap();

        let series = tmp.path().join("a");
        std::fs::create_dir_all(series.join("step-1")).unwrap();
        std::fs::write(series.join("step-1/shard-0.wck"), b"x").unwrap();
        std::os::unix::fs::symlink(&outside, series.join("step-1/manifest")).unwrap();
        let err = hand_over_tree(&series, me).unwrap_err();
        assert!(matches!(&err, PrivFsError::Link(p) if p.ends_with("step-1/manifest")), "{err}");

        let series = tmp.path().join("b");
        std::fs::create_dir_all(series.join("step-1")).unwrap();
        std::fs::hard_link(&outside, series.join("step-1/shard-0.wck")).unwrap();
        let err = hand_over_tree(&series, me).unwrap_err();
        assert!(matches!(err, PrivFsError::HardLinked(_)), "{err}");
        assert_eq!(std::fs::metadata(&outside).unwrap().permissions().mode() & 0o777, 0o644);
    }

    #[test]
    fn a_tree_is_handed_over_private() {
        let me = Owner { uid: nix::unistd::getuid().as_raw(), gid: nix::unistd::getgid().as_raw() };
        let tmp = scratch();
        let series = tmp.path().join("s");
        std::fs::create_dir_all(series.join("step-2")).unwrap();
        std::fs::write(series.join("step-2/shard-0.wck"), b"x").unwrap();
        std::fs::set_permissions(series.join("step-2/shard-0.wck"), std::fs::Permissions::from_mode(0o644)).unwrap();
        hand_over_tree(&series, me).unwrap();
        let md = std::fs::metadata(series.join("step-2/shard-0.wck")).unwrap();
        assert_eq!((md.mode() & 0o777, md.uid()), (0o600, me.uid));
        assert_eq!(std::fs::metadata(series.join("step-2")).unwrap().mode() & 0o777, 0o700);
        // A path of nothing but a name, and one ending in `..`.
        assert!(ensure_dir(Path::new("/"), 0o700, None).is_err());
        assert!(ensure_dir(&tmp.path().join(".."), 0o700, None).is_err());
    }
}
