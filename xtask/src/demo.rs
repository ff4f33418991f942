//! `cargo xtask run`: ingress shaping shown on real packets, in two throwaway
//! namespaces. Nothing on the host is touched; everything is removed at the end, on
//! failure, and on Ctrl-C (the namespace guards drop on the way out).

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{Result, bail};
use imq_tests::{Goodput, Load, Pair, tcp_goodput};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C and SIGTERM end the demo at the next step instead of killing it before it
/// can clean up. Each step is bounded (a few seconds).
pub fn catch_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

pub fn step() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; namespaces removed");
    }
    Ok(())
}

fn measure(pair: &Pair, what: &str) -> Result<Goodput> {
    step()?;
    let addr: SocketAddr = format!("{}:5201", pair.server_v4()).parse()?;
    let g = tcp_goodput(&pair.client, &pair.server, addr, Load::default())?;
    println!("  {what:<34} {:>10.2} Mbit/s", g.mbit_per_s());
    Ok(g)
}

pub fn run() -> Result<()> {
    imq_tests::require_root();
    catch_signals();
    let pair = Pair::new("demo")?;
    let (c, s) = (&pair.client, &pair.server);
    println!(
        "namespaces {} (client, c0) and {} (server, s0), one veth between them;",
        c.name(),
        s.name()
    );
    println!("TCP from client to server; imq sits on the server's ingress.\n");

    let before = measure(&pair, "without imq")?;

    step()?;
    println!("  $ imqctl attach s0 --direction ingress --dev imq0");
    s.imqctl_ok(&["attach", "s0", "--direction", "ingress", "--dev", "imq0"]);
    println!("  $ tc qdisc add dev imq0 root tbf rate 10mbit burst 16kb latency 100ms");
    s.tc(&[
        "qdisc", "add", "dev", "imq0", "root", "tbf", "rate", "10mbit", "burst", "16kb", "latency", "100ms",
    ])?;
    let shaped = measure(&pair, "imq0 with TBF 10mbit")?;
    print!(
        "{}",
        s.imqctl_ok(&["show"])
            .lines()
            .map(|l| format!("    {l}\n"))
            .collect::<String>()
    );

    step()?;
    println!("  $ imqctl detach s0");
    s.imqctl_ok(&["detach", "s0"]);
    let after = measure(&pair, "after detach")?;

    println!(
        "\nwithout imq {:.0} Mbit/s, shaped {:.2} Mbit/s, after detach {:.0} Mbit/s",
        before.mbit_per_s(),
        shaped.mbit_per_s(),
        after.mbit_per_s()
    );
    println!("removing namespaces {} and {}", c.name(), s.name());
    Ok(())
}
