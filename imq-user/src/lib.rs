//! imq control plane: attach, detach and inspect the TC programs that queue selected
//! packets in imq (ifb) devices.
//!
//! Every operation validates all of its input and plans its whole change before it
//! touches the kernel; a refused operation changes nothing.

mod btf;
pub mod error;
pub mod netlink;
pub mod rule;
mod state;
mod sys;

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    path::PathBuf,
};

use imq_common::{DEVICE_DOWN, RuleSet};

use serde::Serialize;

pub use crate::error::{Error, Result};
use crate::{
    netlink::{Link, Netlink},
    rule::{DevName, Direction, Directions, Insert, Mark},
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
    pub mark: Option<Mark>,
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
    /// not told: `imqctl dev add` fixes that); `missing` (deleted: its traffic passes
    /// unshaped); `stale` (re-created outside imqctl: passes unshaped until
    /// `imqctl dev add`).
    pub state: &'static str,
    pub txqueuelen: u32,
}

/// One rule, as `show` reports it.
#[derive(Clone, Debug, Serialize)]
pub struct RuleStatus {
    pub interface: String,
    pub ifindex: u32,
    pub direction: Direction,
    pub prio: u32,
    pub dev: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mark: Option<Mark>,
    /// Whether the program is attached to the interface (false if it has gone).
    pub attached: bool,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    pub devices: Vec<DeviceStatus>,
    pub rules: Vec<RuleStatus>,
    /// Whether imq follows its devices going down and up by itself. Without it, after
    /// `ip link set imqN down` run `imqctl dev add imqN` so that imq passes that
    /// device's traffic instead of sending it into a device that drops it.
    pub tracks_device_state: bool,
}

/// The control plane of one network namespace: the one imqctl runs in.
pub struct Imq {
    opts: Options,
    nl: Netlink,
}

impl Imq {
    /// Checks privileges and kernel support; changes nothing.
    pub fn new(opts: Options) -> Result<Self> {
        sys::check_privileges()?;
        sys::check_tcx()?;
        Ok(Self {
            opts,
            nl: Netlink::new()?,
        })
    }

    fn bpffs(&self) -> Option<&std::path::Path> {
        self.opts.bpffs.as_deref()
    }

    /// The interface a rule may sit on: Ethernet, and not an imq or other ifb device.
    fn source_interface(&self, name: &str) -> Result<Link> {
        let link = self
            .nl
            .link_by_name(name)?
            .ok_or_else(|| Error::NoSuchInterface(name.to_owned()))?;
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
                link_type: link.link_type,
            });
        }
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

    pub fn attach(&mut self, req: &AttachRequest) -> Result<Attached> {
        let link = self.source_interface(&req.interface)?;
        // Whether the device exists is decided under the lock: two attaches at once
        // must not both set out to create it.
        let locked = State::lock(self.bpffs())?;
        let dev_link = self.existing_dev(req.dev)?;

        // Plan every direction before changing anything.
        let mut state = locked.open_or_create()?;
        let directions: Vec<Direction> = req.directions.iter().collect();
        let ids = state.free_rule_ids(directions.len())?;
        let mut plans = Vec::new();
        for (&direction, id) in directions.iter().zip(ids) {
            let old = state.rule_set(link.index, direction)?;
            match rule::insert(&old, &link.name, direction, req.mark, req.dev, req.prio, id)? {
                Insert::Unchanged => {}
                Insert::Changed(new) => plans.push((direction, old, *new, id)),
            }
        }
        if plans.is_empty() {
            // Repairs hooks whose program or filter was removed behind our back.
            for &direction in &directions {
                self.hook_up(&mut state, direction, &link, req.dev)?;
            }
            return Ok(Attached::Unchanged);
        }

        // Everything is decided; from here on, undo what was done if a step fails.
        self.prune_gone(&mut state)?;
        let created_dev = dev_link.is_none();
        let dev_link = match dev_link {
            Some(l) => {
                if !l.up {
                    self.nl.set_up(l.index)?;
                }
                l
            }
            None => self.nl.add_ifb(&req.dev.to_string(), DEFAULT_TXQUEUELEN)?,
        };
        let mut done = Vec::new();
        let result = (|| {
            state.set_device(req.dev.0, dev_link.index, true)?;
            for (direction, old, new, id) in &plans {
                state.reset_counters(*id)?;
                done.push((*direction, *old));
                // The hook first: it selects nothing until the new rules are in.
                self.hook_up(&mut state, *direction, &link, req.dev)?;
                state.set_rule_set(link.index, *direction, new)?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            for (direction, old) in done {
                let _ = state.set_rule_set(link.index, direction, &old);
                let _ = self.hook_down(&mut state, direction, link.index, &old, req.dev);
            }
            if created_dev {
                let _ = self.nl.del_link(dev_link.index);
            }
            return Err(e);
        }
        Ok(Attached::Added { created_dev })
    }

    /// Forgets the rules of interfaces that no longer exist. Rules belong to an
    /// interface instance (its ifindex): when it is deleted the kernel drops its TCX
    /// links and tc filters, and what is left here are rules nothing can name and
    /// counter slots in use. Mutating commands call this once their own input has been
    /// accepted, so a refused command still changes nothing. Returns the rules removed.
    fn prune_gone(&self, state: &mut State) -> Result<usize> {
        let links = self.nl.links()?;
        let mut removed = 0;
        for (key, set) in state.all_rule_sets()? {
            if links.iter().any(|l| l.index == key.ifindex) {
                continue;
            }
            let Some(direction) = Direction::from_raw(key.direction) else {
                continue;
            };
            state.set_rule_set(key.ifindex, direction, &RuleSet::empty())?;
            state.detach(direction, key.ifindex)?;
            removed += set.as_slice().len();
        }
        Ok(removed)
    }

    /// Makes sure the hook can send packets to `dev`: on ingress, the TCX program is
    /// attached to the interface; on egress, the interface has a clsact qdisc and the
    /// filter whose mirred action redirects to `dev`.
    fn hook_up(&self, state: &mut State, direction: Direction, link: &Link, dev: DevName) -> Result<()> {
        match direction {
            Direction::Ingress => state.attach_ingress(&link.name, link.index),
            Direction::Egress => {
                let dev_ifindex = state.device(dev.0)?.ifindex;
                self.nl.ensure_clsact(link.index, &link.name)?;
                let prog = state.program(Direction::Egress)?;
                let fd = prog.fd().map_err(|e| Error::bpf("program fd", e))?;
                let fd = fd.as_fd().as_raw_fd() as u32;
                self.nl.replace_egress_filter(link.index, fd, dev.0, dev_ifindex)
            }
        }
    }

    /// Undoes [`Self::hook_up`] for what the hook's rule set `set` no longer needs:
    /// the egress filter of `dev` when no rule sends there, the ingress program when
    /// the set is empty.
    fn hook_down(
        &self,
        state: &mut State,
        direction: Direction,
        ifindex: u32,
        set: &RuleSet,
        dev: DevName,
    ) -> Result<()> {
        match direction {
            Direction::Ingress if set.len == 0 => state.detach(direction, ifindex),
            Direction::Ingress => Ok(()),
            Direction::Egress if set.as_slice().iter().any(|r| r.dev == dev.0) => Ok(()),
            Direction::Egress => self.nl.del_egress_filter(ifindex, dev.0),
        }
    }

    /// Removes the rules of `interface` in `directions` (only those with `mark` if
    /// given); an interface left without rules in a direction is detached there.
    /// Returns how many rules were removed.
    pub fn detach(&mut self, interface: &str, directions: Directions, mark: Option<Mark>) -> Result<usize> {
        let link = self
            .nl
            .link_by_name(interface)?
            .ok_or_else(|| Error::NoSuchInterface(interface.to_owned()))?;
        let none = || Error::NoSuchRule {
            iface: interface.to_owned(),
            direction: directions.as_str().to_owned(),
            mark,
        };
        let mut state = State::open(self.bpffs())?.ok_or_else(none)?;
        let mut plan = Vec::new();
        for direction in directions.iter() {
            let (new, removed) = rule::remove(&state.rule_set(link.index, direction)?, mark);
            if !removed.is_empty() {
                plan.push((direction, new, removed));
            }
        }
        if plan.is_empty() {
            return Err(none());
        }
        self.prune_gone(&mut state)?;
        let mut count = 0;
        for (direction, new, removed) in plan {
            // Rules first: from then on the hook selects nothing for what was removed.
            state.set_rule_set(link.index, direction, &new)?;
            for r in &removed {
                self.hook_down(&mut state, direction, link.index, &new, DevName(r.dev))?;
            }
            count += removed.len();
        }
        Ok(count)
    }

    pub fn show(&mut self) -> Result<Status> {
        let links = self.nl.links()?;
        let by_index = |i: u32| links.iter().find(|l| l.index == i);
        let mut status = Status::default();
        for l in links.iter().filter(|l| l.is_ifb() && l.name.parse::<DevName>().is_ok()) {
            status.devices.push(DeviceStatus {
                name: l.name.clone(),
                ifindex: l.index,
                state: if l.up { "up" } else { "down" },
                txqueuelen: l.txqueuelen,
            });
        }
        let Some(mut state) = State::open(self.bpffs())? else {
            return Ok(status);
        };
        status.tracks_device_state = state.tracks_device_state();
        let mut targeted = Vec::new();
        for (key, set) in state.all_rule_sets()? {
            let Some(direction) = Direction::from_raw(key.direction) else {
                continue;
            };
            let iface = by_index(key.ifindex);
            let filters = match direction {
                Direction::Egress if iface.is_some() => self.nl.egress_filters(key.ifindex)?,
                _ => Vec::new(),
            };
            for r in set.as_slice() {
                let c = state.counters(r.id)?;
                targeted.push(r.dev);
                let attached = iface.is_some()
                    && match direction {
                        Direction::Ingress => state.is_attached(direction, key.ifindex),
                        Direction::Egress => filters.contains(&r.dev),
                    };
                status.rules.push(RuleStatus {
                    interface: iface.map_or_else(|| format!("(gone, ifindex {})", key.ifindex), |l| l.name.clone()),
                    ifindex: key.ifindex,
                    direction,
                    prio: r.prio,
                    dev: DevName(r.dev).to_string(),
                    mark: rule::mark_of(r),
                    attached,
                    packets: c.packets,
                    bytes: c.bytes,
                });
            }
        }
        targeted.sort_unstable();
        targeted.dedup();
        for dev in targeted {
            let name = DevName(dev).to_string();
            let table = state.device(dev)?;
            match status.devices.iter_mut().find(|d| d.name == name) {
                // Re-created behind imq's back: the rules still point at the old
                // ifindex, so its traffic passes unshaped until `imqctl dev add`.
                Some(d) if d.ifindex != table.ifindex => d.state = "stale",
                // Down and imq does not know: what the rules select is dropped.
                Some(d) if d.state == "down" && table.flags & DEVICE_DOWN == 0 => d.state = "down-dropping",
                Some(_) => {}
                None => status.devices.push(DeviceStatus {
                    name,
                    ifindex: 0,
                    state: "missing",
                    txqueuelen: 0,
                }),
            }
        }
        status.devices.sort_by_key(|d| d.name.parse::<DevName>().ok());
        status
            .rules
            .sort_by(|a, b| (&a.interface, a.direction, a.prio).cmp(&(&b.interface, b.direction, b.prio)));
        Ok(status)
    }

    /// Creates an imq device (or adopts an existing ifb of that name). Returns whether
    /// it was created.
    pub fn dev_add(&mut self, dev: DevName, txqueuelen: u32) -> Result<bool> {
        if txqueuelen == 0 {
            return Err(Error::InvalidTxQueueLen(txqueuelen));
        }
        let locked = State::lock(self.bpffs())?;
        let (link, created) = match self.existing_dev(dev)? {
            Some(l) => (l, false),
            None => (self.nl.add_ifb(&dev.to_string(), txqueuelen)?, true),
        };
        // Rules that already name this device start using it now; egress filters are
        // re-pointed at it (mirred forgets a device that was deleted).
        if let Some(mut state) = locked.open()? {
            state.set_device(dev.0, link.index, link.up)?;
            for (key, set) in state.all_rule_sets()? {
                if key.direction != Direction::Egress.to_raw() || !set.as_slice().iter().any(|r| r.dev == dev.0) {
                    continue;
                }
                if let Some(iface) = self.nl.link_by_index(key.ifindex)? {
                    self.hook_up(&mut state, Direction::Egress, &iface, dev)?;
                }
            }
        }
        Ok(created)
    }

    pub fn dev_del(&mut self, dev: DevName) -> Result<()> {
        let name = dev.to_string();
        let locked = State::lock(self.bpffs())?;
        let link = self
            .existing_dev(dev)?
            .ok_or_else(|| Error::NoSuchDevice(name.clone()))?;
        let mut state = locked.open()?;
        if let Some(state) = state.as_mut() {
            let rules = state
                .all_rule_sets()?
                .iter()
                .flat_map(|(_, s)| {
                    s.as_slice()
                        .iter()
                        .filter(|r| r.dev == dev.0)
                        .copied()
                        .collect::<Vec<_>>()
                })
                .count();
            if rules > 0 {
                return Err(Error::DeviceInUse { dev: name, rules });
            }
            state.set_device(dev.0, 0, true)?;
        }
        self.nl.del_link(link.index)
    }

    /// Removes every rule and program imq attached in this namespace. Devices stay:
    /// they carry the user's qdiscs. Returns the number of rules removed.
    pub fn flush(&mut self) -> Result<usize> {
        let Some(mut state) = State::open(self.bpffs())? else {
            return Ok(0);
        };
        let sets = state.all_rule_sets()?;
        let mut filters: Vec<(u32, u32)> = sets
            .iter()
            .filter(|(key, _)| key.direction == Direction::Egress.to_raw())
            .flat_map(|(key, set)| set.as_slice().iter().map(|r| (key.ifindex, r.dev)))
            .collect();
        filters.sort_unstable();
        filters.dedup();
        for (ifindex, dev) in filters {
            self.nl.del_egress_filter(ifindex, dev)?;
        }
        let rules = sets.iter().map(|(_, s)| s.as_slice().len()).sum();
        state.destroy()?;
        Ok(rules)
    }
}
