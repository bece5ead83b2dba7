//! A synthetic disk with both sides in this process: the guest driver on the caller's thread,
//! the host service on its own.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::proto::MAX_PACKET_PAYLOAD;
use super::{serve, Backing, DiskError, DiskOptions, DiskVsc, VspControl, VspHandle, SLOT_ALIGN};
use crate::channel::{self, ChannelConfig};
use crate::settings::DeviceSettings;

/// A synthetic disk with both sides in this process.
pub struct SyntheticDisk;

impl SyntheticDisk {
    /// Opens `backing`, creates the channel sized by `settings` and `options`, starts the host
    /// service on its own threads and returns the guest driver and the service's handle.
    pub fn start(
        backing: &Path,
        settings: DeviceSettings,
        dev: u32,
        options: DiskOptions,
    ) -> Result<(DiskVsc, VspHandle), DiskError> {
        settings.validate()?;
        if options.max_io_bytes == 0
            || !(options.max_io_bytes as usize).is_multiple_of(SLOT_ALIGN)
            || options.queue_slots == 0
        {
            return Err(DiskError::Invalid(format!(
                "max_io_bytes {} must be a non-zero multiple of {SLOT_ALIGN} and queue_slots non-zero",
                options.max_io_bytes
            )));
        }
        let backing = Backing::open(backing)?;
        let capacity = backing.capacity_sectors();
        let cfg = ChannelConfig {
            out_ring_bytes: settings.ring_out_bytes as usize,
            in_ring_bytes: settings.ring_in_bytes as usize,
            extra_bytes: options.max_io_bytes as usize * options.queue_slots as usize,
        };
        let (mut guest, mut host) = channel::create(&cfg)?;
        guest.rx.set_max_payload(MAX_PACKET_PAYLOAD);
        host.rx.set_max_payload(MAX_PACKET_PAYLOAD);
        let control = VspControl::with_settings(settings)?;
        // The service runs in this process, so it takes channel hand-overs (ring resizes).
        control.live.host_attached.store(true, Ordering::Release);
        let live = Arc::clone(&control.live);
        let thread = {
            let control = control.clone();
            std::thread::Builder::new()
                .name(format!("vsp-disk{dev}"))
                .spawn(move || serve(host, backing, dev, options, control))
                .map_err(|e| DiskError::Backing {
                    path: "host service thread".into(),
                    source: e,
                })?
        };
        let vsc = DiskVsc::with_live(guest, dev, live, options.max_io_bytes, capacity);
        Ok((
            vsc,
            VspHandle {
                control,
                thread: Some(thread),
            },
        ))
    }
}
