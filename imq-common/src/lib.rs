//! Types shared by the imq TC programs and the control plane.
//!
//! Everything here is `#[repr(C)]`, free of padding and of fixed size, because it is
//! the byte layout of BPF map keys and values. Sizes are asserted at compile time so
//! that a change on one side cannot silently disagree with the other.
//!
//! # Classification: tuple space search
//!
//! The control plane compiles the rules of each hook (interface, direction) into
//! *shapes*: a shape is one combination of matched fields and prefix lengths (a mask
//! over [`FlowKey`]), and every rule becomes one entry, `(shape, key & mask) ->
//! target`, in one hash map (a port range becomes one entry per aligned block). The
//! data path parses a packet into a [`FlowKey`] once, then does one hash lookup per
//! shape of its hook, never walking rules: 10,000 per-host rules are one shape and
//! cost what one rule costs. Shapes are ordered by the lowest prio they hold, so the
//! search stops as soon as no later shape can beat the best match so far. (The
//! kernel's flower classifier is built the same way, a hash table per mask.)
//!
//! # Atomic changes
//!
//! Rules, hooks and entries carry a generation, 0 or 1; [`ACTIVE_MAP`] holds the one
//! in force. A change writes the complete new rule set into the other generation,
//! flips [`ACTIVE_MAP`], waits for an RCU grace period (no program still reads the
//! old generation), then deletes the old one. A packet is classified entirely by the
//! old rules or entirely by the new ones, and a change that fails before the flip
//! leaves the old ones in force, for the data path and for imqctl alike.
#![no_std]

/// imq devices are named `imq0` .. `imq{MAX_DEVICES - 1}`; the number indexes
/// [`DEVICES_MAP`].
pub const MAX_DEVICES: u32 = 256;

/// Rules in one network namespace, over all hooks.
pub const MAX_RULES: u32 = 65536;

/// Rule ids, and so counter slots: while a change lands, the rules it replaces are
/// still in force beside the new ones (each rule that changes takes a fresh id, its
/// counter starting from zero), so twice [`MAX_RULES`].
pub const MAX_RULE_IDS: u32 = 2 * MAX_RULES;

/// Shapes one hook may use. The data path does at most this many lookups per packet.
pub const MAX_SHAPES: usize = 32;

/// Entries of [`ENTRIES_MAP`], both generations together.
pub const MAX_ENTRIES: u32 = 1 << 18;

/// (interface, direction) pairs that can carry rules, times the two generations.
pub const MAX_HOOKS: u32 = 2048;

/// Map names, as the ELF declares them and as they are pinned.
pub const RULES_MAP: &str = "imq_rules";
pub const ACTIVE_MAP: &str = "imq_active";
pub const HOOKS_MAP: &str = "imq_hooks";
pub const ENTRIES_MAP: &str = "imq_entries";
pub const DEVICES_MAP: &str = "imq_devices";
pub const IFINDEXES_MAP: &str = "imq_ifindexes";
pub const COUNTERS_MAP: &str = "imq_counters";
pub const MONITOR_MAP: &str = "imq_monitor";
pub const MONITOR_STATE_MAP: &str = "imq_monitor_state";
pub const EVENTS_MAP: &str = "imq_events";
pub const GONE_MAP: &str = "imq_gone";

/// Program names in the ELF.
pub const INGRESS_PROG: &str = "imq_ingress";
/// The ingress program for kernels without TCX (cls_bpf + mirred, like egress).
pub const INGRESS_CLS_PROG: &str = "imq_ingress_cls";
pub const EGRESS_PROG: &str = "imq_egress";
pub const NETDEV_EVENT_PROG: &str = "imq_netdev_event";

pub const DIRECTION_INGRESS: u32 = 0;
pub const DIRECTION_EGRESS: u32 = 1;

/// What the data path knows about a packet. Addresses are in packet byte order (an
/// IPv4 address fills the first of the four words); ports are in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    /// skb->mark as the hook sees it.
    pub mark: u32,
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    /// 4 or 6.
    pub family: u8,
    /// The upper-layer protocol, after IPv6 extension headers; for a packet whose
    /// extension headers could not all be walked, the header where the walk stopped.
    pub proto: u8,
    /// The 6-bit DSCP.
    pub dscp: u8,
    /// [`FLOW_PORTS`].
    pub flags: u8,
}

/// [`FlowKey::flags`]: `sport`/`dport` hold the packet's ports. Not set for protocols
/// without ports, non-first fragments and truncated transport headers, so a rule with
/// ports (whose mask includes this flag) never matches them.
pub const FLOW_PORTS: u8 = 1;

impl FlowKey {
    /// `self & mask`, field by field.
    #[inline(always)]
    pub fn masked(&self, mask: &FlowKey) -> FlowKey {
        FlowKey {
            mark: self.mark & mask.mark,
            src: [
                self.src[0] & mask.src[0],
                self.src[1] & mask.src[1],
                self.src[2] & mask.src[2],
                self.src[3] & mask.src[3],
            ],
            dst: [
                self.dst[0] & mask.dst[0],
                self.dst[1] & mask.dst[1],
                self.dst[2] & mask.dst[2],
                self.dst[3] & mask.dst[3],
            ],
            sport: self.sport & mask.sport,
            dport: self.dport & mask.dport,
            family: self.family & mask.family,
            proto: self.proto & mask.proto,
            dscp: self.dscp & mask.dscp,
            flags: self.flags & mask.flags,
        }
    }
}

/// One shape of a hook: the mask, the lowest prio among its entries, and the address
/// family all its entries need (0: either), so that an IPv4 packet skips the shapes
/// of IPv6 rules and the other way round.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Shape {
    pub mask: FlowKey,
    pub min_prio: u32,
    pub family: u32,
}

/// Key of [`HOOKS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HookKey {
    pub ifindex: u32,
    /// [`DIRECTION_INGRESS`] or [`DIRECTION_EGRESS`].
    pub direction: u16,
    /// 0 or 1, see [`ACTIVE_MAP`].
    pub generation: u16,
}

/// Value of [`HOOKS_MAP`]: the shapes of one hook, by ascending `min_prio`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hook {
    pub len: u32,
    /// Classic mode runs one filter per imq device the hook's rules use; only the
    /// filter of this device reports an unmatched packet to `imqctl monitor`, so it
    /// is reported once.
    pub unmatched_dev: u32,
    pub shapes: [Shape; MAX_SHAPES],
}

impl Hook {
    pub const fn empty() -> Self {
        Self {
            len: 0,
            unmatched_dev: 0,
            shapes: [Shape {
                mask: FlowKey {
                    mark: 0,
                    src: [0; 4],
                    dst: [0; 4],
                    sport: 0,
                    dport: 0,
                    family: 0,
                    proto: 0,
                    dscp: 0,
                    flags: 0,
                },
                min_prio: 0,
                family: 0,
            }; MAX_SHAPES],
        }
    }
}

/// Key of [`ENTRIES_MAP`]: a hook, one of its shapes, and a masked packet key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EntryKey {
    pub hook: HookKey,
    /// Index into [`Hook::shapes`].
    pub shape: u32,
    pub flow: FlowKey,
}

/// Value of [`ENTRIES_MAP`]: the rule a packet matching the entry selects (the one
/// with the lowest prio, where several rules share an entry), and what it does.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Target {
    pub prio: u32,
    /// Counter slot in [`COUNTERS_MAP`], and key in [`RULES_MAP`].
    pub rule_id: u32,
    /// imq device number: the packet goes to `imq{dev}`, resolved through [`DEVICES_MAP`].
    pub dev: u32,
    /// [`TARGET_SET_MARK`], [`TARGET_SET_PRIORITY`], [`TARGET_QUEUE_FIXED`] ...
    pub flags: u32,
    /// skb->mark = (skb->mark & !set_mark_mask) | set_mark_value.
    pub set_mark_value: u32,
    pub set_mark_mask: u32,
    /// skb->priority, a tc classid (MAJOR << 16 | MINOR).
    pub priority: u32,
    /// [`TARGET_QUEUE_FIXED`]: the TX queue of the imq device, counted from 1 as `mq`
    /// numbers its classes.
    pub queue: u32,
}

pub const TARGET_SET_MARK: u32 = 1;
pub const TARGET_SET_PRIORITY: u32 = 2;
/// Send the packet to TX queue [`Target::queue`] of a multi-queue imq device
/// (wrapped around the device's queue count).
pub const TARGET_QUEUE_FIXED: u32 = 4;
/// Choose the TX queue by a hash of the source address (IPv4: the address; IPv6: its
/// /64 prefix), so that one subscriber's packets always meet the same qdisc.
pub const TARGET_QUEUE_SRC: u32 = 8;
/// As [`TARGET_QUEUE_SRC`], by the destination address.
pub const TARGET_QUEUE_DST: u32 = 16;
/// Any of the queue choices.
pub const TARGET_QUEUE: u32 = TARGET_QUEUE_FIXED | TARGET_QUEUE_SRC | TARGET_QUEUE_DST;

/// The TX queue, from 0, that `t` sends a packet with key `flow` to on a device
/// with `queues` (> 0) TX queues; the same for every packet of a flow, and, by
/// address, of a subscriber.
#[inline(always)]
pub fn queue_index(t: &Target, flow: &FlowKey, queues: u32) -> u32 {
    if t.flags & TARGET_QUEUE_FIXED != 0 {
        let q = t.queue.wrapping_sub(1);
        return if q < queues { q } else { q % queues };
    }
    let a = if t.flags & TARGET_QUEUE_SRC != 0 {
        &flow.src
    } else {
        &flow.dst
    };
    // IPv4: the address (the other words are 0). IPv6: the /64 prefix, which a
    // subscriber's hosts share.
    let x = a[0] ^ a[1].rotate_left(16);
    // Fibonacci hashing, then scaled to the queue count without a division.
    let h = x.wrapping_mul(0x9e37_79b1);
    ((h as u64 * queues as u64) >> 32) as u32
}

/// Key of [`RULES_MAP`]: the rules are kept per generation too, so that what imqctl
/// reports and builds on switches with the data path, in the same write.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RuleKey {
    pub id: u32,
    pub generation: u32,
}

/// Value of [`RULES_MAP`]: a rule as the user wrote it. Only the control plane reads
/// it; the data path uses what it was compiled into.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RuleSpec {
    pub ifindex: u32,
    pub direction: u32,
    pub prio: u32,
    pub dev: u32,
    /// [`SPEC_MARK`] ... : which of the fields below are set.
    pub flags: u32,
    pub mark_value: u32,
    pub mark_mask: u32,
    pub set_mark_value: u32,
    pub set_mark_mask: u32,
    pub classid: u32,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: [u16; 2],
    pub dport: [u16; 2],
    /// 0 (no address matched), 4 or 6.
    pub family: u8,
    pub src_len: u8,
    pub dst_len: u8,
    pub proto: u8,
    pub dscp: u8,
    /// [`SPEC_QUEUE_FIXED`], [`SPEC_QUEUE_SRC`] or [`SPEC_QUEUE_DST`] with
    /// [`SPEC_QUEUE`] set in `flags`.
    pub queue_by: u8,
    /// The queue, counted from 1, for [`SPEC_QUEUE_FIXED`].
    pub queue: u16,
}

pub const SPEC_MARK: u32 = 1 << 0;
pub const SPEC_SRC: u32 = 1 << 1;
pub const SPEC_DST: u32 = 1 << 2;
pub const SPEC_PROTO: u32 = 1 << 3;
pub const SPEC_SPORT: u32 = 1 << 4;
pub const SPEC_DPORT: u32 = 1 << 5;
pub const SPEC_DSCP: u32 = 1 << 6;
pub const SPEC_SET_MARK: u32 = 1 << 7;
pub const SPEC_CLASSID: u32 = 1 << 8;
pub const SPEC_QUEUE: u32 = 1 << 9;

/// [`RuleSpec::queue_by`].
pub const SPEC_QUEUE_FIXED: u8 = 1;
pub const SPEC_QUEUE_SRC: u8 = 2;
pub const SPEC_QUEUE_DST: u8 = 3;

/// Value of [`DEVICES_MAP`], indexed by device number. `ifindex == 0`: no such device;
/// [`DEVICE_DOWN`] set: the device is down. Either way selected packets pass unshaped.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Device {
    pub ifindex: u32,
    pub flags: u32,
}

/// [`Device::flags`]: the device is down; a redirect into it would be dropped.
pub const DEVICE_DOWN: u32 = 1;
/// [`Device::flags`] bits from this one up: the device's TX queues (0 when it was
/// recorded by an imqctl from before multi-queue devices: taken as one).
pub const DEVICE_QUEUES_SHIFT: u32 = 16;

/// Value of the per-CPU [`COUNTERS_MAP`]: what a rule sent to its imq device.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}

/// Value of [`MONITOR_MAP`] (one element): what `imqctl monitor` asked to see. With
/// `flags == 0` nobody watches, and the data path's whole cost is reading that word.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MonitorConfig {
    /// [`MONITOR_SELECTED`], [`MONITOR_UNMATCHED`], [`MONITOR_IFINDEX`] ...
    pub flags: u32,
    /// The monitor's process id: a second monitor is refused while it lives.
    pub pid: u32,
    /// Only this interface ([`MONITOR_IFINDEX`]).
    pub ifindex: u32,
    /// Only this direction ([`MONITOR_DIRECTION`]).
    pub direction: u32,
    /// Only the rule at this prio ([`MONITOR_PRIO`]).
    pub prio: u32,
    /// Only packets for this imq device number ([`MONITOR_DEV`]).
    pub dev: u32,
    /// One packet in `sample` is reported (0 and 1: every one).
    pub sample: u32,
    /// Bytes of each packet appended to its event (0: none).
    pub snaplen: u32,
    /// Events per second and per CPU; what is over it is counted, not sent.
    pub rate: u32,
    pub _reserved: u32,
}
/// [`MonitorConfig::flags`]: report packets a rule sent to its imq device, and those
/// a rule took whose device is down or missing (they pass unshaped).
pub const MONITOR_SELECTED: u32 = 1;
/// Report packets of an attached interface that no rule took.
pub const MONITOR_UNMATCHED: u32 = 2;
pub const MONITOR_IFINDEX: u32 = 4;
pub const MONITOR_DIRECTION: u32 = 8;
pub const MONITOR_PRIO: u32 = 16;
pub const MONITOR_DEV: u32 = 32;
/// Value of the per-CPU [`MONITOR_STATE_MAP`] (one element): the CPU's token bucket
/// and what it held back.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MonitorState {
    /// Tokens, in nanoseconds' worth of the rate (one event costs 10^9).
    pub tokens: u64,
    pub last_ns: u64,
    /// Events over the rate: counted, not sent.
    pub limited: u64,
    /// Events the ring buffer had no room for (the reader fell behind).
    pub lost: u64,
}
/// One `imqctl monitor` event, sent through [`EVENTS_MAP`]; the first `cap_len` bytes
/// of the packet follow it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MonitorEvent {
    /// bpf_ktime_get_ns (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    pub ifindex: u32,
    /// skb->len: the whole packet from its Ethernet header, all segments of a GSO packet.
    pub len: u32,
    /// What the classifier saw: the flow key, mark included.
    pub flow: FlowKey,
    /// skb->mark and skb->priority after the rule's actions.
    pub mark: u32,
    pub priority: u32,
    /// The rule that took the packet (unmatched: 0 and `u32::MAX`).
    pub rule_id: u32,
    pub prio: u32,
    /// imq device number.
    pub dev: u32,
    /// [`DIRECTION_INGRESS`] or [`DIRECTION_EGRESS`].
    pub direction: u8,
    /// [`VERDICT_SELECTED`] ...
    pub verdict: u8,
    pub _reserved: u16,
    /// Bytes of the packet that follow.
    pub cap_len: u32,
}
/// [`MonitorEvent::verdict`]: sent to its imq device.
pub const VERDICT_SELECTED: u8 = 1;
/// A rule took it, but its imq device is down or missing: it passed unshaped.
pub const VERDICT_BYPASSED: u8 = 2;
/// No rule of the attached interface took it.
pub const VERDICT_UNMATCHED: u8 = 3;
/// The most bytes of a packet an event carries.
pub const MAX_SNAPLEN: u32 = 65535;
/// Size of the ring buffer a monitor puts into [`EVENTS_MAP`] (a power of two, in
/// whole pages). Fixed: the kernel accepts only an inner map like the one the outer
/// map was created with. 4 MiB holds about 12,000 events with the default 256 bytes
/// of each packet, or 60 with 64 KiB of each.
pub const MONITOR_RING_BYTES: u32 = 4 << 20;
const _: () = {
    assert!(core::mem::size_of::<FlowKey>() == 44);
    assert!(core::mem::size_of::<Shape>() == 52);
    assert!(core::mem::size_of::<HookKey>() == 8);
    assert!(core::mem::size_of::<Hook>() == 8 + 52 * MAX_SHAPES);
    assert!(core::mem::size_of::<EntryKey>() == 56);
    assert!(core::mem::size_of::<Target>() == 32);
    assert!(core::mem::size_of::<RuleSpec>() == 88);
    assert!(core::mem::size_of::<RuleKey>() == 8);
    assert!(core::mem::size_of::<Device>() == 8);
    assert!(core::mem::size_of::<Counters>() == 16);
    assert!(core::mem::size_of::<MonitorConfig>() == 40);
    assert!(core::mem::size_of::<MonitorState>() == 32);
    assert!(core::mem::size_of::<MonitorEvent>() == 88);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], made only of integers, without padding
    // (sizes asserted above), so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Shape {}
    unsafe impl aya::Pod for super::HookKey {}
    unsafe impl aya::Pod for super::Hook {}
    unsafe impl aya::Pod for super::EntryKey {}
    unsafe impl aya::Pod for super::Target {}
    unsafe impl aya::Pod for super::RuleSpec {}
    unsafe impl aya::Pod for super::RuleKey {}
    unsafe impl aya::Pod for super::Device {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::MonitorConfig {}
    unsafe impl aya::Pod for super::MonitorState {}
    unsafe impl aya::Pod for super::MonitorEvent {}
}
