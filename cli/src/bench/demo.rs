//! `enlight bench demo`: the demo's workload with the tuner off and on, side by side.
//!
//! Runs `enlight demo` (this executable, its own temporary disk and enlightd) with `--tune off`
//! and `--tune auto` in the order off, auto, auto, off for each pair (so a drift of the machine
//! over the run weighs on both alike), each for `--seconds`, and compares what each run's
//! `totals:` line says: IOPS, interrupts per I/O and p99, as enlightd's eBPF counts saw them.
//! The demo's own decision lines (each kept change with its drift-corrected effect) are kept in
//! the report. Markdown and JSON go to `--out` (demo.md, demo.json).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::children::DieWithParent;

#[derive(Args, Debug)]
pub struct DemoBenchArgs {
    /// Seconds each demo runs, 3..=3600.
    #[arg(long, default_value_t = 20, value_parser = crate::ranges::int(3..=3600u64))]
    seconds: u64,
    /// Pairs of runs (each pair: off, auto, auto, off), 1..=100.
    #[arg(long, default_value_t = 1, value_parser = crate::ranges::int(1..=100u64))]
    pairs: u64,
    /// Size of each demo's backing file in MiB, 1..=1048576.
    #[arg(long, default_value_t = 256, value_parser = crate::ranges::mib)]
    size_mib: u64,
    /// Where demo.md and demo.json go.
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
}

/// One demo run's totals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DemoRun {
    /// `off` or `auto`.
    pub tune: String,
    pub ios: u64,
    pub seconds: f64,
    pub iops: f64,
    pub interrupts: u64,
    pub interrupts_per_io: f64,
    /// p99 over the whole run, microseconds (`None`: none measured).
    pub p99_us: Option<f64>,
    /// The tuner's decision lines, as the demo printed them.
    pub decisions: Vec<String>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DemoReport {
    pub machine: String,
    pub kernel: String,
    pub seconds: u64,
    pub runs: Vec<DemoRun>,
}

/// Reads a `totals:` line: "totals: N I/Os in S s (R IOPS), I interrupts (X per I/O), p99 Pus".
pub fn parse_totals(line: &str) -> Option<(u64, f64, f64, u64, f64, Option<f64>)> {
    let rest = line.trim().strip_prefix("totals: ")?;
    let words: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| -> Option<f64> {
        words
            .get(i)?
            .trim_matches(|c| c == '(' || c == ')' || c == ',')
            .parse()
            .ok()
    };
    // N I/Os in S s (R IOPS), I interrupts (X per I/O), p99 P
    let ios = num(0)? as u64;
    let seconds = num(3)?;
    let iops = num(5)?;
    let interrupts = num(7)? as u64;
    let per_io = num(9)?;
    let p99 = words
        .get(13)
        .and_then(|w| w.strip_suffix("us"))
        .and_then(|v| v.parse().ok());
    Some((ios, seconds, iops, interrupts, per_io, p99))
}

/// Runs one demo and reads its totals and decisions.
fn run_demo(tune: &str, args: &DemoBenchArgs) -> Result<DemoRun> {
    let exe = std::env::current_exe().context("locating the enlight executable")?;
    let mut child = Command::new(exe)
        .args(["demo", "--tune", tune, "--listen", "127.0.0.1:0"])
        .args(["--duration", &args.seconds.to_string()])
        .args(["--size-mib", &args.size_mib.to_string()])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .die_with_parent(libc::SIGTERM)
        .spawn()
        .context("starting enlight demo")?;
    let stdout = child.stdout.take().context("enlight demo has no stdout")?;
    let reader = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(|l| l.ok())
            .collect::<Vec<String>>()
    });
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("enlight demo --tune {tune} exited with {status}");
            }
            break;
        }
        if crate::signals::stop_requested() {
            // SAFETY: kill(2) on the pid of a child we have not reaped yet.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let _ = child.wait();
            crate::signals::check_stop()?;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let lines = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reading enlight demo's output"))?;
    let totals = lines
        .iter()
        .find_map(|l| parse_totals(l))
        .with_context(|| {
            format!(
                "enlight demo --tune {tune} printed no totals:\n{}",
                lines.join("\n")
            )
        })?;
    let (ios, seconds, iops, interrupts, interrupts_per_io, p99_us) = totals;
    Ok(DemoRun {
        tune: tune.to_string(),
        ios,
        seconds,
        iops,
        interrupts,
        interrupts_per_io,
        p99_us,
        decisions: lines
            .iter()
            .filter(|l| l.trim_start().starts_with("tuner "))
            .map(|l| l.trim().to_string())
            .collect(),
    })
}

/// One figure of a run, if it has it.
type Figure = dyn Fn(&DemoRun) -> Option<f64>;

fn mean(v: impl Iterator<Item = f64>) -> Option<f64> {
    let v: Vec<f64> = v.collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// The Markdown report: every run, then the means and auto/off ratios.
pub fn markdown(r: &DemoReport) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(o, "# enlight bench demo\n");
    let _ = writeln!(
        o,
        "Machine: {}; kernel {}; `enlight demo` for {} s per run (its default workload, QD 32, 4 KiB random, 70% reads, on a fresh backing file), `--tune off` and `--tune auto` in the order off, auto, auto, off.\n",
        r.machine, r.kernel, r.seconds
    );
    let _ = writeln!(
        o,
        "| run | tune | I/Os | IOPS | interrupts/I/O | p99 (us) | tuner decisions |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|");
    for (i, run) in r.runs.iter().enumerate() {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {:.0} | {:.4} | {} | {} |",
            i + 1,
            run.tune,
            run.ios,
            run.iops,
            run.interrupts_per_io,
            run.p99_us
                .map(|v| format!("{v:.1}"))
                .unwrap_or_else(|| "-".into()),
            run.decisions.len()
        );
    }
    let of = |tune: &str, f: &Figure| mean(r.runs.iter().filter(|x| x.tune == tune).filter_map(f));
    let _ = writeln!(o, "\n| figure | off (mean) | auto (mean) | auto / off |");
    let _ = writeln!(o, "|---|---|---|---|");
    let rows: [(&str, &Figure); 3] = [
        ("IOPS", &|x| Some(x.iops)),
        ("interrupts per I/O", &|x| Some(x.interrupts_per_io)),
        ("p99 (us)", &|x| x.p99_us),
    ];
    for (name, f) in rows {
        let (off, auto) = (of("off", f), of("auto", f));
        let ratio = match (off, auto) {
            (Some(a), Some(b)) if a > 0.0 => format!("{:.3}", b / a),
            _ => "-".into(),
        };
        let show = |v: Option<f64>| v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
        let _ = writeln!(o, "| {name} | {} | {} | {ratio} |", show(off), show(auto));
    }
    let kept: Vec<&String> = r
        .runs
        .iter()
        .flat_map(|x| x.decisions.iter())
        .filter(|d| d.contains("change: kept ") || d.contains("; kept "))
        .collect();
    if !kept.is_empty() {
        let _ = writeln!(
            o,
            "\nChanges the tuner kept (with their drift-corrected effects):\n"
        );
        for d in kept {
            let _ = writeln!(o, "- {d}");
        }
    }
    o
}

pub fn run(args: DemoBenchArgs) -> Result<()> {
    let m = super::machine::Machine::read();
    let (machine, kernel) = (m.cpu_text(), m.kernel.unwrap_or_else(|| "unknown".into()));
    let mut runs = Vec::new();
    for pair in 0..args.pairs {
        for tune in ["off", "auto", "auto", "off"] {
            eprintln!(
                "== pair {}/{}: enlight demo --tune {tune} for {} s",
                pair + 1,
                args.pairs,
                args.seconds
            );
            let run = run_demo(tune, &args)?;
            eprintln!(
                "   {:.0} IOPS, {:.4} interrupts per I/O, p99 {}",
                run.iops,
                run.interrupts_per_io,
                run.p99_us
                    .map(|v| format!("{v:.1}us"))
                    .unwrap_or_else(|| "-".into())
            );
            runs.push(run);
        }
    }
    let report = DemoReport {
        machine,
        kernel,
        seconds: args.seconds,
        runs,
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let md = markdown(&report);
    std::fs::write(args.out.join("demo.md"), &md)?;
    std::fs::write(args.out.join("demo.json"), serde_json::to_string(&report)?)?;
    crate::signals::line(md);
    eprintln!("wrote {}/demo.{{md,json}}", args.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demos_totals_line_is_read() {
        let t = parse_totals(
            "totals: 679725 I/Os in 19.8 s (34329 IOPS), 61175 interrupts (0.0900 per I/O), p99 2367.5us",
        )
        .unwrap();
        assert_eq!(t, (679725, 19.8, 34329.0, 61175, 0.09, Some(2367.5)));
        assert_eq!(
            parse_totals("totals: 5 I/Os in 1.0 s (5 IOPS), 0 interrupts (0.0000 per I/O), p99 -")
                .unwrap()
                .5,
            None
        );
        assert!(parse_totals("final: I/Os counted by eBPF 5 / by the workload 5").is_none());
    }
}
