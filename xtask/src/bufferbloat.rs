//! `cargo xtask vm-bench`: latency under load on a bloated WAN link, measured in the
//! VM of a Debian kernel that has cake, fq_codel and netem (imq-tests' `bufferbloat`
//! binary does the measuring), then summed up here: percentiles, goodput, the goal,
//! and SVG plots of RTT over time and its CDF. Writes bench/bufferbloat/ and the
//! latency section of BENCHMARKS.md.

use std::{fs, path::Path, time::Duration};

use anyhow::{Context as _, Result, bail};
use plotters::{
    coord::ranged1d::{AsRangedCoord, ValueFormatter},
    prelude::*,
};
use serde_json::{Value, json};

use crate::{bench, vm};

const DIR: &str = "bench/bufferbloat";
const SETUPS: [&str; 4] = ["unshaped", "imq + cake", "imq + fq_codel", "ifb + mirred + cake"];
const LOADS: [&str; 3] = ["download", "upload", "both"];
/// The goal (issue: bufferbloat): p99 under load at most this far above idle.
const GOAL_P99_ABOVE_IDLE_MS: f64 = 10.0;
/// ... and goodput at least this share of the shaper's rate.
const GOAL_GOODPUT_SHARE: f64 = 0.90;

/// Runs the benchmark in the VM of `suite`, or reads the console log of an earlier
/// run (`from_log`), and writes the results, plots and BENCHMARKS.md.
pub fn run(suite: &str, seconds: u32, rounds: u32, from_log: Option<&Path>) -> Result<()> {
    let (release, lines) = match from_log {
        Some(log) => {
            let text = fs::read_to_string(log).with_context(|| format!("read {}", log.display()))?;
            let release = text
                .lines()
                .find_map(|l| l.strip_prefix("IMQ-VM-BOOTED "))
                .context("no IMQ-VM-BOOTED line in the log")?
                .trim()
                .to_owned();
            let lines = text
                .lines()
                .filter_map(|l| l.strip_prefix("IMQ-BENCH ").map(str::to_owned))
                .collect();
            (release, lines)
        }
        None => {
            let (secs, n) = (seconds.to_string(), rounds.to_string());
            // Each round is 4 setups x (5 s idle + 3 loads), with pauses between.
            let timeout = Duration::from_secs(600 + u64::from(rounds) * 4 * (15 + 3 * (u64::from(seconds) + 3)) * 2);
            vm::run_bench(
                suite,
                "bufferbloat",
                &["--seconds", &secs, "--rounds", &n],
                "IMQ-BENCH ",
                timeout,
            )?
        }
    };
    let records: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l.trim()))
        .collect::<Result<_, _>>()
        .context("a result line of the benchmark")?;
    let rounds = records
        .iter()
        .filter_map(|r| r["round"].as_u64())
        .max()
        .map_or(1, |m| m as u32 + 1);
    let expected = SETUPS.len() * (LOADS.len() + 1) * rounds as usize;
    if records.len() != expected {
        bail!("expected {expected} results ({rounds} rounds), got {}", records.len());
    }
    let root = crate::workspace_root();
    let dir = root.join(DIR);
    fs::create_dir_all(&dir)?;
    let saved = json!({ "kernel": release, "seconds_per_load": seconds, "rounds": rounds, "records": records });
    fs::write(dir.join("results.json"), serde_json::to_string_pretty(&saved)?)?;
    plots(&saved, &dir)?;
    println!("{}", section(&root).unwrap_or_default());
    bench::render_saved()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Every round's record of one setup and load.
fn records<'a>(r: &'a Value, setup: &str, load: &str) -> Vec<&'a Value> {
    r["records"]
        .as_array()
        .map(|a| a.iter().filter(|x| x["setup"] == setup && x["load"] == load).collect())
        .unwrap_or_default()
}

/// The RTTs of every round, each after its warmup, pooled and sorted.
fn rtts(recs: &[&Value]) -> Vec<f64> {
    let mut v: Vec<f64> = recs
        .iter()
        .flat_map(|rec| {
            let warmup = rec["warmup_s"].as_f64().unwrap_or(0.0);
            rec["rtt"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(move |s| s[0].as_f64().unwrap_or(0.0) >= warmup)
                .filter_map(|s| s[1].as_f64())
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

/// The mean over the rounds of a goodput field, if the load had that direction.
fn mean(recs: &[&Value], field: &str) -> Option<f64> {
    let v: Vec<f64> = recs.iter().filter_map(|r| r[field].as_f64()).collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

struct Row {
    idle: f64,
    p50: f64,
    p95: f64,
    p99: f64,
    down: Option<f64>,
    up: Option<f64>,
    lost: u64,
}

fn row(r: &Value, setup: &str, load: &str) -> Option<Row> {
    let idle = percentile(&rtts(&records(r, setup, "idle")), 50.0);
    let recs = records(r, setup, load);
    if recs.is_empty() {
        return None;
    }
    let v = rtts(&recs);
    Some(Row {
        idle,
        p50: percentile(&v, 50.0),
        p95: percentile(&v, 95.0),
        p99: percentile(&v, 99.0),
        down: mean(&recs, "down_mbit"),
        up: mean(&recs, "up_mbit"),
        lost: recs.iter().map(|x| x["lost"].as_u64().unwrap_or(0)).sum(),
    })
}

/// The latency section of BENCHMARKS.md, from bench/bufferbloat/results.json; `None`
/// before the first `cargo xtask vm-bench`.
pub fn section(root: &Path) -> Option<String> {
    let r: Value = serde_json::from_str(&fs::read_to_string(root.join(DIR).join("results.json")).ok()?).ok()?;
    let rec0 = &r["records"][0];
    let (down_rate, up_rate) = (rec0["down_shaped_mbit"].as_f64()?, rec0["up_shaped_mbit"].as_f64()?);
    let mut s = format!(
        "## 7. Latency under load: bufferbloat (`cargo xtask vm-bench`)\n\n\
         Measured in a VM of Linux {} (Debian's kernel under qemu/TCG: it has cake, fq_codel and netem). \
         A client behind a 50/10 Mbit/s line whose modem and DSLAM queue 240 ms (1.5 MB down, 300 KB up, \
         FIFO), 20 ms base RTT (netem, on the server). The client shapes its WAN interface at {down_rate}/{up_rate} \
         Mbit/s: `imqctl shape c0 --down 45mbit --up 9mbit` (cake; `--qdisc fq_codel` for HTB + fq_codel), \
         or sqm-scripts' classic ifb + mirred + cake. Loads: 4 TCP flows down, 4 up, or 4 + 4 at once, {} s \
         each; ping 10 times a second throughout; {} rounds, setups and loads taking turns. RTT \
         percentiles are over the pings of all rounds, each load's first 5 s left out (slow start \
         overshoots into the ISP's FIFO, which a shaper below the line drains only at the difference \
         of the rates: 2.4 s for 1.5 MB at 50 − 45 Mbit/s); goodput is per direction over the same \
         window, the mean of the rounds; lost pings are summed.\n\n\
         | setup | load | idle RTT ms | p50 ms | p95 ms | p99 ms | p99 − idle | down Mbit/s | up Mbit/s | lost pings |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        r["kernel"].as_str()?,
        r["seconds_per_load"],
        r["rounds"]
    );
    let mbit = |v: Option<f64>| v.map_or_else(|| "—".to_owned(), |m| format!("{m:.1}"));
    for setup in SETUPS {
        for load in LOADS {
            let x = row(&r, setup, load)?;
            s.push_str(&format!(
                "| {setup} | {load} | {:.1} | {:.1} | {:.1} | {:.1} | {:+.1} | {} | {} | {} |\n",
                x.idle,
                x.p50,
                x.p95,
                x.p99,
                x.p99 - x.idle,
                mbit(x.down),
                mbit(x.up),
                x.lost
            ));
        }
    }
    // The goal, checked for imq + cake under the RRUL-like load (both at once), and its
    // goodput in each direction alone.
    let imq = row(&r, "imq + cake", "both")?;
    let ifb = row(&r, "ifb + mirred + cake", "both")?;
    let down_alone = row(&r, "imq + cake", "download")?.down?;
    let up_alone = row(&r, "imq + cake", "upload")?.up?;
    let checks = [
        (
            format!(
                "p99 RTT under load within +{GOAL_P99_ABOVE_IDLE_MS} ms of idle, both directions at once: {:+.1} ms",
                imq.p99 - imq.idle
            ),
            imq.p99 - imq.idle <= GOAL_P99_ABOVE_IDLE_MS,
        ),
        (
            format!(
                "goodput ≥ {:.0} % of the shaper's rates: download {:.1} of {down_rate} Mbit/s ({:.0} %), upload {:.1} of {up_rate} ({:.0} %)",
                GOAL_GOODPUT_SHARE * 100.0,
                down_alone,
                down_alone / down_rate * 100.0,
                up_alone,
                up_alone / up_rate * 100.0
            ),
            down_alone >= GOAL_GOODPUT_SHARE * down_rate && up_alone >= GOAL_GOODPUT_SHARE * up_rate,
        ),
        (
            format!(
                "no worse than classic ifb + cake (p99 within 10 % + 1 ms): imq {:.1} ms, ifb {:.1} ms",
                imq.p99, ifb.p99
            ),
            imq.p99 <= ifb.p99 * 1.1 + 1.0,
        ),
    ];
    s.push_str("\nThe goal, for imq + cake:\n\n");
    for (what, met) in checks {
        s.push_str(&format!("- {}: {what}\n", if met { "**met**" } else { "**missed**" }));
    }
    s.push_str(
        "\nGoodput is checked with each direction loaded alone. With both at once the upload \
         also carries the download's ACKs (about 1.5 Mbit/s for 43 Mbit/s of TCP), so every \
         shaped setup moves less upload data there; `--ack-filter` thins those ACKs.\n",
    );
    s.push_str(
        "\nRTT over time in the first round, and its distribution over all rounds, per load \
         (log scale; `bench/bufferbloat/*.svg`):\n\n",
    );
    for load in LOADS {
        s.push_str(&format!(
            "![RTT over time, {load}]({DIR}/{load}-rtt.svg)\n![RTT CDF, {load}]({DIR}/{load}-cdf.svg)\n\n"
        ));
    }
    Some(s)
}

fn color(i: usize) -> RGBColor {
    [
        RGBColor(200, 40, 40),
        RGBColor(30, 90, 200),
        RGBColor(20, 150, 60),
        RGBColor(230, 140, 0),
    ][i % 4]
}

/// One axis: its description, its range (linear or log) and how its labels read.
struct Axis<R> {
    desc: &'static str,
    range: R,
    label: fn(&f64) -> String,
}

fn whole(v: &f64) -> String {
    format!("{v:.0}")
}

fn tenths(v: &f64) -> String {
    format!("{v:.1}")
}

/// An SVG chart with a line per series and a legend.
fn chart<X, Y>(
    path: &Path,
    caption: &str,
    x: Axis<X>,
    y: Axis<Y>,
    series: &[(&str, Vec<(f64, f64)>)],
    legend: SeriesLabelPosition,
) -> Result<()>
where
    X: AsRangedCoord<Value = f64>,
    Y: AsRangedCoord<Value = f64>,
    X::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
    Y::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("plot {}: {e}", path.display());
    let area = SVGBackend::new(path, (900, 420)).into_drawing_area();
    area.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&area)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(x.range, y.range)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(x.desc)
        .y_desc(y.desc)
        .light_line_style(TRANSPARENT)
        .x_label_formatter(&x.label)
        .y_label_formatter(&y.label)
        .draw()
        .map_err(|e| err(&e))?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = color(i);
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(legend)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    area.present().map_err(|e| err(&e))
}

/// Per load: RTT over time in the first round, and the CDF of every round's RTTs.
fn plots(r: &Value, dir: &Path) -> Result<()> {
    for load in LOADS {
        let over_time: Vec<(&str, Vec<(f64, f64)>)> = SETUPS
            .iter()
            .filter_map(|&setup| {
                let rec = *records(r, setup, load).first()?;
                let pts = rec["rtt"]
                    .as_array()?
                    .iter()
                    .filter_map(|s| Some((s[0].as_f64()?, s[1].as_f64()?)))
                    .collect();
                Some((setup, pts))
            })
            .collect();
        let cdf: Vec<(&str, Vec<(f64, f64)>)> = SETUPS
            .iter()
            .map(|&setup| {
                let v = rtts(&records(r, setup, load));
                let n = v.len().max(1) as f64;
                (
                    setup,
                    v.iter().enumerate().map(|(k, &x)| (x, (k + 1) as f64 / n)).collect(),
                )
            })
            .collect();
        let max_t = over_time
            .iter()
            .flat_map(|(_, p)| p.iter().map(|x| x.0))
            .fold(1.0, f64::max);
        let max_rtt = over_time
            .iter()
            .flat_map(|(_, p)| p.iter().map(|x| x.1))
            .fold(100.0, f64::max)
            * 1.2;
        let rtt_axis = |desc| Axis {
            desc,
            range: (10f64..max_rtt).log_scale(),
            label: whole,
        };
        chart(
            &dir.join(format!("{load}-rtt.svg")),
            &format!("RTT during the {load} load, first round (ping, 10/s)"),
            Axis {
                desc: "seconds since the load started",
                range: 0f64..max_t,
                label: whole,
            },
            rtt_axis("RTT ms"),
            &over_time,
            SeriesLabelPosition::UpperRight,
        )?;
        chart(
            &dir.join(format!("{load}-cdf.svg")),
            &format!("RTT distribution during the {load} load, all rounds after warmup"),
            rtt_axis("RTT ms"),
            Axis {
                desc: "fraction of pings",
                range: 0f64..1f64,
                label: tenths,
            },
            &cdf,
            SeriesLabelPosition::LowerRight,
        )?;
    }
    Ok(())
}
