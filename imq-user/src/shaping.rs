//! Setting up and taking down WAN shapers ([`crate::shaper`]) together with the
//! rules, as one change: `shape`, `unshape` and `apply` all end in [`Imq::converge`].

use std::collections::{BTreeSet, HashMap};

use crate::{
    Imq, check_source,
    error::{Error, Result},
    free_ids,
    netlink::{self, Link, Qdisc, TC_H_ROOT},
    rule::{DevName, Direction, Rule},
    shaper::{self, LEAF_MAJOR, SHAPER_MAJOR, SHAPER_PRIO, Shaper, ShaperQdisc},
    state::State,
};

const SHAPER_ROOT: u32 = (SHAPER_MAJOR as u32) << 16;
const SHAPER_CLASS: u32 = SHAPER_ROOT | 1;

/// A shaper found in the kernel, with the rule that feeds its download side.
#[derive(Clone, Debug)]
pub(crate) struct Found {
    pub shaper: Shaper,
    pub rule: Option<(u32, Rule)>,
    /// ifindex of the interface.
    pub ifindex: u32,
}

/// One side of a shaper as it was before a change (its spec, rate, and whether it
/// is the download), to put back if the change fails; `None`: the kernel's default.
type Before<'a> = Option<(&'a Shaper, shaper::Rate, bool)>;

/// Every qdisc of the namespace, by ifindex.
pub(crate) type Qdiscs = HashMap<u32, Vec<Qdisc>>;

fn root(qdiscs: &Qdiscs, ifindex: u32) -> Option<&Qdisc> {
    qdiscs.get(&ifindex)?.iter().find(|q| q.parent == TC_H_ROOT)
}

/// Whether the root qdisc is one of imq's shapers.
fn is_ours(q: Option<&Qdisc>) -> bool {
    q.is_some_and(|q| q.handle == SHAPER_ROOT)
}

/// A shaper may replace the kernel's default root qdisc (handle 0:) or its own,
/// never one an admin put there.
fn check_root(qdiscs: &Qdiscs, link: &Link) -> Result<()> {
    match root(qdiscs, link.index) {
        Some(q) if q.handle >> 16 != 0 && q.handle != SHAPER_ROOT => Err(Error::QdiscInUse(format!(
            "{} has a root qdisc of its own ({} {}): remove it first (tc qdisc del dev {} root)",
            link.name,
            q.kind,
            netlink::handle_text(q.handle),
            link.name
        ))),
        _ => Ok(()),
    }
}

/// A catch-all ingress rule with no action: what a shaper's download side is.
fn feeds_shaper(r: &Rule) -> bool {
    r.direction == Direction::Ingress && r.matches.is_empty() && r.actions == Default::default()
}

impl Imq {
    pub(crate) fn all_qdiscs(&self) -> Result<Qdiscs> {
        let mut map: Qdiscs = HashMap::new();
        for q in self.nl.qdiscs(0)? {
            map.entry(q.ifindex).or_default().push(q);
        }
        Ok(map)
    }

    /// Reads one side of a shaper from the root qdisc of `ifindex`, if it is one.
    fn read_side(&self, qdiscs: &Qdiscs, ifindex: u32) -> Result<Option<shaper::Side>> {
        let Some(q) = root(qdiscs, ifindex).filter(|q| q.handle == SHAPER_ROOT) else {
            return Ok(None);
        };
        Ok(match q.kind.as_str() {
            "cake" => shaper::read_cake(&q.options),
            "htb" => self
                .nl
                .classes(ifindex)?
                .iter()
                .find(|c| c.handle == SHAPER_CLASS)
                .and_then(|c| shaper::read_htb_class(&c.options)),
            _ => None,
        })
    }

    /// The shapers of this namespace, as the kernel has them.
    pub(crate) fn find_shapers(&self, links: &[Link], qdiscs: &Qdiscs, rules: &[(u32, Rule)]) -> Result<Vec<Found>> {
        let mut found: Vec<Found> = Vec::new();
        for link in links.iter().filter(|l| !l.is_ifb()) {
            let up = self.read_side(qdiscs, link.index)?;
            let mut down = None;
            for (id, r) in rules.iter().filter(|(_, r)| r.ifindex == link.index && feeds_shaper(r)) {
                let Some(dev) = links.iter().find(|l| l.name == r.dev.to_string() && l.is_ifb()) else {
                    continue;
                };
                if let Some(side) = self.read_side(qdiscs, dev.index)? {
                    down = Some(((*id, *r), side));
                    break;
                }
            }
            if up.is_none() && down.is_none() {
                continue;
            }
            // The options are the download's where there is one, else the upload's.
            let mut s = down
                .as_ref()
                .map(|(_, side)| side.shaper.clone())
                .or_else(|| up.as_ref().map(|side| side.shaper.clone()))
                .unwrap_or_default();
            s.interface.clone_from(&link.name);
            s.down = down.as_ref().map(|(_, side)| side.rate);
            s.dev = down.as_ref().map(|((_, r), _)| r.dev);
            s.up = up.as_ref().map(|side| side.rate);
            // ack-filter is an upload option only.
            s.ack_filter = up.as_ref().is_some_and(|side| side.shaper.ack_filter);
            found.push(Found {
                shaper: s,
                rule: down.map(|(rule, _)| rule),
                ifindex: link.index,
            });
        }
        Ok(found)
    }

    /// Makes `ifindex`'s root qdisc the shaper's, for one direction. On failure the
    /// root is as it was, or the kernel's default if it was not a shaper's.
    fn set_root(&self, qdiscs: &Qdiscs, ifindex: u32, spec: &Shaper, rate: shaper::Rate, ingress: bool) -> Result<()> {
        let current = root(qdiscs, ifindex).filter(|q| q.handle == SHAPER_ROOT);
        let had_nat =
            current.is_some_and(|q| q.kind == "cake" && shaper::read_cake(&q.options).is_some_and(|s| s.shaper.nat));
        let kind = match spec.qdisc {
            ShaperQdisc::Cake => "cake",
            ShaperQdisc::FqCodel => "htb",
        };
        // A qdisc cannot change its kind in place.
        let fresh = current.is_none_or(|q| q.kind != kind);
        if current.is_some() && fresh {
            self.nl.del_root_qdisc(ifindex)?;
        }
        let missing = |kind: &str, e: std::io::Error| {
            if e.raw_os_error() == Some(libc::ENOENT) {
                let have = shaper::available_qdiscs();
                let mut available = String::new();
                if !have.is_empty() {
                    available = format!("; qdiscs it has: {}", have.join(", "));
                    if kind == "cake" && have.iter().any(|k| k == "fq_codel") && have.iter().any(|k| k == "htb") {
                        available.push_str(" (try --qdisc fq_codel)");
                    }
                }
                Error::NoQdisc {
                    kind: kind.to_owned(),
                    available,
                }
            } else {
                Error::Netlink(format!("set up {kind}: {e}"))
            }
        };
        let result = match spec.qdisc {
            ShaperQdisc::Cake => self
                .nl
                .replace_tc(
                    false,
                    ifindex,
                    TC_H_ROOT,
                    SHAPER_ROOT,
                    "cake",
                    spec.cake_options(rate, ingress, had_nat),
                )
                .map_err(|e| missing("cake", e)),
            ShaperQdisc::FqCodel => (|| {
                if fresh {
                    self.nl
                        .replace_tc(
                            false,
                            ifindex,
                            TC_H_ROOT,
                            SHAPER_ROOT,
                            "htb",
                            Shaper::htb_qdisc_options(),
                        )
                        .map_err(|e| missing("htb", e))?;
                }
                self.nl
                    .replace_tc(
                        true,
                        ifindex,
                        SHAPER_ROOT,
                        SHAPER_CLASS,
                        "htb",
                        spec.htb_class_options(rate),
                    )
                    .map_err(|e| missing("htb", e))?;
                if fresh {
                    self.nl
                        .replace_tc(
                            false,
                            ifindex,
                            SHAPER_CLASS,
                            u32::from(LEAF_MAJOR) << 16,
                            "fq_codel",
                            Vec::new(),
                        )
                        .map_err(|e| missing("fq_codel", e))?;
                }
                Ok(())
            })(),
        };
        if result.is_err() && fresh {
            let _ = self.nl.del_root_qdisc(ifindex);
        }
        result
    }

    /// Puts a shaper side back as it was before a failed change: the old shaper's
    /// qdisc, or the kernel's default.
    fn restore_root(&self, qdiscs: &Qdiscs, ifindex: u32, old: Before<'_>) {
        match old {
            Some((spec, rate, ingress)) => {
                let _ = self.set_root(qdiscs, ifindex, spec, rate, ingress);
            }
            None => {
                let _ = self.nl.del_root_qdisc(ifindex);
            }
        }
    }

    /// Moves the namespace to `base` rules plus `shapers` (the whole wanted setup),
    /// from `old` rules and `old_shapers`. Everything is checked first; then the
    /// download qdiscs are set, the rules switched in one step, the upload qdiscs
    /// set, and what only the old setup used is taken down. A failure before the
    /// rules switch undoes what was done. Returns (rules before, rules after).
    pub(crate) fn converge(
        &mut self,
        state: &mut State,
        links: &[Link],
        old: &[(u32, Rule)],
        old_shapers: &[Found],
        base: Vec<Rule>,
        shapers: &[Shaper],
    ) -> Result<crate::Applied> {
        let qdiscs = self.all_qdiscs()?;
        let by_name = |name: &str| {
            links
                .iter()
                .find(|l| l.name == name)
                .ok_or_else(|| Error::NoSuchInterface(name.to_owned()))
        };
        // Plan: each shaper's interface, device and rule.
        let mut wanted = base;
        let mut taken: BTreeSet<DevName> = wanted.iter().map(|r| r.dev).collect();
        let mut seen = BTreeSet::new();
        let mut plans = Vec::new();
        for s in shapers {
            s.validate()?;
            let link = by_name(&s.interface)?;
            check_source(link)?;
            if !seen.insert(link.index) {
                return Err(Error::BadShaper(format!(
                    "{}: two shapers on one interface",
                    s.interface
                )));
            }
            if s.up.is_some() {
                check_root(&qdiscs, link)?;
            }
            let previous = old_shapers.iter().find(|f| f.ifindex == link.index);
            let dev = match s.down {
                None => None,
                Some(_) => {
                    let dev = s.dev.or(previous.and_then(|p| p.shaper.dev)).unwrap_or_else(|| {
                        (0..imq_common::MAX_DEVICES)
                            .map(DevName)
                            .find(|d| {
                                !taken.contains(d)
                                    && !shapers.iter().any(|o| o.dev == Some(*d))
                                    && !links.iter().any(|l| l.name == d.to_string())
                            })
                            .unwrap_or(DevName(0))
                    });
                    if taken.contains(&dev) {
                        return Err(Error::QdiscInUse(format!(
                            "{dev} already receives traffic from other rules: shape {} with --dev of its own",
                            s.interface
                        )));
                    }
                    if let Some(l) = self.existing_dev(dev)? {
                        check_root(&qdiscs, &l)?;
                    }
                    taken.insert(dev);
                    // Last on the hook: the admin's own rules there take their packets first.
                    let on_hook = |r: &&Rule| r.ifindex == link.index && r.direction == Direction::Ingress;
                    if let Some(r) = wanted.iter().filter(on_hook).find(|r| r.matches.is_empty()) {
                        return Err(Error::Conflict {
                            iface: s.interface.clone(),
                            direction: Direction::Ingress,
                            prio: r.prio,
                            dev: r.dev.to_string(),
                        });
                    }
                    let top = wanted.iter().filter(on_hook).map(|r| r.prio).max().unwrap_or(0);
                    wanted.push(Rule {
                        ifindex: link.index,
                        direction: Direction::Ingress,
                        prio: SHAPER_PRIO.max(top.saturating_add(crate::rule::PRIO_STEP)),
                        dev,
                        matches: Default::default(),
                        actions: Default::default(),
                    });
                    Some(dev)
                }
            };
            plans.push((Shaper { dev, ..s.clone() }, link.index));
        }
        if wanted.len() > imq_common::MAX_RULES as usize {
            return Err(Error::TooManyRules(imq_common::MAX_RULES));
        }
        let devs = taken
            .iter()
            .map(|&d| Ok((d, self.existing_dev(d)?)))
            .collect::<Result<Vec<_>>>()?;
        // Rules that stay the same keep their ids and so their counters.
        let old_ids: HashMap<Rule, u32> = old.iter().map(|(id, r)| (*r, *id)).collect();
        let mut new: Vec<(u32, Rule)> = Vec::with_capacity(wanted.len());
        let mut fresh = Vec::new();
        for r in wanted {
            match old_ids.get(&r) {
                Some(id) => new.push((*id, r)),
                None => fresh.push(r),
            }
        }
        let mut used = old.to_vec();
        used.extend(new.iter().copied());
        let ids = free_ids(&used, fresh.len())?;
        new.extend(ids.into_iter().zip(fresh));
        let compiled = self.compile(links, &new)?;

        // Change: devices, download qdiscs, rules.
        let created = self.ensure_devs(state, &devs)?;
        let links = if created.is_empty() {
            links.to_vec()
        } else {
            self.nl.links()?
        };
        let dev_index = |d: DevName| links.iter().find(|l| l.name == d.to_string()).map(|l| l.index);
        let mut touched: Vec<(u32, Before<'_>)> = Vec::new();
        let result = (|| {
            for (s, _) in &plans {
                let (Some(dev), Some(rate)) = (s.dev, s.down) else {
                    continue;
                };
                let index = dev_index(dev).ok_or_else(|| Error::NoSuchDevice(dev.to_string()))?;
                let before = old_shapers
                    .iter()
                    .find(|f| f.shaper.dev == Some(dev))
                    .and_then(|f| Some((&f.shaper, f.shaper.down?, true)));
                touched.push((index, before));
                self.set_root(&qdiscs, index, s, rate, true)?;
            }
            self.transition(state, &links, old, &new, &compiled)
        })();
        if let Err(e) = result {
            for (index, before) in touched {
                self.restore_root(&qdiscs, index, before);
            }
            for index in created {
                let _ = self.nl.del_link(index);
            }
            return Err(e);
        }

        // The rules are switched; the rest cannot be undone as one, so a failure is
        // reported as what it is.
        let after_commit = |e: Error| Error::Netlink(format!("rules applied, but the shapers are not complete: {e}"));
        for (s, ifindex) in &plans {
            match s.up {
                Some(rate) => self.set_root(&qdiscs, *ifindex, s, rate, false).map_err(after_commit)?,
                None if is_ours(root(&qdiscs, *ifindex)) => self.nl.del_root_qdisc(*ifindex).map_err(after_commit)?,
                None => {}
            }
        }
        for f in old_shapers {
            if !plans.iter().any(|(_, i)| *i == f.ifindex) && f.shaper.up.is_some() {
                self.nl.del_root_qdisc(f.ifindex).map_err(after_commit)?;
            }
            // A shaper's device that no rule uses any more goes with it.
            if let Some(dev) = f.shaper.dev
                && !new.iter().any(|(_, r)| r.dev == dev)
                && let Some(index) = dev_index(dev)
            {
                self.nl.del_link(index).map_err(after_commit)?;
                state.set_device(dev.0, 0, true, 0).map_err(after_commit)?;
            }
        }
        let kept = new
            .iter()
            .filter(|(id, r)| old.iter().any(|(i, o)| i == id && o == r))
            .count();
        let name = |i: u32| {
            links
                .iter()
                .find(|l| l.index == i)
                .map_or_else(|| format!("ifindex {i}"), |l| l.name.clone())
        };
        Ok(crate::Applied {
            rules: new.len(),
            rules_added: new.len() - kept,
            rules_removed: old.len() - kept,
            shapers: plans.len(),
            shapers_set: plans
                .iter()
                .filter(|(s, i)| {
                    old_shapers
                        .iter()
                        .find(|f| f.ifindex == *i)
                        .is_none_or(|f| f.shaper != *s)
                })
                .map(|(_, i)| name(*i))
                .collect(),
            shapers_removed: old_shapers
                .iter()
                .filter(|f| !plans.iter().any(|(_, i)| *i == f.ifindex))
                .map(|f| name(f.ifindex))
                .collect(),
            ..Default::default()
        })
    }

    /// `imqctl shape`: sets up (or changes) the shaper of one interface; every other
    /// shaper and rule stays as it is. Returns the shaper as the kernel now has it.
    pub fn shape(&mut self, spec: &Shaper) -> Result<Shaper> {
        spec.validate()?;
        let link = self.source_interface(&spec.interface)?;
        let locked = State::lock(self.bpffs())?;
        let mut state = locked.open_or_create()?;
        let old = state.rules()?;
        let links = self.nl.links()?;
        let found = self.find_shapers(&links, &self.all_qdiscs()?, &old)?;
        let (base, mut shapers) = Self::split(&links, &old, &found);
        shapers.retain(|s| s.interface != link.name);
        shapers.push(spec.clone());
        self.converge(&mut state, &links, &old, &found, base, &shapers)?;
        let (rules, links) = (state.rules()?, self.nl.links()?);
        self.find_shapers(&links, &self.all_qdiscs()?, &rules)?
            .into_iter()
            .find(|f| f.ifindex == link.index)
            .map(|f| f.shaper)
            .ok_or_else(|| Error::Netlink(format!("the shaper of {} vanished as it was set up", link.name)))
    }

    /// `imqctl unshape`: removes the shaper of one interface. Returns what it was.
    pub fn unshape(&mut self, interface: &str) -> Result<Shaper> {
        let link = self
            .nl
            .link_by_name(interface)?
            .ok_or_else(|| Error::NoSuchInterface(interface.to_owned()))?;
        let locked = State::lock(self.bpffs())?;
        let mut state = locked.open_or_create()?;
        let old = state.rules()?;
        let links = self.nl.links()?;
        let found = self.find_shapers(&links, &self.all_qdiscs()?, &old)?;
        let gone = found
            .iter()
            .find(|f| f.ifindex == link.index)
            .ok_or_else(|| Error::NoSuchShaper(interface.to_owned()))?
            .shaper
            .clone();
        let (base, mut shapers) = Self::split(&links, &old, &found);
        shapers.retain(|s| s.interface != link.name);
        self.converge(&mut state, &links, &old, &found, base, &shapers)?;
        Ok(gone)
    }

    /// The rules that are not shapers' (of interfaces that still exist), and the
    /// shapers.
    pub(crate) fn split(links: &[Link], old: &[(u32, Rule)], found: &[Found]) -> (Vec<Rule>, Vec<Shaper>) {
        let base = Self::without_gone(links, old)
            .into_iter()
            .filter(|(id, _)| !found.iter().any(|f| f.rule.is_some_and(|(i, _)| i == *id)))
            .map(|(_, r)| r)
            .collect();
        (base, found.iter().map(|f| f.shaper.clone()).collect())
    }
}
