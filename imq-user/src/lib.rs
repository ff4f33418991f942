//! imq control plane: attach, detach and inspect the TC programs that queue selected
//! packets in imq (ifb) devices.
//!
//! Every operation validates all of its input and plans its whole change before it
//! touches the kernel; a refused operation changes nothing.

mod btf;
pub mod compile;
mod devices;
pub mod error;
pub mod metrics;
pub mod monitor;
pub mod netlink;
#[cfg(test)]
mod parse_fuzz;
pub mod rule;
pub mod rulefile;
pub mod shaper;
mod shaping;
mod state;
mod sys;
pub mod watch;

use std::{
    collections::{BTreeSet, HashMap},
    os::fd::{AsFd as _, AsRawFd as _},
    path::PathBuf,
};

use imq_common::{DEVICE_DOWN, MAX_RULE_IDS, MAX_RULES};

use serde::Serialize;

pub use crate::error::{Error, Result};
/// How imq names the calling thread's network namespace: its state is
/// `<bpffs>/imq/<NetnsId::dir_name>/`.
pub use crate::sys::{NetnsId, netns_id};
use crate::{
    compile::{Compiled, compile},
    netlink::{Filter, Link, Netlink},
    rule::{Actions, DevName, Direction, Directions, Insert, Match, NewRule, Rule, Selector},
    shaper::{QdiscStats, Shaper},
    state::State,
};

/// The eBPF object built from imq-ebpf, embedded at build time.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/imq"));

/// txqueuelen of the imq devices imq creates: ifb's default of 32 is the limit of
/// HTB's direct queue and default leaf pfifo, which then drop any burst.
pub const DEFAULT_TXQUEUELEN: u32 = 1000;

/// Where and how imq keeps its state.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// A bpffs directory to use instead of /sys/fs/bpf (found or mounted).
    pub bpffs: Option<PathBuf>,
}

/// `imqctl attach`.
#[derive(Clone, Debug)]
pub struct AttachRequest {
    pub interface: String,
    pub directions: Directions,
    pub dev: DevName,
    pub matches: Match,
    pub actions: Actions,
    pub prio: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attached {
    /// The rule was added; `created_dev` if the imq device was created for it.
    Added { created_dev: bool },
    /// The same rule was already there.
    Unchanged,
}

/// One imq device, as `show` reports it.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceStatus {
    pub name: String,
    /// 0 when missing.
    pub ifindex: u32,
    /// `up`; `down` (its traffic passes unshaped); `down-dropping` (down, and imq was
    /// not told: `imqctl dev add` fixes that); `up-bypassed` (up, and imq was not told:
    /// its traffic passes unshaped until `imqctl dev add`); `missing` (deleted: its traffic passes
    /// unshaped); `stale` (re-created outside imqctl: passes unshaped until
    /// `imqctl dev add`).
    pub state: &'static str,
    pub txqueuelen: u32,
    /// TX queues: more than one spreads shaping over CPUs (`mq`, rules' `queue`).
    pub queues: u32,
    /// Its qdiscs with their counters, root first: what shapes its traffic.
    pub qdiscs: Vec<QdiscStats>,
}

/// One WAN shaper, as `show` reports it: its settings, and the counters of its
/// upload qdisc (the download's are its imq device's).
#[derive(Clone, Debug, Serialize)]
pub struct ShaperStatus {
    #[serde(flatten)]
    pub shaper: Shaper,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload: Option<QdiscStats>,
}

/// One rule, as `show` reports it.
#[derive(Clone, Debug, Serialize)]
pub struct RuleStatus {
    pub interface: String,
    pub ifindex: u32,
    pub direction: Direction,
    pub prio: u32,
    pub dev: String,
    #[serde(flatten)]
    pub matches: Match,
    #[serde(flatten)]
    pub actions: Actions,
    /// Whether the program is attached to the interface (false if it has gone).
    pub attached: bool,
    /// How: `tcx` (a TCX link, Linux 6.6+) or `clsact` (a cls_bpf filter with a mirred
    /// action on the clsact qdisc: egress always, ingress where the kernel has no
    /// TCX); empty when not attached.
    pub hook: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    pub devices: Vec<DeviceStatus>,
    pub rules: Vec<RuleStatus>,
    pub shapers: Vec<ShaperStatus>,
    /// Whether imq follows its devices going down and up by itself. Without it, after
    /// `ip link set imqN down` run `imqctl dev add imqN` so that imq passes that
    /// device's traffic instead of sending it into a device that drops it.
    pub tracks_device_state: bool,
}

/// What `apply` changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Rules in place now, shapers' rules included.
    pub rules: usize,
    pub rules_added: usize,
    pub rules_removed: usize,
    /// Shapers in place now.
    pub shapers: usize,
    /// Interfaces whose shaper was added or changed, or removed.
    pub shapers_set: Vec<String>,
    pub shapers_removed: Vec<String>,
    /// imq devices whose `[[device]]` qdiscs were set up, or removed.
    pub devices_set_up: Vec<String>,
    pub devices_removed: Vec<String>,
}

impl std::fmt::Display for Applied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} rule(s) ({} added, {} removed), {} shaper(s)",
            self.rules, self.rules_added, self.rules_removed, self.shapers
        )?;
        for (what, list) in [
            ("shaper set on", &self.shapers_set),
            ("shaper removed from", &self.shapers_removed),
            ("qdiscs set up on", &self.devices_set_up),
            ("qdiscs removed from", &self.devices_removed),
        ] {
            if !list.is_empty() {
                write!(f, "; {what} {}", list.join(", "))?;
            }
        }
        let changed = self.rules_added
            + self.rules_removed
            + self.shapers_set.len()
            + self.shapers_removed.len()
            + self.devices_set_up.len()
            + self.devices_removed.len();
        if changed == 0 {
            write!(f, "; nothing changed")?;
        }
        Ok(())
    }
}

/// The control plane of one network namespace: the one imqctl runs in.
pub struct Imq {
    opts: Options,
    nl: Netlink,
    /// Whether the kernel has TCX, asked of it once.
    tcx: bool,
    /// Leave an imq device the admin took down as it is (and record it down)
    /// instead of bringing it up: `watch` follows the admin's `ip link set down`.
    leave_down: bool,
    /// The bpffs directory, held open by [`Imq::hold_bpffs`].
    held: Option<std::fs::File>,
    /// What failed after a change had landed: reported, not undone
    /// ([`Imq::take_warnings`]).
    warnings: std::cell::RefCell<Vec<String>>,
}

/// What a hook needs in the kernel for its rules to see packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Need {
    /// The ingress program's TCX link on the interface (kernels with TCX).
    Tcx(u32),
    /// The interface's classic filter on `direction` that redirects to imq device
    /// `dev`: egress always, ingress on kernels without TCX.
    Filter {
        ifindex: u32,
        direction: Direction,
        dev: DevName,
    },
}

impl Need {
    fn ifindex(self) -> u32 {
        match self {
            Self::Tcx(i) | Self::Filter { ifindex: i, .. } => i,
        }
    }
}

/// Rounds of write and read [`Imq::publish_devices`] makes before giving up on a
/// device that keeps flapping.
const PUBLISH_TRIES: usize = 8;

/// Points imq device `dev` at `ifindex` when the table has no device or another one
/// for it, marked down: selected packets pass unshaped, nothing is sent to the device
/// until [`Imq::publish_devices`] (on kernels without TCX the filter's mirred still
/// names the old device, and drops what it is given). A device the table already
/// has is left as it is.
pub(crate) fn stage_device(state: &mut State, dev: DevName, ifindex: u32) -> Result<()> {
    if state.device(dev.0)?.ifindex != ifindex {
        state.set_device(dev.0, ifindex, false, 0)?;
    }
    Ok(())
}

/// What `rules` need, on a kernel that has TCX or not.
fn needs(rules: &[(u32, Rule)], tcx: bool) -> BTreeSet<Need> {
    rules
        .iter()
        .map(|(_, r)| match r.direction {
            Direction::Ingress if tcx => Need::Tcx(r.ifindex),
            direction => Need::Filter {
                ifindex: r.ifindex,
                direction,
                dev: r.dev,
            },
        })
        .collect()
}

/// The `n` lowest rule ids `rules` does not use. There are always enough for a
/// change whose old and new rules are each within [`MAX_RULES`].
fn free_ids(rules: &[(u32, Rule)], n: usize) -> Result<Vec<u32>> {
    let used: BTreeSet<u32> = rules.iter().map(|(id, _)| *id).collect();
    let free: Vec<u32> = (0..MAX_RULE_IDS).filter(|i| !used.contains(i)).take(n).collect();
    if free.len() < n {
        return Err(Error::TooManyRules(MAX_RULES));
    }
    Ok(free)
}

/// Named rules, shapers and `[[device]]` setups: what a rule file holds.
type ExportParts = (Vec<(String, Rule)>, Vec<Shaper>, Vec<rulefile::FileDevice>);

impl Imq {
    /// Checks privileges; changes nothing.
    pub fn new(opts: Options) -> Result<Self> {
        sys::check_privileges()?;
        Ok(Self {
            opts,
            nl: Netlink::new()?,
            tcx: sys::has_tcx(),
            leave_down: false,
            held: None,
            warnings: Default::default(),
        })
    }

    /// What failed after the last changes had landed, a line each, and forgets it.
    /// Such a step (taking a hook down that no rule uses any more) cannot be undone
    /// with the change, which stands; a hook left behind without rules passes every
    /// packet, and the next command that touches it tries again.
    pub fn take_warnings(&self) -> Vec<String> {
        let mut all = std::mem::take(&mut *state::LOAD_WARNINGS.lock().unwrap_or_else(|p| p.into_inner()));
        all.extend(self.warnings.take());
        all
    }

    /// Starts reporting what the data path decides (`imqctl monitor`).
    pub fn monitor(&self, req: &monitor::MonitorRequest) -> Result<monitor::Monitor> {
        let ifindex = match &req.interface {
            Some(name) => Some(
                self.nl
                    .link_by_name(name)?
                    .ok_or_else(|| Error::NoSuchInterface(name.clone()))?
                    .index,
            ),
            None => None,
        };
        let state = State::open(self.bpffs())?.ok_or(Error::NothingToMonitor)?;
        monitor::Monitor::start(state, Netlink::new()?, req, ifindex)
    }

    fn bpffs(&self) -> Option<&std::path::Path> {
        self.opts.bpffs.as_deref()
    }

    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// Finds (or mounts) the bpffs once and keeps it open for the life of the
    /// process, which then keeps using that one: under `ip netns exec` it is found
    /// through an ancestor's mount namespace, and a long-running `watch` must not
    /// lose it when that ancestor (a shell, say) exits.
    pub fn hold_bpffs(&mut self) -> Result<()> {
        let dir = sys::find_bpffs(self.bpffs())?;
        let f = std::fs::File::open(&dir).map_err(|e| Error::io(format!("open {}", dir.display()), e))?;
        self.opts.bpffs = Some(PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd())));
        self.held = Some(f);
        Ok(())
    }

    /// The interface a rule may sit on: Ethernet, and not an imq or other ifb device.
    fn source_interface(&self, name: &str) -> Result<Link> {
        let link = self
            .nl
            .link_by_name(name)?
            .ok_or_else(|| Error::NoSuchInterface(name.to_owned()))?;
        check_source(&link)?;
        Ok(link)
    }

    /// An existing imq device must be an ifb; `None` if there is none yet.
    fn existing_dev(&self, dev: DevName) -> Result<Option<Link>> {
        let name = dev.to_string();
        match self.nl.link_by_name(&name)? {
            Some(l) if !l.is_ifb() => Err(Error::NotIfb {
                name,
                kind: l.kind.unwrap_or_else(|| l.link_type.clone()),
            }),
            other => Ok(other),
        }
    }

    /// Makes sure the devices exist and are up, creating the missing ones, and points
    /// the device table at them: a device new to the table is staged (nothing is sent
    /// to it yet), for [`Self::transition`] to publish once the filters that send to it
    /// are in place. Returns the ifindexes of the devices it created.
    fn ensure_devs(&self, state: &mut State, devs: &[(DevName, Option<Link>)]) -> Result<Vec<u32>> {
        let mut created = Vec::new();
        let result = (|| {
            for (dev, link) in devs {
                let link = match link {
                    Some(l) if !l.up && self.leave_down => {
                        stage_device(state, *dev, l.index)?;
                        continue;
                    }
                    Some(l) => {
                        netlink::prepare_imq_device(&l.name);
                        if !l.up {
                            self.nl.set_up(l.index)?;
                        }
                        l.clone()
                    }
                    None => {
                        let l = self.nl.add_ifb(&dev.to_string(), DEFAULT_TXQUEUELEN, 1)?;
                        created.push(l.index);
                        l
                    }
                };
                stage_device(state, *dev, link.index)?;
            }
            Ok(())
        })();
        match result {
            Ok(()) => Ok(created),
            Err(e) => {
                for &index in &created {
                    let _ = self.nl.del_link(index);
                }
                Err(e)
            }
        }
    }

    /// Records in the device table whether each of `devs` is up, as the kernel has
    /// it now; from then on packets are sent to those that are. The table is written
    /// from a fresh read of the links and read again after, until the two agree: the
    /// device hook may record a device going down or up between a read and a write,
    /// and a write from the older read would undo it (a device marked up while down
    /// has everything sent to it dropped). When a read after the write agrees with
    /// it, any later change is the hook's: the kernel changes a device's state and
    /// calls the hook in one step under RTNL, which a link dump takes on older
    /// kernels. Where the dump reads under RCU instead (newer kernels), a read during
    /// a close can still see the device up; the hook's NETDEV_DOWN, sent once the
    /// device is marked down, puts the flag right after such a write.
    pub(crate) fn publish_devices(&self, state: &mut State, devs: &[DevName]) -> Result<()> {
        let mut table = Vec::new();
        for &dev in devs {
            let ifindex = state.device(dev.0)?.ifindex;
            if ifindex != 0 && !table.iter().any(|(d, _)| *d == dev) {
                table.push((dev, ifindex));
            }
        }
        if table.is_empty() {
            return Ok(());
        }
        // Up or not, and the TX queues, of each device.
        let read = || -> Result<Vec<(bool, u32)>> {
            let links = self.nl.links()?;
            Ok(table
                .iter()
                .map(|(_, i)| {
                    links
                        .iter()
                        .find(|l| l.index == *i)
                        .map_or((false, 0), |l| (l.up, l.queues))
                })
                .collect())
        };
        let mut up = read()?;
        for _ in 0..PUBLISH_TRIES {
            for ((dev, ifindex), (up, queues)) in table.iter().zip(&up) {
                state.set_device(dev.0, *ifindex, *up, *queues)?;
            }
            let now = read()?;
            if now == up {
                return Ok(());
            }
            up = now;
        }
        Err(Error::Netlink(format!(
            "{} kept going down and up while imq recorded its state; try again",
            table.iter().map(|(d, _)| d.to_string()).collect::<Vec<_>>().join(", ")
        )))
    }

    /// Compiles `new`, refusing it (before any change) if it cannot be.
    fn compile(&self, links: &[Link], new: &[(u32, Rule)]) -> Result<Compiled> {
        let name = |i: u32| {
            links
                .iter()
                .find(|l| l.index == i)
                .map_or_else(|| format!("ifindex {i}"), |l| l.name.clone())
        };
        compile(new.iter().map(|(id, r)| (*id, r)), name)
    }

    /// Moves the namespace from its rules `old` to `new`: what `new` needs is set up
    /// first (it selects nothing until the commit), then the rules are switched in
    /// one step, then what only `old` needed is taken down. On failure before the
    /// switch, what was set up is taken down again and the old rules stay.
    fn transition(
        &self,
        state: &mut State,
        links: &[Link],
        old: &[(u32, Rule)],
        new: &[(u32, Rule)],
        compiled: &Compiled,
    ) -> Result<()> {
        let exists = |i: u32| links.iter().any(|l| l.index == i);
        let (before, after) = (needs(old, self.tcx), needs(new, self.tcx));
        let mut raised = Vec::new();
        let result = (|| {
            for &need in &after {
                if !before.contains(&need) {
                    raised.push(need);
                }
                // Also repairs what was removed behind imq's back.
                self.raise(state, links, need)?;
            }
            // The devices the rules send to, now that what sends to them is in place.
            let devs: Vec<DevName> = old.iter().chain(new).map(|(_, r)| r.dev).collect();
            self.publish_devices(state, &devs)?;
            state.commit(old, new, compiled)
        })();
        if let Err(e) = result {
            for need in raised {
                let _ = self.lower(state, need, true);
            }
            return Err(e);
        }
        // The new rules are in force: what follows is tidying, and a failure of it
        // must not make a caller undo what the rules now use (their devices).
        for &need in before.difference(&after) {
            if let Err(e) = self.lower(state, need, exists(need.ifindex())) {
                let name = links
                    .iter()
                    .find(|l| l.index == need.ifindex())
                    .map_or_else(|| format!("ifindex {}", need.ifindex()), |l| l.name.clone());
                let hook = match need {
                    Need::Tcx(_) => format!("the ingress hook of {name}"),
                    Need::Filter { direction, dev, .. } => {
                        format!("the {} filter of {name} for {dev}", direction.as_str())
                    }
                };
                self.warnings.borrow_mut().push(format!(
                    "rules changed, but {hook} (no rules left) was not removed: {e}"
                ));
            }
        }
        Ok(())
    }

    /// Makes sure the hook can send packets: the ingress program's TCX link is on
    /// the interface, or the interface has a clsact qdisc and the hook's filter whose
    /// mirred action redirects to the device.
    fn raise(&self, state: &mut State, links: &[Link], need: Need) -> Result<()> {
        let link = links
            .iter()
            .find(|l| l.index == need.ifindex())
            .ok_or(Error::Netlink(format!("ifindex {} is gone", need.ifindex())))?;
        match need {
            Need::Tcx(ifindex) => state.attach_ingress(&link.name, ifindex),
            Need::Filter { direction, dev, .. } => {
                let dev_ifindex = state.device(dev.0)?.ifindex;
                self.nl.ensure_clsact(link.index, &link.name, direction)?;
                let prog = state.program(state::Prog::classic(direction))?;
                let fd = prog.fd().map_err(|e| Error::bpf("program fd", e))?;
                let filter = Filter { direction, dev: dev.0 };
                self.nl
                    .replace_filter(link.index, filter, fd.as_fd().as_raw_fd() as u32, dev_ifindex)
            }
        }
    }

    /// Points imq device `dev` at its device `ifindex`, created or re-created: staged
    /// in the table, the classic filters of `rules` that send to `dev` re-pointed at
    /// it (mirred forgets a device that was deleted), then published.
    pub(crate) fn adopt_device(
        &self,
        state: &mut State,
        links: &[Link],
        rules: &[(u32, Rule)],
        dev: DevName,
        ifindex: u32,
    ) -> Result<()> {
        stage_device(state, dev, ifindex)?;
        for need in needs(&Self::without_gone(links, rules), self.tcx) {
            if matches!(need, Need::Filter { dev: d, .. } if d == dev) {
                self.raise(state, links, need)?;
            }
        }
        self.publish_devices(state, &[dev])
    }

    /// Undoes [`Self::raise`]. For an interface that is gone only the pin is left to
    /// remove (the kernel dropped its links and filters with it).
    fn lower(&self, state: &mut State, need: Need, exists: bool) -> Result<()> {
        match need {
            Need::Tcx(ifindex) => state.detach(Direction::Ingress, ifindex),
            Need::Filter {
                ifindex,
                direction,
                dev,
            } if exists => self.nl.del_filter(ifindex, Filter { direction, dev: dev.0 }),
            Need::Filter { .. } => Ok(()),
        }
    }

    /// `old` without the rules of interfaces that no longer exist. Rules belong to an
    /// interface instance (its ifindex): when it is deleted the kernel drops its TCX
    /// links and tc filters, and what is left are rules nothing can name. Mutating
    /// commands drop them once their own input has been accepted, so a refused command
    /// still changes nothing.
    fn without_gone(links: &[Link], old: &[(u32, Rule)]) -> Vec<(u32, Rule)> {
        old.iter()
            .filter(|(_, r)| links.iter().any(|l| l.index == r.ifindex))
            .copied()
            .collect()
    }

    pub fn attach(&mut self, req: &AttachRequest) -> Result<Attached> {
        req.matches.validate()?;
        let link = self.source_interface(&req.interface)?;
        // Whether the device exists is decided under the lock: two attaches at once
        // must not both set out to create it.
        let locked = State::lock(self.bpffs())?;
        let dev_link = self.existing_dev(req.dev)?;

        // Plan every direction before changing anything.
        let mut state = locked.open_or_create()?;
        let old = state.rules()?;
        let mut rules: Vec<Rule> = old.iter().map(|(_, r)| *r).collect();
        let mut added = Vec::new();
        for direction in req.directions.iter() {
            let new = NewRule {
                ifindex: link.index,
                direction,
                prio: req.prio,
                dev: req.dev,
                matches: req.matches,
                actions: req.actions,
            };
            if let Insert::Add(rule) = rule::insert(&rules, &link.name, &new)? {
                rules.push(rule);
                added.push(rule);
            }
        }
        let links = self.nl.links()?;
        if added.is_empty() {
            // Repairs hooks whose program or filter was removed behind our back.
            for need in needs(&old, self.tcx).into_iter().filter(|n| match n {
                Need::Tcx(i) => *i == link.index,
                Need::Filter { ifindex, dev, .. } => *ifindex == link.index && *dev == req.dev,
            }) {
                self.raise(&mut state, &links, need)?;
            }
            return Ok(Attached::Unchanged);
        }
        let mut new = Self::without_gone(&links, &old);
        if new.len() + added.len() > MAX_RULES as usize {
            return Err(Error::TooManyRules(MAX_RULES));
        }
        let ids = free_ids(&old, added.len())?;
        new.extend(ids.into_iter().zip(added));
        let compiled = self.compile(&links, &new)?;

        // Everything is decided; from here on, undo what was done if a step fails.
        let created = self.ensure_devs(&mut state, &[(req.dev, dev_link)])?;
        let links = if created.is_empty() { links } else { self.nl.links()? };
        if let Err(e) = self.transition(&mut state, &links, &old, &new, &compiled) {
            for index in created {
                let _ = self.nl.del_link(index);
            }
            return Err(e);
        }
        Ok(Attached::Added {
            created_dev: !created.is_empty(),
        })
    }

    /// Removes the rules of `interface` in `directions` that `selector` picks; an
    /// interface left without rules in a direction is detached there. Returns how many
    /// rules were removed.
    pub fn detach(&mut self, interface: &str, directions: Directions, selector: Selector) -> Result<usize> {
        let link = self
            .nl
            .link_by_name(interface)?
            .ok_or_else(|| Error::NoSuchInterface(interface.to_owned()))?;
        let none = || Error::NoSuchRule {
            iface: interface.to_owned(),
            direction: directions.as_str().to_owned(),
            selector,
        };
        let mut state = State::open(self.bpffs())?.ok_or_else(none)?;
        let old = state.rules()?;
        let links = self.nl.links()?;
        // A shaper's rule is the shaper's: `unshape` removes it with its qdiscs.
        let shaper_rules: BTreeSet<u32> = self
            .find_shapers(&links, &self.all_qdiscs()?, &old)?
            .iter()
            .filter_map(|f| f.rule.map(|(id, _)| id))
            .collect();
        let selected =
            |r: &Rule| r.ifindex == link.index && directions.iter().any(|d| d == r.direction) && selector.selects(r);
        let picked = |id: u32, r: &Rule| selected(r) && !shaper_rules.contains(&id);
        let removed = old.iter().filter(|(id, r)| picked(*id, r)).count();
        if removed == 0 {
            if old.iter().any(|(id, r)| selected(r) && shaper_rules.contains(id)) {
                return Err(Error::BadShaper(format!(
                    "the only rule there is {interface}'s shaper: imqctl unshape {interface}"
                )));
            }
            return Err(none());
        }
        let new: Vec<(u32, Rule)> = Self::without_gone(&links, &old)
            .into_iter()
            .filter(|(id, r)| !picked(*id, r))
            .collect();
        let compiled = self.compile(&links, &new)?;
        self.transition(&mut state, &links, &old, &new, &compiled)?;
        Ok(removed)
    }

    /// Replaces every rule and shaper of this namespace with those of a rule file
    /// ([`rulefile::parse`]), as one change. Rules that stay the same keep their
    /// counters. Imq devices the rules name are created if missing. Returns what
    /// changed.
    pub fn apply(&mut self, setup: &rulefile::Setup) -> Result<Applied> {
        let links = self.nl.links()?;
        let wanted = Self::plan_setup(&links, setup)?;
        for d in &setup.devices {
            self.existing_dev(d.name).map_err(|e| Error::RuleFile {
                line: d.line,
                message: e.to_string(),
            })?;
        }
        let locked = State::lock(self.bpffs())?;
        let mut state = locked.open_or_create()?;
        // The devices first: ready before the rules send them traffic.
        let applied = state.device_setups()?;
        self.check_devices(&links, &applied, &setup.devices)?;
        let (devices_set_up, devices_removed) = self.apply_devices(&mut state, &links, &applied, &setup.devices)?;
        let links = if setup.devices.is_empty() {
            links
        } else {
            self.nl.links()?
        };
        let old = state.rules()?;
        let found = self.find_shapers(&links, &self.all_qdiscs()?, &old)?;
        let shapers: Vec<Shaper> = setup.shapers.iter().map(|(_, s)| s.clone()).collect();
        let applied = self.converge(&mut state, &links, &old, &found, wanted, &shapers)?;
        // The rules' devices were published as they took effect; a `[[device]]` no
        // rule uses has only this moment (those the rules use are read again, to no
        // effect).
        let devs: Vec<DevName> = setup.devices.iter().map(|d| d.name).collect();
        if let Err(e) = self.publish_devices(&mut state, &devs) {
            self.warnings.borrow_mut().push(format!(
                "rules applied, but the state of the [[device]] devices is not recorded: {e}"
            ));
        }
        Ok(Applied {
            devices_set_up,
            devices_removed,
            ..applied
        })
    }

    /// The rules of a rule file, placed on the interfaces they name; checks that the
    /// interfaces of its rules and shapers exist and can carry rules.
    fn plan_setup(links: &[netlink::Link], setup: &rulefile::Setup) -> Result<Vec<Rule>> {
        let index = |name: &str| {
            let link = links
                .iter()
                .find(|l| l.name == name)
                .ok_or_else(|| Error::NoSuchInterface(name.to_owned()))?;
            check_source(link)?;
            Ok(link.index)
        };
        let wanted = rulefile::plan(&setup.rules, index)?;
        for (line, s) in &setup.shapers {
            index(&s.interface).map_err(|e| Error::RuleFile {
                line: *line,
                message: e.to_string(),
            })?;
        }
        if wanted.len() > MAX_RULES as usize {
            return Err(Error::TooManyRules(MAX_RULES));
        }
        Ok(wanted)
    }

    /// What `export` prints now, and what it would print after `apply` of `setup`;
    /// changes nothing. The file is checked as `apply` checks it, but for what only
    /// the kernel can judge (the qdisc lines of `[[device]]` tables, the devices'
    /// state).
    pub fn apply_preview(&mut self, setup: &rulefile::Setup) -> Result<(String, String)> {
        let links = self.nl.links()?;
        let (rules, shapers, devices) = self.export_parts(&links)?;
        let before = rulefile::render(&rules, &shapers, &devices);
        let wanted = Self::plan_setup(&links, setup)?;
        let rules = Self::named(&links, wanted);
        // A shaper that leaves its device to imq keeps the one it has.
        let wanted_shapers: Vec<Shaper> = setup
            .shapers
            .iter()
            .map(|(_, s)| Shaper {
                dev: s
                    .dev
                    .or_else(|| shapers.iter().find(|o| o.interface == s.interface).and_then(|o| o.dev)),
                ..s.clone()
            })
            .collect();
        Ok((before, rulefile::render(&rules, &wanted_shapers, &setup.devices)))
    }

    /// Every rule and shaper, in the rule file format of `apply`.
    pub fn export(&mut self) -> Result<String> {
        let links = self.nl.links()?;
        let (rules, shapers, devices) = self.export_parts(&links)?;
        Ok(rulefile::render(&rules, &shapers, &devices))
    }

    /// What `export` prints: the rules (but the shapers'), the shapers, the devices.
    fn export_parts(&mut self, links: &[netlink::Link]) -> Result<ExportParts> {
        let (rules, devices) = match State::open(self.bpffs())? {
            Some(mut state) => (state.rules()?, Self::device_entries(&state)?),
            None => (Vec::new(), Vec::new()),
        };
        let found = self.find_shapers(links, &self.all_qdiscs()?, &rules)?;
        let (base, shapers) = Self::split(links, &rules, &found);
        Ok((Self::named(links, base), shapers, devices))
    }

    /// Rules with the names of their interfaces, in the order `export` writes them.
    fn named(links: &[netlink::Link], mut rules: Vec<Rule>) -> Vec<(String, Rule)> {
        rules.sort_by_key(|r| (r.ifindex, r.direction, r.prio));
        rules
            .into_iter()
            .filter_map(|r| Some((links.iter().find(|l| l.index == r.ifindex)?.name.clone(), r)))
            .collect()
    }

    pub fn show(&mut self) -> Result<Status> {
        let links = self.nl.links()?;
        let qdiscs = self.all_qdiscs()?;
        let by_index = |i: u32| links.iter().find(|l| l.index == i);
        let stats_of = |i: u32| {
            let mut list: Vec<&netlink::Qdisc> = qdiscs.get(&i).map(|v| v.iter().collect()).unwrap_or_default();
            list.sort_by_key(|q| (q.parent != netlink::TC_H_ROOT, q.handle));
            list.into_iter().map(|q| q.stats.clone()).collect::<Vec<_>>()
        };
        let mut status = Status::default();
        for l in links.iter().filter(|l| l.is_ifb() && l.name.parse::<DevName>().is_ok()) {
            status.devices.push(DeviceStatus {
                name: l.name.clone(),
                ifindex: l.index,
                state: if l.up { "up" } else { "down" },
                txqueuelen: l.txqueuelen,
                queues: l.queues,
                qdiscs: stats_of(l.index),
            });
        }
        let Some(mut state) = State::open(self.bpffs())? else {
            status.shapers = self.shaper_status(&links, &qdiscs, &[])?;
            return Ok(status);
        };
        status.tracks_device_state = state.tracks_device_state();
        let rules = state.rules()?;
        let mut filters = HashMap::new();
        for (id, r) in &rules {
            let iface = by_index(r.ifindex);
            let tcx = r.direction == Direction::Ingress && state.is_attached(Direction::Ingress, r.ifindex);
            let hook = match iface {
                None => "",
                Some(_) if tcx => "tcx",
                Some(_) => {
                    let list = match filters.entry(r.ifindex) {
                        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::hash_map::Entry::Vacant(e) => e.insert(self.nl.filters(r.ifindex)?),
                    };
                    let filter = Filter {
                        direction: r.direction,
                        dev: r.dev.0,
                    };
                    if list.contains(&filter) { "clsact" } else { "" }
                }
            };
            let c = state.counters(*id)?;
            status.rules.push(RuleStatus {
                interface: iface.map_or_else(|| format!("(gone, ifindex {})", r.ifindex), |l| l.name.clone()),
                ifindex: r.ifindex,
                direction: r.direction,
                prio: r.prio,
                dev: r.dev.to_string(),
                matches: r.matches,
                actions: r.actions,
                attached: !hook.is_empty(),
                hook,
                packets: c.packets,
                bytes: c.bytes,
            });
        }
        let mut targeted: Vec<DevName> = rules.iter().map(|(_, r)| r.dev).collect();
        targeted.sort_unstable();
        targeted.dedup();
        for dev in targeted {
            let name = dev.to_string();
            let table = state.device(dev.0)?;
            match status.devices.iter_mut().find(|d| d.name == name) {
                // Re-created behind imq's back: the rules still point at the old
                // ifindex, so its traffic passes unshaped until `imqctl dev add`.
                Some(d) if d.ifindex != table.ifindex => d.state = "stale",
                // Down and imq does not know: what the rules select is dropped.
                Some(d) if d.state == "down" && table.flags & DEVICE_DOWN == 0 => d.state = "down-dropping",
                // Up and imq does not know (or a change was cut short before it sent
                // traffic there): what the rules select passes unshaped.
                Some(d) if d.state == "up" && table.flags & DEVICE_DOWN != 0 => d.state = "up-bypassed",
                Some(_) => {}
                None => status.devices.push(DeviceStatus {
                    name,
                    ifindex: 0,
                    state: "missing",
                    txqueuelen: 0,
                    queues: 0,
                    qdiscs: Vec::new(),
                }),
            }
        }
        status.shapers = self.shaper_status(&links, &qdiscs, &rules)?;
        status.devices.sort_by_key(|d| d.name.parse::<DevName>().ok());
        status
            .rules
            .sort_by(|a, b| (&a.interface, a.direction, a.prio).cmp(&(&b.interface, b.direction, b.prio)));
        Ok(status)
    }

    fn shaper_status(
        &self,
        links: &[Link],
        qdiscs: &shaping::Qdiscs,
        rules: &[(u32, Rule)],
    ) -> Result<Vec<ShaperStatus>> {
        Ok(self
            .find_shapers(links, qdiscs, rules)?
            .into_iter()
            .map(|f| ShaperStatus {
                upload: f
                    .shaper
                    .up
                    .and_then(|_| qdiscs.get(&f.ifindex)?.iter().find(|q| q.parent == netlink::TC_H_ROOT))
                    .map(|q| q.stats.clone()),
                shaper: f.shaper,
            })
            .collect())
    }

    /// Creates imq device `dev` with `txqueuelen` and `queues` TX queues (default
    /// one), or adopts it if it exists (with as many queues, when given: they are
    /// fixed when a device is created). Returns whether it was created.
    pub fn dev_add(&mut self, dev: DevName, txqueuelen: u32, queues: Option<u32>) -> Result<bool> {
        if txqueuelen == 0 {
            return Err(Error::InvalidTxQueueLen(txqueuelen));
        }
        let locked = State::lock(self.bpffs())?;
        let (link, created) = match self.existing_dev(dev)? {
            Some(l) if queues.is_some_and(|q| q != l.queues) => {
                return Err(Error::QueuesDiffer {
                    dev: l.name,
                    has: l.queues,
                    wanted: queues.unwrap_or(1),
                });
            }
            Some(l) => {
                netlink::prepare_imq_device(&l.name);
                (l, false)
            }
            None => (
                self.nl.add_ifb(&dev.to_string(), txqueuelen, queues.unwrap_or(1))?,
                true,
            ),
        };
        // Rules that already name this device start using it now; their filters are
        // re-pointed at it (mirred forgets a device that was deleted).
        if let Some(mut state) = locked.open()? {
            let links = self.nl.links()?;
            let rules = state.rules()?;
            self.adopt_device(&mut state, &links, &rules, dev, link.index)?;
        }
        Ok(created)
    }

    pub fn dev_del(&mut self, dev: DevName) -> Result<()> {
        let name = dev.to_string();
        let locked = State::lock(self.bpffs())?;
        let link = self
            .existing_dev(dev)?
            .ok_or_else(|| Error::NoSuchDevice(name.clone()))?;
        if let Some(mut state) = locked.open()? {
            let rules = state.rules()?.iter().filter(|(_, r)| r.dev == dev).count();
            if rules > 0 {
                return Err(Error::DeviceInUse { dev: name, rules });
            }
            state.set_device(dev.0, 0, true, 0)?;
        }
        self.nl.del_link(link.index)
    }

    /// Removes every rule and program imq attached in this namespace, every shaper
    /// with its qdiscs and device, and the qdiscs of `[[device]]` setups. Other imq
    /// devices stay, with the user's own qdiscs. Returns the number of rules removed.
    pub fn flush(&mut self) -> Result<usize> {
        let links = self.nl.links()?;
        let Some(mut state) = State::open(self.bpffs())? else {
            // Upload-only shapers need no rule.
            for f in self.find_shapers(&links, &self.all_qdiscs()?, &[])? {
                self.nl.del_root_qdisc(f.ifindex)?;
            }
            return Ok(0);
        };
        let rules = state.rules()?;
        for f in self.find_shapers(&links, &self.all_qdiscs()?, &rules)? {
            if f.shaper.up.is_some() {
                self.nl.del_root_qdisc(f.ifindex)?;
            }
            if let Some(dev) = f
                .shaper
                .dev
                .and_then(|d| links.iter().find(|l| l.name == d.to_string()))
            {
                self.nl.del_link(dev.index)?;
            }
        }
        for need in needs(&Self::without_gone(&links, &rules), self.tcx) {
            // TCX links go with the state's pins.
            if let Need::Filter {
                ifindex,
                direction,
                dev,
            } = need
            {
                self.nl.del_filter(ifindex, Filter { direction, dev: dev.0 })?;
            }
        }
        // `[[device]]` setups: their qdiscs go, their devices stay (like any imq
        // device's).
        for (_, setup) in state.device_setups()? {
            if links.iter().any(|l| l.index == setup.ifindex) {
                self.nl.del_root_qdisc(setup.ifindex)?;
            }
        }
        state.destroy()?;
        Ok(rules.len())
    }
}

/// Whether a link may carry rules: Ethernet, and not an imq or other ifb device.
fn check_source(link: &Link) -> Result<()> {
    let name = &link.name;
    if link.is_ifb() {
        return Err(if name.parse::<DevName>().is_ok() {
            Error::ImqAsInterface(name.to_owned())
        } else {
            Error::IfbAsInterface(name.to_owned())
        });
    }
    if name.parse::<DevName>().is_ok() {
        return Err(Error::ImqAsInterface(name.to_owned()));
    }
    if !link.is_ether {
        return Err(Error::NotEthernet {
            name: name.to_owned(),
            link_type: link.link_type.clone(),
        });
    }
    Ok(())
}
