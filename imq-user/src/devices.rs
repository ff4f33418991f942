//! `[[device]]` in rule files: imq devices kept with their txqueuelen and the tc
//! commands that set up their qdiscs. A setup is applied as one part: before the
//! rules change (a device is ready before traffic reaches it), and only when it
//! changed, or when the device was re-created (its qdiscs went with it). The
//! setups applied are kept in the namespace's pinned state, so that `export` gives
//! them back and a deleted device is set up again (`imqctl watch`).

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use crate::{
    Imq,
    error::{Error, Result},
    netlink::{self, Link},
    rule::DevName,
    rulefile::FileDevice,
    state::{DeviceSetup, State},
};

/// An ifb that setups are tried on before they touch an imq device: not an imq
/// device name, so nothing ever sends it traffic.
const SCRATCH: &str = "imq-check";

/// Runs `lines` for device `dev` through `tc -batch -`; an error quotes tc.
fn tc_batch(dev: &str, lines: &[String]) -> std::result::Result<(), String> {
    let mut child = Command::new("tc")
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run tc (iproute2): {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(FileDevice::batch(dev, lines).as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| format!("tc: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    // tc says what it refused, then often its usage, then which line failed.
    let said = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = said.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let failed = lines
        .iter()
        .find_map(|l| l.strip_prefix("Command failed -:"))
        .map(|n| format!("qdisc line {n}: "))
        .unwrap_or_default();
    let first = lines.first().filter(|l| !l.starts_with("Command failed")).copied();
    Err(format!("{failed}tc: {}", first.unwrap_or("failed")))
}

impl Imq {
    /// Refuses a device that exists with other queues than its setup asks, and tries
    /// each setup that would change on a scratch ifb first: a line the kernel or tc
    /// refuses is reported before anything changed. Call before the lock's changes,
    /// with the setups applied so far.
    pub(crate) fn check_devices(
        &self,
        links: &[Link],
        applied: &[(u32, DeviceSetup)],
        devices: &[FileDevice],
    ) -> Result<()> {
        for d in devices {
            let link = links.iter().find(|l| l.name == d.name.to_string());
            if let Some(l) = link.filter(|l| l.is_ifb() && l.queues != d.queues) {
                return Err(Error::QueuesDiffer {
                    dev: l.name.clone(),
                    has: l.queues,
                    wanted: d.queues,
                });
            }
            if d.qdisc.is_empty() {
                continue;
            }
            let ifindex = link.map(|l| l.index);
            let same = applied
                .iter()
                .any(|(n, s)| *n == d.name.0 && Some(s.ifindex) == ifindex && s.qdisc == d.qdisc);
            if same {
                continue;
            }
            let scratch = self.nl.add_ifb(SCRATCH, d.txqueuelen, d.queues)?;
            let tried = tc_batch(SCRATCH, &d.qdisc);
            let _ = self.nl.del_link(scratch.index);
            tried.map_err(|e| Error::RuleFile {
                line: d.line,
                message: format!("{}: {e}", d.name),
            })?;
        }
        Ok(())
    }

    /// Brings the listed devices to their setups and forgets (removing their
    /// qdiscs) the setups of devices no longer listed; `links` as they are now,
    /// `applied` as the state records them.
    /// Returns the devices set up and those whose setups were removed.
    pub(crate) fn apply_devices(
        &self,
        state: &mut State,
        links: &[Link],
        applied: &[(u32, DeviceSetup)],
        devices: &[FileDevice],
    ) -> Result<(Vec<String>, Vec<String>)> {
        let (mut set_up, mut removed) = (Vec::new(), Vec::new());
        for d in devices {
            let name = d.name.to_string();
            let link = match links.iter().find(|l| l.name == name) {
                Some(l) if !l.is_ifb() => {
                    return Err(Error::NotIfb {
                        name,
                        kind: l.kind.clone().unwrap_or_else(|| l.link_type.clone()),
                    });
                }
                Some(l) => {
                    netlink::prepare_imq_device(&l.name);
                    if l.txqueuelen != d.txqueuelen {
                        self.nl.set_txqueuelen(l.index, d.txqueuelen)?;
                    }
                    if !l.up && !self.leave_down {
                        self.nl.set_up(l.index)?;
                    }
                    l.clone()
                }
                None => self.nl.add_ifb(&name, d.txqueuelen, d.queues)?,
            };
            // Published once what sends to it points at it (`apply`).
            crate::stage_device(state, d.name, link.index)?;
            let want = DeviceSetup {
                ifindex: link.index,
                txqueuelen: d.txqueuelen,
                queues: d.queues,
                qdisc: d.qdisc.clone(),
            };
            let before = applied.iter().find(|(n, _)| *n == d.name.0).map(|(_, s)| s);
            if before.is_some_and(|b| b.ifindex == want.ifindex && b.qdisc == want.qdisc) {
                if before != Some(&want) {
                    state.set_device_setup(d.name.0, Some(&want))?;
                }
                continue;
            }
            // Replaced whole: what an earlier setup added goes first.
            let _ = self.nl.del_root_qdisc(link.index);
            if !d.qdisc.is_empty()
                && let Err(e) = tc_batch(&name, &d.qdisc)
            {
                let _ = self.nl.del_root_qdisc(link.index);
                let _ = state.set_device_setup(d.name.0, None);
                return Err(Error::Config(format!(
                    "{name}: its qdisc lines failed, so it has none now: {e}"
                )));
            }
            state.set_device_setup(d.name.0, Some(&want))?;
            set_up.push(name);
        }
        for (n, old) in applied {
            if devices.iter().any(|d| d.name.0 == *n) {
                continue;
            }
            if links.iter().any(|l| l.index == old.ifindex) {
                let _ = self.nl.del_root_qdisc(old.ifindex);
            }
            state.set_device_setup(*n, None)?;
            removed.push(DevName(*n).to_string());
        }
        Ok((set_up, removed))
    }

    /// The `[[device]]` entries of the setups imq applied, for `export`.
    pub(crate) fn device_entries(state: &State) -> Result<Vec<FileDevice>> {
        Ok(state
            .device_setups()?
            .into_iter()
            .map(|(n, s)| FileDevice {
                line: 0,
                name: DevName(n),
                txqueuelen: s.txqueuelen,
                queues: s.queues,
                qdisc: s.qdisc,
            })
            .collect())
    }
}
