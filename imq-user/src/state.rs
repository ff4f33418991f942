//! imq's kernel state, pinned in bpffs so the data path outlives imqctl:
//!
//! ```text
//! <bpffs>/imq/                      lock for every imqctl on the host
//! <bpffs>/imq/net-<cookie>/         one network namespace (SO_NETNS_COOKIE;
//!                                   net-inode-<n> on kernels without it)
//!     layout-4                              the layout of what is below
//!     imq_rules imq_active imq_hooks imq_entries imq_devices imq_ifindexes
//!     imq_counters imq_monitor imq_monitor_state imq_events imq_gone
//!                                           maps (see imq-common)
//!     device_setups                         [[device]] qdisc setups (on first use)
//!     prog_ingress prog_ingress_cls prog_egress
//!                                           the TC programs (each once used)
//!     link_ingress_<ifindex>                TCX link of one interface
//!     link_netdev_event                     the device hook, where tracing works
//!     programs-<hash>                       the build whose programs these are
//! ```

use std::{
    collections::HashSet,
    fs, io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuHashMap, PerCpuValues},
    programs::{
        FEntry, LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::TcAttachOptions,
    },
};
use imq_common::{
    ACTIVE_MAP, COUNTERS_MAP, Counters, DEVICE_DOWN, DEVICE_QUEUES_SHIFT, DEVICES_MAP, Device, EGRESS_PROG,
    ENTRIES_MAP, EVENTS_MAP, EntryKey, GONE_MAP, HOOKS_MAP, Hook, HookKey, IFINDEXES_MAP, INGRESS_CLS_PROG,
    INGRESS_PROG, MONITOR_MAP, MONITOR_STATE_MAP, MonitorConfig, NETDEV_EVENT_PROG, RULES_MAP, RuleKey, RuleSpec,
    Target,
};

use crate::{
    compile::Compiled,
    error::{Error, Result},
    rule::{Direction, Rule},
    sys,
};

pub(crate) struct State {
    dir: PathBuf,
    ebpf: Ebpf,
    _lock: sys::Lock,
}

/// The TC programs, each loaded and pinned on first use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Prog {
    /// Ingress through a TCX link, redirecting by itself.
    IngressTcx,
    /// Ingress as a classic cls_bpf filter with mirred (kernels without TCX).
    IngressClassic,
    /// Egress as a classic cls_bpf filter with mirred.
    Egress,
}

impl Prog {
    /// The program of a classic filter on `direction`.
    pub fn classic(direction: Direction) -> Self {
        match direction {
            Direction::Ingress => Self::IngressClassic,
            Direction::Egress => Self::Egress,
        }
    }

    /// (name in the object, pin name)
    fn names(self) -> (&'static str, &'static str) {
        match self {
            Self::IngressTcx => (INGRESS_PROG, "prog_ingress"),
            Self::IngressClassic => (INGRESS_CLS_PROG, "prog_ingress_cls"),
            Self::Egress => (EGRESS_PROG, "prog_egress"),
        }
    }
}

const LINK_NETDEV_EVENT: &str = "link_netdev_event";
/// A directory that names the layout of the pinned maps (bpffs holds no regular files).
const LAYOUT: &str = "layout-4";
/// A directory `programs-<hash of the eBPF object>` names the build whose programs
/// run here: a newer imqctl replaces them in place ([`State::replace_programs`]).
const PROGRAMS_PREFIX: &str = "programs-";

fn programs_marker() -> String {
    // FNV-1a: a fingerprint of the object, not a defence against anyone.
    let hash = crate::EBPF_OBJECT.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{PROGRAMS_PREFIX}{hash:016x}")
}

/// Refuses pinned maps that are not what this object declares (type, key and value
/// size, entries): aya reuses a pinned map as it finds it, and imq would write its
/// records into whatever was pinned there, by someone else or by another layout.
fn check_pinned_maps(pins: &[(&str, PathBuf)]) -> Result<()> {
    let object = aya_obj::Object::parse(crate::EBPF_OBJECT).map_err(|e| Error::bpf("parse imq object", e))?;
    for (name, path) in pins {
        if !path.exists() {
            continue;
        }
        let declared = object
            .maps
            .get(*name)
            .ok_or_else(|| Error::Bpf(format!("map {name} missing from the object")))?;
        let want = (
            declared.map_type(),
            declared.key_size(),
            declared.value_size(),
            declared.max_entries(),
        );
        let untrusted = |reason: String| Error::UntrustedState(path.clone(), reason);
        let info = aya::maps::MapInfo::from_pin(path).map_err(|e| untrusted(format!("is not a BPF map ({e})")))?;
        let found = (
            info.map_type().map_or(u32::MAX, |t| t as u32),
            info.key_size(),
            info.value_size(),
            info.max_entries(),
        );
        if found != want {
            return Err(untrusted(format!(
                "is a map of type {}, key {} B, value {} B, {} entries; imq's {name} is type {}, key {} B, value {} B, {} entries",
                found.0, found.1, found.2, found.3, want.0, want.1, want.2, want.3
            )));
        }
    }
    Ok(())
}

/// What went wrong while opening state that the command can still do its work
/// despite; taken by [`crate::Imq::take_warnings`].
pub(crate) static LOAD_WARNINGS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Whether programs were loaded into this state (they are, on first use).
fn has_programs(dir: &Path) -> bool {
    [Prog::IngressTcx, Prog::IngressClassic, Prog::Egress]
        .iter()
        .any(|p| dir.join(p.names().1).exists())
        || dir.join(LINK_NETDEV_EVENT).exists()
}

/// A directory whose presence says the device hooks could not be loaded here.
const NO_DEVICE_HOOKS: &str = "no_device_hooks";

/// What the device hook needs to know; see imq-ebpf's imq_netdev_event.
struct HookConstants {
    netns_id: u64,
    net_id_mask: u64,
    net_id: u32,
    dev_ifindex: u32,
    dev_net: u32,
    info_dev: u32,
    up: u64,
    going_down: u64,
    down: u64,
    unregister: u64,
}

impl HookConstants {
    fn read() -> Option<Self> {
        let btf = crate::btf::Btf::from_sys_fs()?;
        let event = |name| btf.enum_value("netdev_cmd", name).map(|v| v as u64);
        let (netns_id, net_id, net_id_mask) = match sys::netns_id().ok()? {
            sys::NetnsId::Cookie(c) => (c, btf.offset_of("net", &["net_cookie"])?, u64::MAX),
            sys::NetnsId::Inode(i) => (i, btf.offset_of("net", &["ns", "inum"])?, u64::from(u32::MAX)),
        };
        Some(Self {
            netns_id,
            net_id_mask,
            net_id,
            dev_ifindex: btf.offset_of("net_device", &["ifindex"])?,
            dev_net: btf.offset_of("net_device", &["nd_net", "net"])?,
            info_dev: btf.offset_of("netdev_notifier_info", &["dev"])?,
            up: event("NETDEV_UP")?,
            going_down: event("NETDEV_GOING_DOWN")?,
            down: event("NETDEV_DOWN")?,
            unregister: event("NETDEV_UNREGISTER")?,
        })
    }
}
const LINK_PREFIX: &str = "link_";
/// The `[[device]]` qdisc setups imq applied, per imq device number: a map of its
/// own (not in the eBPF object: no program reads it), created on first use.
const DEVICE_SETUPS: &str = "device_setups";
/// One setup: the ifindex it was applied to, its txqueuelen, the length of its
/// text, the `qdisc` lines joined by newlines.
const SETUP_BYTES: usize = 32 * 1024;
type SetupRecord = [u8; SETUP_BYTES];

/// A `[[device]]` setup as imq applied it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSetup {
    pub ifindex: u32,
    pub txqueuelen: u32,
    /// TX queues the device was created with.
    pub queues: u32,
    pub qdisc: Vec<String>,
}

impl DeviceSetup {
    fn encode(&self) -> Result<Box<SetupRecord>> {
        let text = self.qdisc.join("\n");
        if text.len() > SETUP_BYTES - 12 {
            return Err(Error::Config(format!(
                "the qdisc setup is {} bytes, at most {}",
                text.len(),
                SETUP_BYTES - 12
            )));
        }
        let mut r = Box::new([0u8; SETUP_BYTES]);
        r[0..4].copy_from_slice(&self.ifindex.to_ne_bytes());
        r[4..8].copy_from_slice(&self.txqueuelen.to_ne_bytes());
        // The text's length, below 2^16, and the queues above (0 in records from
        // before multi-queue devices: one).
        let len_queues = text.len() as u32 | (self.queues.min(0xffff) << 16);
        r[8..12].copy_from_slice(&len_queues.to_ne_bytes());
        r[12..12 + text.len()].copy_from_slice(text.as_bytes());
        Ok(r)
    }

    fn decode(r: &SetupRecord) -> Self {
        let word = |i: usize| u32::from_ne_bytes(r[i..i + 4].try_into().unwrap_or_default());
        let len = ((word(8) & 0xffff) as usize).min(SETUP_BYTES - 12);
        let text = String::from_utf8_lossy(&r[12..12 + len]);
        Self {
            ifindex: word(0),
            txqueuelen: word(4),
            queues: (word(8) >> 16).max(1),
            qdisc: text.lines().filter(|l| !l.is_empty()).map(str::to_owned).collect(),
        }
    }
}

fn link_pin_name(direction: Direction, ifindex: u32) -> String {
    format!("{LINK_PREFIX}{direction}_{ifindex}")
}

/// A delete of a key that is not there: aya reports it as the syscall's ENOENT.
fn is_not_found(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// Runs a map update, again after a short pause while the kernel answers ENOMEM, for
/// up to about 100 ms. imq's hash maps are not preallocated: each element comes from a
/// cache the kernel refills in the background (bpf_mem_alloc; a per-CPU value from
/// percpu pages that only a worker populates), so thousands of updates in a row can
/// find it empty for a moment. Seen: "create counters" failing in an apply of 33,000
/// rules, in about one run in four right after a build (errno not recorded then).
/// A map that is really out of memory still fails, with the errno in the message.
fn update_retrying(what: &str, mut update: impl FnMut() -> std::result::Result<(), aya::maps::MapError>) -> Result<()> {
    let mut tries = 0;
    loop {
        match update() {
            Ok(()) => return Ok(()),
            Err(aya::maps::MapError::SyscallError(s))
                if s.io_error.raw_os_error() == Some(libc::ENOMEM) && tries < 100 =>
            {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Err(aya::maps::MapError::SyscallError(s)) => {
                return Err(Error::Bpf(format!("{what}: {}: {}", s.call, s.io_error)));
            }
            Err(e) => return Err(Error::bpf(what, e)),
        }
    }
}

/// A program the kernel refused, in one line: the errno and the verifier's last word
/// (its whole log is many lines), and what imq needs.
fn load_error(name: &str, e: aya::programs::ProgramError) -> Error {
    match e {
        aya::programs::ProgramError::LoadError { io_error, verifier_log } => {
            let log = verifier_log.to_string();
            let last = log
                .lines()
                .map(str::trim)
                .rfind(|l| !l.is_empty() && !l.starts_with("processed ") && !l.starts_with("verification time"))
                .unwrap_or("no verifier output");
            Error::Bpf(format!(
                "this kernel refused {name} ({io_error}; verifier: {last}): imq needs Linux 5.10 or later with BPF and BTF"
            ))
        }
        e => Error::bpf(&format!("load {name}"), e),
    }
}

/// How many CPUs a per-CPU map value has a slot for.
pub(crate) fn possible_cpus() -> Result<usize> {
    aya::util::nr_cpus().map_err(|(what, e)| Error::io(what, e))
}

/// A per-CPU map value of defaults (zeroes) for `cpus` CPUs.
pub(crate) fn zeroed_per_cpu<T: aya::Pod + Default + Clone>(cpus: usize) -> Result<PerCpuValues<T>> {
    PerCpuValues::try_from(vec![T::default(); cpus]).map_err(|e| Error::io("per-CPU values", e))
}

/// Removes the state of every namespace whose device hook saw it torn down
/// ([`GONE_MAP`]): its pins held its maps, programs and links (the device hook among
/// them, which otherwise runs on every device event of the host) for good. The caller
/// holds the host-wide lock. Best effort and silent: a directory that cannot be read
/// or removed now is tried again by the next command. State without the device hook
/// (made before it existed, or where tracing programs are refused) is never judged
/// gone: `imqctl flush` in the namespace, or `rm -r` once it is gone, removes it.
pub(crate) fn reclaim_gone(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        if !entry.file_name().to_string_lossy().starts_with("net-") || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let gone = MapData::from_pin(dir.join(GONE_MAP))
            .ok()
            .and_then(|m| Array::<_, u32>::try_from(aya::maps::Map::Array(m)).ok())
            .and_then(|a| a.get(&0, 0).ok())
            == Some(1);
        // Unpinning is all it takes: the namespace's devices, filters and TCX links
        // went with it, and what the pins held is freed with its last reference.
        if gone {
            let _ = fs::remove_dir_all(&dir);
        }
    }
}

/// Creates `dir` for root alone (mode 0700), if missing.
fn ensure_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::io(format!("create {}", dir.display()), e)),
    }
}

/// The lock every imqctl on the host takes, and this namespace's state directory;
/// nothing opened or created yet. Checks that must not race with another imqctl
/// (does the imq device exist?) go between taking it and opening the state.
pub(crate) struct Locked {
    dir: PathBuf,
    lock: sys::Lock,
}

impl Locked {
    /// Opens the state of this namespace; `None` if imq has none here yet.
    pub fn open(self) -> Result<Option<State>> {
        if !self.dir.join(RULES_MAP).exists() {
            return Ok(None);
        }
        self.check_layout()?;
        State::load(self.dir, self.lock).map(Some)
    }

    /// Opens the state of this namespace, creating it if needed.
    pub fn open_or_create(self) -> Result<State> {
        let created = !self.dir.exists();
        ensure_dir(&self.dir)?;
        if self.dir.join(RULES_MAP).exists() {
            self.check_layout()?;
        } else {
            ensure_dir(&self.dir.join(LAYOUT))?;
        }
        let dir = self.dir.clone();
        State::load(self.dir, self.lock).inspect_err(|_| {
            // Nothing half-made stays behind a command that failed.
            if created {
                let _ = fs::remove_dir_all(&dir);
            }
        })
    }

    /// Pinned maps are reused as they are: ones of another layout would be misread.
    fn check_layout(&self) -> Result<()> {
        if self.dir.join(LAYOUT).is_dir() {
            Ok(())
        } else {
            Err(Error::OldLayout(self.dir.clone()))
        }
    }
}

impl State {
    /// Takes the host-wide imq lock (held until the state is dropped).
    pub fn lock(bpffs: Option<&Path>) -> Result<Locked> {
        let root = sys::find_bpffs(bpffs)?.join("imq");
        ensure_dir(&root)?;
        sys::check_trusted_dir(&root)?;
        let lock = sys::Lock::exclusive(&root)?;
        reclaim_gone(&root);
        Ok(Locked {
            dir: root.join(sys::netns_id()?.dir_name()),
            lock,
        })
    }

    /// Shorthand: lock, then open.
    pub fn open(bpffs: Option<&Path>) -> Result<Option<Self>> {
        Self::lock(bpffs)?.open()
    }

    fn load(dir: PathBuf, lock: sys::Lock) -> Result<Self> {
        let pins: Vec<(&str, PathBuf)> = [
            RULES_MAP,
            ACTIVE_MAP,
            HOOKS_MAP,
            ENTRIES_MAP,
            DEVICES_MAP,
            IFINDEXES_MAP,
            COUNTERS_MAP,
            MONITOR_MAP,
            MONITOR_STATE_MAP,
            EVENTS_MAP,
            GONE_MAP,
        ]
        .into_iter()
        .map(|m| (m, dir.join(m)))
        .collect();
        check_pinned_maps(&pins)?;
        let mut loader = EbpfLoader::new();
        // Pinned maps are reused as they are; missing ones are created and pinned.
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        // The device hooks are loaded once per namespace, with its cookie and the
        // running kernel's struct offsets as constants.
        // Programs of another imq build are replaced by this one's (same maps: the
        // layout says they are read alike).
        let stale = has_programs(&dir) && !dir.join(programs_marker()).is_dir();
        let hook_pinned = dir.join(LINK_NETDEV_EVENT).exists();
        let hooks = if (hook_pinned && !stale) || dir.join(NO_DEVICE_HOOKS).exists() {
            None
        } else {
            HookConstants::read()
        };
        if let Some(c) = &hooks {
            loader
                .override_global("NETNS_ID", &c.netns_id, true)
                .override_global("NET_ID_MASK", &c.net_id_mask, true)
                .override_global("OFFSET_NET_ID", &c.net_id, true)
                .override_global("OFFSET_DEV_IFINDEX", &c.dev_ifindex, true)
                .override_global("OFFSET_DEV_NET", &c.dev_net, true)
                .override_global("OFFSET_INFO_DEV", &c.info_dev, true)
                .override_global("NETDEV_UP", &c.up, true)
                .override_global("NETDEV_GOING_DOWN", &c.going_down, true)
                .override_global("NETDEV_DOWN", &c.down, true)
                .override_global("NETDEV_UNREGISTER", &c.unregister, true);
        }
        let ebpf = loader
            .load(crate::EBPF_OBJECT)
            .map_err(|e| Error::bpf("load imq object", e))?;
        let mut state = Self { dir, ebpf, _lock: lock };
        state.clear_dead_monitor();
        if stale {
            match state.replace_programs(hook_pinned && hooks.is_some()) {
                Ok(()) => ensure_dir(&state.dir.join(programs_marker()))?,
                // The old programs read the same maps: they go on working, and the
                // next command tries again.
                Err(e) => LOAD_WARNINGS.lock().unwrap_or_else(|p| p.into_inner()).push(format!(
                    "the programs of an older imq build still run here; replacing them failed: {e}"
                )),
            }
        } else {
            ensure_dir(&state.dir.join(programs_marker()))?;
        }
        if hooks.is_some() && !hook_pinned {
            // Best effort: without these hooks a device that is down still drops what
            // is sent to it, but everything else works.
            if state.attach_device_hooks().is_err() {
                // Remembered, so later commands do not parse the kernel's BTF and try
                // again (bpffs holds no regular files, but directories).
                let _ = fs::create_dir(state.dir.join(NO_DEVICE_HOOKS));
            }
        }
        Ok(state)
    }

    /// Puts this build's programs where another build's run, each switch atomic to a
    /// packet: the pinned TC programs, the TCX links (BPF_LINK_UPDATE), imq's cls_bpf
    /// filters (replaced in place, NLM_F_REPLACE) and the device hook (the new one is
    /// attached before the old one goes). The maps stay, with every rule, counter and
    /// device. A failure leaves the build marker unset, so the next command carries on.
    fn replace_programs(&mut self, device_hook: bool) -> Result<()> {
        for which in [Prog::IngressTcx, Prog::IngressClassic, Prog::Egress] {
            let (name, pin) = which.names();
            let pin = self.dir.join(pin);
            if !pin.exists() {
                continue;
            }
            // bpffs refuses names with a dot.
            let fresh = self.dir.join(format!("{}_new", which.names().1));
            let prog = self.load_classifier(name)?;
            let _ = fs::remove_file(&fresh);
            prog.pin(&fresh).map_err(|e| Error::bpf(&format!("pin {name}"), e))?;
            fs::rename(&fresh, &pin).map_err(|e| Error::io(format!("replace {}", pin.display()), e))?;
        }
        // TCX links.
        let entries = fs::read_dir(&self.dir).map_err(|e| Error::io("read state directory", e))?;
        let prefix = format!("{LINK_PREFIX}{}_", Direction::Ingress);
        let links: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path())
            .collect();
        if !links.is_empty() {
            let prog = self.program(Prog::IngressTcx)?;
            let prog_fd = prog.fd().map_err(|e| Error::bpf("program fd", e))?;
            for path in links {
                let link = sys::obj_get(&path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
                sys::link_update(link.as_fd(), prog_fd.as_fd())
                    .map_err(|e| Error::io(format!("update {}", path.display()), e))?;
            }
        }
        // imq's classic filters, on every interface of the namespace.
        let nl = crate::netlink::Netlink::new()?;
        for link in nl.links()? {
            for filter in nl.filters(link.index)? {
                let dev_ifindex = self.device(filter.dev)?.ifindex;
                if dev_ifindex == 0 {
                    continue;
                }
                let prog = self.program(Prog::classic(filter.direction))?;
                let fd = prog.fd().map_err(|e| Error::bpf("program fd", e))?;
                let fd = std::os::fd::AsRawFd::as_raw_fd(&fd.as_fd()) as u32;
                nl.replace_filter(link.index, filter, fd, dev_ifindex)?;
            }
        }
        if device_hook {
            // The old hook and the new one set the same flags, so both may run for a
            // moment.
            let fresh = self.dir.join(format!("{LINK_NETDEV_EVENT}_new"));
            let _ = fs::remove_file(&fresh);
            self.attach_device_hooks_at(&fresh)?;
            let pin = self.dir.join(LINK_NETDEV_EVENT);
            fs::rename(&fresh, &pin).map_err(|e| Error::io(format!("replace {}", pin.display()), e))?;
        }
        for entry in fs::read_dir(&self.dir)
            .map_err(|e| Error::io("read state directory", e))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(PROGRAMS_PREFIX) && name != programs_marker() {
                let _ = fs::remove_dir(entry.path());
            }
        }
        Ok(())
    }

    /// Turns the monitor flag off when the monitor that set it is gone (killed before it
    /// could): the data path would otherwise keep building events nobody reads. A live
    /// monitor this misjudges (in another pid namespace) sets it again within a second.
    fn clear_dead_monitor(&mut self) {
        let Ok(mut cfg) = self
            .map_mut(MONITOR_MAP)
            .and_then(|m| Array::<_, MonitorConfig>::try_from(m).map_err(|e| Error::bpf(MONITOR_MAP, e)))
        else {
            return;
        };
        if let Ok(c) = cfg.get(&0, 0)
            && c.flags != 0
            && !crate::monitor::process_lives(c.pid)
        {
            let _ = cfg.set(0, MonitorConfig::default(), 0);
            // And its ring buffer's memory goes.
            if let Ok(aya::maps::Map::ArrayOfMaps(events)) = self.map_mut(EVENTS_MAP) {
                crate::monitor::close_event_ring(events);
            }
        }
    }

    /// Whether the device hook runs: imq then follows its devices going down and up by
    /// itself. (Some kernels refuse tracing programs, e.g. without BPF trampolines or
    /// with a lockdown.)
    pub fn tracks_device_state(&self) -> bool {
        self.dir.join(LINK_NETDEV_EVENT).exists()
    }

    /// An fentry program on call_netdevice_notifiers_info keeps the down-device flags
    /// of the device table current.
    fn attach_device_hooks(&mut self) -> Result<()> {
        let pin = self.dir.join(LINK_NETDEV_EVENT);
        self.attach_device_hooks_at(&pin)
    }

    fn attach_device_hooks_at(&mut self, pin: &Path) -> Result<()> {
        let btf = aya::Btf::from_sys_fs().map_err(|e| Error::bpf("kernel BTF", e))?;
        let function = "call_netdevice_notifiers_info";
        let prog: &mut FEntry = self
            .ebpf
            .program_mut(NETDEV_EVENT_PROG)
            .ok_or_else(|| Error::Bpf(format!("program {NETDEV_EVENT_PROG} missing from the object")))?
            .try_into()
            .map_err(|e| Error::bpf("program type", e))?;
        prog.load(function, &btf)
            .map_err(|e| Error::bpf(&format!("load {NETDEV_EVENT_PROG}"), e))?;
        let id = prog
            .attach()
            .map_err(|e| Error::bpf(&format!("attach to {function}"), e))?;
        let link: FdLink = prog.take_link(id).map_err(|e| Error::bpf("take link", e))?.into();
        link.pin(pin).map_err(|e| Error::bpf("pin link", e))?;
        Ok(())
    }

    /// The monitor's configuration, per-CPU state and ring buffer slot, owned by the
    /// caller (they stay usable after the state and its lock are dropped).
    pub fn take_monitor_maps(&mut self) -> Result<(aya::maps::Map, aya::maps::Map, aya::maps::Map)> {
        let mut take = |name: &str| {
            self.ebpf
                .take_map(name)
                .ok_or_else(|| Error::Bpf(format!("map {name} missing from the object")))
        };
        Ok((take(MONITOR_MAP)?, take(MONITOR_STATE_MAP)?, take(EVENTS_MAP)?))
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| Error::Bpf(format!("map {name} missing from the object")))
    }

    fn rules_map(&mut self) -> Result<HashMap<&mut MapData, RuleKey, RuleSpec>> {
        HashMap::try_from(self.map_mut(RULES_MAP)?).map_err(|e| Error::bpf(RULES_MAP, e))
    }

    fn hooks_map(&mut self) -> Result<HashMap<&mut MapData, HookKey, Hook>> {
        HashMap::try_from(self.map_mut(HOOKS_MAP)?).map_err(|e| Error::bpf(HOOKS_MAP, e))
    }

    fn entries_map(&mut self) -> Result<HashMap<&mut MapData, EntryKey, Target>> {
        HashMap::try_from(self.map_mut(ENTRIES_MAP)?).map_err(|e| Error::bpf(ENTRIES_MAP, e))
    }

    fn active_map(&mut self) -> Result<Array<&mut MapData, u32>> {
        Array::try_from(self.map_mut(ACTIVE_MAP)?).map_err(|e| Error::bpf(ACTIVE_MAP, e))
    }

    fn counters_map(&mut self) -> Result<PerCpuHashMap<&mut MapData, u32, Counters>> {
        PerCpuHashMap::try_from(self.map_mut(COUNTERS_MAP)?).map_err(|e| Error::bpf(COUNTERS_MAP, e))
    }

    fn active_generation(&mut self) -> Result<u32> {
        let g = self
            .active_map()?
            .get(&0, 0)
            .map_err(|e| Error::bpf("read generation", e))?;
        Ok(g & 1)
    }

    /// Every rule in force, by id. A record this imqctl cannot read (from a newer one)
    /// is an error rather than something to drop silently.
    pub fn rules(&mut self) -> Result<Vec<(u32, Rule)>> {
        let generation = self.active_generation()?;
        let mut rules = Vec::new();
        for item in self.rules_map()?.iter() {
            let (key, spec) = item.map_err(|e| Error::bpf("read rules", e))?;
            if key.generation != generation {
                continue;
            }
            let rule =
                Rule::from_spec(&spec).ok_or_else(|| Error::Bpf(format!("rule {} has an unknown layout", key.id)))?;
            rules.push((key.id, rule));
        }
        Ok(rules)
    }

    /// Replaces every rule, `old` (as [`Self::rules`] read them under this lock), with
    /// `new` (id, rule), as one change: the rules and what
    /// they compile to are written into the generation not in use, the data path (and
    /// what `rules` reads) is switched to it in one write, and once no program can
    /// still be reading the old generation it is deleted. If writing fails, the new
    /// generation is deleted again and nothing has changed. Rules whose id is kept
    /// keep their counters.
    pub fn commit(&mut self, old: &[(u32, Rule)], new: &[(u32, Rule)], compiled: &Compiled) -> Result<()> {
        let active = self.active_generation()?;
        let next = active ^ 1;
        let old_ids: HashSet<u32> = old.iter().map(|(id, _)| *id).collect();
        let new_ids: HashSet<u32> = new.iter().map(|(id, _)| *id).collect();
        // A command that died half-way may have left parts of `next` behind.
        self.delete_generation(next)?;
        let created: Vec<u32> = new_ids.difference(&old_ids).copied().collect();
        if let Err(e) = self.write_generation(next, new, compiled, &created) {
            let _ = self.delete_generation(next);
            let _ = self.remove_counters(&created);
            return Err(e);
        }

        self.active_map()?
            .set(0, next, 0)
            .map_err(|e| Error::bpf("switch generation", e))?;
        let Some(aya::maps::Map::Array(devices)) = self.ebpf.map(DEVICES_MAP) else {
            return Err(Error::Bpf(format!("map {DEVICES_MAP} missing from the object")));
        };
        sys::wait_for_bpf_programs(devices.fd().as_fd())?;
        self.delete_generation(active)?;
        let removed: Vec<u32> = old_ids.difference(&new_ids).copied().collect();
        self.remove_counters(&removed)
    }

    /// Everything of generation `generation` but the switch: zeroed counters for the
    /// rules in `created`, the rules, the hooks, then the entries (see
    /// delete_generation for why in this order).
    fn write_generation(
        &mut self,
        generation: u32,
        new: &[(u32, Rule)],
        compiled: &Compiled,
        created: &[u32],
    ) -> Result<()> {
        let cpus = possible_cpus()?;
        let mut counters = self.counters_map()?;
        for id in created {
            // A fresh value for each try: insert takes it, and it is not Clone.
            update_retrying("create counters", || {
                let zero = PerCpuValues::try_from(vec![Counters::default(); cpus]).map_err(|io_error| {
                    aya::sys::SyscallError {
                        call: "per-CPU values",
                        io_error,
                    }
                })?;
                counters.insert(id, zero, 0)
            })?;
        }
        let mut rules = self.rules_map()?;
        for (id, rule) in new {
            update_retrying("write rule", || {
                rules.insert(RuleKey { id: *id, generation }, rule.to_spec(), 0)
            })?;
        }
        let with_generation = |mut k: HookKey| {
            k.generation = generation as u16;
            k
        };
        let mut hooks = self.hooks_map()?;
        for (key, hook) in &compiled.hooks {
            update_retrying("write hook", || hooks.insert(with_generation(*key), hook, 0))?;
        }
        let mut entries = self.entries_map()?;
        for (key, target) in &compiled.entries {
            let key = EntryKey {
                hook: with_generation(key.hook),
                ..*key
            };
            update_retrying("write rule entry", || entries.insert(key, target, 0))?;
        }
        Ok(())
    }

    fn remove_counters(&mut self, ids: &[u32]) -> Result<()> {
        let mut counters = self.counters_map()?;
        for id in ids {
            match counters.remove(id) {
                Err(e) if !is_not_found(&e) => return Err(Error::bpf("remove counters", e)),
                _ => {}
            }
        }
        Ok(())
    }

    /// Deletes a generation: entries, hooks, then rules. Entries are written after
    /// hooks and deleted before them, so a generation without hooks has no entries, and
    /// cleaning up after a crash looks through the (large) entry map only when it
    /// finds hooks.
    fn delete_generation(&mut self, generation: u32) -> Result<()> {
        fn remove_all<K: aya::Pod>(map: &mut HashMap<&mut MapData, K, impl aya::Pod>, keys: Vec<K>) -> Result<()> {
            for key in keys {
                match map.remove(&key) {
                    Err(e) if !is_not_found(&e) => return Err(Error::bpf("delete old generation", e)),
                    _ => {}
                }
            }
            Ok(())
        }
        let g16 = generation as u16;
        let hooks: Vec<HookKey> = self
            .hooks_map()?
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.generation == g16)
            .collect();
        if !hooks.is_empty() {
            let mut entries = self.entries_map()?;
            let stale: Vec<EntryKey> = entries
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| k.hook.generation == g16)
                .collect();
            remove_all(&mut entries, stale)?;
            remove_all(&mut self.hooks_map()?, hooks)?;
        }
        let mut rules = self.rules_map()?;
        let stale: Vec<RuleKey> = rules
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.generation == generation)
            .collect();
        remove_all(&mut rules, stale)
    }

    /// The device table's entry for imq device number `dev` (ifindex 0: none).
    pub fn device(&mut self, dev: u32) -> Result<Device> {
        self.devices_map()?
            .get(&dev, 0)
            .map_err(|e| Error::bpf("read device table", e))
    }

    /// A rule's counters, summed over CPUs (zero if it has none).
    pub fn counters(&mut self, id: u32) -> Result<Counters> {
        let per_cpu = match self.counters_map()?.get(&id, 0) {
            Ok(c) => c,
            Err(e) if is_not_found(&e) => return Ok(Counters::default()),
            Err(e) => return Err(Error::bpf("read counters", e)),
        };
        Ok(per_cpu.iter().fold(Counters::default(), |a, c| Counters {
            packets: a.packets + c.packets,
            bytes: a.bytes + c.bytes,
        }))
    }

    fn devices_map(&mut self) -> Result<Array<&mut MapData, Device>> {
        Array::try_from(self.map_mut(DEVICES_MAP)?).map_err(|e| Error::bpf(DEVICES_MAP, e))
    }

    /// Points imq device number `dev` at `ifindex` (0: no device, pass unshaped), and
    /// records whether that device is up (the device hooks keep it current after).
    /// Records imq device `dev` as `ifindex` (0: none), up or down, with `queues` TX
    /// queues (0 or 1: the data path leaves the queue to the kernel).
    pub fn set_device(&mut self, dev: u32, ifindex: u32, up: bool, queues: u32) -> Result<()> {
        let flags = (if up { 0 } else { DEVICE_DOWN }) | (queues.min(0xffff) << DEVICE_QUEUES_SHIFT);
        let old = self.device(dev)?.ifindex;
        let mut reverse: HashMap<&mut MapData, u32, u32> =
            HashMap::try_from(self.map_mut(IFINDEXES_MAP)?).map_err(|e| Error::bpf(IFINDEXES_MAP, e))?;
        if old != 0 && old != ifindex {
            match reverse.remove(&old) {
                Err(e) if !is_not_found(&e) => return Err(Error::bpf("write device table", e)),
                _ => {}
            }
        }
        if ifindex != 0 {
            reverse
                .insert(ifindex, dev, 0)
                .map_err(|e| Error::bpf("write device table", e))?;
        }
        self.devices_map()?
            .set(dev, Device { ifindex, flags }, 0)
            .map_err(|e| Error::bpf("write device table", e))
    }

    /// The setups map: opened from its pin, or created and pinned when `create`.
    fn setups_map(&self, create: bool) -> Result<Option<HashMap<MapData, u32, SetupRecord>>> {
        let pin = self.dir.join(DEVICE_SETUPS);
        if pin.exists() {
            let data = MapData::from_pin(&pin).map_err(|e| Error::bpf("open device setups", e))?;
            let map = aya::maps::Map::from_map_data(data).map_err(|e| Error::bpf("device setups", e))?;
            // Refuses a pin of another type or size.
            return HashMap::try_from(map)
                .map(Some)
                .map_err(|e| Error::bpf("device setups", e));
        }
        if !create {
            return Ok(None);
        }
        // Entries are allocated as they are written: a setup costs only its device.
        const BPF_F_NO_PREALLOC: u32 = 1;
        let map = HashMap::<MapData, u32, SetupRecord>::create(imq_common::MAX_DEVICES, BPF_F_NO_PREALLOC)
            .map_err(|e| Error::bpf("create device setups", e))?;
        map.pin(&pin).map_err(|e| Error::bpf("pin device setups", e))?;
        let data = MapData::from_pin(&pin).map_err(|e| Error::bpf("open device setups", e))?;
        let map = aya::maps::Map::from_map_data(data).map_err(|e| Error::bpf("device setups", e))?;
        HashMap::try_from(map)
            .map(Some)
            .map_err(|e| Error::bpf("device setups", e))
    }

    /// The `[[device]]` setups imq applied, by imq device number.
    pub fn device_setups(&self) -> Result<Vec<(u32, DeviceSetup)>> {
        let Some(map) = self.setups_map(false)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for item in map.iter() {
            let (dev, record) = item.map_err(|e| Error::bpf("read device setups", e))?;
            out.push((dev, DeviceSetup::decode(&record)));
        }
        out.sort_by_key(|(d, _)| *d);
        Ok(out)
    }

    /// Records (or, with `None`, forgets) the setup of imq device number `dev`.
    pub fn set_device_setup(&self, dev: u32, setup: Option<&DeviceSetup>) -> Result<()> {
        match setup {
            Some(s) => {
                let record = s.encode()?;
                let Some(mut map) = self.setups_map(true)? else {
                    return Err(Error::Bpf("device setups: map missing".into()));
                };
                map.insert(dev, *record, 0)
                    .map_err(|e| Error::bpf("write device setups", e))
            }
            None => match self.setups_map(false)? {
                Some(mut map) => match map.remove(&dev) {
                    Err(e) if !is_not_found(&e) => Err(Error::bpf("write device setups", e)),
                    _ => Ok(()),
                },
                None => Ok(()),
            },
        }
    }

    /// The object's TC program `name`, loaded into the kernel (not pinned).
    fn load_classifier(&mut self, name: &str) -> Result<&mut SchedClassifier> {
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| Error::Bpf(format!("program {name} missing from the object")))?
            .try_into()
            .map_err(|e| Error::bpf("program type", e))?;
        prog.load().map_err(|e| load_error(name, e))?;
        Ok(prog)
    }

    /// A pinned program, loaded and pinned on first use.
    pub fn program(&mut self, which: Prog) -> Result<SchedClassifier> {
        let (name, pin) = which.names();
        let pin = self.dir.join(pin);
        if !pin.exists() {
            let prog = self.load_classifier(name)?;
            prog.pin(&pin).map_err(|e| Error::bpf(&format!("pin {name}"), e))?;
        }
        SchedClassifier::from_pin(&pin).map_err(|e| Error::bpf("open pinned program", e))
    }

    pub fn is_attached(&self, direction: Direction, ifindex: u32) -> bool {
        self.dir.join(link_pin_name(direction, ifindex)).exists()
    }

    /// Attaches the ingress program to the interface's TCX ingress hook (after the
    /// programs already there) and pins the link, unless that was done before. (Egress,
    /// and ingress without TCX, go through cls_bpf + mirred filters instead.)
    pub fn attach_ingress(&mut self, ifname: &str, ifindex: u32) -> Result<()> {
        let direction = Direction::Ingress;
        if self.is_attached(direction, ifindex) {
            return Ok(());
        }
        let mut prog = self.program(Prog::IngressTcx)?;
        let id = prog
            .attach_with_options(
                ifname,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(|e| Error::bpf(&format!("attach to {ifname} {direction}"), e))?;
        let link: FdLink = prog
            .take_link(id)
            .map_err(|e| Error::bpf("take link", e))?
            .try_into()
            .map_err(|e| Error::bpf("link is not a TCX link", e))?;
        link.pin(self.dir.join(link_pin_name(direction, ifindex)))
            .map_err(|e| Error::bpf("pin link", e))?;
        Ok(())
    }

    /// Removes the link pin: the link's last reference goes with it and the kernel
    /// detaches the program from the interface.
    pub fn detach(&mut self, direction: Direction, ifindex: u32) -> Result<()> {
        let pin = self.dir.join(link_pin_name(direction, ifindex));
        if !pin.exists() {
            return Ok(());
        }
        let link = PinnedLink::from_pin(&pin).map_err(|e| Error::bpf("open pinned link", e))?;
        drop(link.unpin().map_err(|e| Error::io("unpin link", e))?);
        Ok(())
    }

    /// Detaches every TCX link, removes this namespace's pins and directory. Egress
    /// filters are the caller's to remove first (they are netlink objects).
    pub fn destroy(mut self) -> Result<()> {
        let old = self.rules()?;
        self.commit(&old, &[], &Compiled::default())?;
        let entries = fs::read_dir(&self.dir).map_err(|e| Error::io("read state directory", e))?;
        for entry in entries {
            let path = entry.map_err(|e| Error::io("read state directory", e))?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name.starts_with(LINK_PREFIX) {
                let link = PinnedLink::from_pin(&path).map_err(|e| Error::bpf("open pinned link", e))?;
                drop(link.unpin().map_err(|e| Error::io("unpin link", e))?);
            }
        }
        let entries = fs::read_dir(&self.dir).map_err(|e| Error::io("read state directory", e))?;
        for entry in entries {
            let path = entry.map_err(|e| Error::io("read state directory", e))?.path();
            let removed = if path.is_dir() {
                fs::remove_dir(&path)
            } else {
                fs::remove_file(&path)
            };
            removed.map_err(|e| Error::io(format!("remove {}", path.display()), e))?;
        }
        fs::remove_dir(&self.dir).map_err(|e| Error::io(format!("remove {}", self.dir.display()), e))
    }
}
