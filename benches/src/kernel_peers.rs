//! `kernel-bench --peers`: the kernel's own measure of what block latency programs cost per fio
//! I/O, enlight's against libbpf-tools `biolatency -D` and a bpftrace one-liner keeping the same
//! per-disk histogram, in one run whose rounds rotate the order of the three tools (so drift and
//! a neighbour's load hit each alike).
//!
//! Each tool's programs are found by the process that holds them (`bpftool prog show`'s `pids`;
//! for enlight, this process) among the programs that appeared when it started; their
//! `run_time_ns` and `run_cnt` (`kernel.bpf_stats_enabled` on for the whole run) are read before
//! and after one fio run per tool and round, and divided by fio's own I/O count. Every hit on the
//! machine counts, other processes' I/O too, for every tool alike.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use enlight_probes::kernel::{make_dev, Group, KernelProbes, Selection};
use serde::Serialize;

use super::{first_line, median, BpfStats, Loop};

/// The bpftrace peer: issue time by (dev, sector), a per-disk histogram of issue-to-completion
/// nanoseconds at completion, what `biolatency -D` and enlight keep.
const BPFTRACE_PROGRAM: &str =
    "tracepoint:block:block_rq_issue { @start[args->dev, args->sector] = nsecs; } \
tracepoint:block:block_rq_complete /@start[args->dev, args->sector]/ { \
@ns[args->dev] = hist(nsecs - @start[args->dev, args->sector]); \
delete(@start[args->dev, args->sector]); }";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
enum Tool {
    #[serde(rename = "enlight")]
    Enlight,
    #[serde(rename = "biolatency -D")]
    Biolatency,
    #[serde(rename = "bpftrace")]
    Bpftrace,
}

impl Tool {
    const ALL: [Tool; 3] = [Tool::Enlight, Tool::Biolatency, Tool::Bpftrace];

    fn name(self) -> &'static str {
        match self {
            Tool::Enlight => "enlight",
            Tool::Biolatency => "biolatency -D",
            Tool::Bpftrace => "bpftrace",
        }
    }
}

/// A program's cumulative statistics, from `bpftool prog show -j`.
#[derive(Debug, Clone)]
struct Prog {
    name: String,
    run_time_ns: u64,
    run_cnt: u64,
    pids: Vec<u32>,
}

fn programs() -> Result<BTreeMap<u64, Prog>> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "-j"])
        .output()
        .context("bpftool (apt-get install bpftool)")?;
    if !out.status.success() {
        bail!(
            "bpftool prog show: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("bpftool JSON")?;
    let mut progs = BTreeMap::new();
    for p in v.as_array().map(Vec::as_slice).unwrap_or_default() {
        let Some(id) = p["id"].as_u64() else { continue };
        let pids = p["pids"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x["pid"].as_u64().map(|n| n as u32))
                    .collect()
            })
            .unwrap_or_default();
        progs.insert(
            id,
            Prog {
                name: p["name"].as_str().unwrap_or("").to_string(),
                run_time_ns: p["run_time_ns"].as_u64().unwrap_or(0),
                run_cnt: p["run_cnt"].as_u64().unwrap_or(0),
                pids,
            },
        );
    }
    Ok(progs)
}

/// A running tool: enlight's probes in this process, or a peer's process.
enum Running {
    Enlight(Box<KernelProbes>),
    Peer(Child),
}

impl Running {
    fn pid(&self) -> u32 {
        match self {
            Running::Enlight(_) => std::process::id(),
            Running::Peer(c) => c.id(),
        }
    }

    /// Stops the tool: drops enlight's probes; SIGINT to a peer (both print their histograms and
    /// detach on it), SIGKILL if it has not exited 10 s later.
    fn stop(self) -> Result<()> {
        match self {
            Running::Enlight(p) => drop(p),
            Running::Peer(mut child) => {
                // SAFETY: kill with the pid of a child we spawned and have not reaped yet.
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    if child.try_wait()?.is_some() {
                        break;
                    }
                    if Instant::now() > deadline {
                        child.kill()?;
                        child.wait()?;
                        bail!("a peer did not exit on SIGINT within 10 s; killed");
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        Ok(())
    }
}

fn start(tool: Tool, dev: u32) -> Result<Running> {
    match tool {
        Tool::Enlight => {
            // What enlightd loads for kernel disks: the block group, with the disk's counters
            // created ahead.
            let mut p = KernelProbes::load(&Selection(vec![Group::Block]))?;
            if !p.group_attached(Group::Block) {
                bail!("enlight's block probes did not attach: {:?}", p.status());
            }
            p.prepare_disk(dev)?;
            Ok(Running::Enlight(Box::new(p)))
        }
        Tool::Biolatency => Ok(Running::Peer(
            Command::new("biolatency")
                .arg("-D")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("biolatency (apt-get install libbpf-tools)")?,
        )),
        Tool::Bpftrace => Ok(Running::Peer(
            Command::new("bpftrace")
                .args(["-e", BPFTRACE_PROGRAM])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("bpftrace (apt-get install bpftrace)")?,
        )),
    }
}

/// The ids of the tool's programs: among those not there before it started, those `pid` holds
/// (where bpftool lists holders: Debian 12's bpftool 7.1 does not), else those with the tool's
/// program names (the run holds /work/.privtest.lock-style exclusion by the caller, so no one
/// else loads programs of these names meanwhile). Waits for `names.len()` programs, then a
/// second more for the attachments that follow the loads.
fn programs_of(pid: u32, before: &BTreeSet<u64>, names: &[&str]) -> Result<Vec<u64>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let progs = programs()?;
        let fresh = || progs.iter().filter(|(id, _)| !before.contains(id));
        let by_pid: Vec<u64> = fresh()
            .filter(|(_, p)| p.pids.contains(&pid))
            .map(|(id, _)| *id)
            .collect();
        let by_name: Vec<u64> = fresh()
            .filter(|(_, p)| p.pids.is_empty() && names.iter().any(|n| same_program(n, &p.name)))
            .map(|(id, _)| *id)
            .collect();
        let ids = if by_pid.is_empty() { by_name } else { by_pid };
        if ids.len() >= names.len() {
            std::thread::sleep(Duration::from_secs(1));
            return Ok(ids);
        }
        if Instant::now() > deadline {
            bail!(
                "after 60 s, {} new programs of pid {pid} or named {names:?}, expected {}",
                ids.len(),
                names.len()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether a loaded program's name is `name`: the kernel keeps its first 15 bytes, bpftool shows
/// the full one from BTF, and biolatency suffixes its `tp_btf` variants (`block_rq_issue_btf`).
fn same_program(name: &str, loaded: &str) -> bool {
    !loaded.is_empty()
        && (loaded.starts_with(name) || (loaded.len() >= 15 && name.starts_with(loaded)))
}

/// fio's I/O count for one time-based 4 KiB random-read run.
fn fio_ios(dev: &str, secs: u32, iodepth: u32) -> Result<u64> {
    let engine = if iodepth > 1 { "libaio" } else { "psync" };
    let out = Command::new("fio")
        .args([
            "--name=kernel-bench-peers",
            &format!("--filename={dev}"),
            "--rw=randread",
            "--bs=4k",
            "--direct=1",
            &format!("--ioengine={engine}"),
            &format!("--iodepth={iodepth}"),
            "--size=256M",
            &format!("--runtime={secs}"),
            "--time_based",
            "--output-format=json",
        ])
        .output()
        .context("fio (apt-get install fio)")?;
    if !out.status.success() {
        bail!("fio: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v["jobs"][0]["read"]["total_ios"]
        .as_u64()
        .filter(|n| *n > 0)
        .context("fio reported no reads")
}

#[derive(Serialize)]
struct Measure {
    round: usize,
    /// Position of the tool in this round's order (0 first).
    position: usize,
    tool: Tool,
    programs: Vec<String>,
    fio_ios: u64,
    runs: u64,
    run_time_ns: u64,
    ns_per_io: f64,
    runs_per_io: f64,
}

#[derive(Serialize)]
struct PeersReport {
    machine: String,
    kernel: String,
    secs: u32,
    iodepth: u32,
    rounds: usize,
    measures: Vec<Measure>,
    /// Median ns per I/O per tool.
    medians: BTreeMap<&'static str, f64>,
    /// Per round, enlight's ns per I/O over each peer's in the same round.
    ratios_biolatency: Vec<f64>,
    ratios_bpftrace: Vec<f64>,
    /// enlight below both peers in every round.
    below_both_every_round: bool,
    irq: IrqCost,
}

/// enlight's IRQ program on interrupts unrelated to the bench.
#[derive(Serialize)]
struct IrqCost {
    runs: u64,
    ns_per_run: f64,
    secs: u32,
}

pub struct PeersArgs {
    pub secs: u32,
    pub rounds: usize,
    pub iodepth: u32,
    pub json: PathBuf,
}

pub fn run(args: &PeersArgs) -> Result<()> {
    require_tools()?;
    let machine = format!(
        "{}, {} CPUs",
        first_line("sh", &["-c", "lscpu | sed -n 's/^Model name: *//p'"]),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let kernel = first_line("uname", &["-r"]);
    // tmpfs backing: a read is a memory copy, so the path is CPU-bound and each fio read is
    // exactly one request on the loop device and no other device's.
    let lo = Loop::new(Path::new("/dev/shm"), false)?;
    let (major, minor) = loop_dev_numbers(&lo.dev)?;
    let dev = make_dev(major, minor);
    let _stats = BpfStats::enable()?;
    fio_ios(&lo.dev, 1, args.iodepth)?; // warm-up
    let mut measures = Vec::new();
    for round in 0..args.rounds {
        for position in 0..Tool::ALL.len() {
            let tool = Tool::ALL[(round + position) % Tool::ALL.len()];
            measures.push(measure_one(tool, round, position, dev, &lo.dev, args)?);
        }
    }
    // The IRQ program alone, during one more fio run: on a tmpfs-backed loop device no
    // interrupt is the bench's own, so every run is an unrelated interrupt (issue 17: 1.6-2.0 us
    // each), the case its early exit is for.
    let irq = irq_cost(&lo.dev, args)?;
    drop(lo);
    let per_round = |tool: Tool| -> Vec<f64> {
        (0..args.rounds)
            .map(|r| {
                measures
                    .iter()
                    .find(|m| m.round == r && m.tool == tool)
                    .map(|m| m.ns_per_io)
                    .unwrap_or(f64::NAN)
            })
            .collect()
    };
    let (e, b, t) = (
        per_round(Tool::Enlight),
        per_round(Tool::Biolatency),
        per_round(Tool::Bpftrace),
    );
    let ratios_biolatency: Vec<f64> = e.iter().zip(&b).map(|(e, b)| e / b).collect();
    let ratios_bpftrace: Vec<f64> = e.iter().zip(&t).map(|(e, t)| e / t).collect();
    let below_both_every_round = ratios_biolatency
        .iter()
        .chain(&ratios_bpftrace)
        .all(|r| *r < 1.0);
    let mut medians = BTreeMap::new();
    for (tool, v) in [
        (Tool::Enlight, &e),
        (Tool::Biolatency, &b),
        (Tool::Bpftrace, &t),
    ] {
        medians.insert(tool.name(), median(v.clone()));
    }
    let report = PeersReport {
        machine,
        kernel,
        secs: args.secs,
        iodepth: args.iodepth,
        rounds: args.rounds,
        measures,
        medians,
        ratios_biolatency,
        ratios_bpftrace,
        below_both_every_round,
        irq,
    };
    print_markdown(&report, &e, &b, &t);
    if let Some(parent) = args.json.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.json, serde_json::to_vec_pretty(&report)?)?;
    eprintln!("raw results: {}", args.json.display());
    Ok(())
}

/// Every tool the comparison runs, or which Debian package has it.
fn require_tools() -> Result<()> {
    for (tool, package) in [
        ("biolatency", "libbpf-tools"),
        ("bpftrace", "bpftrace"),
        ("bpftool", "bpftool"),
        ("fio", "fio"),
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !found {
            bail!("{tool} not found: apt-get install {package}");
        }
    }
    Ok(())
}

/// One tool's program time over one fio run on the loop device `loop_dev` (device number
/// `dev`): its programs found by name among those it loaded, their run counts and times before
/// and after.
fn measure_one(
    tool: Tool,
    round: usize,
    position: usize,
    dev: u32,
    loop_dev: &str,
    args: &PeersArgs,
) -> Result<Measure> {
    let before: BTreeSet<u64> = programs()?.into_keys().collect();
    let running = start(tool, dev)?;
    // enlight: the completion program; each peer: its issue and completion programs
    // (the kernel keeps the first 15 bytes of a name).
    let names: &[&str] = match tool {
        Tool::Enlight => &["enlight_blk_complete"],
        Tool::Biolatency | Tool::Bpftrace => &["block_rq_issue", "block_rq_complete"],
    };
    let ids = match programs_of(running.pid(), &before, names) {
        Ok(ids) => ids,
        Err(e) => {
            let _ = running.stop();
            return Err(e);
        }
    };
    let p0 = programs()?;
    let ios = fio_ios(loop_dev, args.secs, args.iodepth);
    let p1 = programs()?;
    running.stop()?;
    let ios = ios?;
    let (mut runs, mut time, mut names) = (0, 0, Vec::new());
    for id in &ids {
        let (Some(a), Some(b)) = (p0.get(id), p1.get(id)) else {
            bail!("{}: program {id} vanished during the run", tool.name());
        };
        runs += b.run_cnt - a.run_cnt;
        time += b.run_time_ns - a.run_time_ns;
        names.push(b.name.clone());
    }
    let m = Measure {
        round,
        position,
        tool,
        programs: names,
        fio_ios: ios,
        runs,
        run_time_ns: time,
        ns_per_io: time as f64 / ios as f64,
        runs_per_io: runs as f64 / ios as f64,
    };
    eprintln!(
        "round {round}: {:<14} {:>7.0} ns per I/O, {:.2} runs per I/O ({} I/Os; {})",
        tool.name(),
        m.ns_per_io,
        m.runs_per_io,
        ios,
        m.programs.join(", ")
    );
    if m.runs_per_io < 0.95 {
        bail!(
            "{}: {:.2} program runs per fio I/O: not attached to every request",
            tool.name(),
            m.runs_per_io
        );
    }
    Ok(m)
}

/// enlight's IRQ program alone, during one more fio run on `loop_dev`.
fn irq_cost(loop_dev: &str, args: &PeersArgs) -> Result<IrqCost> {
    let probes = KernelProbes::load(&Selection(vec![Group::Irq]))?;
    if !probes.group_attached(Group::Irq) {
        bail!("enlight's IRQ probe did not attach: {:?}", probes.status());
    }
    let s0 = probes.program_stats();
    fio_ios(loop_dev, args.secs, args.iodepth)?;
    let s1 = probes.program_stats();
    let key = "enlight_irq_entry";
    let (a, b) = (&s0[key], &s1[key]);
    let runs = b.run_cnt - a.run_cnt;
    Ok(IrqCost {
        runs,
        ns_per_run: (b.run_time_ns - a.run_time_ns) as f64 / runs.max(1) as f64,
        secs: args.secs,
    })
}

/// The report as markdown, with its verdict; `e`, `b`, `t`: each tool's ns per I/O by round.
fn print_markdown(r: &PeersReport, e: &[f64], b: &[f64], t: &[f64]) {
    println!("## Kernel block probes against their peers: program time per fio I/O\n");
    println!(
        "Machine: {}; kernel {}. fio 4 KiB random reads on a tmpfs-backed loop device, queue depth {}, {} s per tool, {} rounds rotating the order; `kernel.bpf_stats_enabled` run time of each tool's programs over fio's I/O count.\n",
        r.machine, r.kernel, r.iodepth, r.secs, r.rounds
    );
    println!("| round | enlight ns/I/O | biolatency -D ns/I/O | bpftrace ns/I/O | enlight/biolatency | enlight/bpftrace |");
    println!("|---|---|---|---|---|---|");
    for i in 0..r.rounds {
        println!(
            "| {i} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} |",
            e[i], b[i], t[i], r.ratios_biolatency[i], r.ratios_bpftrace[i]
        );
    }
    println!(
        "| median | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} |",
        r.medians["enlight"],
        r.medians["biolatency -D"],
        r.medians["bpftrace"],
        median(r.ratios_biolatency.clone()),
        median(r.ratios_bpftrace.clone())
    );
    println!(
        "\nVerdict (target: enlight below both peers in every round): {}",
        if r.below_both_every_round {
            "met".to_string()
        } else {
            let worse = r
                .ratios_biolatency
                .iter()
                .chain(&r.ratios_bpftrace)
                .filter(|r| **r >= 1.0)
                .count();
            format!(
                "NOT met ({worse} of {} paired ratios at or above 1)",
                2 * r.rounds
            )
        }
    );
    println!(
        "\nenlight_irq_entry alone, during one more {} s fio run (no interrupt is the bench's): {} runs, {:.0} ns per run",
        r.irq.secs, r.irq.runs, r.irq.ns_per_run
    );
}

/// `major:minor` of a block device node, from sysfs.
fn loop_dev_numbers(dev: &str) -> Result<(u32, u32)> {
    let name = Path::new(dev)
        .file_name()
        .and_then(|n| n.to_str())
        .context("device name")?;
    let text = std::fs::read_to_string(format!("/sys/class/block/{name}/dev"))?;
    let (a, b) = text.trim().split_once(':').context("major:minor")?;
    Ok((a.parse()?, b.parse()?))
}
