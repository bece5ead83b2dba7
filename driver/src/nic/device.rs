//! Both sides on threads of this process ([`SyntheticNic`], [`NicHandle`]), and [`NicBridge`]:
//! the NIC between two network namespaces.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::{
    io_err, FrameIo, LatencyFigures, NicCounters, NicError, NicGuestStats, NicHostStats, NicKnobs,
    NicOptions, NicVsc, NicVsp, IDLE_POLL,
};
use crate::channel::{self, ChannelConfig};
use crate::netns::{NetNamespaces, NetPair, Netns};
use crate::settings::DeviceSettings;

/// Both sides of a synthetic NIC on threads of this process.
pub struct NicHandle {
    stop: Arc<AtomicBool>,
    /// Written once to stop; never drained, so both threads see it.
    wake: Arc<OwnedFd>,
    guest: Option<JoinHandle<Result<(), NicError>>>,
    host: Option<JoinHandle<Result<(), NicError>>>,
    guest_stats: Arc<NicGuestStats>,
    host_stats: Arc<NicHostStats>,
    knobs: Arc<NicKnobs>,
    options: NicOptions,
    dev: u32,
}

/// Starting a synthetic NIC between two frame backends.
pub struct SyntheticNic;

impl SyntheticNic {
    /// Creates the channel sized by `settings` and `options`, and runs the guest driver on
    /// `guest_io` and the host service on `host_io`, each on its own thread.
    pub fn start<G: FrameIo + 'static, H: FrameIo + 'static>(
        guest_io: G,
        host_io: H,
        dev: u32,
        settings: DeviceSettings,
        options: NicOptions,
    ) -> Result<NicHandle, NicError> {
        Self::start_idle(guest_io, host_io, dev, settings, options, IDLE_POLL)
    }

    /// [`start`](Self::start), with both sides sleeping at most `idle` at a time when they have
    /// nothing to do.
    pub(crate) fn start_idle<G: FrameIo + 'static, H: FrameIo + 'static>(
        guest_io: G,
        host_io: H,
        dev: u32,
        settings: DeviceSettings,
        options: NicOptions,
        idle: Duration,
    ) -> Result<NicHandle, NicError> {
        settings.validate()?;
        options.validate()?;
        let cfg = ChannelConfig {
            out_ring_bytes: settings.ring_out_bytes as usize,
            in_ring_bytes: settings.ring_in_bytes as usize,
            extra_bytes: options.extra_bytes(),
        };
        let (guest, host) = channel::create(&cfg)?;
        let knobs = Arc::new(NicKnobs::new(&settings)?);
        let guest_stats = Arc::new(NicGuestStats::default());
        let host_stats = Arc::new(NicHostStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        // SAFETY: plain syscall; we own the fd on success.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io_err("eventfd")(io::Error::last_os_error()));
        }
        // SAFETY: fresh fd owned by nobody else.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut vsp = NicVsp::new(
            host,
            host_io,
            dev,
            options,
            Arc::clone(&knobs),
            Arc::clone(&host_stats),
        )?;
        let mut vsc = NicVsc::new(
            guest,
            guest_io,
            dev,
            options,
            Arc::clone(&knobs),
            Arc::clone(&guest_stats),
        )?;
        let spawn = |name: String, f: Box<dyn FnOnce() -> Result<(), NicError> + Send>| {
            std::thread::Builder::new()
                .name(name)
                .spawn(f)
                .map_err(io_err("spawning a NIC thread"))
        };
        let host_thread = {
            let (stop, wake) = (Arc::clone(&stop), Arc::clone(&wake));
            spawn(
                format!("vsp-nic{dev}"),
                Box::new(move || vsp.run(&stop, wake.as_raw_fd(), idle)),
            )?
        };
        let mut handle = NicHandle {
            stop: Arc::clone(&stop),
            wake: Arc::clone(&wake),
            guest: None,
            host: Some(host_thread),
            guest_stats,
            host_stats,
            knobs,
            options,
            dev,
        };
        handle.guest = Some(spawn(
            format!("vsc-nic{dev}"),
            Box::new(move || vsc.run(&stop, wake.as_raw_fd(), idle)),
        )?);
        Ok(handle)
    }
}

impl NicHandle {
    /// Both sides' counters now.
    pub fn counters(&self) -> NicCounters {
        NicCounters::read(&self.guest_stats, &self.host_stats)
    }

    /// The guest's own (tx, rx) latency figures over the completions traced so far (all of them
    /// once the NIC has stopped).
    pub fn latency(&self) -> (LatencyFigures, LatencyFigures) {
        self.guest_stats.latency.figures()
    }

    /// The live knobs (moderation and budget can change while the NIC runs).
    pub fn knobs(&self) -> &Arc<NicKnobs> {
        &self.knobs
    }

    /// The settings in force.
    pub fn settings(&self) -> DeviceSettings {
        self.knobs.settings()
    }

    /// The buffer sizes.
    pub fn options(&self) -> NicOptions {
        self.options
    }

    /// The device id in the probes.
    pub fn dev_id(&self) -> u32 {
        self.dev
    }

    /// Whether a side has stopped on its own (an error); [`stop`](Self::stop) reports which.
    pub fn failed(&self) -> bool {
        self.guest.as_ref().is_some_and(|t| t.is_finished())
            || self.host.as_ref().is_some_and(|t| t.is_finished())
    }

    /// Stops both sides (the guest traces what it reaped) and returns the final counters, or
    /// the first error either side stopped with.
    pub fn stop(self) -> Result<NicCounters, NicError> {
        Ok(self.stop_with_latency()?.0)
    }

    /// Like [`stop`](Self::stop), with the final (tx, rx) latency figures.
    pub fn stop_with_latency(
        mut self,
    ) -> Result<(NicCounters, (LatencyFigures, LatencyFigures)), NicError> {
        self.stop_inner()?;
        Ok((self.counters(), self.latency()))
    }

    fn stop_inner(&mut self) -> Result<(), NicError> {
        self.stop.store(true, Ordering::Release);
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a local to our eventfd.
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
        let mut result = Ok(());
        for (side, t) in [("guest", self.guest.take()), ("host", self.host.take())] {
            if let Some(t) = t {
                let r = t.join().unwrap_or(Err(NicError::Panicked(side)));
                if result.is_ok() {
                    result = r;
                }
            }
        }
        result
    }
}

impl Drop for NicHandle {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

/// A synthetic NIC between two network namespaces: the guest side on a tap in one, the host side
/// on a tap in the other, so that traffic between [`GUEST_IP`](crate::netns::GUEST_IP) and
/// [`HOST_IP`](crate::netns::HOST_IP) crosses our rings. Dropping it (or [`stop`](Self::stop))
/// stops the NIC, closes the taps and deletes the namespaces.
pub struct NicBridge {
    // Field order is drop order: the NIC threads own the taps and go first.
    nic: NicHandle,
    namespaces: NetNamespaces,
    mtu: u32,
}

impl NicBridge {
    /// Creates the namespaces and taps (removing dead runs' leftovers first) and starts the NIC.
    /// `label` names the namespaces (`enl-<pid>-<seq>-<label>_g` / `_h`). Sections are sized
    /// for `mtu` when `options` are too small for it.
    pub fn start(
        label: &str,
        dev: u32,
        settings: DeviceSettings,
        options: NicOptions,
        mtu: u32,
    ) -> Result<NicBridge, NicError> {
        let need = NicOptions::for_mtu(mtu).section_bytes;
        let options = NicOptions {
            section_bytes: options.section_bytes.max(need),
            ..options
        };
        options.validate()?;
        settings.validate()?;
        let pair = NetPair::create(label, mtu)?;
        let (guest_tap, host_tap, namespaces) = pair.split();
        let nic = SyntheticNic::start(guest_tap, host_tap, dev, settings, options)?;
        Ok(NicBridge {
            nic,
            namespaces,
            mtu,
        })
    }

    /// The namespace of the guest side (address [`GUEST_IP`](crate::netns::GUEST_IP)).
    pub fn guest_ns(&self) -> &Netns {
        &self.namespaces.guest
    }

    /// The namespace of the host side (address [`HOST_IP`](crate::netns::HOST_IP)).
    pub fn host_ns(&self) -> &Netns {
        &self.namespaces.host
    }

    /// The NIC.
    pub fn nic(&self) -> &NicHandle {
        &self.nic
    }

    /// MTU of both taps.
    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    /// Kernel counters of the guest tap (in the guest namespace) and the host tap.
    pub fn tap_stats(
        &self,
    ) -> Result<(crate::netns::LinkStats, crate::netns::LinkStats), NicError> {
        Ok((
            self.namespaces.guest.link_stats(NetPair::GUEST_IF)?,
            self.namespaces.host.link_stats(NetPair::HOST_IF)?,
        ))
    }

    /// Stops the NIC and removes the taps and namespaces; returns the final counters.
    pub fn stop(self) -> Result<NicCounters, NicError> {
        Ok(self.stop_with_latency()?.0)
    }

    /// Like [`stop`](Self::stop), with the guest's final (tx, rx) latency figures.
    pub fn stop_with_latency(
        self,
    ) -> Result<(NicCounters, (LatencyFigures, LatencyFigures)), NicError> {
        let NicBridge {
            nic, namespaces, ..
        } = self;
        let result = nic.stop_with_latency();
        drop(namespaces);
        result
    }
}
