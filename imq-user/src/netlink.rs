//! Link queries and ifb management over rtnetlink, behind a blocking facade: imqctl
//! does a handful of requests per command, so one current-thread runtime is enough.

use std::io;

use futures::{StreamExt as _, TryStreamExt as _};
use rtnetlink::{
    Handle, LinkIfb, LinkUnspec,
    packet_core::{
        DefaultNla, Emitable as _, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
        NetlinkMessage, NetlinkPayload, Nla as _,
    },
    packet_route::{
        RouteNetlinkMessage,
        link::{LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
        tc::{
            TcAction, TcActionAttribute, TcActionMirror, TcActionMirrorOption, TcActionOption, TcActionType,
            TcAttribute, TcFilterBpf, TcFilterBpfOption, TcHandle, TcHeader, TcMessage, TcMirror, TcMirrorActionType,
            TcOption, TcStats2, TcXstats,
        },
    },
};
use tokio::runtime::Runtime;

use crate::{
    error::{Error, Result},
    rule::Direction,
    shaper::QdiscStats,
};

/// What imq needs to know of a network interface.
#[derive(Clone, Debug)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// rtnetlink "kind" (`ifb`, `veth`, ...); `None` for physical devices.
    pub kind: Option<String>,
    /// `ARPHRD_*` link type, as iproute2 names it in lower case (`ether`, `loopback`...).
    pub link_type: String,
    pub is_ether: bool,
    pub up: bool,
    pub txqueuelen: u32,
    /// TX queues (IFLA_NUM_TX_QUEUES; 1 where the kernel does not say).
    pub queues: u32,
}

impl Link {
    fn from_message(msg: &LinkMessage) -> Self {
        let mut link = Self {
            index: msg.header.index,
            name: String::new(),
            kind: None,
            link_type: msg.header.link_layer_type.to_string().to_lowercase(),
            is_ether: u16::from(msg.header.link_layer_type) == libc::ARPHRD_ETHER,
            up: msg.header.flags.contains(LinkFlags::Up),
            txqueuelen: 0,
            queues: 1,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name.clone_from(n),
                LinkAttribute::TxQueueLen(q) => link.txqueuelen = *q,
                LinkAttribute::NumTxQueues(q) => link.queues = (*q).max(1),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(kind) = info {
                            link.kind = Some(kind.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }

    pub fn is_ifb(&self) -> bool {
        self.kind.as_deref() == Some("ifb")
    }
}

/// What an imq device needs besides being an ifb, set on creation and again whenever
/// imqctl adopts or re-registers one. Best effort: a sysctl that is absent (IPv6
/// disabled altogether) has nothing to set.
/// - No IPv6 on it: an imq device carries other interfaces' packets and must not send
///   ND/MLD of its own (ifb would drop them and count them as received).
/// - No IPv4 forwarding on it: it forwards nothing itself (ifb re-injects packets as
///   their own interface's), and the data path's check that the device exists
///   (bpf_fib_lookup) then stops before a route lookup.
pub fn prepare_imq_device(name: &str) {
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    let _ = std::fs::write(format!("/proc/sys/net/ipv4/conf/{name}/forwarding"), "0");
}

pub struct Netlink {
    rt: Runtime,
    handle: Handle,
}

fn nl_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Netlink(format!("{what}: {e}"))
}

impl Netlink {
    pub fn new() -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|e| Error::io("tokio runtime", e))?;
        let handle = rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| Error::io("netlink socket", e))?;
            tokio::spawn(conn);
            Ok::<_, Error>(handle)
        })?;
        Ok(Self { rt, handle })
    }

    pub fn links(&self) -> Result<Vec<Link>> {
        self.rt.block_on(async {
            let msgs: Vec<LinkMessage> = self
                .handle
                .link()
                .get()
                .execute()
                .try_collect()
                .await
                .map_err(|e| nl_err("list links", e))?;
            Ok(msgs.iter().map(Link::from_message).collect())
        })
    }

    pub fn link_by_name(&self, name: &str) -> Result<Option<Link>> {
        Ok(self.links()?.into_iter().find(|l| l.name == name))
    }

    pub fn link_by_index(&self, index: u32) -> Result<Option<Link>> {
        Ok(self.links()?.into_iter().find(|l| l.index == index))
    }

    /// Creates an ifb device with the given txqueuelen and TX (and RX) queues and
    /// brings it up, prepared as an imq device ([`prepare_imq_device`]).
    pub fn add_ifb(&self, name: &str, txqueuelen: u32, queues: u32) -> Result<Link> {
        let added = self.rt.block_on(async {
            let mut msg = LinkIfb::new(name).txqueuelen(txqueuelen).build();
            if queues > 1 {
                msg.attributes.push(LinkAttribute::NumTxQueues(queues));
                msg.attributes.push(LinkAttribute::NumRxQueues(queues));
            }
            self.handle.link().add(msg).execute().await
        });
        if let Err(e) = added {
            // Created by someone else in the meantime (imqctl itself serializes):
            // adopt it if it is an ifb.
            return match self.link_by_name(name)? {
                Some(l) if l.is_ifb() => {
                    if !l.up {
                        self.set_up(l.index)?;
                    }
                    Ok(Link { up: true, ..l })
                }
                _ => Err(nl_err(&format!("create {name}"), e)),
            };
        }
        let link = self
            .link_by_name(name)?
            .ok_or_else(|| Error::Netlink(format!("{name} vanished right after it was created")))?;
        prepare_imq_device(name);
        if let Err(e) = self.set_up(link.index) {
            let _ = self.del_link(link.index);
            return Err(e);
        }
        Ok(Link { up: true, ..link })
    }

    pub fn set_up(&self, index: u32) -> Result<()> {
        self.set_link(LinkUnspec::new_with_index(index).up().build(), "set link up")
    }

    pub fn set_txqueuelen(&self, index: u32, txqueuelen: u32) -> Result<()> {
        self.set_link(
            LinkUnspec::new_with_index(index).txqueuelen(txqueuelen).build(),
            "set txqueuelen",
        )
    }

    fn set_link(&self, msg: LinkMessage, what: &str) -> Result<()> {
        self.rt
            .block_on(async { self.handle.link().set(msg).execute().await.map_err(|e| nl_err(what, e)) })
    }

    pub fn del_link(&self, index: u32) -> Result<()> {
        self.rt.block_on(async {
            self.handle
                .link()
                .del(index)
                .execute()
                .await
                .map_err(|e| nl_err("delete link", e))
        })
    }
}

/// Preference of imq's filters on the clsact hooks. High, so that the admin's own
/// filters (tc numbers them from 49152 down) run first; IMQ likewise took packets at
/// POSTROUTING after every table.
pub const FILTER_PREF: u16 = 0xfff0;
/// The classid major of imq's filters; the minor is the imq device number the filter's
/// mirred action sends to (the program reads it from skb->tc_classid).
const FILTER_CLASSID_MAJOR: u16 = 0x1a0;
const ETH_P_ALL: u16 = 0x0003;
const TCA_BPF_ACT: u16 = 1;

/// One of imq's cls_bpf filters on an interface's clsact (or ingress) qdisc: the
/// filter of imq device `dev` on one hook, running the hook's program in classic mode
/// with a mirred action to the device. (Ingress has them on kernels without TCX.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Filter {
    pub direction: Direction,
    pub dev: u32,
}

impl Filter {
    fn parent(direction: Direction) -> TcHandle {
        TcHandle {
            major: TcHandle::CLSACT.major,
            minor: match direction {
                Direction::Ingress => TcHandle::MIN_INGRESS,
                Direction::Egress => TcHandle::MIN_EGRESS,
            },
        }
    }

    fn header(self, ifindex: u32) -> TcHeader {
        TcHeader {
            index: ifindex as i32,
            parent: Self::parent(self.direction),
            handle: TcHandle::from(self.dev + 1),
            info: (u32::from(FILTER_PREF) << 16) | u32::from(ETH_P_ALL.to_be()),
            ..TcHeader::default()
        }
    }
}

impl Netlink {
    /// Sends one request; collects the messages of a dump. A kernel error comes back
    /// as its errno.
    fn tc_request(&self, msg: RouteNetlinkMessage, flags: u16) -> std::result::Result<Vec<TcMessage>, io::Error> {
        self.rt.block_on(async {
            let mut req = NetlinkMessage::from(msg);
            req.header.flags = flags;
            let mut responses = self
                .handle
                .clone()
                .request(req)
                .map_err(|e| io::Error::other(e.to_string()))?;
            let mut out = Vec::new();
            while let Some(resp) = responses.next().await {
                match resp.payload {
                    NetlinkPayload::Error(e) => {
                        if let Some(code) = e.code {
                            return Err(io::Error::from_raw_os_error(-code.get()));
                        }
                    }
                    NetlinkPayload::InnerMessage(
                        RouteNetlinkMessage::NewTrafficFilter(m)
                        | RouteNetlinkMessage::NewQueueDiscipline(m)
                        | RouteNetlinkMessage::NewTrafficClass(m),
                    ) => out.push(m),
                    _ => {}
                }
            }
            Ok(out)
        })
    }

    /// Makes sure the interface has the qdisc imq's filters of `direction` hang on:
    /// clsact, added unless there. An admin's `ingress` qdisc serves the ingress
    /// filters as well (its filters share the ffff: block), but not the egress ones.
    pub fn ensure_clsact(&self, ifindex: u32, ifname: &str, direction: Direction) -> Result<()> {
        let mut msg = TcMessage::with_index(ifindex as i32);
        msg.header.handle = TcHandle {
            major: 0xffff,
            minor: 0,
        };
        msg.header.parent = TcHandle::CLSACT;
        msg.attributes.push(TcAttribute::Kind("clsact".into()));
        match self.tc_request(
            RouteNetlinkMessage::NewQueueDiscipline(msg),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => match (self.ingress_qdisc(ifindex)?, direction) {
                (Some(kind), _) if kind == "clsact" => Ok(()),
                (Some(kind), Direction::Ingress) if kind == "ingress" => Ok(()),
                _ => Err(Error::Netlink(format!(
                    "{ifname} has an ingress qdisc, not clsact: imq needs clsact for egress \
                     (tc qdisc del dev {ifname} ingress; tc qdisc add dev {ifname} clsact)"
                ))),
            },
            Err(e) => Err(nl_err(&format!("add clsact qdisc to {ifname}"), e)),
        }
    }

    /// The kind of the qdisc at ffff: (`clsact` or `ingress`), if any.
    fn ingress_qdisc(&self, ifindex: u32) -> Result<Option<String>> {
        let msg = TcMessage::with_index(ifindex as i32);
        let qdiscs = self
            .tc_request(RouteNetlinkMessage::GetQueueDiscipline(msg), NLM_F_REQUEST | NLM_F_DUMP)
            .map_err(|e| nl_err("list qdiscs", e))?;
        Ok(qdiscs
            .iter()
            .filter(|q| q.header.index == ifindex as i32)
            .flat_map(|q| &q.attributes)
            .find_map(|a| match a {
                TcAttribute::Kind(k) if k == "clsact" || k == "ingress" => Some(k.clone()),
                _ => None,
            }))
    }

    /// Installs (or replaces) `filter` on an interface: cls_bpf running `prog_fd` in
    /// classic mode, with `mirred egress redirect` to `dev_ifindex`. Replacing also
    /// re-points mirred at a re-created device.
    pub fn replace_filter(&self, ifindex: u32, filter: Filter, prog_fd: u32, dev_ifindex: u32) -> Result<()> {
        let mut mirred = TcMirror::default();
        mirred.generic.action = TcActionType::Stolen;
        mirred.eaction = TcMirrorActionType::EgressRedir;
        mirred.ifindex = dev_ifindex;
        let mut action = TcAction::default();
        action.attributes = vec![
            TcActionAttribute::Kind(TcActionMirror::KIND.to_string()),
            TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(mirred))]),
        ];
        // netlink-packet-route has no TCA_BPF_ACT option: emit the action list as a raw
        // attribute, laid out as iproute2 does.
        let actions = [action];
        let mut act_buf = vec![0u8; actions.as_slice().buffer_len()];
        actions.as_slice().emit(&mut act_buf);
        let dev = filter.dev;
        let mut msg = TcMessage::with_index(ifindex as i32);
        msg.header = filter.header(ifindex);
        msg.attributes.push(TcAttribute::Kind(TcFilterBpf::KIND.into()));
        msg.attributes.push(TcAttribute::Options(vec![
            TcOption::Bpf(TcFilterBpfOption::ProgFd(prog_fd)),
            TcOption::Bpf(TcFilterBpfOption::ProgName(format!(
                "imq_{}:imq{dev}",
                filter.direction
            ))),
            TcOption::Bpf(TcFilterBpfOption::ClassId(TcHandle {
                major: FILTER_CLASSID_MAJOR,
                minor: dev as u16,
            })),
            TcOption::Bpf(TcFilterBpfOption::Other(DefaultNla::new(TCA_BPF_ACT, act_buf))),
        ]));
        self.tc_request(
            RouteNetlinkMessage::NewTrafficFilter(msg),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
        .map_err(|e| nl_err("add filter", e))
    }

    /// Removes one of imq's filters from an interface, if there.
    pub fn del_filter(&self, ifindex: u32, filter: Filter) -> Result<()> {
        let mut msg = TcMessage::with_index(ifindex as i32);
        msg.header = filter.header(ifindex);
        msg.attributes.push(TcAttribute::Kind(TcFilterBpf::KIND.into()));
        match self.tc_request(RouteNetlinkMessage::DelTrafficFilter(msg), NLM_F_REQUEST | NLM_F_ACK) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINVAL | libc::ENODEV)) => Ok(()),
            Err(e) => Err(nl_err("delete filter", e)),
        }
    }

    /// imq's filters on the interface.
    pub fn filters(&self, ifindex: u32) -> Result<Vec<Filter>> {
        let mut found = Vec::new();
        for direction in [Direction::Ingress, Direction::Egress] {
            let mut msg = TcMessage::with_index(ifindex as i32);
            msg.header.parent = Filter::parent(direction);
            let filters = match self.tc_request(RouteNetlinkMessage::GetTrafficFilter(msg), NLM_F_REQUEST | NLM_F_DUMP)
            {
                Ok(f) => f,
                // No clsact qdisc: no filters.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => continue,
                Err(e) => return Err(nl_err("list filters", e)),
            };
            found.extend(
                filters
                    .iter()
                    .filter(|f| (f.header.info >> 16) as u16 == FILTER_PREF && u32::from(f.header.handle) != 0)
                    .filter(|f| {
                        f.attributes
                            .iter()
                            .any(|a| matches!(a, TcAttribute::Kind(k) if k == TcFilterBpf::KIND))
                    })
                    .map(|f| Filter {
                        direction,
                        dev: u32::from(f.header.handle) - 1,
                    }),
            );
        }
        Ok(found)
    }
}

/// One qdisc or class of an interface, with its options left raw (imq reads those of
/// its own shapers) and its counters.
#[derive(Clone, Debug)]
pub struct Qdisc {
    pub ifindex: u32,
    pub handle: u32,
    pub parent: u32,
    pub kind: String,
    /// TCA_OPTIONS, as the kernel sent it.
    pub options: Vec<u8>,
    pub stats: QdiscStats,
}

/// The root of a device's egress qdisc tree.
pub const TC_H_ROOT: u32 = 0xffff_ffff;
const TCA_OPTIONS: u16 = 2;

fn tc_handle(h: u32) -> TcHandle {
    TcHandle::from(h)
}

/// `1a1:` or `1a1:1`, as tc writes handles.
pub fn handle_text(h: u32) -> String {
    match h {
        TC_H_ROOT => "root".into(),
        h if h & 0xffff == 0 => format!("{:x}:", h >> 16),
        h => format!("{:x}:{:x}", h >> 16, h & 0xffff),
    }
}

impl Qdisc {
    fn from_message(m: &TcMessage) -> Self {
        let mut q = Self {
            ifindex: m.header.index as u32,
            handle: u32::from(m.header.handle),
            parent: u32::from(m.header.parent),
            kind: String::new(),
            options: Vec::new(),
            stats: QdiscStats::default(),
        };
        let mut app = None;
        for a in &m.attributes {
            match a {
                TcAttribute::Kind(k) => q.kind.clone_from(k),
                TcAttribute::Options(opts) => {
                    for o in opts {
                        let mut buf = vec![0u8; o.value_len()];
                        o.emit_value(&mut buf);
                        // Unknown kinds come back whole, as one TCA_OPTIONS.
                        if o.kind() == TCA_OPTIONS {
                            q.options = buf;
                        } else {
                            crate::shaper::nla(&mut q.options, o.kind(), &buf);
                        }
                    }
                }
                TcAttribute::Stats2(stats) => {
                    for s in stats {
                        match s {
                            TcStats2::Basic(b) => {
                                q.stats.sent_bytes = b.bytes;
                                q.stats.sent_packets = u64::from(b.packets);
                            }
                            TcStats2::Queue(qs) => {
                                q.stats.drops = u64::from(qs.drops);
                                q.stats.overlimits = u64::from(qs.overlimits);
                                q.stats.requeues = u64::from(qs.requeues);
                                q.stats.backlog_bytes = u64::from(qs.backlog);
                                q.stats.backlog_packets = u64::from(qs.qlen);
                            }
                            TcStats2::App(TcXstats::Other(raw)) => app = Some(raw.clone()),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        q.stats.kind.clone_from(&q.kind);
        q.stats.handle = handle_text(q.handle);
        q.stats.parent = handle_text(q.parent);
        if q.kind == "cake"
            && let Some(raw) = app
        {
            q.stats.cake = Some(crate::shaper::read_cake_stats(&raw));
        }
        q
    }
}

impl Netlink {
    /// The egress qdiscs of an interface, or of every interface for ifindex 0
    /// (clsact and ingress left out).
    pub fn qdiscs(&self, ifindex: u32) -> Result<Vec<Qdisc>> {
        let msg = TcMessage::with_index(ifindex as i32);
        let all = self
            .tc_request(RouteNetlinkMessage::GetQueueDiscipline(msg), NLM_F_REQUEST | NLM_F_DUMP)
            .map_err(|e| nl_err("list qdiscs", e))?;
        Ok(all
            .iter()
            .filter(|q| ifindex == 0 || q.header.index == ifindex as i32)
            .map(Qdisc::from_message)
            .filter(|q| q.kind != "clsact" && q.kind != "ingress")
            .collect())
    }

    /// The classes of an interface's root qdisc.
    pub fn classes(&self, ifindex: u32) -> Result<Vec<Qdisc>> {
        let msg = TcMessage::with_index(ifindex as i32);
        let all = self
            .tc_request(RouteNetlinkMessage::GetTrafficClass(msg), NLM_F_REQUEST | NLM_F_DUMP)
            .map_err(|e| nl_err("list classes", e))?;
        Ok(all.iter().map(Qdisc::from_message).collect())
    }

    /// `tc qdisc replace` (or `tc class replace` with `class`): creates it, or changes
    /// the one with this handle. ENOENT means the kernel has no such qdisc kind.
    pub fn replace_tc(
        &self,
        class: bool,
        ifindex: u32,
        parent: u32,
        handle: u32,
        kind: &str,
        options: Vec<u8>,
    ) -> std::result::Result<(), io::Error> {
        let mut msg = TcMessage::with_index(ifindex as i32);
        msg.header.parent = tc_handle(parent);
        msg.header.handle = tc_handle(handle);
        msg.attributes.push(TcAttribute::Kind(kind.into()));
        msg.attributes
            .push(TcAttribute::Other(DefaultNla::new(TCA_OPTIONS, options)));
        let msg = if class {
            RouteNetlinkMessage::NewTrafficClass(msg)
        } else {
            RouteNetlinkMessage::NewQueueDiscipline(msg)
        };
        self.tc_request(msg, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE)
            .map(drop)
    }

    /// `tc qdisc del dev X root`: the kernel puts its default qdisc back. Nothing to
    /// do if the root is already the default.
    pub fn del_root_qdisc(&self, ifindex: u32) -> Result<()> {
        let mut msg = TcMessage::with_index(ifindex as i32);
        msg.header.parent = tc_handle(TC_H_ROOT);
        match self.tc_request(RouteNetlinkMessage::DelQueueDiscipline(msg), NLM_F_REQUEST | NLM_F_ACK) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINVAL | libc::ENODEV)) => Ok(()),
            Err(e) => Err(nl_err("delete root qdisc", e)),
        }
    }
}
