//! Link queries and ifb management over rtnetlink, behind a blocking facade: imqctl
//! does a handful of requests per command, so one current-thread runtime is enough.

use futures::TryStreamExt as _;
use rtnetlink::{
    Handle, LinkIfb, LinkUnspec,
    packet_route::link::{LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
};
use tokio::runtime::Runtime;

use crate::error::{Error, Result};

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
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name.clone_from(n),
                LinkAttribute::TxQueueLen(q) => link.txqueuelen = *q,
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
            let (conn, handle, _) =
                rtnetlink::new_connection().map_err(|e| Error::io("netlink socket", e))?;
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

    /// Creates an ifb device with the given txqueuelen and brings it up. IPv6 is
    /// disabled on it first: an imq device carries other interfaces' packets and must
    /// not send ND/MLD of its own (ifb would drop them and count them as received).
    pub fn add_ifb(&self, name: &str, txqueuelen: u32) -> Result<Link> {
        self.rt.block_on(async {
            let msg = LinkIfb::new(name).txqueuelen(txqueuelen).build();
            self.handle
                .link()
                .add(msg)
                .execute()
                .await
                .map_err(|e| nl_err(&format!("create {name}"), e))
        })?;
        let link = self
            .link_by_name(name)?
            .ok_or_else(|| Error::Netlink(format!("{name} vanished right after it was created")))?;
        // Absent when IPv6 is disabled altogether: nothing to silence then.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        if let Err(e) = self.set_up(link.index) {
            let _ = self.del_link(link.index);
            return Err(e);
        }
        Ok(Link { up: true, ..link })
    }

    pub fn set_up(&self, index: u32) -> Result<()> {
        self.rt.block_on(async {
            let msg = LinkUnspec::new_with_index(index).up().build();
            self.handle
                .link()
                .set(msg)
                .execute()
                .await
                .map_err(|e| nl_err("set link up", e))
        })
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
