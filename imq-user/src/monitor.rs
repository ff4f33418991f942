//! `imqctl monitor`: what the data path decides, packet by packet, as it decides it.
//!
//! The TC programs report a packet when a monitor asks for it ([`MonitorConfig`] in
//! the pinned `imq_monitor` map; all zero when nobody watches): one [`MonitorEvent`]
//! with what the classifier saw and did, followed by the packet's first bytes, through
//! a BPF ring buffer that the monitor creates and hands to the data path (the
//! `imq_events` map-of-maps) for as long as it runs. Filters, sampling and a per-CPU
//! token bucket run in the kernel, so what is not wanted costs the reader nothing and
//! a flood cannot bury it; what the bucket held back and what the ring had no room
//! for are counted and reported.
//!
//! One monitor per network namespace: the ring buffer slot and the configuration are
//! the namespace's. A second one is refused while the first lives.

use std::{
    collections::HashMap,
    fmt,
    io::{self, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd as _, AsRawFd as _},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use aya::maps::{Array, Map, MapData, PerCpuArray, RingBuf};
use imq_common::{
    DIRECTION_EGRESS, MAX_SNAPLEN, MONITOR_DEV, MONITOR_DIRECTION, MONITOR_IFINDEX, MONITOR_PRIO, MONITOR_RING_BYTES,
    MONITOR_SELECTED, MONITOR_UNMATCHED, MonitorConfig, MonitorEvent, MonitorState, VERDICT_BYPASSED, VERDICT_SELECTED,
};
use serde::Serialize;

use crate::{
    error::{Error, Result},
    netlink::Netlink,
    rule::{DevName, Direction},
};

/// What to watch.
#[derive(Clone, Debug)]
pub struct MonitorRequest {
    pub interface: Option<String>,
    pub direction: Option<Direction>,
    /// Only the rule at this prio.
    pub prio: Option<u32>,
    pub dev: Option<DevName>,
    /// Packets a rule took (sent to its device, or passed unshaped because the device
    /// is down or missing).
    pub selected: bool,
    /// Packets of an attached interface that no rule took.
    pub unmatched: bool,
    /// One packet in `sample`.
    pub sample: u32,
    /// Events per second and CPU.
    pub rate: u32,
    /// Bytes of each packet to capture (0: none).
    pub snaplen: u32,
}

/// A running monitor. Dropping it turns the reports off.
pub struct Monitor {
    config: Array<MapData, MonitorConfig>,
    /// What this monitor wrote, and when it last checked it is still in force.
    wanted: MonitorConfig,
    checked: std::time::Instant,
    state: PerCpuArray<MapData, MonitorState>,
    /// The data path's slot for the ring buffer (`imq_events`, a map-of-maps).
    slot: MapData,
    ring: RingBuf<MapData>,
    /// CLOCK_REALTIME minus CLOCK_MONOTONIC, to put the events' times on the wall clock.
    wall_offset: Duration,
    names: Names,
}

/// Interface names by ifindex, looked up once each.
struct Names {
    known: HashMap<u32, String>,
    nl: Netlink,
}

/// What the kernel held back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Held {
    /// Events over `--rate`.
    pub limited: u64,
    /// Events the ring buffer had no room for: the reader fell behind.
    pub lost: u64,
}

impl Monitor {
    pub(crate) fn start(
        mut state: crate::state::State,
        nl: Netlink,
        req: &MonitorRequest,
        ifindex: Option<u32>,
    ) -> Result<Self> {
        let (config, mon_state, events) = state.take_monitor_maps()?;
        // The imq lock is held only while the maps are opened.
        drop(state);
        let config: Array<MapData, MonitorConfig> =
            Array::try_from(config).map_err(|e| Error::bpf(imq_common::MONITOR_MAP, e))?;
        let current = config.get(&0, 0).map_err(|e| Error::bpf("read monitor config", e))?;
        if current.flags != 0 && process_lives(current.pid) {
            return Err(Error::MonitorBusy(current.pid));
        }
        let Map::ArrayOfMaps(slot) = events else {
            return Err(Error::Bpf(format!("{} is not a map-of-maps", imq_common::EVENTS_MAP)));
        };
        let mut mon_state: PerCpuArray<MapData, MonitorState> =
            PerCpuArray::try_from(mon_state).map_err(|e| Error::bpf(imq_common::MONITOR_STATE_MAP, e))?;
        let zero = crate::state::zeroed_per_cpu::<MonitorState>(crate::state::possible_cpus()?)?;
        mon_state
            .set(0, zero, 0)
            .map_err(|e| Error::bpf("reset monitor state", e))?;
        let mut flags = 0;
        if req.selected {
            flags |= MONITOR_SELECTED;
        }
        if req.unmatched {
            flags |= MONITOR_UNMATCHED;
        }
        let mut cfg = MonitorConfig {
            pid: std::process::id(),
            sample: req.sample.max(1),
            snaplen: req.snaplen.min(MAX_SNAPLEN),
            rate: req.rate,
            ..MonitorConfig::default()
        };
        if let Some(i) = ifindex {
            flags |= MONITOR_IFINDEX;
            cfg.ifindex = i;
        }
        if let Some(d) = req.direction {
            flags |= MONITOR_DIRECTION;
            cfg.direction = d.to_raw();
        }
        if let Some(p) = req.prio {
            flags |= MONITOR_PRIO;
            cfg.prio = p;
        }
        if let Some(d) = req.dev {
            flags |= MONITOR_DEV;
            cfg.dev = d.0;
        }
        cfg.flags = flags;
        // Last of what can fail before the monitor exists, whose drop takes the ring
        // out again (on an error below too).
        let ring = open_event_ring(&slot)?;
        let mut monitor = Self {
            config,
            wanted: cfg,
            checked: std::time::Instant::now(),
            state: mon_state,
            slot,
            ring,
            wall_offset: wall_offset(),
            names: Names {
                known: HashMap::new(),
                nl,
            },
        };
        monitor
            .config
            .set(0, cfg, 0)
            .map_err(|e| Error::bpf("write monitor config", e))?;
        Ok(monitor)
    }

    /// Waits up to `timeout` for events and hands each to `f`.
    pub fn poll(&mut self, timeout: Duration, mut f: impl FnMut(Event)) -> Result<()> {
        if self.checked.elapsed() >= Duration::from_secs(1) {
            // Another imqctl may have judged this monitor dead (see
            // State::clear_dead_monitor): set the configuration again.
            self.checked = std::time::Instant::now();
            if self.config.get(&0, 0).is_ok_and(|c| c.flags == 0) {
                let _ = self.config.set(0, self.wanted, 0);
            }
        }
        let mut fd = libc::pollfd {
            fd: self.ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&raw mut fd, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(Error::io("poll the ring buffer", e));
        }
        // One ring for every CPU: the records are in the order they were reserved.
        let Self {
            ring,
            names,
            wall_offset,
            ..
        } = self;
        while let Some(record) = ring.next() {
            if let Some(e) = decode(&record, names, *wall_offset) {
                f(e);
            }
        }
        Ok(())
    }

    /// What the kernel held back since the start, over every CPU.
    pub fn held(&self) -> Result<Held> {
        let v = self.state.get(&0, 0).map_err(|e| Error::bpf("read monitor state", e))?;
        Ok(v.iter().fold(Held::default(), |h, s| Held {
            limited: h.limited + s.limited,
            lost: h.lost + s.lost,
        }))
    }
}

/// Creates a ring buffer for the data path's events, puts it into `slot` (the
/// `imq_events` map-of-maps) and returns its reader. The data path writes into it from
/// then on, until [`close_event_ring`] (or a new ring) takes its place.
/// The ring is named `imq_mon_<pid>` after the process that made it.
pub fn open_event_ring(slot: &MapData) -> Result<RingBuf<MapData>> {
    let name = format!("imq_mon_{}", std::process::id());
    let ring = crate::sys::create_ringbuf(MONITOR_RING_BYTES, &name)
        .map_err(|e| Error::io("create the monitor's ring buffer", e))?;
    crate::sys::map_set_fd(slot.fd().as_fd(), 0, ring.as_fd())
        .map_err(|e| Error::io("hand the ring buffer to the data path", e))?;
    MapData::from_fd(ring)
        .and_then(|m| RingBuf::try_from(Map::RingBuf(m)))
        .map_err(|e| {
            close_event_ring(slot);
            Error::bpf("open the ring buffer", e)
        })
}

/// Takes the ring buffer out of `slot`: the data path stops writing, and the ring's
/// memory goes with its last reader.
pub fn close_event_ring(slot: &MapData) {
    let _ = crate::sys::map_delete(slot.fd().as_fd(), 0);
}

/// One ring buffer record: a [`MonitorEvent`], then room for the packet's bytes, of
/// which the event's `cap_len` are filled.
fn decode(b: &[u8], names: &mut Names, wall_offset: Duration) -> Option<Event> {
    const HEAD: usize = size_of::<MonitorEvent>();
    if b.len() < HEAD {
        return None;
    }
    // SAFETY: MonitorEvent is plain integers (every bit pattern valid), and
    // read_unaligned copies HEAD bytes that the check above found.
    let e: MonitorEvent = unsafe { std::ptr::read_unaligned(b.as_ptr().cast()) };
    let cap = (e.cap_len as usize).min(b.len() - HEAD);
    let name = names.get(e.ifindex);
    Some(Event::new(&e, name, wall_offset, b[HEAD..HEAD + cap].to_vec()))
}

impl Names {
    fn get(&mut self, ifindex: u32) -> String {
        if let Some(n) = self.known.get(&ifindex) {
            return n.clone();
        }
        let name = match self.nl.link_by_index(ifindex) {
            Ok(Some(l)) => l.name,
            _ => format!("if{ifindex}"),
        };
        self.known.insert(ifindex, name.clone());
        name
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        // Best effort: a monitor killed without this leaves the flag on, and the data
        // path then builds events that go nowhere until the next monitor starts (it
        // takes over from a dead one, and any imqctl command frees its ring buffer).
        let _ = self.config.set(0, MonitorConfig::default(), 0);
        close_event_ring(&self.slot);
    }
}

/// Whether a process with this id exists (in our pid namespace).
pub(crate) fn process_lives(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks.
    pid != 0
        && (unsafe { libc::kill(pid as libc::pid_t, 0) } == 0
            || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

fn wall_offset() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let mono = Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_sub(mono)
}

/// One reported packet.
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    /// Seconds since the epoch, to the microsecond.
    pub time: f64,
    pub interface: String,
    pub ifindex: u32,
    pub direction: Direction,
    /// `selected` (sent to its imq device), `bypassed` (a rule took it, its device is
    /// down or missing: passed unshaped) or `unmatched`.
    pub verdict: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prio: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dev: Option<String>,
    /// skb->priority after the rule, as a tc class id, when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub classid: Option<String>,
    /// The mark the classifier saw, and the one the packet leaves with.
    pub mark: u32,
    pub new_mark: u32,
    /// 4 or 6; 0 for what is not a complete IPv4/IPv6 packet.
    pub family: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proto: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sport: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dport: Option<u16>,
    pub dscp: u8,
    /// The whole packet from its Ethernet header (a GSO packet: all its segments).
    pub len: u32,
    /// Bytes captured (`--snaplen`).
    pub captured: u32,
    #[serde(skip)]
    pub ts_ns: u64,
    #[serde(skip)]
    pub wall: Duration,
    #[serde(skip)]
    pub data: Vec<u8>,
}

impl Event {
    fn new(e: &MonitorEvent, interface: String, wall_offset: Duration, data: Vec<u8>) -> Self {
        let f = &e.flow;
        let addr = |w: &[u32; 4]| -> Option<IpAddr> {
            let b = |i: usize| w[i].to_ne_bytes();
            match f.family {
                4 => Some(IpAddr::V4(Ipv4Addr::from(b(0)))),
                6 => {
                    let mut o = [0u8; 16];
                    for i in 0..4 {
                        o[4 * i..4 * i + 4].copy_from_slice(&b(i));
                    }
                    Some(IpAddr::V6(Ipv6Addr::from(o)))
                }
                _ => None,
            }
        };
        let ip = f.family != 0;
        let ports = f.flags & imq_common::FLOW_PORTS != 0;
        let took = e.verdict == VERDICT_SELECTED || e.verdict == VERDICT_BYPASSED;
        let wall = wall_offset + Duration::from_nanos(e.ts_ns);
        Self {
            time: (wall.as_micros() as f64) / 1e6,
            interface,
            ifindex: e.ifindex,
            direction: if u32::from(e.direction) == DIRECTION_EGRESS {
                Direction::Egress
            } else {
                Direction::Ingress
            },
            verdict: match e.verdict {
                VERDICT_SELECTED => "selected",
                VERDICT_BYPASSED => "bypassed",
                _ => "unmatched",
            },
            prio: took.then_some(e.prio),
            dev: took.then(|| DevName(e.dev).to_string()),
            classid: (e.verdict == VERDICT_SELECTED && e.priority != 0)
                .then(|| format!("{:x}:{:x}", e.priority >> 16, e.priority & 0xffff)),
            mark: f.mark,
            new_mark: e.mark,
            family: f.family,
            src: addr(&f.src),
            dst: addr(&f.dst),
            proto: ip.then_some(f.proto),
            sport: ports.then_some(f.sport),
            dport: ports.then_some(f.dport),
            dscp: f.dscp,
            len: e.len,
            captured: data.len() as u32,
            ts_ns: e.ts_ns,
            wall,
            data,
        }
    }
}

fn proto_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        136 => "udplite".into(),
        47 => "gre".into(),
        50 => "esp".into(),
        p => format!("proto {p}"),
    }
}

/// One line: `19:40:01.123456 eth0 ingress prio 10 imq0 class 1:20 mark 0x0 tcp
/// 198.18.0.1:34567 > 198.18.0.2:5201 dscp 46 len 1514`.
impl fmt::Display for Event {
    fn fmt(&self, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (h, m, sec) = local_time(self.wall.as_secs());
        write!(
            out,
            "{h:02}:{m:02}:{sec:02}.{:06} {} {}",
            self.wall.subsec_micros(),
            self.interface,
            self.direction
        )?;
        match (self.verdict, self.prio, &self.dev) {
            ("unmatched", ..) => write!(out, " unmatched")?,
            (v, Some(prio), Some(dev)) => {
                write!(out, " prio {prio} {dev}")?;
                if v == "bypassed" {
                    write!(out, " bypassed (device down or missing: passed unshaped)")?;
                }
            }
            _ => {}
        }
        if let Some(c) = &self.classid {
            write!(out, " class {c}")?;
        }
        write!(out, " mark {:#x}", self.mark)?;
        if self.new_mark != self.mark {
            write!(out, "->{:#x}", self.new_mark)?;
        }
        match (self.src, self.dst, self.proto) {
            (Some(s), Some(d), Some(p)) => {
                write!(out, " {}", proto_name(p))?;
                let host = |a: IpAddr, port: Option<u16>| match (a, port) {
                    (IpAddr::V6(a), Some(p)) => format!("[{a}]:{p}"),
                    (a, Some(p)) => format!("{a}:{p}"),
                    (a, None) => a.to_string(),
                };
                write!(
                    out,
                    " {} > {} dscp {}",
                    host(s, self.sport),
                    host(d, self.dport),
                    self.dscp
                )?;
            }
            _ => write!(out, " not IPv4/IPv6")?,
        }
        write!(out, " len {}", self.len)
    }
}

/// Hours, minutes and seconds of the local time (as tcpdump prints it).
fn local_time(epoch_secs: u64) -> (i32, i32, i32) {
    let t = epoch_secs as libc::time_t;
    // SAFETY: an all-zero tm is valid; localtime_r fills it from a valid time_t.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to a time_t and a tm.
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        let s = (epoch_secs % 86_400) as i32;
        return (s / 3600, s / 60 % 60, s % 60);
    }
    (tm.tm_hour, tm.tm_min, tm.tm_sec)
}

/// Writes packets in the classic pcap format (microsecond timestamps, Ethernet),
/// which tcpdump, tshark and Wireshark read.
pub struct PcapWriter<W: Write> {
    out: W,
}

impl<W: Write> PcapWriter<W> {
    pub fn new(mut out: W, snaplen: u32) -> io::Result<Self> {
        const MAGIC: u32 = 0xa1b2_c3d4;
        const LINKTYPE_ETHERNET: u32 = 1;
        let mut h = Vec::with_capacity(24);
        h.extend_from_slice(&MAGIC.to_le_bytes());
        h.extend_from_slice(&2u16.to_le_bytes());
        h.extend_from_slice(&4u16.to_le_bytes());
        h.extend_from_slice(&0i32.to_le_bytes()); // thiszone: UTC
        h.extend_from_slice(&0u32.to_le_bytes()); // sigfigs
        h.extend_from_slice(&snaplen.max(1).to_le_bytes());
        h.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        out.write_all(&h)?;
        Ok(Self { out })
    }

    pub fn write(&mut self, e: &Event) -> io::Result<()> {
        let mut h = Vec::with_capacity(16);
        h.extend_from_slice(&(e.wall.as_secs() as u32).to_le_bytes());
        h.extend_from_slice(&e.wall.subsec_micros().to_le_bytes());
        h.extend_from_slice(&(e.data.len() as u32).to_le_bytes());
        h.extend_from_slice(&e.len.max(e.data.len() as u32).to_le_bytes());
        self.out.write_all(&h)?;
        self.out.write_all(&e.data)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcap_header_and_record_layout() {
        let mut buf = Vec::new();
        let mut w = PcapWriter::new(&mut buf, 96).unwrap();
        let e = Event {
            time: 0.0,
            interface: "eth0".into(),
            ifindex: 2,
            direction: Direction::Ingress,
            verdict: "unmatched",
            prio: None,
            dev: None,
            classid: None,
            mark: 0,
            new_mark: 0,
            family: 0,
            src: None,
            dst: None,
            proto: None,
            sport: None,
            dport: None,
            dscp: 0,
            len: 1514,
            captured: 3,
            ts_ns: 0,
            wall: Duration::new(1_700_000_000, 123_456_000),
            data: vec![1, 2, 3],
        };
        w.write(&e).unwrap();
        assert_eq!(&buf[..4], &[0xd4, 0xc3, 0xb2, 0xa1]);
        assert_eq!(u32::from_le_bytes(buf[16..20].try_into().unwrap()), 96);
        assert_eq!(u32::from_le_bytes(buf[20..24].try_into().unwrap()), 1);
        let rec = &buf[24..];
        assert_eq!(u32::from_le_bytes(rec[0..4].try_into().unwrap()), 1_700_000_000);
        assert_eq!(u32::from_le_bytes(rec[4..8].try_into().unwrap()), 123_456);
        assert_eq!(u32::from_le_bytes(rec[8..12].try_into().unwrap()), 3);
        assert_eq!(u32::from_le_bytes(rec[12..16].try_into().unwrap()), 1514);
        assert_eq!(&rec[16..], &[1, 2, 3]);
        let line = e.to_string();
        let (time, rest) = line.split_once(' ').unwrap();
        assert!(time.len() == 15 && time.ends_with(".123456"), "{line}");
        assert_eq!(rest, "eth0 ingress unmatched mark 0x0 not IPv4/IPv6 len 1514");
    }
}
