//! imq data path: TC programs that send selected packets into imq (ifb) devices.
//!
//! Ingress: a TCX ingress program classifies the packet by the rules of its interface
//! and, on a match, `bpf_redirect`s it into the rule's imq device. (Kernels without
//! TCX take the egress way on ingress too: [`imq_ingress_cls`].) After the imq
//! device's qdisc, ifb re-injects it with `netif_receive_skb` on the original device,
//! and `skb_skip_tc_classify` keeps the TC ingress hook from running on it again, so a
//! packet is queued at most once (ifb_ri_tasklet, __netif_receive_skb_core).
//!
//! How rules are searched (shapes, generations) is described in imq-common.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{__sk_buff, BPF_F_NO_PREALLOC, TC_ACT_UNSPEC, bpf_fib_lookup},
    btf_maps::{ArrayOfMaps, RingBuf},
    helpers::{
        bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_skb_load_bytes},
    },
    macros::{btf_map, classifier, fentry, map},
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap},
    programs::{FEntryContext, TcContext},
};
use core::mem::offset_of;
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{IpProto, Ipv4Hdr, Ipv6Hdr},
};

use imq_common::{
    Counters, DEVICE_DOWN, DEVICE_QUEUES_SHIFT, DIRECTION_EGRESS, DIRECTION_INGRESS, Device, EntryKey, FLOW_PORTS,
    FlowKey, Hook, HookKey, MAX_DEVICES, MAX_ENTRIES, MAX_HOOKS, MAX_RULE_IDS, MAX_RULES, MAX_SHAPES, MAX_SNAPLEN,
    MONITOR_DEV, MONITOR_DIRECTION, MONITOR_IFINDEX, MONITOR_PRIO, MONITOR_RING_BYTES, MONITOR_SELECTED,
    MONITOR_UNMATCHED, MonitorConfig, MonitorEvent, MonitorState, RuleKey, RuleSpec, TARGET_QUEUE, TARGET_SET_MARK,
    TARGET_SET_PRIORITY, Target, VERDICT_BYPASSED, VERDICT_SELECTED, VERDICT_UNMATCHED, queue_index,
};

/// The generation in use (index 0). Only ever 0 or 1, so a reader racing the flip
/// sees one of the two whole values (only the low byte changes).
#[map(name = "imq_active")]
static ACTIVE: Array<u32> = Array::with_max_entries(1, 0);

/// Shapes by hook and generation. Not preallocated: an update links a fresh element
/// and frees the old one after an RCU grace period (htab_map_update_elem), so a
/// program reading it never sees it rewritten.
#[map(name = "imq_hooks")]
static HOOKS: HashMap<HookKey, Hook> = HashMap::with_max_entries(MAX_HOOKS, BPF_F_NO_PREALLOC);

/// (hook, shape, masked key) -> target.
#[map(name = "imq_entries")]
static ENTRIES: HashMap<EntryKey, Target> = HashMap::with_max_entries(MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// The rules as written, by id and generation. The control plane's record; never
/// read here.
#[map(name = "imq_rules")]
static RULES: HashMap<RuleKey, RuleSpec> = HashMap::with_max_entries(2 * MAX_RULES, BPF_F_NO_PREALLOC);

/// imq device number -> ifindex.
#[map(name = "imq_devices")]
static DEVICES: Array<Device> = Array::with_max_entries(MAX_DEVICES, 0);

/// ifindex -> imq device number: which interfaces are imq devices (a packet one of
/// them re-injects on egress is never selected again).
#[map(name = "imq_ifindexes")]
static IFINDEXES: HashMap<u32, u32> = HashMap::with_max_entries(2 * MAX_DEVICES, 0);

/// Per-rule packets and bytes sent to the imq device, per CPU. The control plane
/// creates a rule's slot (zeroed) before the rule can match and deletes it after.
#[map(name = "imq_counters")]
static COUNTERS: PerCpuHashMap<u32, Counters> = PerCpuHashMap::with_max_entries(MAX_RULE_IDS, BPF_F_NO_PREALLOC);

/// What `imqctl monitor` asked to see; all zero when nobody watches.
#[map(name = "imq_monitor")]
static MONITOR: Array<MonitorConfig> = Array::with_max_entries(1, 0);

/// Per CPU: the monitor's token bucket and what it held back.
#[map(name = "imq_monitor_state")]
static MONITOR_STATE: PerCpuArray<MonitorState> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU: the event being built. The classifier leaves its flow key here, only when
/// a monitor watches, so that the key need not live to the end of the program (kept
/// alive, it cost every packet stack copies, about 10 ns in BPF_PROG_TEST_RUN); the
/// event is then sent from here, not from the stack.
#[map(name = "imq_monitor_event")]
static SCRATCH: PerCpuArray<MonitorEvent> = PerCpuArray::with_max_entries(1, 0);

/// Monitor events: one BPF ring buffer, shared by every CPU, in order. It exists only
/// while a monitor runs: `imqctl monitor` creates it, puts it at index 0 and takes it
/// out when it stops, so a namespace nobody watches holds no ring buffer memory (a
/// plain ring buffer map would be allocated with the map, in every namespace, for
/// good). Inner ring buffers are valid since 5.8 (5.10 checks them with
/// map_meta_equal, hence one fixed size).
#[btf_map(name = "imq_events")]
static EVENTS: ArrayOfMaps<EventRing, 1> = ArrayOfMaps::new();
type EventRing = RingBuf<u8, { MONITOR_RING_BYTES as usize }>;

/// Index 0 becomes 1 when the namespace this instance serves is torn down (its
/// loopback device unregisters, which happens only then): the next imqctl, in any
/// namespace, removes the pins of a namespace that is gone.
#[map(name = "imq_gone")]
static GONE: Array<u32> = Array::with_max_entries(1, 0);

/// The loopback device's ifindex in every namespace (LOOPBACK_IFINDEX).
const LOOPBACK_IFINDEX: u32 = 1;

/// TCX verdict "not mine": the next TCX program, then classic tc filters, still run.
const TCX_NEXT: i32 = TC_ACT_UNSPEC;
/// cls_bpf (classic mode) verdicts: match with the filter's own classid, or no match.
const CLS_MATCH: i32 = -1;
const CLS_NO_MATCH: i32 = 0;

// Header layouts and protocol numbers are network-types'. EtherType's values are in
// network byte order, as the packet holds them: compared with the raw field, no swap.
const ETH_P_IP: u16 = EtherType::Ipv4 as u16;
const ETH_P_IPV6: u16 = EtherType::Ipv6 as u16;
const IPPROTO_HOPOPTS: u8 = IpProto::HopOpt as u8;
const IPPROTO_TCP: u8 = IpProto::Tcp as u8;
const IPPROTO_UDP: u8 = IpProto::Udp as u8;
const IPPROTO_ROUTING: u8 = IpProto::Ipv6Route as u8;
const IPPROTO_FRAGMENT: u8 = IpProto::Ipv6Frag as u8;
const IPPROTO_AH: u8 = IpProto::Ah as u8;
const IPPROTO_DSTOPTS: u8 = IpProto::Ipv6Opts as u8;
const IPPROTO_SCTP: u8 = IpProto::Sctp as u8;
const IPPROTO_UDPLITE: u8 = IpProto::UdpLite as u8;
/// IPv6 extension headers walked before giving up on reaching the transport header.
const MAX_EXT_HEADERS: usize = 8;

#[classifier]
pub fn imq_ingress(ctx: TcContext) -> i32 {
    let watched = watched();
    match select(&ctx, DIRECTION_INGRESS, watched) {
        Outcome::Selected(sel) => {
            act(&ctx, &sel);
            if watched {
                report(&ctx, DIRECTION_INGRESS, VERDICT_SELECTED, &sel.target);
            }
            // SAFETY: plain helper call; the verdict it returns (TC_ACT_REDIRECT, or
            // TC_ACT_SHOT for bad flags, which we never pass) is handed to the kernel.
            unsafe { bpf_redirect(sel.ifindex, 0) as i32 }
        }
        Outcome::Bypassed(target) => {
            if watched {
                report(&ctx, DIRECTION_INGRESS, VERDICT_BYPASSED, &target);
            }
            TCX_NEXT
        }
        Outcome::Unmatched(_) => {
            if watched {
                report(&ctx, DIRECTION_INGRESS, VERDICT_UNMATCHED, &NO_RULE);
            }
            TCX_NEXT
        }
        Outcome::Pass => TCX_NEXT,
    }
}

/// Ingress classifier for kernels without TCX, run by cls_bpf in classic mode with an
/// `act_mirred egress redirect` to one imq device, as [`imq_egress`] is. Not
/// bpf_redirect from a direct-action filter: on 5.10 that leaves skb->redirected
/// unset (__bpf_tx_skb), and ifb drops what it did not see redirected (ifb_xmit;
/// seen on Debian 11's 5.10: every packet counted in imq0's RX dropped). mirred sets
/// it (skb_set_redirected), and this is the classic ifb ingress setup.
#[classifier]
pub fn imq_ingress_cls(ctx: TcContext) -> i32 {
    classic(&ctx, DIRECTION_INGRESS)
}

/// Egress classifier, run by cls_bpf in classic (non direct-action) mode with an
/// `act_mirred egress redirect` to one imq device. bpf_redirect cannot be used on
/// egress: it leaves skb_iif unset, so ifb drops local packets and sends forwarded ones
/// back out of their input device (ifb_xmit, ifb_ri_tasklet); mirred sets skb_iif to
/// the egress device first.
#[classifier]
pub fn imq_egress(ctx: TcContext) -> i32 {
    // SAFETY: ctx.skb.skb is the context pointer the kernel gave this program.
    let came_from = unsafe { (*ctx.skb.skb).ingress_ifindex };
    // ifb re-injects with dev_queue_xmit, skb_iif set to itself and
    // skb->tc_skip_classify set, and classifiers run again. A packet any imq device
    // re-injected is never selected again: not by this device's filter, and not by
    // another's, which a rule's --set-mark may have made it match. It is answered
    // "match" all the same, without counting or acting: the filter's actions then run,
    // and tcf_action_exec, seeing tc_skip_classify, clears it and lets the packet go
    // on (TC_ACT_OK) without running mirred. Answered "no match", the flag would leave
    // with the packet, and a veth peer would skip its TC ingress for it: its own imq,
    // tc filters and TCX programs (__netif_receive_skb_core). Checked first, so the
    // second pass costs one lookup, not a classification.
    if is_imq_device(came_from) {
        return CLS_MATCH;
    }
    classic(&ctx, DIRECTION_EGRESS)
}

/// A classic-mode filter's answer. There is one filter per imq device the hook's
/// rules use, all running this program; cls_bpf stores the filter's classid in
/// skb->tc_classid before running it (cls_bpf_classify), and its minor number says
/// which device this filter serves. The program answers "match" (-1: use the filter's
/// classid, then run its mirred action) only when the first matching rule sends the
/// packet to that device.
#[inline(always)]
fn classic(ctx: &TcContext, direction: u32) -> i32 {
    // SAFETY: ctx.skb.skb is the context pointer the kernel gave this program.
    let filter_dev = unsafe { (*ctx.skb.skb).tc_classid & 0xffff };
    let watched = watched();
    match select(ctx, direction, watched) {
        Outcome::Selected(sel) if sel.target.dev == filter_dev => {
            act(ctx, &sel);
            if watched {
                report(ctx, direction, VERDICT_SELECTED, &sel.target);
            }
            CLS_MATCH
        }
        Outcome::Bypassed(target) if target.dev == filter_dev => {
            if watched {
                report(ctx, direction, VERDICT_BYPASSED, &target);
            }
            CLS_NO_MATCH
        }
        Outcome::Unmatched(dev) if dev == filter_dev => {
            if watched {
                report(ctx, direction, VERDICT_UNMATCHED, &NO_RULE);
            }
            CLS_NO_MATCH
        }
        _ => CLS_NO_MATCH,
    }
}

/// Whether `ifindex` is an imq device (0, "none", is not).
#[inline(always)]
fn is_imq_device(ifindex: u32) -> bool {
    // SAFETY: only whether the key exists is used.
    ifindex != 0 && unsafe { IFINDEXES.get(ifindex) }.is_some()
}

/// What the first matching rule decided, the ifindex of its imq device, and the
/// device's TX queue it chose, plus one (0: the kernel chooses).
struct Selection {
    target: Target,
    ifindex: u32,
    queue: u32,
}

/// What classification decided.
enum Outcome {
    /// Not imq's: the interface has no rules in this direction.
    Pass,
    /// No rule took it (a packet that is not a complete IPv4/IPv6 packet included);
    /// the imq device whose classic filter reports it.
    Unmatched(u32),
    /// A rule took it, but its device is down or missing: it passes unshaped.
    Bypassed(Target),
    Selected(Selection),
}

/// The rule of an unmatched packet in a monitor event.
const NO_RULE: Target = Target {
    prio: u32::MAX,
    rule_id: u32::MAX,
    dev: u32::MAX,
    flags: 0,
    set_mark_value: 0,
    set_mark_mask: 0,
    priority: 0,
    queue: 0,
};

/// The rule's actions, on a packet that is being sent to its imq device.
#[inline(always)]
fn act(ctx: &TcContext, sel: &Selection) {
    let t = &sel.target;
    // SAFETY: ctx.skb.skb is the context pointer; mark and priority are fields a
    // SCHED_CLS program may write.
    unsafe {
        let skb = ctx.skb.skb;
        if t.flags & TARGET_SET_MARK != 0 {
            (*skb).mark = ((*skb).mark & !t.set_mark_mask) | t.set_mark_value;
        }
        if t.flags & TARGET_SET_PRIORITY != 0 {
            (*skb).priority = t.priority;
        }
        // Read as the recorded RX queue, plus one, by the imq device's queue choice
        // (netdev_pick_tx, skb_tx_hash): the packet goes to TX queue `queue - 1`.
        if sel.queue != 0 {
            (*skb).queue_mapping = sel.queue;
        }
    }
    count(t.rule_id, ctx.len());
}

/// Whether the packet is selected for an imq device, and which.
///
/// Every "no" is deliberate and leaves the packet untouched: not IPv4/IPv6, a header
/// too short to be a real packet, no rules on this hook, no rule matching, or a target
/// device that does not exist or is down (pass unshaped rather than drop, as IMQ did).
#[inline(always)]
fn select(ctx: &TcContext, direction: u32, watched: bool) -> Outcome {
    // SAFETY: ctx.skb.skb is the context pointer the kernel gave this program.
    let (ifindex, mark) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).mark) };
    let Some(generation) = ACTIVE.get(0) else {
        return Outcome::Pass;
    };
    let hook = HookKey {
        ifindex,
        direction: direction as u16,
        generation: *generation as u16,
    };
    // SAFETY: the value is only read, and an update replaces the element instead of
    // writing into it (see HOOKS).
    let Some(shapes) = (unsafe { HOOKS.get(hook) }) else {
        return Outcome::Pass;
    };
    let Some(flow) = parse(ctx, mark) else {
        if watched {
            keep_not_ip(mark);
        }
        return Outcome::Unmatched(shapes.unmatched_dev);
    };
    if watched {
        keep_flow(&flow);
    }
    let Some(target) = search(hook, shapes, &flow) else {
        return Outcome::Unmatched(shapes.unmatched_dev);
    };
    let dev = DEVICES.get(target.dev).copied().unwrap_or_default();
    if dev.ifindex == 0 || dev.flags & DEVICE_DOWN != 0 || !device_exists(ctx, dev.ifindex) {
        return Outcome::Bypassed(target);
    }
    let queues = dev.flags >> DEVICE_QUEUES_SHIFT;
    let queue = if target.flags & TARGET_QUEUE != 0 && queues > 1 {
        queue_index(&target, &flow, queues) + 1
    } else {
        0
    };
    Outcome::Selected(Selection {
        target,
        ifindex: dev.ifindex,
        queue,
    })
}

/// Whether `imqctl monitor` watches: when it does not, this is the data path's whole
/// cost of the monitor, one array element read and one branch.
#[inline(always)]
fn watched() -> bool {
    MONITOR.get(0).is_some_and(|c| c.flags != 0)
}

/// Leaves what the classifier saw for [`report`].
#[inline(always)]
fn keep_flow(flow: &FlowKey) {
    if let Some(e) = SCRATCH.get_ptr_mut(0) {
        // SAFETY: per-CPU element; a TC program runs to its end on one CPU.
        unsafe { (*e).flow = *flow };
    }
}

/// As [`keep_flow`] for what is not an IPv4/IPv6 packet: the mark, and family 0 (the
/// reader ignores addresses and ports then). Field by field: a whole zeroed key
/// would become a call to memset, a BPF-to-BPF call that Linux 5.10 refuses here.
#[inline(always)]
fn keep_not_ip(mark: u32) {
    if let Some(e) = SCRATCH.get_ptr_mut(0) {
        // SAFETY: as in keep_flow.
        unsafe {
            (*e).flow.mark = mark;
            (*e).flow.family = 0;
            (*e).flow.proto = 0;
            (*e).flow.dscp = 0;
            (*e).flow.flags = 0;
        }
    }
}

/// Reports the packet to `imqctl monitor` (which watches), if its filters, sampling
/// and rate let it through.
#[inline(always)]
fn report(ctx: &TcContext, direction: u32, verdict: u8, target: &Target) {
    let Some(cfg) = MONITOR.get(0) else {
        return;
    };
    let flags = cfg.flags;
    let wanted = if verdict == VERDICT_UNMATCHED {
        MONITOR_UNMATCHED
    } else {
        MONITOR_SELECTED
    };
    // SAFETY: ctx.skb.skb is the context pointer the kernel gave this program.
    let (ifindex, mark, priority) = unsafe {
        let skb = ctx.skb.skb;
        ((*skb).ifindex, (*skb).mark, (*skb).priority)
    };
    if flags & wanted == 0
        || (flags & MONITOR_IFINDEX != 0 && ifindex != cfg.ifindex)
        || (flags & MONITOR_DIRECTION != 0 && direction != cfg.direction)
        || (flags & MONITOR_PRIO != 0 && target.prio != cfg.prio)
        || (flags & MONITOR_DEV != 0 && target.dev != cfg.dev)
    {
        return;
    }
    let sample = cfg.sample;
    // SAFETY: plain helper call.
    if sample > 1 && unsafe { bpf_get_prandom_u32() } % sample != 0 {
        return;
    }
    let Some(state) = MONITOR_STATE.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    // A token bucket of `rate` events per second, as deep as one second's worth. In
    // units of 10^-9 event, so that the refill is exact; the time since the last event
    // is taken at most one second, which keeps the product within 64 bits.
    const ONE: u64 = 1_000_000_000;
    let rate = u64::from(cfg.rate);
    // SAFETY: per-CPU element; only this CPU touches it while the program runs.
    unsafe {
        let elapsed = now.wrapping_sub((*state).last_ns).min(ONE);
        (*state).last_ns = now;
        let tokens = ((*state).tokens + elapsed * rate).min(ONE * rate);
        if tokens < ONE {
            (*state).tokens = tokens;
            (*state).limited += 1;
            return;
        }
        (*state).tokens = tokens - ONE;
    }
    let len = ctx.len();
    let cap_len = cfg.snaplen.min(len).min(MAX_SNAPLEN);
    let Some(event) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU element, its flow left by the classifier of this packet.
    unsafe {
        (*event).ts_ns = now;
        (*event).ifindex = ifindex;
        (*event).len = len;
        (*event).mark = mark;
        (*event).priority = priority;
        (*event).rule_id = target.rule_id;
        (*event).prio = target.prio;
        (*event).dev = target.dev;
        (*event).direction = direction as u8;
        (*event).verdict = verdict;
        (*event).cap_len = cap_len;
    }
    // No ring: the monitor is starting or stopping.
    let Some(ring) = EVENTS.get(0) else {
        return;
    };
    // A ring buffer record's size must be a constant: the packet's bytes go into the
    // smallest of a few.
    let skb = ctx.skb.skb;
    let sent = if cap_len == 0 {
        emit::<0>(ring, skb, event, cap_len)
    } else if cap_len <= 256 {
        emit::<256>(ring, skb, event, cap_len)
    } else if cap_len <= 2048 {
        emit::<2048>(ring, skb, event, cap_len)
    } else {
        emit::<65536>(ring, skb, event, cap_len)
    };
    if !sent {
        // SAFETY: as above.
        unsafe { (*state).lost += 1 };
    }
}

/// Sends `event` and the packet's first `cap_len` bytes (1..=CAP, or 0 when CAP is 0)
/// as one record of `CAP` bytes after the event. False if the ring had no room.
#[inline(always)]
fn emit<const CAP: usize>(ring: &EventRing, skb: *mut __sk_buff, event: *const MonitorEvent, cap_len: u32) -> bool {
    const HEAD: usize = size_of::<MonitorEvent>();
    let Some(mut record) = ring.reserve_bytes(HEAD + CAP, 0) else {
        return false;
    };
    let dst = record.as_mut_ptr();
    // Word by word, volatile: a struct copy may become a call to memcpy, and 5.10
    // refuses BPF-to-BPF calls here (see keep_not_ip).
    for i in 0..HEAD / 8 {
        // SAFETY: both are HEAD bytes long and 8-aligned (ring buffer records are).
        unsafe {
            dst.cast::<u64>()
                .add(i)
                .write_volatile(event.cast::<u64>().add(i).read_volatile())
        };
    }
    if CAP > 0 {
        // cap_len is 1..=CAP here, and (cap_len - 1) & (CAP - 1) + 1 equals it; the
        // verifier needs to see that bound, so the value is read back from the stack,
        // where the compiler cannot see it either and drop the mask.
        let n = u64::from(cap_len);
        // SAFETY: a read of a local.
        let n = (unsafe { core::ptr::read_volatile(&n) }.wrapping_sub(1) & (CAP as u64 - 1)) + 1;
        // SAFETY: the context pointer, and `n` bytes of the record after the event.
        let ret = unsafe { bpf_skb_load_bytes(skb.cast(), 0, dst.add(HEAD).cast(), n as u32) };
        if ret != 0 {
            record.discard(0);
            return false;
        }
    }
    // Without flags the kernel wakes the reader only when it has read everything
    // before this record: one wakeup for a burst.
    record.submit(0);
    true
}

/// The lowest-prio entry matching `flow` over the hook's shapes: one lookup per shape,
/// stopping at the first shape whose rules all come after the best match so far.
#[inline(always)]
fn search(hook: HookKey, shapes: &Hook, flow: &FlowKey) -> Option<Target> {
    // The best entry so far, by reference: one register, never a partly defined copy
    // (an Option<Target> left LLVM free to spill its undefined payload, which the
    // verifier refuses as a read of an uninitialized register).
    let mut best: Option<&Target> = None;
    let len = shapes.len as usize;
    for i in 0..MAX_SHAPES {
        if i >= len {
            break;
        }
        let shape = &shapes.shapes[i];
        if best.is_some_and(|b| b.prio <= shape.min_prio) {
            break;
        }
        if shape.family != 0 && shape.family != u32::from(flow.family) {
            continue;
        }
        let key = EntryKey {
            hook,
            shape: i as u32,
            flow: flow.masked(&shape.mask),
        };
        // SAFETY: read-only use of the value; see HOOKS for why it is stable.
        if let Some(t) = unsafe { ENTRIES.get(key) }
            && best.is_none_or(|b| t.prio < b.prio)
        {
            best = Some(t);
        }
    }
    best.copied()
}

/// `size_of::<T>()` bytes of the packet at `off`: read in place when they are in the
/// linear data (no helper call), else copied by bpf_skb_load_bytes, which also reads
/// paged data and fails past the end of the packet.
#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    // The bound lets the verifier see the in-place read stays within the packet.
    // Written as `off > LIMIT` so that the register is compared with an immediate
    // (BPF v1 has JGT, not JLT): with the constant in a register instead, the 5.10
    // verifier cannot decide the branch, walks the impossible side with contradictory
    // bounds on `off` and refuses the read there ("R1 invalid mem access 'inv'",
    // seen on Debian 11).
    if off > DIRECT_READ_LIMIT {
        return ctx.load::<T>(off).ok();
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + off + size_of::<T>() > end {
        return ctx.load::<T>(off).ok();
    }
    // SAFETY: [data + off, data + off + size) is within the linear data.
    Some(unsafe { core::ptr::read_unaligned((data + off) as *const T) })
}

/// Offsets up to this are read in place when the linear data has them.
const DIRECT_READ_LIMIT: usize = 256;

/// The packet's [`FlowKey`], or `None` for what is not a complete IPv4/IPv6 header
/// behind an Ethernet header: ARP, in-band VLAN tags and other frames are never
/// queued. A short packet fails the read (see [`read`]).
#[inline(always)]
fn parse(ctx: &TcContext, mark: u32) -> Option<FlowKey> {
    let ethertype = read::<u16>(ctx, offset_of!(EthHdr, ether_type))?;
    let mut flow = FlowKey {
        mark,
        ..FlowKey::default()
    };
    let (proto, l4, first_fragment) = match ethertype {
        ETH_P_IP => parse_ipv4(ctx, &mut flow)?,
        ETH_P_IPV6 => parse_ipv6(ctx, &mut flow)?,
        _ => return None,
    };
    flow.proto = proto;
    if first_fragment && matches!(proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP | IPPROTO_UDPLITE) {
        // The ports are the first four bytes of each of these headers; only they are
        // read (not a whole TcpHdr), so a truncated header still has them. Shorter
        // still: no ports, so no port rule matches.
        if let Some(ports) = read::<[u8; 4]>(ctx, l4) {
            flow.sport = u16::from_be_bytes([ports[0], ports[1]]);
            flow.dport = u16::from_be_bytes([ports[2], ports[3]]);
            flow.flags |= FLOW_PORTS;
        }
    }
    Some(flow)
}

/// Fills addresses and DSCP; returns (protocol, transport header offset, whether
/// the transport header is in this packet: not a non-first fragment).
#[inline(always)]
fn parse_ipv4(ctx: &TcContext, flow: &mut FlowKey) -> Option<(u8, usize, bool)> {
    let h = read::<Ipv4Hdr>(ctx, EthHdr::LEN)?;
    let hlen = usize::from(h.ihl());
    if h.version() != 4 || hlen < Ipv4Hdr::LEN {
        return None;
    }
    // The whole header as IHL declares it, options included.
    read::<u8>(ctx, EthHdr::LEN + hlen - 1)?;
    flow.family = 4;
    flow.dscp = h.dscp();
    flow.src[0] = u32::from_ne_bytes(h.src_addr);
    flow.dst[0] = u32::from_ne_bytes(h.dst_addr);
    Some((h.proto, EthHdr::LEN + hlen, h.frag_offset() == 0))
}

/// As [`parse_ipv4`], walking at most [`MAX_EXT_HEADERS`] extension headers.
#[inline(always)]
fn parse_ipv6(ctx: &TcContext, flow: &mut FlowKey) -> Option<(u8, usize, bool)> {
    let h = read::<Ipv6Hdr>(ctx, EthHdr::LEN)?;
    if h.version() != 6 {
        return None;
    }
    flow.family = 6;
    flow.dscp = h.dscp();
    for i in 0..4 {
        let word = |a: &[u8; 16]| u32::from_ne_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]]);
        flow.src[i] = word(&h.src_addr);
        flow.dst[i] = word(&h.dst_addr);
    }
    let mut next = h.next_hdr;
    let mut off = EthHdr::LEN + Ipv6Hdr::LEN;
    for _ in 0..MAX_EXT_HEADERS {
        let len = match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH | IPPROTO_FRAGMENT => {
                // Next header, then the length (8-octet units; 4-octet units for AH):
                // the first bytes every extension header shares (network-types has no
                // type for them).
                let Some(e) = read::<[u8; 4]>(ctx, off) else {
                    // Truncated: the protocol stays the header we could not read.
                    return Some((next, off, false));
                };
                let len = match next {
                    IPPROTO_FRAGMENT => {
                        if u16::from_be_bytes([e[2], e[3]]) & 0xfff8 != 0 {
                            // A later fragment: what follows is a piece of payload, not
                            // headers. Its protocol is the one the fragment header
                            // names, as for the kernel (ipv6_skip_exthdr).
                            return Some((e[0], off + 8, false));
                        }
                        8
                    }
                    IPPROTO_AH => (usize::from(e[1]) + 2) * 4,
                    _ => (usize::from(e[1]) + 1) * 8,
                };
                next = e[0];
                len
            }
            // The transport header (or one we do not walk): a first fragment, or no
            // fragment at all.
            _ => return Some((next, off, true)),
        };
        off += len;
    }
    // Too many extension headers: the transport header was not reached.
    Some((next, off, false))
}

/// A deleted imq device must not blackhole traffic: bpf_redirect to a missing ifindex
/// would drop the packet in skb_do_redirect, and so would mirred. bpf_fib_lookup
/// (Linux 4.18; bpf_check_mtu, which would do, came in 5.12) looks the device up in
/// the packet's namespace first and fails with -ENODEV when there is none; any other
/// answer means it exists. imqctl turns IPv4 forwarding off on imq devices, so the
/// lookup stops right there (BPF_FIB_LKUP_RET_FWD_DISABLED) without a route lookup
/// (bpf_ipv4_fib_lookup).
#[inline(always)]
fn device_exists(ctx: &TcContext, ifindex: u32) -> bool {
    const AF_INET: u8 = 2;
    const ENODEV: i64 = 19;
    const _: () = assert!(size_of::<bpf_fib_lookup>() == 64);
    // struct bpf_fib_lookup as words: family is its first byte, ifindex the u32 at
    // byte 8. Stored one by one: LLVM turns a zeroed buffer into a call to memset, a
    // function of its own in the object.
    let mut params = [0u64; 8];
    for (i, word) in params.iter_mut().enumerate() {
        let value = match i {
            0 => u64::from(AF_INET),
            1 => u64::from(ifindex),
            _ => 0,
        };
        // SAFETY: a valid, aligned stack slot.
        unsafe { core::ptr::write_volatile(word, value) };
    }
    // SAFETY: the context pointer and a stack buffer of the struct's size and alignment.
    let ret = unsafe { fib_lookup(ctx.skb.skb.cast(), params.as_mut_ptr().cast(), 64, 0) };
    ret != -ENODEV
}

#[inline(always)]
fn count(id: u32, len: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(id) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(len);
        }
    }
}

// Load-time constants, set by imqctl from the namespace it serves and the running
// kernel's BTF: which namespace this instance serves (its cookie, or its inode number
// on kernels that cannot report a cookie), where struct net_device, struct net and
// struct netdev_notifier_info keep what the hook below reads, and the values of enum
// netdev_cmd, which differ between kernel versions. Without CO-RE in Rust, offsets
// come in this way.
#[unsafe(no_mangle)]
static NETNS_ID: u64 = 0;
/// Bits of the u64 at OFFSET_NET_ID that hold the id (a 32-bit inode number, or the
/// whole 64-bit cookie).
#[unsafe(no_mangle)]
static NET_ID_MASK: u64 = 0;
#[unsafe(no_mangle)]
static OFFSET_NET_ID: u32 = 0;
#[unsafe(no_mangle)]
static OFFSET_DEV_IFINDEX: u32 = 0;
#[unsafe(no_mangle)]
static OFFSET_DEV_NET: u32 = 0;
#[unsafe(no_mangle)]
static OFFSET_INFO_DEV: u32 = 0;
#[unsafe(no_mangle)]
static NETDEV_UP: u64 = 0;
#[unsafe(no_mangle)]
static NETDEV_GOING_DOWN: u64 = 0;
#[unsafe(no_mangle)]
static NETDEV_DOWN: u64 = 0;
#[unsafe(no_mangle)]
static NETDEV_UNREGISTER: u64 = 0;

/// Every netdevice notifier event of the kernel goes through this vmlinux function,
/// whatever the driver and whether or not it is a module (ifb usually is, and a
/// module's functions are not in vmlinux's BTF). NETDEV_UP comes after the device
/// was opened and its qdisc activated (__dev_notify_flags); NETDEV_GOING_DOWN before
/// its qdisc is deactivated (__dev_close_many), so nothing is redirected into a
/// device that drops.
#[fentry(function = "call_netdevice_notifiers_info")]
pub fn imq_netdev_event(ctx: FEntryContext) -> u32 {
    // SAFETY: constants are read as the loader left them.
    let (up, going_down, down, unregister, off_info_dev) = unsafe {
        (
            core::ptr::read_volatile(&NETDEV_UP),
            core::ptr::read_volatile(&NETDEV_GOING_DOWN),
            core::ptr::read_volatile(&NETDEV_DOWN),
            core::ptr::read_volatile(&NETDEV_UNREGISTER),
            core::ptr::read_volatile(&OFFSET_INFO_DEV) as usize,
        )
    };
    let event: u64 = ctx.arg(0);
    let change = if event == up {
        Change::Up
    } else if event == going_down || event == down {
        Change::Down
    } else if event == unregister && unregister != 0 {
        Change::Unregister
    } else {
        return 0;
    };
    let info: *const u8 = ctx.arg(1);
    // SAFETY: bpf_probe_read_kernel checks the address; info is the hooked function's
    // struct netdev_notifier_info *.
    if let Ok(dev) = unsafe { bpf_probe_read_kernel(info.add(off_info_dev).cast::<*const u8>()) } {
        track_device(dev, change);
    }
    0
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Change {
    Up,
    Down,
    Unregister,
}

#[inline(always)]
fn track_device(dev: *const u8, change: Change) {
    // SAFETY: constants are read as the loader left them.
    let (id, mask, off_id, off_ifindex, off_net) = unsafe {
        (
            core::ptr::read_volatile(&NETNS_ID),
            core::ptr::read_volatile(&NET_ID_MASK),
            core::ptr::read_volatile(&OFFSET_NET_ID) as usize,
            core::ptr::read_volatile(&OFFSET_DEV_IFINDEX) as usize,
            core::ptr::read_volatile(&OFFSET_DEV_NET) as usize,
        )
    };
    if id == 0 || off_ifindex == 0 {
        return;
    }
    // SAFETY: bpf_probe_read_kernel checks the addresses; dev is a struct net_device *.
    let read = || unsafe {
        let net = bpf_probe_read_kernel(dev.add(off_net).cast::<*const u8>()).ok()?;
        let dev_id = bpf_probe_read_kernel(net.add(off_id).cast::<u64>()).ok()? & mask;
        let ifindex = bpf_probe_read_kernel(dev.add(off_ifindex).cast::<u32>()).ok()?;
        Some((dev_id, ifindex))
    };
    // Each namespace's imq state has its own instance: only its devices count.
    let Some((dev_id, ifindex)) = read() else {
        return;
    };
    if dev_id != id {
        return;
    }
    if change == Change::Unregister {
        if ifindex == LOOPBACK_IFINDEX
            && let Some(gone) = GONE.get_ptr_mut(0)
        {
            // SAFETY: array element.
            unsafe { *gone = 1 };
        }
        return;
    }
    let up = change == Change::Up;
    // Device up/down is rare: a scan of the device table is fine here and keeps the
    // per-packet path to the one lookup it already makes.
    for n in 0..MAX_DEVICES {
        if let Some(d) = DEVICES.get_ptr_mut(n) {
            // SAFETY: array element; racing writers only ever store whole flag words.
            unsafe {
                if (*d).ifindex == ifindex {
                    (*d).flags = if up {
                        (*d).flags & !DEVICE_DOWN
                    } else {
                        (*d).flags | DEVICE_DOWN
                    };
                }
            }
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
