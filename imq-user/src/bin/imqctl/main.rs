//! imqctl: queue the incoming and outgoing traffic of chosen interfaces in imq
//! devices, where any kernel qdisc shapes it.

mod show;

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, CommandFactory as _, Parser, Subcommand};
use imq::{
    AttachRequest, Attached, DEFAULT_TXQUEUELEN, Imq, Options, metrics,
    monitor::{MonitorRequest, PcapWriter},
    rule::{Actions, ClassId, DevName, Directions, Dscp, Mark, Match, PortRange, Prefix, Proto, Queue, Selector},
    rulefile,
    shaper::{Diffserv, LinkLayer, Rate, Shaper, ShaperQdisc},
    watch::{self, Event, Watch},
};

#[derive(Parser)]
#[command(
    name = "imqctl",
    version,
    about = "Intermediate queueing devices for Linux, without a kernel patch",
    after_long_help = "Examples:
  imqctl shape eth0 --down 45mbit --up 9mbit      fix bufferbloat on a WAN link
  imqctl attach eth0                              queue what eth0 receives in imq0
  tc qdisc add dev imq0 root cake bandwidth 45mbit ingress
  imqctl attach eth1 --dev imq0 --mark 0x10/0xff  one limit over several interfaces
  imqctl show                                     devices, rules and their counters
  imqctl watch -f /etc/imq/imq.toml               keep a setup across reboots and hotplug

Each command changes nothing when it fails, and says why in one line."
)]
struct Cli {
    /// bpffs directory for imq's pinned state [default: /sys/fs/bpf, mounted if needed]
    #[arg(long, global = true, env = "IMQ_BPFFS", value_name = "DIR")]
    bpffs: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Queue the IPv4/IPv6 traffic of an interface in an imq device
    Attach {
        /// Interface whose traffic is queued
        interface: String,
        /// ingress, egress or both
        #[arg(long, short, default_value = "ingress", value_parser = parse::<Directions>)]
        direction: Directions,
        /// imq device the traffic goes to; created (ifb, up) if missing
        #[arg(long, default_value = "imq0", value_parser = parse::<DevName>)]
        dev: DevName,
        #[command(flatten)]
        matches: MatchArgs,
        /// Set the packet's fwmark: VALUE[/MASK] (bits outside MASK are kept)
        #[arg(long, value_parser = parse::<Mark>, value_name = "VALUE[/MASK]")]
        set_mark: Option<Mark>,
        /// Put the packet in this class of the imq device's HTB/HFSC/... (sets skb->priority)
        #[arg(long, value_parser = parse::<ClassId>, value_name = "MAJOR:MINOR")]
        classid: Option<ClassId>,
        /// TX queue of a multi-queue imq device: a number from 1 (mq's class :1), or
        /// src/dst: by a hash of the address (IPv6: its /64), one queue per subscriber
        #[arg(long, value_parser = parse::<Queue>, value_name = "N|src|dst")]
        queue: Option<Queue>,
        /// Rule order on this interface and direction, lowest first [default: after the last]
        #[arg(long)]
        prio: Option<u32>,
    },
    /// Remove rules; an interface left without rules is detached
    Detach {
        interface: String,
        #[arg(long, short, default_value = "ingress", value_parser = parse::<Directions>)]
        direction: Directions,
        /// Only the rule with exactly this match [default: every rule of the interface]
        #[command(flatten)]
        matches: MatchArgs,
        /// Only the rule at this prio
        #[arg(long)]
        prio: Option<u32>,
    },
    /// Replace every rule of this network namespace with those of a TOML file, atomically
    Apply {
        /// Rule file ("-": standard input)
        #[arg(long, short)]
        file: PathBuf,
        /// Apply a file with no rules and no shapers even though it removes every rule
        /// in place (refused without this, so an empty or truncated file cannot)
        #[arg(long)]
        allow_empty: bool,
        /// Print what would change (rule file blocks, - removed, + added) and change
        /// nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Print every rule in the format of `apply`
    Export,
    /// Keep a rule file applied: re-attach its rules when an interface it names comes
    /// back, re-create deleted imq devices, follow imq devices going down and up;
    /// SIGHUP reads the file again, SIGTERM exits leaving the data path in place
    #[command(after_long_help = "Signals:
  SIGHUP   read the file again; a file with an error is refused and the running setup stays
  SIGTERM  exit; the rules and imq devices stay in place (imqctl flush removes them)

One line per event on stderr. imq.service runs it at boot with /etc/imq/imq.toml.")]
    Watch {
        /// Rule file, as for `apply`
        #[arg(long, short)]
        file: PathBuf,
        /// Serve `show --format prometheus` (or openmetrics, by the Accept header) at
        /// http://ADDR/metrics, e.g. 127.0.0.1:9464
        #[arg(long, value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
    },
    /// Watch, packet by packet, what imq's rules decide: which rule took a packet, into
    /// which imq device, with what mark and class; or which packets no rule took
    #[command(
        after_long_help = "Each line: time, interface, direction, the rule's prio and imq device (or
`unmatched`), the class and mark it set, then what the classifier saw: protocol,
addresses, ports, DSCP and the packet's length from its Ethernet header.
`bypassed` means a rule took the packet but its imq device is down or missing: it
passed unshaped.

Examples:
  imqctl monitor                           what every rule takes
  imqctl monitor eth0 --unmatched          what no rule of eth0 takes: why is my VoIP not matched?
  imqctl monitor --prio 10 -c 20           twenty packets of the rule at prio 10
  imqctl monitor --all -w /tmp/imq.pcap    capture for tcpdump -r or Wireshark
  imqctl monitor -w - | tcpdump -nr -      decode on the fly

Filters, sampling and the rate limit run in the kernel. Events over --rate, and
events the buffers had no room for, are counted and reported on exit (stderr).
One monitor at a time in a network namespace. Costs nothing when none runs."
    )]
    Monitor {
        /// Only this interface
        interface: Option<String>,
        /// ingress, egress or both
        #[arg(long, short, default_value = "both", value_parser = parse::<Directions>)]
        direction: Directions,
        /// Only the rule at this prio
        #[arg(long)]
        prio: Option<u32>,
        /// Only packets for this imq device
        #[arg(long, value_parser = parse::<DevName>)]
        dev: Option<DevName>,
        /// Only packets of attached interfaces that no rule took
        #[arg(long, conflicts_with_all = ["all", "prio", "dev"])]
        unmatched: bool,
        /// Packets rules took and packets no rule took
        #[arg(long)]
        all: bool,
        /// Report one packet in N (chosen at random)
        #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        sample: u32,
        /// At most N events per second and CPU
        #[arg(long, default_value_t = 1000, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        rate: u32,
        /// Write the packets to FILE in pcap format instead of printing lines ("-": stdout)
        #[arg(long, short = 'w', value_name = "FILE")]
        write: Option<PathBuf>,
        /// Bytes of each packet to capture with -w
        #[arg(long, default_value_t = 256, value_name = "BYTES", value_parser = clap::value_parser!(u32).range(1..=65535))]
        snaplen: u32,
        /// One JSON object per line
        #[arg(long, short, conflicts_with = "write")]
        json: bool,
        /// Stop after N packets
        #[arg(long, short = 'c', value_name = "N")]
        count: Option<u64>,
        /// Stop after this many seconds
        #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
        duration: Option<std::time::Duration>,
    },
    /// imq devices, rules in match order, and what each rule queued
    Show {
        /// One JSON object: {"devices": [...], "rules": [...], "shapers": [...]} (--format json)
        #[arg(long, short, conflicts_with = "format")]
        json: bool,
        /// text; json; prometheus (text format 0.0.4, for node_exporter's textfile
        /// collector); openmetrics (OpenMetrics 1.0 text)
        #[arg(long, default_value = "text", value_parser = ["text", "json", "prometheus", "openmetrics"])]
        format: String,
    },
    /// Fix bufferbloat on a WAN link: shape what it receives (in an imq device) and
    /// what it sends (on the interface) a little below the line's rates
    Shape(ShapeArgs),
    /// Remove the shaper of an interface: its rule, imq device and qdiscs
    Unshape { interface: String },
    /// Manage imq devices
    Dev {
        #[command(subcommand)]
        command: DevCommand,
    },
    /// Remove every rule and program imq attached in this network namespace
    Flush,
    /// Print a completion script: bash, zsh, fish, elvish or powershell
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write imqctl's man pages (section 8) into DIR
    #[command(hide = true)]
    Manpages { dir: PathBuf },
}

#[derive(Subcommand)]
enum DevCommand {
    /// Create an imq device (an ifb, up)
    Add {
        #[arg(value_parser = parse::<DevName>)]
        name: DevName,
        #[arg(long, default_value_t = DEFAULT_TXQUEUELEN)]
        txqueuelen: u32,
        /// TX queues (1 to 256) [default: 1; an existing device's own]: with `mq`
        /// and one qdisc per queue, shaping uses as many CPUs; rules choose the queue
        /// with --queue
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
        queues: Option<u16>,
    },
    /// Delete an imq device no rule sends traffic to
    Del {
        #[arg(value_parser = parse::<DevName>)]
        name: DevName,
    },
}

#[derive(Args)]
struct ShapeArgs {
    /// The WAN interface
    interface: String,
    /// Download rate, e.g. 45mbit: set it 5-10 % below what the line really delivers
    #[arg(long, value_parser = parse::<Rate>, value_name = "RATE")]
    down: Option<Rate>,
    /// Upload rate, e.g. 9mbit
    #[arg(long, value_parser = parse::<Rate>, value_name = "RATE")]
    up: Option<Rate>,
    /// imq device for the download [default: the one it has, else the lowest free]
    #[arg(long, value_parser = parse::<DevName>)]
    dev: Option<DevName>,
    /// cake, or fq_codel (HTB with one fq_codel leaf) where the kernel lacks cake
    #[arg(long, default_value = "cake", value_parser = parse::<ShaperQdisc>)]
    qdisc: ShaperQdisc,
    /// Bytes of framing per packet below IP, e.g. 18 (Ethernet, VLAN), 44 (PPPoA/ATM)
    #[arg(long, allow_hyphen_values = true, value_name = "BYTES")]
    overhead: Option<i32>,
    /// Smallest frame the link sends, after overhead, e.g. 64 for Ethernet
    #[arg(long, value_name = "BYTES")]
    mpu: Option<u32>,
    /// ethernet, atm (ADSL) or ptm (VDSL2)
    #[arg(long, default_value = "ethernet", value_parser = parse::<LinkLayer>)]
    link_layer: LinkLayer,
    /// cake's priority tins: diffserv3, diffserv4, diffserv8, besteffort, precedence
    #[arg(long, default_value = "diffserv3", value_parser = parse::<Diffserv>)]
    diffserv: Diffserv,
    /// cake: look through NAT for fairness per internal host
    #[arg(long)]
    nat: bool,
    /// cake: clear DSCP marks once the tin is chosen
    #[arg(long)]
    wash: bool,
    /// cake, upload: drop ACKs a later ACK makes redundant (asymmetric links)
    #[arg(long)]
    ack_filter: bool,
}

impl ShapeArgs {
    fn to_shaper(&self) -> Shaper {
        Shaper {
            interface: self.interface.clone(),
            down: self.down,
            up: self.up,
            dev: self.dev,
            qdisc: self.qdisc,
            overhead: self.overhead,
            mpu: self.mpu,
            link_layer: self.link_layer,
            diffserv: self.diffserv,
            nat: self.nat,
            wash: self.wash,
            ack_filter: self.ack_filter,
        }
    }
}

/// What a rule matches; every option given must match.
#[derive(Args)]
struct MatchArgs {
    /// Packets whose fwmark matches: VALUE[/MASK], e.g. 0x10/0xff
    #[arg(long, value_parser = parse::<Mark>, value_name = "VALUE[/MASK]")]
    mark: Option<Mark>,
    /// Source address prefix (IPv4 or IPv6 CIDR)
    #[arg(long, value_parser = parse::<Prefix>, value_name = "PREFIX")]
    src: Option<Prefix>,
    /// Destination address prefix (IPv4 or IPv6 CIDR)
    #[arg(long, value_parser = parse::<Prefix>, value_name = "PREFIX")]
    dst: Option<Prefix>,
    /// tcp, udp, icmp, icmpv6, sctp, udplite, gre, esp or a number
    #[arg(long, value_parser = parse::<Proto>)]
    proto: Option<Proto>,
    /// Source port or range (needs --proto tcp/udp/sctp/udplite)
    #[arg(long, value_parser = parse::<PortRange>, value_name = "PORT[-PORT]")]
    sport: Option<PortRange>,
    /// Destination port or range (needs --proto tcp/udp/sctp/udplite)
    #[arg(long, value_parser = parse::<PortRange>, value_name = "PORT[-PORT]")]
    dport: Option<PortRange>,
    /// DSCP: 0-63 or a name (ef, af41, cs1, ...)
    #[arg(long, value_parser = parse::<Dscp>)]
    dscp: Option<Dscp>,
}

impl MatchArgs {
    fn to_match(&self) -> Match {
        Match {
            mark: self.mark,
            src: self.src,
            dst: self.dst,
            proto: self.proto,
            sport: self.sport,
            dport: self.dport,
            dscp: self.dscp,
        }
    }
}

fn parse<T: std::str::FromStr<Err = imq::Error>>(s: &str) -> Result<T, String> {
    s.parse().map_err(|e: imq::Error| e.to_string())
}

/// clap's messages span several lines; an admin's scripts and logs want one.
fn one_line(err: &clap::Error) -> String {
    err.render()
        .to_string()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("For more information") && !l.starts_with("Usage:"))
        .map(|l| l.strip_prefix("error: ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join(" ")
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut imq = Imq::new(Options { bpffs: cli.bpffs })?;
    let result = command(&mut imq, cli.command);
    for w in imq.take_warnings() {
        eprintln!("imqctl: warning: {w}");
    }
    result
}

fn command(imq: &mut Imq, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Attach {
            interface,
            direction,
            dev,
            matches,
            set_mark,
            classid,
            queue,
            prio,
        } => {
            let req = AttachRequest {
                interface,
                directions: direction,
                dev,
                matches: matches.to_match(),
                actions: Actions {
                    set_mark,
                    classid,
                    queue,
                },
                prio,
            };
            match imq.attach(&req)? {
                Attached::Added { created_dev: true } => eprintln!("created {dev}"),
                Attached::Added { created_dev: false } => {}
                Attached::Unchanged => eprintln!("rule already present on {} {}", req.interface, direction.as_str()),
            }
        }
        Command::Detach {
            interface,
            direction,
            matches,
            prio,
        } => {
            let m = matches.to_match();
            let selector = Selector {
                matches: (!m.is_empty()).then_some(m),
                prio,
            };
            let n = imq.detach(&interface, direction, selector)?;
            eprintln!("removed {n} rule(s) from {interface}");
        }
        Command::Apply {
            file,
            allow_empty,
            dry_run,
        } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())
            } else {
                std::fs::read_to_string(&file)
            }
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let setup = rulefile::parse_setup(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            if dry_run {
                let (before, after) = imq.apply_preview(&setup).map_err(|e| match e {
                    imq::Error::RuleFile { .. } => anyhow::anyhow!("{}: {e}", file.display()),
                    e => e.into(),
                })?;
                let (removed, added, kept) = block_diff(&before, &after);
                for b in &removed {
                    print!("{}", prefixed(b, "- "));
                }
                for b in &added {
                    print!("{}", prefixed(b, "+ "));
                }
                eprintln!(
                    "dry run: {} block(s) removed, {} added, {kept} unchanged; nothing changed",
                    removed.len(),
                    added.len()
                );
                return Ok(());
            }
            if setup.rules.is_empty() && setup.shapers.is_empty() && !allow_empty {
                let n = imq.show()?.rules.len();
                if n > 0 {
                    anyhow::bail!(
                        "{} has no rules: applying it would remove all {n} rule(s) in place; \
                         pass --allow-empty to do that (or run imqctl flush)",
                        file.display()
                    );
                }
            }
            let applied = imq.apply(&setup).map_err(|e| match e {
                imq::Error::RuleFile { .. } => anyhow::anyhow!("{}: {e}", file.display()),
                e => e.into(),
            })?;
            eprintln!("applied {applied}");
        }
        Command::Export => print!("{}", imq.export()?),
        Command::Watch { file, metrics } => watch(imq, file, metrics)?,
        Command::Monitor {
            interface,
            direction,
            prio,
            dev,
            unmatched,
            all,
            sample,
            rate,
            write,
            snaplen,
            json,
            count,
            duration,
        } => {
            let mut dirs = direction.iter();
            let req = MonitorRequest {
                interface,
                direction: match (dirs.next(), dirs.next()) {
                    (Some(d), None) => Some(d),
                    _ => None,
                },
                prio,
                dev,
                selected: !unmatched,
                unmatched: unmatched || all,
                sample,
                rate,
                snaplen: if write.is_some() { snaplen } else { 0 },
            };
            let output = match &write {
                None => Output::Lines { json },
                Some(path) => {
                    let out: Box<dyn std::io::Write> = if path.as_os_str() == "-" {
                        Box::new(std::io::stdout().lock())
                    } else {
                        Box::new(std::fs::File::create(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?)
                    };
                    Output::Pcap(PcapWriter::new(std::io::BufWriter::new(out), snaplen)?)
                }
            };
            monitor(imq, &req, output, count, duration)?;
        }
        Command::Show { json, format } => {
            let status = imq.show()?;
            match (json, format.as_str()) {
                (true, _) | (_, "json") => println!("{}", serde_json::to_string(&status)?),
                (_, "prometheus") => print!("{}", metrics::render(&status, metrics::Format::Prometheus)),
                (_, "openmetrics") => print!("{}", metrics::render(&status, metrics::Format::OpenMetrics)),
                _ => print!("{}", show::render(&status)),
            }
        }
        Command::Shape(args) => {
            let s = imq.shape(&args.to_shaper())?;
            eprintln!("{}", show::shaper_line(&s));
        }
        Command::Unshape { interface } => {
            let s = imq.unshape(&interface)?;
            eprintln!("removed the shaper of {interface}: {}", show::shaper_line(&s));
        }
        Command::Dev {
            command:
                DevCommand::Add {
                    name,
                    txqueuelen,
                    queues,
                },
        } => {
            if !imq.dev_add(name, txqueuelen, queues.map(u32::from))? {
                eprintln!("{name} already exists");
            }
        }
        Command::Dev {
            command: DevCommand::Del { name },
        } => imq.dev_del(name)?,
        Command::Flush => {
            let n = imq.flush()?;
            eprintln!("removed {n} rule(s)");
        }
        Command::Completions { .. } | Command::Manpages { .. } => unreachable!("handled without privileges"),
    }
    Ok(())
}

enum Output {
    Lines { json: bool },
    Pcap(PcapWriter<std::io::BufWriter<Box<dyn std::io::Write>>>),
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn stop(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Runs a monitor until `count` packets, `duration`, SIGINT or SIGTERM, or a reader
/// that went away (a closed pipe); then says what the kernel held back.
fn monitor(
    imq: &Imq,
    req: &MonitorRequest,
    mut output: Output,
    count: Option<u64>,
    duration: Option<std::time::Duration>,
) -> anyhow::Result<()> {
    use std::io::Write as _;
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, stop as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, stop as *const () as libc::sighandler_t);
    }
    let mut mon = imq.monitor(req)?;
    let deadline = duration.map(|d| std::time::Instant::now() + d);
    let mut seen = 0u64;
    let mut stdout = std::io::stdout().lock();
    let mut result: std::io::Result<()> = Ok(());
    eprintln!("monitoring; Ctrl-C stops");
    while !STOP.load(std::sync::atomic::Ordering::Relaxed)
        && count.is_none_or(|c| seen < c)
        && deadline.is_none_or(|d| std::time::Instant::now() < d)
        && result.is_ok()
    {
        let wait = deadline.map_or(std::time::Duration::from_millis(200), |d| {
            d.saturating_duration_since(std::time::Instant::now())
                .min(std::time::Duration::from_millis(200))
        });
        mon.poll(wait, |e| {
            if result.is_err() || count.is_some_and(|c| seen >= c) {
                return;
            }
            seen += 1;
            result = match &mut output {
                Output::Lines { json: true } => serde_json::to_writer(&mut stdout, &e)
                    .map_err(std::io::Error::from)
                    .and_then(|()| writeln!(stdout)),
                Output::Lines { json: false } => writeln!(stdout, "{e}"),
                Output::Pcap(w) => w.write(&e),
            };
        })?;
        result = result.and_then(|()| match &mut output {
            Output::Pcap(w) => w.flush(),
            Output::Lines { .. } => stdout.flush(),
        });
    }
    let held = mon.held()?;
    drop(mon);
    match result {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(anyhow::anyhow!("write: {e}")),
        _ => {}
    }
    eprintln!(
        "{seen} packet(s); {} over --rate, not reported; {} lost (the reader fell behind)",
        held.limited, held.lost
    );
    Ok(())
}

fn parse_seconds(s: &str) -> Result<std::time::Duration, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v < 1e9 => Ok(std::time::Duration::from_secs_f64(v)),
        _ => Err(format!("invalid duration '{s}': seconds, more than 0")),
    }
}

/// One page for imqctl and one per subcommand (imqctl-attach.8, ...).
fn manpages(dir: &std::path::Path) -> anyhow::Result<()> {
    fn write(cmd: &clap::Command, dir: &std::path::Path) -> anyhow::Result<()> {
        for sub in cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        {
            write(sub, dir)?;
        }
        // Built, a subcommand is named imqctl-attach (file) and `imqctl attach` (usage).
        clap_mangen::Man::new(cmd.clone())
            .section("8")
            .manual("imq")
            .generate_to(dir)
            .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
        Ok(())
    }
    let mut cmd = Cli::command();
    cmd.build();
    write(&cmd, dir)
}

/// `imqctl watch`: one line per event on stderr, for the journal.
fn watch(imq: &mut Imq, file: PathBuf, metrics: Option<std::net::SocketAddr>) -> anyhow::Result<()> {
    let mut w = Watch::new(file.clone())?;
    imq.hold_bpffs()?;
    if let Some(addr) = metrics {
        watch::serve_metrics(addr, imq.options().clone())?;
        eprintln!("serving metrics at http://{addr}/metrics");
    }
    let events = watch::events()?;
    let mut log = |line: String| eprintln!("{line}");
    let mut pass = |w: &mut Watch, log: &mut dyn FnMut(String)| {
        if let Err(e) = w.sync(imq, log) {
            log(format!("error: {e}"));
        }
        for warning in imq.take_warnings() {
            log(format!("warning: {warning}"));
        }
    };
    log(format!("watching {} (pid {})", file.display(), std::process::id()));
    pass(&mut w, &mut log);
    watch::notify("READY=1");
    loop {
        let mut event = events.recv()?;
        let mut reload = false;
        // A burst of notifications costs one pass.
        loop {
            match event {
                Event::Link => {}
                Event::Reload => reload = true,
                Event::Stop(signal) => {
                    watch::notify("STOPPING=1");
                    log(format!("{signal}: exiting; the rules stay in place"));
                    return Ok(());
                }
                Event::Failed(why) => anyhow::bail!("{why}"),
            }
            match events.try_recv() {
                Ok(e) => event = e,
                Err(_) => break,
            }
        }
        if reload {
            match w.reload() {
                Ok(()) => log(format!("reloaded {}", file.display())),
                Err(e) => log(format!("reload refused, the running setup stays: {e}")),
            }
        }
        pass(&mut w, &mut log);
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help, --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("imqctl: {}", one_line(&e));
            return ExitCode::from(2);
        }
    };
    // What needs neither root nor the kernel.
    let done = match &cli.command {
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "imqctl", &mut script);
            use std::io::Write as _;
            Some(std::io::stdout().write_all(&script).map_err(Into::into))
        }
        Command::Manpages { dir } => Some(manpages(dir)),
        _ => None,
    };
    match done.unwrap_or_else(|| run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("imqctl: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The `[[...]]` blocks of two rule files (as `export` writes them) only in the first,
/// only in the second, and how many are in both.
fn block_diff<'a>(before: &'a str, after: &'a str) -> (Vec<&'a str>, Vec<&'a str>, usize) {
    fn blocks(text: &str) -> Vec<&str> {
        let mut starts: Vec<usize> = text.match_indices("\n[[").map(|(i, _)| i + 1).collect();
        starts.push(text.len());
        starts.windows(2).map(|w| text[w[0]..w[1]].trim_end()).collect()
    }
    let (old, new) = (blocks(before), blocks(after));
    let mut unmatched = new.clone();
    let mut removed = Vec::new();
    for b in old {
        match unmatched.iter().position(|n| *n == b) {
            Some(i) => {
                unmatched.remove(i);
            }
            None => removed.push(b),
        }
    }
    let kept = new.len() - unmatched.len();
    (removed, unmatched, kept)
}

/// `block` with `prefix` before each line.
fn prefixed(block: &str, prefix: &str) -> String {
    block.lines().map(|l| format!("{prefix}{l}\n")).collect()
}
