//! Test kit for imq: network namespaces that clean up after themselves, a bounded TCP
//! traffic generator that measures goodput at the receiver, and helpers to run imqctl
//! and ip/tc inside a namespace.
//!
//! Everything it creates lives in namespaces it created, with addresses from
//! 198.18.0.0/15 and 2001:db8::/32; nothing on the host is touched.

use std::{
    fs::File,
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Command, Output},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

pub mod check;
pub mod rng;
pub mod udp;

/// Privileged tests call this first: without root they fail, loudly, instead of
/// passing without having run.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "this test needs root (it creates network namespaces and loads BPF): run `sudo cargo xtask test`"
    );
}

/// A short name unique to this process and call, for namespaces and subnets.
pub fn unique_id() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    (std::process::id() % 10_000) * 100 + NEXT.fetch_add(1, Ordering::Relaxed) % 100
}

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("spawn {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// A network namespace, deleted on drop (with every device in it) unless adopted.
pub struct NetNs {
    name: String,
    owned: bool,
}

impl NetNs {
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name, owned: true };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A handle on a namespace someone else owns (and deletes), e.g. for a thread.
    pub fn adopt(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            owned: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `program args` in the namespace; fails unless it exits 0.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = run(self.command(program).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn ip(&self, args: &[&str]) -> Result<String> {
        self.exec("ip", args)
    }

    pub fn tc(&self, args: &[&str]) -> Result<String> {
        self.exec("tc", args)
    }

    /// A veth pair: `dev` in this namespace, `peer` in `other`.
    pub fn veth(&self, dev: &str, other: &NetNs, peer: &str) -> Result<()> {
        self.ip(&[
            "link",
            "add",
            dev,
            "type",
            "veth",
            "peer",
            "name",
            peer,
            "netns",
            other.name(),
        ])?;
        Ok(())
    }

    /// Spawns a thread that runs `f` inside this namespace (setns affects only the
    /// calling thread; sockets it opens stay in the namespace).
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> thread::JoinHandle<Result<T>> {
        let path = format!("/run/netns/{}", self.name);
        thread::spawn(move || {
            let ns = File::open(&path).with_context(|| format!("open {path}"))?;
            // SAFETY: valid fd of a network namespace.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error()).context("setns");
            }
            f()
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        // imq's pinned state for this namespace would outlive it: remove it first.
        if let Some(imqctl) = imqctl_path() {
            let _ = self.command(imqctl.to_str().unwrap_or("imqctl")).arg("flush").output();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

impl NetNs {
    /// Where imqctl keeps this namespace's pinned state on the host's bpffs:
    /// `net-<SO_NETNS_COOKIE>`, or `net-inode-<inode>` on kernels without cookies
    /// (before 5.14). Worked out here, not asked of imqctl.
    pub fn imq_state_dir(&self) -> PathBuf {
        let path = format!("/run/netns/{}", self.name);
        let cookie = self
            .spawn(|| {
                let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
                let mut cookie = 0u64;
                let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
                // SAFETY: getsockopt into a u64 of the length given.
                let rc = unsafe {
                    libc::getsockopt(
                        sock.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_NETNS_COOKIE,
                        (&raw mut cookie).cast(),
                        &raw mut len,
                    )
                };
                Ok((rc == 0).then_some(cookie))
            })
            .join()
            .expect("cookie thread")
            .expect("enter the namespace");
        let name = match cookie {
            Some(c) => format!("net-{c}"),
            None => {
                use std::os::unix::fs::MetadataExt as _;
                format!(
                    "net-inode-{}",
                    std::fs::metadata(&path).expect("stat the namespace").ino()
                )
            }
        };
        PathBuf::from("/sys/fs/bpf/imq").join(name)
    }
}

/// Two namespaces joined by a veth pair:
/// `client` (veth `c0`, 198.18.N.1, 2001:db8:N::1) — `server` (veth `s0`, .2, ::2).
pub struct Pair {
    // Field order: namespaces drop (and are deleted) after nothing else needs them.
    pub client: NetNs,
    pub server: NetNs,
    pub id: u32,
}

impl Pair {
    pub fn new(tag: &str) -> Result<Self> {
        let id = unique_id();
        let client = NetNs::new(format!("imq-{tag}-{id}-c"))?;
        let server = NetNs::new(format!("imq-{tag}-{id}-s"))?;
        client.veth("c0", &server, "s0")?;
        let net = id % 250;
        let v4 = |h: u8| format!("198.18.{net}.{h}/24");
        let v6 = |h: u8| format!("2001:db8:{net:x}::{h}/64");
        for (ns, dev, host) in [(&client, "c0", 1), (&server, "s0", 2)] {
            ns.ip(&["addr", "add", &v4(host), "dev", dev])?;
            ns.ip(&["addr", "add", &v6(host), "dev", dev, "nodad"])?;
            ns.ip(&["link", "set", dev, "up"])?;
        }
        Ok(Self { client, server, id })
    }

    pub fn server_v4(&self) -> String {
        format!("198.18.{}.2", self.id % 250)
    }

    pub fn server_v6(&self) -> String {
        format!("2001:db8:{:x}::2", self.id % 250)
    }
}

/// Clients, a router and a server, each in its own namespace:
///
/// ```text
/// client k (c0, 198.18.k.1, 2001:db8:k::1) —— r<k> (.2, ::2)  router  rs (198.19.0.2, 2001:db8:ff::2) —— s0 (198.19.0.1, 2001:db8:ff::1) server
/// ```
///
/// The router forwards IPv4 and IPv6 (sysctls of its own namespace only).
pub struct Routed {
    pub clients: Vec<NetNs>,
    pub router: NetNs,
    pub server: NetNs,
}

impl Routed {
    pub fn new(tag: &str, clients: usize) -> Result<Self> {
        let id = unique_id();
        let router = NetNs::new(format!("imq-{tag}-{id}-r"))?;
        let server = NetNs::new(format!("imq-{tag}-{id}-s"))?;
        for sysctl in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            router.exec("sysctl", &["-qw", sysctl])?;
        }
        let addr = |ns: &NetNs, dev: &str, v4: &str, v6: &str| -> Result<()> {
            ns.ip(&["addr", "add", v4, "dev", dev])?;
            ns.ip(&["addr", "add", v6, "dev", dev, "nodad"])?;
            ns.ip(&["link", "set", dev, "up"])?;
            Ok(())
        };
        server.veth("s0", &router, "rs")?;
        addr(&server, "s0", "198.19.0.1/24", "2001:db8:ff::1/64")?;
        addr(&router, "rs", "198.19.0.2/24", "2001:db8:ff::2/64")?;
        server.ip(&["route", "add", "default", "via", "198.19.0.2"])?;
        server.ip(&["-6", "route", "add", "default", "via", "2001:db8:ff::2"])?;
        let mut list = Vec::new();
        for k in 0..clients {
            let client = NetNs::new(format!("imq-{tag}-{id}-c{k}"))?;
            let r = format!("r{k}");
            client.veth("c0", &router, &r)?;
            addr(
                &client,
                "c0",
                &format!("198.18.{k}.1/24"),
                &format!("2001:db8:{k}::1/64"),
            )?;
            addr(&router, &r, &format!("198.18.{k}.2/24"), &format!("2001:db8:{k}::2/64"))?;
            client.ip(&["route", "add", "default", "via", &format!("198.18.{k}.2")])?;
            client.ip(&["-6", "route", "add", "default", "via", &format!("2001:db8:{k}::2")])?;
            list.push(client);
        }
        Ok(Self {
            clients: list,
            router,
            server,
        })
    }

    pub const SERVER_V4: &str = "198.19.0.1";
    pub const SERVER_V6: &str = "2001:db8:ff::1";
}

/// Pings `dst` from `ns` `count` times; the number of replies.
pub fn ping(ns: &NetNs, dst: &str, count: u32) -> u32 {
    let out = ns
        .command("ping")
        .args(["-c", &count.to_string(), "-i", "0.2", "-W", "1", "-q", dst])
        .output()
        .expect("spawn ping");
    let text = String::from_utf8_lossy(&out.stdout);
    // "3 packets transmitted, 3 received, 0% packet loss, ..."
    text.split(',')
        .find_map(|part| part.trim().strip_suffix(" received"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// The average RTT of `count` pings from `ns` to `dst`, in milliseconds; panics if
/// none came back.
pub fn ping_rtt_ms(ns: &NetNs, dst: &str, count: u32) -> f64 {
    let out = ns
        .command("ping")
        .args(["-c", &count.to_string(), "-i", "0.2", "-W", "2", "-q", dst])
        .output()
        .expect("spawn ping");
    let text = String::from_utf8_lossy(&out.stdout);
    // "rtt min/avg/max/mdev = 40.1/40.6/41.9/0.5 ms"
    text.lines()
        .find_map(|l| l.split_once(" = ").filter(|(k, _)| k.starts_with("rtt")))
        .and_then(|(_, v)| v.split('/').nth(1)?.parse().ok())
        .unwrap_or_else(|| panic!("no RTT from ping {dst}: {text}"))
}

/// What the receiver measured.
#[derive(Clone, Copy, Debug)]
pub struct Goodput {
    pub bytes: u64,
    pub secs: f64,
}

impl Goodput {
    pub fn mbit_per_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.secs / 1e6
    }
}

impl std::fmt::Display for Goodput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.2} Mbit/s ({} bytes in {:.2} s)",
            self.mbit_per_s(),
            self.bytes,
            self.secs
        )
    }
}

/// Bounds of one goodput measurement.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    /// Received before measuring: lets TCP and the shaper's burst settle.
    pub warmup: Duration,
    /// The measured window.
    pub window: Duration,
    /// The sender never sends more than this, whatever the link's speed.
    pub max_bytes: u64,
    /// The receiver's SO_RCVBUF, which caps the TCP window. Kept below a shaper's
    /// queue, the flow never overflows it: a drop makes the receiver hold data behind
    /// the hole and release it in one piece when the retransmission arrives, so bytes
    /// that arrived before the measured window would be counted in it.
    pub rcvbuf: Option<u32>,
}

/// Whether the tests run in an emulated guest (`cargo xtask vm-test` sets
/// IMQ_EMULATED): there, where every second costs several, rates are measured over
/// shorter windows and loops take fewer rounds.
pub fn emulated() -> bool {
    std::env::var_os("IMQ_EMULATED").is_some()
}

impl Default for Load {
    fn default() -> Self {
        // In the emulated guests 1 s + 2 s: at the 10–50 Mbit/s the tests shape to, a
        // 32 KB burst is still under 1.5% of the window.
        let (warmup, window) = if emulated() { (1000, 2000) } else { (1500, 3000) };
        Self {
            warmup: Duration::from_millis(warmup),
            window: Duration::from_millis(window),
            max_bytes: 16 << 30,
            // TBF at 10mbit with latency 100ms queues ~157 KB: stay well below. Still
            // > 5 Gbit/s on veth, whose RTT is tens of microseconds.
            rcvbuf: Some(96 << 10),
        }
    }
}

/// One TCP stream from `client` to `server_addr` (a port on `server`); the goodput
/// the receiver saw in the measured window. The receiver ends the transfer by
/// closing; the sender stops at the first failed write, at `max_bytes`, or after
/// warmup + window + 10 s, whichever comes first.
pub fn tcp_goodput(client: &NetNs, server: &NetNs, server_addr: SocketAddr, load: Load) -> Result<Goodput> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let receiver = server.spawn(move || {
        let listener = TcpListener::bind(server_addr).with_context(|| format!("bind {server_addr}"))?;
        if let Some(size) = load.rcvbuf {
            // Set on the listener before any connection: accepted sockets inherit it,
            // and the window is negotiated from it.
            set_sockopt(&listener, libc::SO_RCVBUF, size as libc::c_int)?;
        }
        ready_tx.send(listener.local_addr()?)?;
        // A blackholed path must fail the measurement, not hang it: the sender gives
        // up connecting after 5 s, and so does the receiver waiting for it.
        listener.set_nonblocking(true)?;
        let accept_until = Instant::now() + Duration::from_secs(8);
        let mut conn = loop {
            match listener.accept() {
                Ok((conn, _)) => break conn,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < accept_until => {
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => bail!("no connection arrived in 8 s"),
                Err(e) => return Err(e).context("accept"),
            }
        };
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = vec![0u8; 256 << 10];
        let mut first = None;
        let mut measured_from = None;
        let mut bytes = 0u64;
        loop {
            let n = conn.read(&mut buf).context("receive")?;
            if n == 0 {
                bail!("sender closed before the measurement ended");
            }
            let now = Instant::now();
            let first = *first.get_or_insert(now);
            match measured_from {
                None if now.duration_since(first) >= load.warmup => measured_from = Some(now),
                None => {}
                Some(from) => {
                    bytes += n as u64;
                    let secs = now.duration_since(from).as_secs_f64();
                    if secs >= load.window.as_secs_f64() {
                        return Ok(Goodput { bytes, secs });
                    }
                }
            }
        }
    });
    let addr = ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("receiver did not start")?;
    let hard_stop = load.warmup + load.window + Duration::from_secs(10);
    let sender = client.spawn(move || {
        let mut conn =
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).with_context(|| format!("connect {addr}"))?;
        conn.set_write_timeout(Some(Duration::from_secs(2)))?;
        let buf = vec![0x5au8; 128 << 10];
        let start = Instant::now();
        let mut sent = 0u64;
        while sent < load.max_bytes && start.elapsed() < hard_stop {
            match conn.write(&buf) {
                Ok(n) => sent += n as u64,
                // The receiver closed: the measurement is over.
                Err(_) => break,
            }
        }
        Ok(sent)
    });
    let result = receiver.join().map_err(|_| anyhow::anyhow!("receiver panicked"))?;
    let _ = sender.join();
    result
}

/// An integer SOL_SOCKET option.
pub(crate) fn set_sockopt(sock: &impl AsRawFd, opt: libc::c_int, val: libc::c_int) -> Result<()> {
    // SAFETY: valid socket fd and a pointer to an int of the given length.
    let ret = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&raw const val).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error()).context("setsockopt");
    }
    Ok(())
}

/// One TCP stream from each client namespace to `server_addr(k)` on `server`, all at
/// once; their goodputs, in client order.
pub fn concurrent_tcp_goodput(
    clients: &[NetNs],
    server: &NetNs,
    server_addr: impl Fn(usize) -> SocketAddr,
    load: Load,
) -> Result<Vec<Goodput>> {
    let flows: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(k, c)| {
            let (c, s, addr) = (c.name().to_owned(), server.name().to_owned(), server_addr(k));
            thread::spawn(move || tcp_goodput(&NetNs::adopt(&c), &NetNs::adopt(&s), addr, load))
        })
        .collect();
    flows
        .into_iter()
        .map(|f| f.join().map_err(|_| anyhow::anyhow!("flow panicked"))?)
        .collect()
}

/// The imqctl binary under test: `$IMQCTL`, else the workspace's release build, else
/// its debug build.
pub fn imqctl_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("IMQCTL") {
        return Some(PathBuf::from(p));
    }
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target");
    ["release", "debug"]
        .iter()
        .map(|p| target.join(p).join("imqctl"))
        .find(|p| p.exists())
}

/// What one imqctl invocation did.
#[derive(Debug)]
pub struct Imqctl {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl NetNs {
    /// Runs imqctl with `args` in this namespace, the way an admin would
    /// (`ip netns exec NS imqctl ...`).
    pub fn imqctl(&self, args: &[&str]) -> Imqctl {
        let path = imqctl_path().expect("no imqctl binary: run `cargo xtask build` or set IMQCTL");
        let out = self
            .command(path.to_str().expect("utf-8 path"))
            .args(args)
            .output()
            .expect("spawn imqctl");
        Imqctl {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs imqctl and panics with its stderr unless it succeeds.
    pub fn imqctl_ok(&self, args: &[&str]) -> String {
        let r = self.imqctl(args);
        assert_eq!(r.code, 0, "imqctl {args:?} failed: {}", r.stderr.trim());
        r.stdout
    }

    /// Runs `imqctl apply -f FILE` with `text` as the rule file.
    pub fn imqctl_apply(&self, text: &str) -> Imqctl {
        self.imqctl_apply_with(text, &[])
    }

    /// As [`NetNs::imqctl_apply`], with more arguments after `-f FILE`.
    pub fn imqctl_apply_with(&self, text: &str, more: &[&str]) -> Imqctl {
        let path = std::env::temp_dir().join(format!("imq-rules-{}-{}.toml", self.name, unique_id()));
        if let Err(e) = std::fs::write(&path, text) {
            return Imqctl {
                code: -1,
                stdout: String::new(),
                stderr: format!("write {}: {e}", path.display()),
            };
        }
        let mut args = vec!["apply", "-f", path.to_str().expect("utf-8 path")];
        args.extend_from_slice(more);
        let r = self.imqctl(&args);
        let _ = std::fs::remove_file(&path);
        r
    }
}
