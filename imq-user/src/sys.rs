//! Small system facts and syscalls: privileges, kernel features, network namespace
//! identity, bpffs detection and mounting, locks.

use std::{
    ffi::CString,
    fs::{self, File},
    io,
    os::{
        fd::{AsFd as _, AsRawFd, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

use crate::error::{Error, Result};

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// `BPF_FS_MAGIC` from include/uapi/linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// `SO_NETNS_COOKIE` (asm-generic/socket.h), Linux 5.14.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// imq needs to create devices and attach programs (CAP_NET_ADMIN) and to load BPF
/// (CAP_BPF, or CAP_SYS_ADMIN which implies it).
pub fn check_privileges() -> Result<()> {
    let status = fs::read_to_string("/proc/self/status").map_err(|e| Error::io("/proc/self/status", e))?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| eff & (1 << cap) != 0;
    if !(has(CAP_NET_ADMIN) && (has(CAP_BPF) || has(CAP_SYS_ADMIN))) {
        return Err(Error::NotPrivileged);
    }
    // The kernel checks CAP_BPF against the initial user namespace: capabilities held
    // in another one (all of them, as its root) load nothing.
    if !in_initial_user_namespace() {
        return Err(Error::InUserNamespace);
    }
    Ok(())
}

/// Whether this process is in the initial user namespace, whose uid map alone maps
/// every uid to itself ("0 0 4294967295").
fn in_initial_user_namespace() -> bool {
    fs::read_to_string("/proc/self/uid_map").is_ok_and(|map| {
        let lines: Vec<Vec<&str>> = map.lines().map(|l| l.split_whitespace().collect()).collect();
        lines.len() == 1 && lines[0] == ["0", "0", "4294967295"]
    })
}

/// How imq tells network namespaces apart: its state directory and the device hooks
/// are keyed by this.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetnsId {
    /// SO_NETNS_COOKIE (Linux 5.14): unique for the life of the system, never reused.
    Cookie(u64),
    /// The namespace's nsfs inode number, where there is no cookie to read: unique
    /// among living namespaces, but reused once one is gone.
    Inode(u64),
}

impl NetnsId {
    /// The state directory of the namespace under `<bpffs>/imq/`.
    pub fn dir_name(self) -> String {
        match self {
            Self::Cookie(c) => format!("net-{c}"),
            Self::Inode(i) => format!("net-inode-{i}"),
        }
    }

    pub fn value(self) -> u64 {
        match self {
            Self::Cookie(v) | Self::Inode(v) => v,
        }
    }
}

/// The calling thread's network namespace: its cookie, or on kernels that cannot
/// report one (before 5.14), its inode number.
pub fn netns_id() -> Result<NetnsId> {
    // SAFETY: plain socket call; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(Error::io("socket", io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor we own.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie and len are valid for writing 8 bytes.
    let ret = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if ret == 0 {
        return Ok(NetnsId::Cookie(cookie));
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::ENOPROTOOPT) {
        return Err(Error::io("getsockopt(SO_NETNS_COOKIE)", err));
    }
    use std::os::unix::fs::MetadataExt as _;
    // thread-self: setns changes the namespace of one thread.
    let ns = fs::metadata("/proc/thread-self/ns/net").map_err(|e| Error::io("/proc/thread-self/ns/net", e))?;
    Ok(NetnsId::Inode(ns.ino()))
}

/// Whether the kernel has TCX (BPF links on the TC hooks, Linux 6.6), asked of the
/// kernel itself: a BPF_PROG_QUERY of the TCX ingress hook of `lo` (ifindex 1 in every
/// namespace) succeeds where TCX exists and fails with EINVAL where the attach type is
/// unknown. It only reads.
pub fn has_tcx() -> bool {
    const BPF_PROG_QUERY: libc::c_long = 16;
    const BPF_TCX_INGRESS: u64 = 46;
    const LOOPBACK_IFINDEX: u64 = 1;
    // union bpf_attr, BPF_PROG_QUERY: target_ifindex, attach_type, query_flags,
    // attach_flags (u32 each), prog_ids (pointer; none), prog_cnt (u32; 0).
    let mut attr = [0u64; 16];
    attr[0] = LOOPBACK_IFINDEX | (BPF_TCX_INGRESS << 32);
    bpf(BPF_PROG_QUERY, &mut attr).is_ok()
}

pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs is plain data.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and statfs pointer.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

fn mount_bpffs_here(path: &Path) -> io::Result<()> {
    let target = CString::new(path.as_os_str().as_bytes())?;
    if mount_bpffs(&target) {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Mounts a bpffs at `target` as systemd does: only root may enter it (mode 0700),
/// and nothing in it is a device, setuid or executable. (A bpffs mounted with the
/// default 1777 would let any user create imq's directory or hold its lock.) Only
/// raw syscalls: a forked child calls it.
fn mount_bpffs(target: &std::ffi::CStr) -> bool {
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: valid C strings; the data argument is a C string of mount options.
    unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            flags,
            c"mode=0700".as_ptr().cast(),
        ) == 0
    }
}

/// Refuses a directory of imq's state that someone other than root could have made
/// or could change: imqctl trusts what it finds there (the lock, the pinned maps).
pub fn check_trusted_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let m = fs::symlink_metadata(dir).map_err(|e| Error::io(format!("stat {}", dir.display()), e))?;
    let why = if !m.is_dir() {
        Some("is not a directory".to_owned())
    } else if m.uid() != 0 {
        Some(format!("is owned by uid {}, not root", m.uid()))
    } else if m.mode() & 0o022 != 0 {
        Some(format!("is writable by other users (mode {:o})", m.mode() & 0o7777))
    } else {
        None
    };
    match why {
        Some(why) => Err(Error::UntrustedState(dir.to_owned(), why)),
        None => Ok(()),
    }
}

fn mount_ns(pid: &str) -> Option<PathBuf> {
    fs::read_link(format!("/proc/{pid}/ns/mnt")).ok()
}

fn parent_pid(pid: &str) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses; the fields after its last ')'
    // are "state ppid ...".
    let rest = &stat[stat.rfind(')')? + 1..];
    let ppid = rest.split_whitespace().nth(1)?;
    (ppid != "0").then(|| ppid.to_owned())
}

/// The outermost ancestor whose mount namespace differs from ours and that we can
/// reach, if any. `ip netns exec` runs its command in a fresh mount namespace with a new
/// /sys, where /sys/fs/bpf is no longer the host's bpffs; a bpffs mounted there would
/// die (and unpin everything) with that namespace when the command exits.
fn outer_mount_ns_pid() -> Option<String> {
    let ours = mount_ns("self")?;
    let mut found = None;
    let mut pid = parent_pid("self");
    while let Some(p) = pid {
        match mount_ns(&p) {
            Some(ns) if ns != ours => found = Some(p.clone()),
            Some(_) => {}
            None => break,
        }
        pid = parent_pid(&p);
    }
    found
}

/// Mounts a bpffs at `/sys/fs/bpf` inside the mount namespace of `pid`, from a forked
/// child (setns(CLONE_NEWNS) needs a single-threaded caller).
fn mount_bpffs_in(pid: &str) -> io::Result<()> {
    let ns = File::open(format!("/proc/{pid}/ns/mnt"))?;
    let root = CString::new("/")?;
    let target = CString::new("/sys/fs/bpf")?;
    // SAFETY: the child only makes raw syscalls and _exits.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => unsafe {
            let ok = libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNS) == 0
                && libc::chdir(root.as_ptr()) == 0
                && mount_bpffs(&target);
            libc::_exit(if ok { 0 } else { 1 })
        },
        child => {
            let mut status = 0;
            // SAFETY: waiting for our own child.
            if unsafe { libc::waitpid(child, &mut status, 0) } < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
                Ok(())
            } else {
                Err(io::Error::other("mounting bpffs in the outer mount namespace failed"))
            }
        }
    }
}

/// The bpffs that holds imq's state, mounted if there is none. The same for every
/// imqctl on the host, whether started directly or by `ip netns exec`.
pub fn find_bpffs(configured: Option<&Path>) -> Result<PathBuf> {
    if let Some(dir) = configured {
        if !is_bpffs(dir) {
            return Err(Error::NotBpffs(dir.to_owned()));
        }
        return Ok(dir.to_owned());
    }
    let sys = Path::new("/sys/fs/bpf");
    if let Some(pid) = outer_mount_ns_pid() {
        let outer = PathBuf::from(format!("/proc/{pid}/root/sys/fs/bpf"));
        if !is_bpffs(&outer) {
            mount_bpffs_in(&pid).map_err(|e| Error::io("mounting bpffs on /sys/fs/bpf", e))?;
        }
        return if is_bpffs(&outer) {
            Ok(outer)
        } else {
            Err(Error::NotBpffs(outer))
        };
    }
    if !is_bpffs(sys) {
        mount_bpffs_here(sys).map_err(|e| Error::io("mounting bpffs on /sys/fs/bpf", e))?;
    }
    Ok(sys.to_owned())
}

/// An exclusive `flock` held until drop: serializes concurrent imqctl invocations.
pub struct Lock {
    /// Held only to keep the flock: it is released when the file is closed.
    _file: File,
}

impl Lock {
    pub fn exclusive(dir: &Path) -> Result<Self> {
        let f = File::open(dir).map_err(|e| Error::io(format!("open {}", dir.display()), e))?;
        // SAFETY: valid fd.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(Error::io(format!("lock {}", dir.display()), io::Error::last_os_error()));
        }
        Ok(Self { _file: f })
    }
}

/// Returns once no BPF program that was running when it was called still runs: an
/// RCU grace period. After it, no packet can be using a generation the data path no
/// longer points to, and its entries can go.
///
/// Userspace cannot ask for a grace period directly, but an update of a map-of-maps
/// makes the kernel wait for one before returning, so that the caller knows programs
/// see the new inner map (maybe_wait_bpf_programs in kernel/bpf/syscall.c). We create
/// a one-slot ARRAY_OF_MAPS, store `inner` in it, and drop it.
pub fn wait_for_bpf_programs(inner: BorrowedFd<'_>) -> Result<()> {
    const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;
    // union bpf_attr, BPF_MAP_CREATE: map_type, key_size, value_size, max_entries,
    // map_flags, inner_map_fd (u32 each).
    let mut attr = [0u64; 16];
    attr[0] = u64::from(BPF_MAP_TYPE_ARRAY_OF_MAPS) | (4u64 << 32);
    attr[1] = 4 | (1u64 << 32);
    attr[2] = u64::from(inner.as_raw_fd() as u32) << 32;
    let outer = bpf_new_fd(BPF_MAP_CREATE, &mut attr).map_err(|e| Error::io("create map-of-maps", e))?;
    map_set_fd(outer.as_fd(), 0, inner).map_err(|e| Error::io("update map-of-maps", e))
}

/// A new BPF ring buffer of `bytes` (a power of two, in whole pages), named `name`
/// (at most 15 bytes; what `bpftool map` shows).
pub fn create_ringbuf(bytes: u32, name: &str) -> io::Result<OwnedFd> {
    const BPF_MAP_TYPE_RINGBUF: u32 = 27;
    // BPF_MAP_CREATE: map_type, key_size, value_size (0 for a ring), max_entries,
    // map_flags, inner_map_fd, numa_node (u32 each), map_name (16 bytes, NUL-ended).
    let mut attr = [0u64; 16];
    attr[0] = u64::from(BPF_MAP_TYPE_RINGBUF);
    attr[1] = u64::from(bytes) << 32;
    let name = &name.as_bytes()[..name.len().min(15)];
    for (i, &b) in name.iter().enumerate() {
        let at = 28 + i;
        attr[at / 8] |= u64::from(b) << (8 * (at % 8));
    }
    bpf_new_fd(BPF_MAP_CREATE, &mut attr)
}

/// Stores the map `value` at `key` of the map-of-maps `outer`.
pub fn map_set_fd(outer: BorrowedFd<'_>, key: u32, value: BorrowedFd<'_>) -> io::Result<()> {
    let value = value.as_raw_fd() as u32;
    // BPF_MAP_UPDATE_ELEM: map_fd (u32, padded), key, value (pointers), flags.
    let mut attr = [0u64; 16];
    attr[0] = outer.as_raw_fd() as u64;
    attr[1] = &raw const key as u64;
    attr[2] = &raw const value as u64;
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

/// Deletes `key` of a map-of-maps (the inner map goes when nothing else holds it).
/// A key already empty is not an error.
pub fn map_delete(map: BorrowedFd<'_>, key: u32) -> io::Result<()> {
    // BPF_MAP_DELETE_ELEM: map_fd (u32, padded), key (pointer).
    let mut attr = [0u64; 16];
    attr[0] = map.as_raw_fd() as u64;
    attr[1] = &raw const key as u64;
    match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r.map(drop),
    }
}

/// Opens the BPF object pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // BPF_OBJ_GET: pathname (pointer), bpf_fd, file_flags.
    let mut attr = [0u64; 16];
    attr[0] = path.as_ptr() as u64;
    bpf_new_fd(BPF_OBJ_GET, &mut attr)
}

/// Points the BPF link `link` at program `prog`, atomically: each run of the hook
/// runs the old program or the new one.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    // BPF_LINK_UPDATE: link_fd, new_prog_fd, flags, old_prog_fd (u32 each).
    let mut attr = [0u64; 16];
    attr[0] = u64::from(link.as_raw_fd() as u32) | (u64::from(prog.as_raw_fd() as u32) << 32);
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;

/// The bpf syscall with a zeroed `union bpf_attr` the caller filled in.
fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<libc::c_long> {
    // SAFETY: attr is a union bpf_attr large enough for every command used here, and
    // the pointers in it point to live locals of the caller.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size_of::<[u64; 16]>()) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// As [`bpf`], for a command that returns a new file descriptor.
fn bpf_new_fd(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<OwnedFd> {
    let fd = bpf(cmd, attr)?;
    // SAFETY: the syscall returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
