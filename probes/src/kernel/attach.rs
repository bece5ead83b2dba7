//! Attaching the kernel programs: each tracepoint or BTF program by itself, the Hyper-V events'
//! counter on every `hyperv:vmbus_*` tracepoint the kernel has, and the KVM programs' field
//! offsets from the tracefs formats.

use super::*;

/// Tells the KVM programs where their fields are (from the tracefs formats).
pub(super) fn set_kvm_fields(
    ebpf: &mut Ebpf,
    catalog: &dyn Catalog,
) -> Result<(), KernelProbeError> {
    let offset = |event: &str, field: &str| {
        catalog
            .format("kvm", event)
            .and_then(|f| tracefs::field_offset(&f, field))
            .unwrap_or(FIELD_ABSENT)
    };
    let fields = [
        (KVM_EXIT_REASON, offset("kvm_exit", "exit_reason")),
        (KVM_EXIT_ISA, offset("kvm_exit", "isa")),
        (KVM_PIO_RW, offset("kvm_pio", "rw")),
        (KVM_MMIO_TYPE, offset("kvm_mmio", "type")),
    ];
    let map = ebpf
        .map_mut("kvm_fields")
        .ok_or_else(|| KernelProbeError::Map {
            name: "kvm_fields",
            reason: "missing".into(),
        })?;
    let mut array: Array<&mut MapData, u32> =
        Array::try_from(map).map_err(map_err("kvm_fields"))?;
    for (index, off) in fields {
        array.set(index, off, 0).map_err(map_err("kvm_fields"))?;
    }
    Ok(())
}

/// Attaches the event counter to every `hyperv:vmbus_*` event the catalog lists.
pub(super) fn attach_hyperv(
    ebpf: &mut Ebpf,
    selection: &Selection,
    catalog: &dyn Catalog,
    status: &mut BTreeMap<String, ProbeStatus>,
    event_names: &mut BTreeMap<u32, String>,
    links: &mut Vec<SiteLink>,
) {
    let events: Vec<String> = catalog
        .events("hyperv")
        .into_iter()
        .filter(|e| e.starts_with("vmbus_"))
        .collect();
    if !selection.has(Group::Hyperv) {
        status.insert(
            HYPERV_PROBE.into(),
            ProbeStatus {
                group: Group::Hyperv,
                attached: false,
                reason: Some("not selected".into()),
                absent: false,
            },
        );
        return;
    }
    if events.is_empty() {
        status.insert(
            HYPERV_PROBE.into(),
            ProbeStatus {
                group: Group::Hyperv,
                attached: false,
                reason: Some(
                    "this kernel has no hyperv:vmbus_* tracepoints (not a Hyper-V guest, or hv_vmbus not loaded)"
                        .into(),
                ),
                absent: true,
            },
        );
        return;
    }
    for event in events {
        let probe = format!("hyperv:{event}");
        let result = attach_counter(ebpf, links, catalog, "hyperv", &event);
        if let Ok(id) = &result {
            event_names.insert(*id, probe.clone());
        }
        status.insert(
            probe,
            ProbeStatus {
                group: Group::Hyperv,
                attached: result.is_ok(),
                reason: result.err().map(|e| format!("hyperv:{event}: {e}")),
                absent: false,
            },
        );
    }
}

/// Attaches the generic event counter to a classic tracepoint, loading it first if needed; the
/// attach cookie is the event's tracefs id, which the program counts by. Returns the id.
pub(super) fn attach_counter(
    ebpf: &mut Ebpf,
    links: &mut Vec<SiteLink>,
    catalog: &dyn Catalog,
    category: &str,
    name: &str,
) -> Result<u32, String> {
    let id = catalog
        .id(category, name)
        .ok_or_else(|| format!("{category}:{name} has no id in tracefs (no such tracepoint)"))?;
    let program: &mut TracePoint = ebpf
        .program_mut(EVENT_COUNTER)
        .ok_or("program enlight_count_event missing from the object")?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
    if program.fd().is_err() {
        program
            .load()
            .map_err(|e| format!("the kernel refused {EVENT_COUNTER}: {}", verifier_tail(&e)))?;
    }
    let fd = program.fd().map_err(|e| e.to_string())?;
    let link = crate::attach::attach_tracepoint(fd.as_fd(), id, id as u64)
        .map_err(|e| format!("attaching {category}:{name}: {e}"))?;
    links.push(link);
    Ok(id)
}

/// Loads and attaches one fixed probe's program.
pub(super) fn attach_one(
    ebpf: &mut Ebpf,
    program: &str,
    how: Attach,
    category: &str,
    name: &str,
    btf: Result<&Btf, &String>,
) -> Result<(), String> {
    let prog = ebpf
        .program_mut(program)
        .ok_or_else(|| format!("program {program} missing from the object"))?;
    match how {
        Attach::Btf => {
            let btf = btf.map_err(|e| format!("no kernel BTF: {e}"))?;
            let p: &mut BtfTracePoint = prog.try_into().map_err(|e| format!("{e}"))?;
            p.load(name, btf)
                .map_err(|e| format!("the kernel refused {program}: {}", verifier_tail(&e)))?;
            p.attach().map_err(|e| format!("attaching: {e}"))?;
        }
        Attach::Classic => {
            let p: &mut TracePoint = prog.try_into().map_err(|e| format!("{e}"))?;
            p.load()
                .map_err(|e| format!("the kernel refused {program}: {}", verifier_tail(&e)))?;
            p.attach(category, name)
                .map_err(|e| format!("attaching: {e}"))?;
        }
    }
    Ok(())
}

/// A program error with at most the last lines of a verifier log, to keep statuses readable.
fn verifier_tail(e: &aya::programs::ProgramError) -> String {
    let text = format!("{e:#}");
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() <= 6 {
        return text;
    }
    format!("{} ... {}", lines[0], lines[lines.len() - 4..].join(" | "))
}
