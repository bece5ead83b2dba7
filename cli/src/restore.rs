//! `enlight restore`: puts back every kernel device setting enlight changed, from the journal
//! enlightd keeps under the runtime directory (`<dir>/kernel/originals.json`, written before
//! each change, so it survives a daemon killed mid-change). Each restored knob leaves the
//! journal; one that cannot be restored stays there and makes the command fail.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use enlightd::kernel::changes::{KernelChanges, RestoreReport};
use enlightd::kernel::journal::Entry;

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// Runtime directory holding the journal [default: $ENLIGHT_RUNTIME_DIR or /run/enlight].
    #[arg(long, value_name = "DIR")]
    runtime_dir: Option<PathBuf>,
    /// Only list what would be restored.
    #[arg(long)]
    list: bool,
}

/// The journal, one line per changed knob (pure, tested).
pub fn render_entries(entries: &[Entry]) -> String {
    if entries.is_empty() {
        return "nothing to restore: enlight changed no kernel device setting\n".into();
    }
    entries
        .iter()
        .map(|e| {
            let now = e
                .applied
                .as_ref()
                .map(|v| format!(", now {v}"))
                .unwrap_or_default();
            format!("{} {}: original {}{now}\n", e.target, e.knob, e.original)
        })
        .collect()
}

/// What a restore did, one line per knob (pure, tested).
pub fn render_report(report: &RestoreReport) -> String {
    let mut out = String::new();
    for (target, knob, value) in &report.restored {
        out.push_str(&format!("restored {target} {knob} = {value}\n"));
    }
    for (target, knob, why) in &report.failed {
        out.push_str(&format!("FAILED   {target} {knob}: {why}\n"));
    }
    for (target, knob, why) in &report.left {
        out.push_str(&format!("left     {target} {knob}: {why}\n"));
    }
    if out.is_empty() {
        out.push_str("nothing to restore: enlight changed no kernel device setting\n");
    }
    out
}

pub fn run(args: RestoreArgs) -> Result<()> {
    let dir = args
        .runtime_dir
        .unwrap_or_else(enlight_driver::registry::runtime_dir);
    let mut changes = KernelChanges::open(&dir).context("opening the kernel settings journal")?;
    if args.list {
        crate::signals::text(render_entries(changes.journal().entries()));
        return Ok(());
    }
    let report = changes.restore();
    crate::signals::text(render_report(&report));
    if !report.failed.is_empty() {
        bail!(
            "{} setting(s) could not be restored; they stay in {}",
            report.failed.len(),
            changes.journal().path().display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use enlightd::kernel::journal::{KnobValue, Target};

    #[test]
    fn reports_name_every_knob() {
        let report = RestoreReport {
            left: vec![],
            restored: vec![(
                Target::Block { disk: "vdb".into() },
                "read_ahead_kb".into(),
                KnobValue::U32(128),
            )],
            failed: vec![(
                Target::Nic {
                    iface: "eth1".into(),
                    netns: None,
                },
                "rx_frames".into(),
                "no network interface eth1".into(),
            )],
        };
        assert_eq!(
            render_report(&report),
            "restored disk vdb read_ahead_kb = 128\nFAILED   nic eth1 rx_frames: no network interface eth1\n"
        );
        assert!(render_report(&RestoreReport::default()).starts_with("nothing to restore"));
        let entries = vec![Entry {
            target: Target::Nic {
                iface: "eth1".into(),
                netns: None,
            },
            knob: "adaptive_rx".into(),
            original: KnobValue::Bool(false),
            applied: Some(KnobValue::Bool(true)),
            recorded_unix_ms: 0,
        }];
        assert_eq!(
            render_entries(&entries),
            "nic eth1 adaptive_rx: original off, now on\n"
        );
    }

    #[test]
    fn an_empty_runtime_dir_has_nothing_to_restore() {
        let dir = tempfile::tempdir().unwrap();
        run(RestoreArgs {
            runtime_dir: Some(dir.path().into()),
            list: false,
        })
        .unwrap();
    }
}
