//! imq's kernel state, pinned in bpffs so the data path outlives imqctl:
//!
//! ```text
//! <bpffs>/imq/                      lock for every imqctl on the host
//! <bpffs>/imq/net-<cookie>/         one network namespace (SO_NETNS_COOKIE)
//!     imq_rules imq_devices imq_counters    maps
//!     prog_ingress                          the loaded TC program
//!     link_ingress_<ifindex>                TCX link of one interface
//! ```

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::TcAttachOptions,
    },
};
use imq_common::{
    COUNTERS_MAP, Counters, DEVICES_MAP, Device, EGRESS_PROG, HookKey, INGRESS_PROG, MAX_RULE_IDS, RULES_MAP, RuleSet,
};

use crate::{
    error::{Error, Result},
    rule::Direction,
    sys,
};

pub(crate) struct State {
    dir: PathBuf,
    ebpf: Ebpf,
    _lock: sys::Lock,
}

const PROG_INGRESS: &str = "prog_ingress";
const PROG_EGRESS: &str = "prog_egress";
const LINK_PREFIX: &str = "link_";

fn link_pin_name(direction: Direction, ifindex: u32) -> String {
    format!("{LINK_PREFIX}{direction}_{ifindex}")
}

/// The directory and the lock for this network namespace, without creating anything.
fn locate(bpffs: Option<&Path>) -> Result<(PathBuf, sys::Lock)> {
    let root = sys::find_bpffs(bpffs)?.join("imq");
    match fs::create_dir(&root) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io(format!("create {}", root.display()), e)),
    }
    let lock = sys::Lock::exclusive(&root)?;
    Ok((root.join(format!("net-{}", sys::netns_cookie()?)), lock))
}

impl State {
    /// Opens the state of this namespace; `None` if imq has none here yet.
    pub fn open(bpffs: Option<&Path>) -> Result<Option<Self>> {
        let (dir, lock) = locate(bpffs)?;
        if !dir.join(RULES_MAP).exists() {
            return Ok(None);
        }
        Self::load(dir, lock).map(Some)
    }

    /// Opens the state of this namespace, creating it if needed.
    pub fn open_or_create(bpffs: Option<&Path>) -> Result<Self> {
        let (dir, lock) = locate(bpffs)?;
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io(format!("create {}", dir.display()), e)),
        }
        Self::load(dir, lock)
    }

    fn load(dir: PathBuf, lock: sys::Lock) -> Result<Self> {
        let (rules, devices, counters) = (dir.join(RULES_MAP), dir.join(DEVICES_MAP), dir.join(COUNTERS_MAP));
        // Pinned maps are reused as they are; missing ones are created and pinned.
        let ebpf = EbpfLoader::new()
            .map_pin_path(RULES_MAP, rules.as_path())
            .map_pin_path(DEVICES_MAP, devices.as_path())
            .map_pin_path(COUNTERS_MAP, counters.as_path())
            .load(crate::EBPF_OBJECT)
            .map_err(|e| Error::bpf("load imq object", e))?;
        Ok(Self { dir, ebpf, _lock: lock })
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| Error::Bpf(format!("map {name} missing from the object")))
    }

    fn rules_map(&mut self) -> Result<HashMap<&mut MapData, HookKey, RuleSet>> {
        HashMap::try_from(self.map_mut(RULES_MAP)?).map_err(|e| Error::bpf(RULES_MAP, e))
    }

    pub fn rule_set(&mut self, ifindex: u32, direction: Direction) -> Result<RuleSet> {
        let key = HookKey {
            ifindex,
            direction: direction.to_raw(),
        };
        match self.rules_map()?.get(&key, 0) {
            Ok(set) => Ok(set),
            Err(aya::maps::MapError::KeyNotFound) => Ok(RuleSet::empty()),
            Err(e) => Err(Error::bpf("read rules", e)),
        }
    }

    /// Every hook with rules, with its rules.
    pub fn all_rule_sets(&mut self) -> Result<Vec<(HookKey, RuleSet)>> {
        self.rules_map()?
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::bpf("read rules", e))
    }

    /// Replaces a hook's rule set in one map update (the data path sees the old or the
    /// new set); an empty set removes the hook's entry.
    pub fn set_rule_set(&mut self, ifindex: u32, direction: Direction, set: &RuleSet) -> Result<()> {
        let key = HookKey {
            ifindex,
            direction: direction.to_raw(),
        };
        let mut map = self.rules_map()?;
        if set.len == 0 {
            match map.remove(&key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                Err(e) => Err(Error::bpf("remove rules", e)),
            }
        } else {
            map.insert(key, set, 0).map_err(|e| Error::bpf("write rules", e))
        }
    }

    /// The `n` lowest counter slots no rule uses.
    pub fn free_rule_ids(&mut self, n: usize) -> Result<Vec<u32>> {
        let mut used = vec![false; MAX_RULE_IDS as usize];
        for (_, set) in self.all_rule_sets()? {
            for r in set.as_slice() {
                if let Some(u) = used.get_mut(r.id as usize) {
                    *u = true;
                }
            }
        }
        let free: Vec<u32> = (0..MAX_RULE_IDS).filter(|&i| !used[i as usize]).take(n).collect();
        if free.len() < n {
            return Err(Error::NoFreeRuleId(MAX_RULE_IDS));
        }
        Ok(free)
    }

    /// The device table's entry for imq device `dev` (0: none).
    pub fn device(&mut self, dev: u32) -> Result<u32> {
        self.devices_map()?
            .get(&dev, 0)
            .map(|d| d.ifindex)
            .map_err(|e| Error::bpf("read device table", e))
    }

    fn counters_map(&mut self) -> Result<PerCpuArray<&mut MapData, Counters>> {
        PerCpuArray::try_from(self.map_mut(COUNTERS_MAP)?).map_err(|e| Error::bpf(COUNTERS_MAP, e))
    }

    pub fn reset_counters(&mut self, id: u32) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| Error::io(what, e))?;
        let zero =
            PerCpuValues::try_from(vec![Counters::default(); cpus]).map_err(|e| Error::io("per-CPU values", e))?;
        self.counters_map()?
            .set(id, zero, 0)
            .map_err(|e| Error::bpf("reset counters", e))
    }

    /// A rule's counters, summed over CPUs.
    pub fn counters(&mut self, id: u32) -> Result<Counters> {
        let per_cpu = self
            .counters_map()?
            .get(&id, 0)
            .map_err(|e| Error::bpf("read counters", e))?;
        Ok(per_cpu.iter().fold(Counters::default(), |a, c| Counters {
            packets: a.packets + c.packets,
            bytes: a.bytes + c.bytes,
        }))
    }

    fn devices_map(&mut self) -> Result<Array<&mut MapData, Device>> {
        Array::try_from(self.map_mut(DEVICES_MAP)?).map_err(|e| Error::bpf(DEVICES_MAP, e))
    }

    /// Points imq device number `dev` at `ifindex` (0: no device, pass unshaped).
    pub fn set_device(&mut self, dev: u32, ifindex: u32) -> Result<()> {
        self.devices_map()?
            .set(dev, Device { ifindex, _reserved: 0 }, 0)
            .map_err(|e| Error::bpf("write device table", e))
    }

    /// The pinned program of a direction, loaded and pinned on first use.
    pub fn program(&mut self, direction: Direction) -> Result<SchedClassifier> {
        let (name, pin) = match direction {
            Direction::Ingress => (INGRESS_PROG, self.dir.join(PROG_INGRESS)),
            Direction::Egress => (EGRESS_PROG, self.dir.join(PROG_EGRESS)),
        };
        if !pin.exists() {
            let prog: &mut SchedClassifier = self
                .ebpf
                .program_mut(name)
                .ok_or_else(|| Error::Bpf(format!("program {name} missing from the object")))?
                .try_into()
                .map_err(|e| Error::bpf("program type", e))?;
            prog.load().map_err(|e| Error::bpf(&format!("load {name}"), e))?;
            prog.pin(&pin).map_err(|e| Error::bpf(&format!("pin {name}"), e))?;
        }
        SchedClassifier::from_pin(&pin).map_err(|e| Error::bpf("open pinned program", e))
    }

    pub fn is_attached(&self, direction: Direction, ifindex: u32) -> bool {
        self.dir.join(link_pin_name(direction, ifindex)).exists()
    }

    /// Attaches the program to the interface's TCX hook (after the programs already
    /// there) and pins the link, unless that was done before.
    pub fn attach(&mut self, direction: Direction, ifname: &str, ifindex: u32) -> Result<()> {
        if self.is_attached(direction, ifindex) {
            return Ok(());
        }
        // Egress goes through cls_bpf + mirred (see imq_egress), not a TCX link.
        if direction == Direction::Egress {
            return Err(Error::Bpf("egress is attached with a tc filter, not a TCX link".into()));
        }
        let (mut prog, attach_type) = (self.program(direction)?, TcAttachType::Ingress);
        let id = prog
            .attach_with_options(ifname, attach_type, TcAttachOptions::TcxOrder(LinkOrder::default()))
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
        for (key, _) in self.all_rule_sets()? {
            let direction = Direction::from_raw(key.direction).unwrap_or(Direction::Ingress);
            self.set_rule_set(key.ifindex, direction, &RuleSet::empty())?;
        }
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
            fs::remove_file(&path).map_err(|e| Error::io(format!("remove {}", path.display()), e))?;
        }
        fs::remove_dir(&self.dir).map_err(|e| Error::io(format!("remove {}", self.dir.display()), e))
    }
}
