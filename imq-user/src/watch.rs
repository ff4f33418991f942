//! `imqctl watch`: keep a rule file's setup in place while interfaces and imq
//! devices come and go.
//!
//! Kernel notifications only wake the loop; what it does is decided by comparing the
//! kernel with the file (level-triggered), so a burst of events costs one pass and a
//! missed one is caught by the next. Each pass takes imq's lock like any imqctl
//! command, so a concurrent `imqctl` waits for it or it for that.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::mpsc,
};

use futures::StreamExt as _;
use rtnetlink::{
    constants::RTMGRP_LINK,
    sys::{AsyncSocket as _, SocketAddr},
};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    Imq,
    error::{Error, Result},
    metrics,
    netlink::{self, Link},
    rule::DevName,
    rulefile::{self, Setup},
    state::State,
};

/// What wakes the loop.
#[derive(Debug)]
pub enum Event {
    /// A link appeared, changed or went (which one is read from the kernel).
    Link,
    /// SIGHUP: read the file again.
    Reload,
    /// SIGTERM or SIGINT: exit, leaving the data path in place.
    Stop(&'static str),
    /// The notification socket failed; the loop cannot follow the kernel any more.
    Failed(String),
}

/// Subscribes to link notifications and to SIGHUP, SIGTERM and SIGINT on a thread
/// of its own (the control plane's netlink calls are blocking), and returns once
/// both are in place: nothing that happens after this call is missed.
pub fn events() -> Result<mpsc::Receiver<Event>> {
    let (tx, rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
    std::thread::Builder::new()
        .name("imq-events".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_io().build() {
                Ok(rt) => rt,
                Err(e) => return ready_tx.send(Err(Error::io("tokio runtime", e))).unwrap_or(()),
            };
            rt.block_on(async move {
                let setup = || {
                    let (mut conn, _, messages) =
                        rtnetlink::new_connection().map_err(|e| Error::io("netlink socket", e))?;
                    let socket = conn.socket_mut().socket_mut();
                    socket
                        .bind(&SocketAddr::new(0, RTMGRP_LINK))
                        .map_err(|e| Error::io("subscribe to link notifications", e))?;
                    // Room for a burst (a container host re-creating hundreds of veths):
                    // a notification dropped on overflow would be missed until the next.
                    let _ = socket.set_rx_buf_sz(4usize << 20);
                    let sig = |kind, name: &str| signal(kind).map_err(|e| Error::io(format!("handle {name}"), e));
                    let signals = (
                        sig(SignalKind::hangup(), "SIGHUP")?,
                        sig(SignalKind::terminate(), "SIGTERM")?,
                        sig(SignalKind::interrupt(), "SIGINT")?,
                    );
                    Ok::<_, Error>((conn, messages, signals))
                };
                let (conn, mut messages, (mut hup, mut term, mut int)) = match setup() {
                    Ok(s) => s,
                    Err(e) => return ready_tx.send(Err(e)).unwrap_or(()),
                };
                tokio::spawn(conn);
                if ready_tx.send(Ok(())).is_err() {
                    return;
                }
                loop {
                    let event = tokio::select! {
                        m = messages.next() => match m {
                            Some(_) => Event::Link,
                            None => Event::Failed("the link notification socket closed".into()),
                        },
                        _ = hup.recv() => Event::Reload,
                        _ = term.recv() => Event::Stop("SIGTERM"),
                        _ = int.recv() => Event::Stop("SIGINT"),
                    };
                    let last = matches!(event, Event::Failed(_));
                    if tx.send(event).is_err() || last {
                        return;
                    }
                }
            });
        })
        .map_err(|e| Error::io("start the event thread", e))?;
    ready_rx
        .recv()
        .map_err(|_| Error::Netlink("the event thread ended".into()))??;
    Ok(rx)
}

/// Reads and parses a rule file; errors name the file (and the line).
pub fn read_setup(path: &Path) -> Result<Setup> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path.display().to_string(), e))?;
    rulefile::parse_setup(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
}

/// The interfaces a setup names, with the ifindex each has now (0: missing).
fn presence(setup: &Setup, links: &[Link]) -> BTreeMap<String, u32> {
    let names = setup
        .rules
        .iter()
        .map(|r| &r.interface)
        .chain(setup.shapers.iter().map(|(_, s)| &s.interface));
    names
        .map(|n| (n.clone(), links.iter().find(|l| &l.name == n).map_or(0, |l| l.index)))
        .collect()
}

/// The part of `setup` whose interfaces exist.
fn present_part(setup: &Setup, present: &BTreeMap<String, u32>) -> Setup {
    let here = |name: &String| present.get(name).is_some_and(|&i| i != 0);
    Setup {
        rules: setup.rules.iter().filter(|r| here(&r.interface)).cloned().collect(),
        shapers: setup
            .shapers
            .iter()
            .filter(|(_, s)| here(&s.interface))
            .cloned()
            .collect(),
        devices: setup.devices.clone(),
    }
}

/// The watch loop's state: the file, and what was last applied from it.
pub struct Watch {
    path: PathBuf,
    setup: Setup,
    /// The interfaces of the file as they were at the last apply (which may have
    /// failed: it is tried again when they change); `None` before the first pass and
    /// after a reload.
    applied: Option<BTreeMap<String, u32>>,
    /// The imq devices as the last pass saw them: (ifindex, up).
    devices: BTreeMap<DevName, (u32, bool)>,
}

impl Watch {
    /// Reads the file; a file that cannot be read or parsed is refused.
    pub fn new(path: PathBuf) -> Result<Self> {
        let setup = read_setup(&path)?;
        Ok(Self {
            path,
            setup,
            applied: None,
            devices: BTreeMap::new(),
        })
    }

    /// Reads the file again. A bad file is refused and the running setup stays.
    pub fn reload(&mut self) -> Result<()> {
        self.setup = read_setup(&self.path)?;
        self.applied = None;
        Ok(())
    }

    /// One pass: follows imq devices going down and up, re-registers re-created
    /// ones, and applies the file again when one of its interfaces appeared, went
    /// or changed, or an imq device its rules use was deleted. Reports what it did,
    /// a line each, through `log`.
    pub fn sync(&mut self, imq: &mut Imq, log: &mut dyn FnMut(String)) -> Result<()> {
        imq.leave_down = true;
        let links = imq.nl.links()?;
        let deleted = imq.follow_devices(&links, &mut self.devices, log)?;
        let present = presence(&self.setup, &links);
        if !deleted && self.applied.as_ref() == Some(&present) {
            return Ok(());
        }
        if let Some(before) = &self.applied {
            for (name, &index) in &present {
                match before.get(name).copied().unwrap_or(0) {
                    0 if index != 0 => log(format!("{name} appeared (ifindex {index})")),
                    old if old != 0 && index == 0 => log(format!("{name} is gone: its rules wait for it")),
                    old if old != index => log(format!("{name} was re-created (ifindex {index})")),
                    _ => {}
                }
            }
        }
        let part = present_part(&self.setup, &present);
        // Recorded before applying: an apply that failed is tried again only when
        // something it depends on changes, not on every event.
        self.applied = Some(present.clone());
        let applied = imq.apply(&part).map_err(|e| match e {
            Error::RuleFile { .. } => Error::Config(format!("{}: {e}", self.path.display())),
            e => e,
        })?;
        let waiting: Vec<&str> = present
            .iter()
            .filter(|(_, i)| **i == 0)
            .map(|(n, _)| n.as_str())
            .collect();
        let mut line = format!("applied {}: {applied}", self.path.display());
        if !waiting.is_empty() {
            line.push_str(&format!("; waiting for {}", waiting.join(", ")));
        }
        log(line);
        Ok(())
    }
}

impl Imq {
    /// Brings the device table in line with the imq devices the rules use: a
    /// device taken down or up is recorded at once (traffic passes unshaped while
    /// it is down instead of being dropped), and one re-created behind imq's back is
    /// re-registered. Returns whether a device the rules or a `[[device]]` use was
    /// deleted or re-created with its qdiscs gone: the file must be applied again.
    fn follow_devices(
        &mut self,
        links: &[Link],
        seen: &mut BTreeMap<DevName, (u32, bool)>,
        log: &mut dyn FnMut(String),
    ) -> Result<bool> {
        let locked = State::lock(self.bpffs())?;
        let Some(mut state) = locked.open()? else {
            return Ok(false);
        };
        let rules = state.rules()?;
        let setups = state.device_setups()?;
        let mut devs: Vec<DevName> = rules.iter().map(|(_, r)| r.dev).collect();
        devs.extend(setups.iter().map(|(n, _)| DevName(*n)));
        devs.sort_unstable();
        devs.dedup();
        let mut deleted = false;
        for dev in devs {
            let name = dev.to_string();
            let table = state.device(dev.0)?;
            let recorded_up = table.flags & imq_common::DEVICE_DOWN == 0;
            match links.iter().find(|l| l.name == name && l.is_ifb()) {
                None if table.ifindex != 0 => {
                    log(format!(
                        "{name} was deleted: its traffic passes unshaped; re-creating it"
                    ));
                    state.set_device(dev.0, 0, true, 0)?;
                    deleted = true;
                }
                None => deleted = true,
                // Re-created with its qdiscs gone: `apply` sets it up again.
                Some(l) if setups.iter().any(|(n, s)| *n == dev.0 && s.ifindex != l.index) => {
                    log(format!(
                        "{name} was re-created (ifindex {}): setting it up again",
                        l.index
                    ));
                    seen.insert(dev, (l.index, l.up));
                    deleted = true;
                }
                Some(l) if l.index != table.ifindex => {
                    log(format!(
                        "{name} was re-created (ifindex {}): shaping its traffic again",
                        l.index
                    ));
                    netlink::prepare_imq_device(&l.name);
                    seen.insert(dev, (l.index, l.up));
                    self.adopt_device(&mut state, links, &rules, dev, l.index)?;
                }
                Some(l) => {
                    // `links` may be older than the table (the device hook records
                    // changes as they happen): published from a fresh read.
                    if l.up != recorded_up {
                        self.publish_devices(&mut state, &[dev])?;
                    }
                    // Logged by what this loop saw: where the kernel's device hook
                    // runs, it has already updated the table.
                    if seen
                        .insert(dev, (l.index, l.up))
                        .is_some_and(|(i, up)| i == l.index && up != l.up)
                    {
                        log(if l.up {
                            format!("{name} is up: shaping its traffic again")
                        } else {
                            format!("{name} is down: its traffic passes unshaped until it is up")
                        });
                    }
                }
            }
        }
        Ok(deleted)
    }
}

/// Tells systemd (Type=notify) how the service stands: `READY=1`, `RELOADING=1`,
/// `STOPPING=1`, `STATUS=...`. Nothing without `$NOTIFY_SOCKET`.
pub fn notify(state: &str) {
    use std::os::{linux::net::SocketAddrExt as _, unix::net::UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name),
        None => std::os::unix::net::SocketAddr::from_pathname(Path::new(&path)),
    };
    if let Ok(addr) = addr {
        let _ = sock.send_to_addr(state.as_bytes(), &addr);
    }
}

/// Serves the metrics of `show --format prometheus` at `http://addr/metrics` on a
/// thread of its own, read fresh at each scrape; OpenMetrics text where the scraper
/// asks for it (`Accept: application/openmetrics-text`). Binds before returning, so
/// an address in use is refused at start.
pub fn serve_metrics(addr: std::net::SocketAddr, opts: crate::Options) -> Result<()> {
    use std::io::{Read as _, Write as _};
    let listener =
        std::net::TcpListener::bind(addr).map_err(|e| Error::io(format!("metrics listener on {addr}"), e))?;
    std::thread::Builder::new()
        .name("imq-metrics".into())
        .spawn(move || {
            let mut imq = None;
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(5)));
                let _ = stream.set_write_timeout(Some(std::time::Duration::from_secs(5)));
                // The request head: a scraper sends a few hundred bytes.
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head);
                let mut words = head.split_whitespace();
                let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                let om = head.lines().any(|l| {
                    l.to_ascii_lowercase().starts_with("accept:") && l.contains("application/openmetrics-text")
                });
                let format = if om {
                    metrics::Format::OpenMetrics
                } else {
                    metrics::Format::Prometheus
                };
                let (code, ctype, body) = if method != "GET" && method != "HEAD" {
                    ("405 Method Not Allowed", "text/plain", "GET /metrics\n".to_owned())
                } else if path != "/metrics" && !path.starts_with("/metrics?") {
                    ("404 Not Found", "text/plain", "imq serves /metrics\n".to_owned())
                } else {
                    if imq.is_none() {
                        imq = Imq::new(opts.clone()).ok();
                    }
                    match imq.as_mut().map(Imq::show) {
                        Some(Ok(status)) => ("200 OK", format.content_type(), metrics::render(&status, format)),
                        Some(Err(e)) => ("500 Internal Server Error", "text/plain", format!("{e}\n")),
                        None => (
                            "500 Internal Server Error",
                            "text/plain",
                            "cannot open imq\n".to_owned(),
                        ),
                    }
                };
                let body = if method == "HEAD" { "" } else { body.as_str() };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        })
        .map_err(|e| Error::io("start the metrics thread", e))?;
    Ok(())
}
