//! UDP load: small-packet rate, round-trip time, and a sequenced flow that counts
//! every lost packet. All bounded in time and volume; all measured at the receiver.

use std::{
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::{Load, NetNs, set_sockopt};

/// UDP payload of a 64-byte Ethernet frame (14 + 20 IPv4 + 8 UDP + 22).
pub const SMALL_PAYLOAD: usize = 22;
const BATCH: usize = 64;

/// Packets the receiver got in the measured window.
#[derive(Clone, Copy, Debug)]
pub struct Rate {
    pub packets: u64,
    pub secs: f64,
}

impl Rate {
    pub fn pps(&self) -> f64 {
        self.packets as f64 / self.secs
    }
}

/// One mmsghdr per iovec, for sendmmsg/recvmmsg. The iovecs must outlive them.
fn mmsg_headers(iov: &mut [libc::iovec]) -> Vec<libc::mmsghdr> {
    iov.iter_mut()
        .map(|v| {
            // SAFETY: mmsghdr is plain data; zero is a valid empty header.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect()
}

/// Sends `payload`-sized datagrams as fast as one core can (sendmmsg batches) until
/// `stop` or `deadline`, at most `max_packets`. Returns how many were sent.
fn blast(sock: &UdpSocket, payload: usize, stop: &AtomicBool, deadline: Instant, max_packets: u64) -> u64 {
    let buf = vec![0x5au8; payload];
    let mut iov: Vec<libc::iovec> = (0..BATCH)
        .map(|_| libc::iovec {
            iov_base: buf.as_ptr() as *mut _,
            iov_len: payload,
        })
        .collect();
    let mut msgs = mmsg_headers(&mut iov);
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && sent < max_packets {
        // SAFETY: msgs is a valid array of BATCH initialized headers on a connected socket.
        let n = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
        if n > 0 {
            sent += n as u64;
        }
    }
    sent
}

/// Small-packet rate from `client` to `server_addr` on `server`: the packets per
/// second the receiver got in the measured window.
pub fn udp_pps(client: &NetNs, server: &NetNs, server_addr: SocketAddr, load: Load) -> Result<Rate> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_rx = stop.clone();
    let receiver = server.spawn(move || {
        let sock = UdpSocket::bind(server_addr).with_context(|| format!("bind {server_addr}"))?;
        set_sockopt(&sock, libc::SO_RCVBUF, 8 << 20)?;
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        ready_tx.send(sock.local_addr()?)?;
        let mut bufs = vec![[0u8; 64]; BATCH];
        let mut iov: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let mut msgs = mmsg_headers(&mut iov);
        let start = Instant::now();
        let (mut from, mut packets) = (None, 0u64);
        let result = loop {
            if start.elapsed() > load.warmup + load.window + Duration::from_secs(5) {
                break Err(anyhow::anyhow!("no traffic"));
            }
            // SAFETY: valid headers and buffers; timeout from SO_RCVTIMEO.
            let n = unsafe {
                libc::recvmmsg(
                    sock.as_raw_fd(),
                    msgs.as_mut_ptr(),
                    BATCH as u32,
                    libc::MSG_WAITFORONE,
                    std::ptr::null_mut(),
                )
            };
            if n <= 0 {
                continue;
            }
            let now = Instant::now();
            match from {
                None if now.duration_since(start) >= load.warmup => from = Some(now),
                None => {}
                Some(f) => {
                    packets += n as u64;
                    let secs = now.duration_since(f).as_secs_f64();
                    if secs >= load.window.as_secs_f64() {
                        break Ok(Rate { packets, secs });
                    }
                }
            }
        };
        stop_rx.store(true, Ordering::Relaxed);
        result
    });
    let addr = ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("receiver did not start")?;
    let deadline = Instant::now() + load.warmup + load.window + Duration::from_secs(5);
    let stop_tx = stop.clone();
    let sender = client.spawn(move || {
        let sock = UdpSocket::bind(if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
        sock.connect(addr)?;
        Ok(blast(&sock, SMALL_PAYLOAD, &stop_tx, deadline, 200_000_000))
    });
    let result = receiver.join().map_err(|_| anyhow::anyhow!("receiver panicked"))?;
    stop.store(true, Ordering::Relaxed);
    let _ = sender.join();
    result
}

/// Round-trip times of `count` small UDP echoes, one at a time, 1 ms apart.
pub fn udp_rtt(client: &NetNs, server: &NetNs, server_addr: SocketAddr, count: u32) -> Result<Vec<Duration>> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let echo = server.spawn(move || {
        let sock = UdpSocket::bind(server_addr)?;
        sock.set_read_timeout(Some(Duration::from_millis(500)))?;
        ready_tx.send(sock.local_addr()?)?;
        let mut buf = [0u8; 64];
        let mut served = 0;
        while served < count {
            match sock.recv_from(&mut buf) {
                Ok((n, peer)) => {
                    sock.send_to(&buf[..n], peer)?;
                    served += 1;
                }
                Err(_) => break,
            }
        }
        Ok(served)
    });
    let addr = ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("echo server did not start")?;
    let rtts = client
        .spawn(move || {
            let sock = UdpSocket::bind(if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
            sock.connect(addr)?;
            sock.set_read_timeout(Some(Duration::from_millis(100)))?;
            let mut rtts = Vec::with_capacity(count as usize);
            let mut buf = [0u8; 64];
            for seq in 0..count {
                let t = Instant::now();
                sock.send(&seq.to_be_bytes())?;
                if sock.recv(&mut buf).is_ok() {
                    rtts.push(t.elapsed());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(rtts)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("pinger panicked"))??;
    let _ = echo.join();
    Ok(rtts)
}

/// A sequenced flow at `pps` for `duration`; (sent, received, lost). While it runs,
/// `during` is called (e.g. to change rules). The receiver waits for stragglers.
pub fn udp_flow_loss(
    client: &NetNs,
    server: &NetNs,
    server_addr: SocketAddr,
    pps: u32,
    duration: Duration,
    during: impl FnOnce(),
) -> Result<(u64, u64, u64)> {
    let f = udp_flow(client, server, server_addr, pps, duration, during)?;
    Ok((f.sent, f.sent - f.lost.len() as u64, f.lost.len() as u64))
}

/// What [`udp_flow`] counted.
pub struct Flow {
    pub sent: u64,
    /// When the first packet left.
    pub start: Instant,
    /// When each packet that never arrived was sent (the flow is paced: packet `seq`
    /// left at `start + seq/pps`).
    pub lost: Vec<Instant>,
    /// Packets received more than once (a packet looped back into the path would be).
    pub duplicates: u64,
    /// Packets received after one sent later than them.
    pub reordered: u64,
}

/// [`udp_flow_loss`], telling when each lost packet was sent, so that a loss can be
/// put beside what happened at that moment.
pub fn udp_flow(
    client: &NetNs,
    server: &NetNs,
    server_addr: SocketAddr,
    pps: u32,
    duration: Duration,
    during: impl FnOnce(),
) -> Result<Flow> {
    let total = (f64::from(pps) * duration.as_secs_f64()) as u64;
    let (ready_tx, ready_rx) = mpsc::channel();
    let receiver = server.spawn(move || {
        let sock = UdpSocket::bind(server_addr)?;
        set_sockopt(&sock, libc::SO_RCVBUF, 8 << 20)?;
        sock.set_read_timeout(Some(Duration::from_millis(1000)))?;
        ready_tx.send(sock.local_addr()?)?;
        let mut seen = vec![false; total as usize];
        let (mut duplicates, mut reordered, mut newest) = (0u64, 0u64, None);
        let mut buf = [0u8; 64];
        while let Ok(n) = sock.recv(&mut buf) {
            if n >= 8 {
                let seq = u64::from_be_bytes(buf[..8].try_into().unwrap());
                if newest.is_some_and(|n| seq < n) {
                    reordered += 1;
                }
                newest = newest.max(Some(seq));
                if let Some(s) = seen.get_mut(seq as usize) {
                    duplicates += u64::from(*s);
                    *s = true;
                }
            }
        }
        Ok((seen, duplicates, reordered))
    });
    let addr = ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("receiver did not start")?;
    let sender = client.spawn(move || {
        let sock = UdpSocket::bind(if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
        sock.connect(addr)?;
        let start = Instant::now();
        let mut buf = [0u8; SMALL_PAYLOAD];
        for seq in 0..total {
            // Paced: packet `seq` leaves at seq/pps seconds.
            let due = start + Duration::from_secs_f64(seq as f64 / f64::from(pps));
            while Instant::now() < due {
                std::hint::spin_loop();
            }
            buf[..8].copy_from_slice(&seq.to_be_bytes());
            sock.send(&buf)?;
        }
        Ok(start)
    });
    during();
    let start = sender.join().map_err(|_| anyhow::anyhow!("sender panicked"))??;
    let (seen, duplicates, reordered) = receiver.join().map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    let lost = seen
        .iter()
        .enumerate()
        .filter(|(_, s)| !**s)
        .map(|(seq, _)| start + Duration::from_secs_f64(seq as f64 / f64::from(pps)))
        .collect();
    Ok(Flow {
        sent: total,
        start,
        lost,
        duplicates,
        reordered,
    })
}
