//! The emulated NIC end to end: a guest network stack (the kernel in the "guest" namespace,
//! behind its tap) whose frames go through the NE2000 driver, register by register, to the
//! NE2000 model, whose wire is the tap in the "host" namespace; and back.
//!
//! Threads, as in QEMU with a tap backend:
//! - the caller's thread is the guest: it waits on its tap and on the card's interrupt, and runs
//!   the driver ([`Ne2kDriver`]) whose every register access is a synchronous hand-off to
//! - the device-model thread ([`ThreadBus`]), which owns nothing but the hand-off; the model
//!   lives behind a mutex (QEMU's big lock) shared with
//! - the backend's reader thread, which waits on the host tap and, while the receive ring has
//!   room, places arriving frames in it ([`Ne2000::receive`]) and raises the interrupt (an
//!   eventfd the guest waits on).
//!
//! Traced like the synthetic devices: `io_submit`/`io_complete` per frame and `io_reap` in
//! batches with op `tx` (guest tap → card → host tap; latency from the frame leaving the guest
//! stack to the card reporting it sent) and `rx` (host tap → card → guest tap; latency from the
//! frame entering the card's ring to the guest stack receiving it), plus `trap` per batch.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::ne2000::{self, Ne2000, NetBackend, NicCounters};
use super::ne2000_driver::Ne2kDriver;
use super::pio::{PioBus, PioDevice, ThreadBus};
use super::EmulatedError;
use crate::netns::Tap;
use crate::trace::{self, CompletionRecord, OP_RX, OP_TX};

/// I/O base of the card (the classic ISA NE2000 address).
pub const IO_BASE: u16 = 0x300;

/// The host tap as the card's wire.
struct TapWire(Arc<Tap>);

impl NetBackend for TapWire {
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.0.write_frame(frame)
    }
}

/// The card and what the backend reader shares with it.
struct Card {
    nic: Ne2000<TapWire>,
    /// Arrival times of the frames in the receive ring, oldest first (for rx latency only).
    arrivals: VecDeque<u64>,
}

/// The card as the guest's transport and the backend reader share it.
pub struct Shared {
    card: Mutex<Card>,
    /// Signalled when the guest moves BNRY (ring room may have appeared).
    room: Condvar,
}

/// The model side of the hand-off: one lock per access, as QEMU takes its lock per exit. The
/// KVM transport's vCPU thread serves its port-I/O exits with it too.
pub struct SharedCard(Arc<Shared>);

impl PioDevice for SharedCard {
    fn pio_read(&mut self, port: u16, size: u8) -> u32 {
        let mut c = self.0.card.lock().unwrap_or_else(|p| p.into_inner());
        c.nic.pio_read(port.wrapping_sub(IO_BASE), size)
    }

    fn pio_write(&mut self, port: u16, size: u8, value: u32) {
        let offset = port.wrapping_sub(IO_BASE);
        let mut c = self.0.card.lock().unwrap_or_else(|p| p.into_inner());
        c.nic.pio_write(offset, size, value);
        drop(c);
        if offset == ne2000::BNRY {
            self.0.room.notify_all();
        }
    }
}

/// What the serving loop needs from a guest driver of the card, whatever carries its register
/// accesses: the Rust driver over the thread transport, or a guest program in a VM.
pub trait NicGuest {
    /// Sends one frame through the card (returns once the card reports it transmitted).
    fn send(&mut self, frame: &[u8]) -> Result<(), EmulatedError>;
    /// Takes every frame out of the card's receive ring, oldest first, handing each to `deliver`.
    fn receive(&mut self, deliver: &mut dyn FnMut(&[u8])) -> Result<usize, EmulatedError>;
    /// Register accesses trapped so far (set-up included).
    fn traps(&self) -> u64;
    /// Every exit to the VMM so far (0 on the thread transport).
    fn vm_exits(&self) -> u64 {
        0
    }
    /// Receive headers that made no sense.
    fn rx_errors(&self) -> u64;
}

impl NicGuest for Ne2kDriver<ThreadBus<SharedCard>> {
    fn send(&mut self, frame: &[u8]) -> Result<(), EmulatedError> {
        Ne2kDriver::send(self, frame)
    }
    fn receive(&mut self, deliver: &mut dyn FnMut(&[u8])) -> Result<usize, EmulatedError> {
        Ne2kDriver::receive(self, deliver)
    }
    fn traps(&self) -> u64 {
        self.bus().traps()
    }
    fn rx_errors(&self) -> u64 {
        self.rx_errors
    }
}

/// Totals of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct NicFigures {
    /// Frames the guest sent (through the card to the host tap).
    pub tx_frames: u64,
    /// Their bytes.
    pub tx_bytes: u64,
    /// Frames the guest received (from the host tap through the card).
    pub rx_frames: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// Register accesses trapped (the transport's count, the card's set-up included).
    pub traps: u64,
    /// Frames the driver failed to send.
    pub tx_errors: u64,
    /// Receive headers that made no sense.
    pub rx_errors: u64,
    /// Exits to the VMM (KVM transport: the port-I/O exits plus the guest's done-writes; 0 on
    /// the thread transport).
    pub vm_exits: u64,
}

fn eventfd() -> Result<OwnedFd, EmulatedError> {
    // SAFETY: plain syscall; the result is checked before it is wrapped.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(EmulatedError::Transport(format!(
            "eventfd: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: fd is a new descriptor owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn efd_signal(fd: &OwnedFd) {
    let one = 1u64;
    // SAFETY: writes 8 bytes from a local to our eventfd.
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

fn efd_drain(fd: &OwnedFd) {
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into a local from our (non-blocking) eventfd.
    unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
}

/// Waits until one of `fds` is readable or `timeout` passes; returns their readiness.
fn wait_readable<const N: usize>(fds: [i32; N], timeout: Duration) -> [bool; N] {
    let mut p = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    // SAFETY: poll on an array of N pollfds we own.
    let n = unsafe {
        libc::poll(
            p.as_mut_ptr(),
            N as libc::nfds_t,
            timeout.as_millis() as i32,
        )
    };
    if n <= 0 {
        return [false; N];
    }
    p.map(|q| q.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0)
}

/// The backend reader: host tap → card, while the ring has room.
fn backend_reader(shared: Arc<Shared>, wire: Arc<Tap>, irq: Arc<OwnedFd>, stop: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        wait_readable([wire.raw_fd()], Duration::from_millis(50));
        let mut raised = false;
        let mut card = shared.card.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if !card.nic.can_receive() {
                // Leave frames in the tap's queue until the guest frees ring pages.
                if raised {
                    efd_signal(&irq);
                    raised = false;
                }
                card = shared
                    .room
                    .wait_timeout(card, Duration::from_millis(20))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                continue;
            }
            match wire.read_frame(&mut buf) {
                Ok(Some(n)) => {
                    if card.nic.receive(&buf[..n]) {
                        card.arrivals.push_back(trace::monotonic_ns());
                        raised = true;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    log::warn!("emulated NIC: reading the host tap: {e}");
                    break;
                }
            }
        }
        drop(card);
        if raised {
            efd_signal(&irq);
        }
    }
}

/// Batches completions for `io_reap` and traps for `trap`.
struct Tracer {
    dev: u32,
    records: Vec<CompletionRecord>,
    since: Option<Instant>,
    traps_traced: u64,
}

impl Tracer {
    fn push(&mut self, r: CompletionRecord) {
        self.since.get_or_insert_with(Instant::now);
        self.records.push(r);
        if self.records.len() >= trace::MAX_BATCH {
            trace::io_reap(self.dev, &self.records, None);
            self.records.clear();
            self.since = None;
        }
    }

    fn flush(&mut self, traps_now: u64, force: bool) {
        let old = self
            .since
            .is_some_and(|t| t.elapsed() >= crate::disk::TRACE_FLUSH);
        if !(force || old) {
            return;
        }
        if !self.records.is_empty() {
            trace::io_reap(self.dev, &self.records, None);
            self.records.clear();
        }
        self.since = None;
        if traps_now > self.traps_traced {
            trace::trap(self.dev, traps_now - self.traps_traced);
            self.traps_traced = traps_now;
        }
    }
}

/// Runs the emulated NIC between `guest_tap` and `host_tap` until `stop`; `on_interval` gets the
/// totals about once per second. The model's own counters come back with the totals.
pub fn serve(
    guest_tap: Tap,
    host_tap: Tap,
    mac: [u8; 6],
    dev_id: u32,
    stop: &AtomicBool,
    on_interval: impl FnMut(&NicFigures),
) -> Result<(NicFigures, NicCounters), EmulatedError> {
    serve_with(
        guest_tap,
        host_tap,
        mac,
        dev_id,
        stop,
        on_interval,
        |card| {
            let bus = ThreadBus::spawn(card, "ne2k-model")
                .map_err(|e| EmulatedError::Transport(format!("spawning the model thread: {e}")))?;
            Ne2kDriver::new(bus, IO_BASE)
        },
    )
}

/// [`serve`] with the guest driver `make_guest` builds over the card (the thread transport's
/// Rust driver, or the KVM transport's guest program).
pub fn serve_with<G: NicGuest>(
    guest_tap: Tap,
    host_tap: Tap,
    mac: [u8; 6],
    dev_id: u32,
    stop: &AtomicBool,
    mut on_interval: impl FnMut(&NicFigures),
    make_guest: impl FnOnce(SharedCard) -> Result<G, EmulatedError>,
) -> Result<(NicFigures, NicCounters), EmulatedError> {
    let wire = Arc::new(host_tap);
    let shared = Arc::new(Shared {
        card: Mutex::new(Card {
            nic: Ne2000::new(mac, TapWire(wire.clone())),
            arrivals: VecDeque::new(),
        }),
        room: Condvar::new(),
    });
    let irq = Arc::new(eventfd()?);
    let reader_stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (shared, wire, irq, s) = (
            shared.clone(),
            wire.clone(),
            irq.clone(),
            reader_stop.clone(),
        );
        std::thread::Builder::new()
            .name("ne2k-backend".into())
            .spawn(move || backend_reader(shared, wire, irq, s))
            .map_err(|e| EmulatedError::Transport(format!("spawning the backend reader: {e}")))?
    };
    let result = make_guest(SharedCard(shared.clone())).and_then(|guest| {
        guest_loop(
            guest,
            &guest_tap,
            &irq,
            &shared,
            dev_id,
            stop,
            &mut on_interval,
        )
    });
    reader_stop.store(true, Ordering::Relaxed);
    shared.room.notify_all();
    let _ = reader.join();
    let counters = shared
        .card
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .nic
        .counters();
    result.map(|f| (f, counters))
}

fn guest_loop<G: NicGuest>(
    mut driver: G,
    guest_tap: &Tap,
    irq: &OwnedFd,
    shared: &Shared,
    dev_id: u32,
    stop: &AtomicBool,
    on_interval: &mut impl FnMut(&NicFigures),
) -> Result<NicFigures, EmulatedError> {
    let mut figures = NicFigures::default();
    let mut tracer = Tracer {
        dev: dev_id,
        records: Vec::with_capacity(trace::MAX_BATCH),
        since: None,
        // The card's set-up trapped too: counted from the first access.
        traps_traced: 0,
    };
    let mut frame = vec![0u8; 65536];
    let mut tag = 0u64;
    let mut last_tick = Instant::now();
    trace::workload_start(dev_id, 1);
    while !stop.load(Ordering::Relaxed) {
        let [tx_ready, irq_ready] = wait_readable(
            [guest_tap.raw_fd(), irq.as_raw_fd()],
            Duration::from_millis(1),
        );
        if irq_ready {
            efd_drain(irq);
        }
        // Receive first (the card's ring is small), then send what the guest stack queued.
        // Only on the interrupt, as a real driver: the eventfd was drained before the ring, so
        // a frame placed during the drain raises it again. (Polling the ring every pass would
        // cost 5 register accesses per idle millisecond, each a VM exit on KVM.)
        let mut delivered = Vec::new();
        if irq_ready {
            driver.receive(&mut |f| {
                let _ = guest_tap.write_frame(f);
                delivered.push(f.len());
            })?;
        }
        if !delivered.is_empty() {
            let now = trace::monotonic_ns();
            let mut card = shared.card.lock().unwrap_or_else(|p| p.into_inner());
            for len in delivered {
                let arrived = card.arrivals.pop_front().unwrap_or(now);
                tag += 1;
                trace::io_submit(dev_id, OP_RX, tag, len as u32, arrived);
                trace::io_complete(dev_id, OP_RX, tag, len as u32, now - arrived, 0);
                tracer.push(CompletionRecord {
                    latency_ns: now - arrived,
                    bytes: len as u32,
                    op: OP_RX,
                    status: 0,
                });
                figures.rx_frames += 1;
                figures.rx_bytes += len as u64;
            }
        }
        if tx_ready {
            // A bounded burst, so received frames are not starved.
            for _ in 0..64 {
                let Some(n) = guest_tap
                    .read_frame(&mut frame)
                    .map_err(|e| EmulatedError::Transport(format!("guest tap: {e}")))?
                else {
                    break;
                };
                let start = trace::monotonic_ns();
                tag += 1;
                trace::io_submit(dev_id, OP_TX, tag, n as u32, start);
                let status = match driver.send(&frame[..n.min(ne2000::MAX_FRAME)]) {
                    Ok(()) => 0u16,
                    Err(EmulatedError::Device { .. }) => {
                        figures.tx_errors += 1;
                        libc::EIO as u16
                    }
                    Err(e) => return Err(e),
                };
                let latency = trace::monotonic_ns() - start;
                trace::io_complete(dev_id, OP_TX, tag, n as u32, latency, status);
                tracer.push(CompletionRecord {
                    latency_ns: latency,
                    bytes: n as u32,
                    op: OP_TX,
                    status,
                });
                figures.tx_frames += 1;
                figures.tx_bytes += n as u64;
            }
        }
        figures.traps = driver.traps();
        figures.vm_exits = driver.vm_exits();
        figures.rx_errors = driver.rx_errors();
        tracer.flush(driver.traps(), false);
        if last_tick.elapsed() >= Duration::from_secs(1) {
            last_tick = Instant::now();
            on_interval(&figures);
        }
    }
    tracer.flush(driver.traps(), true);
    figures.traps = driver.traps();
    figures.vm_exits = driver.vm_exits();
    Ok(figures)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netns::{NetPair, HOST_IP};

    fn root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// A socket read timed out (`SO_RCVTIMEO` reports `EAGAIN`).
    fn is_timeout(e: &std::io::Error) -> bool {
        matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        )
    }

    #[test]
    fn a_datagram_crosses_the_emulated_nic_intact_both_ways() {
        assert!(
            root(),
            "this test creates network namespaces and taps: run it as root"
        );
        let pair = NetPair::create("emunic", 1500).unwrap();
        let (guest_tap, host_tap, ns) = pair.split();
        let stop = Arc::new(AtomicBool::new(false));
        let runner = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                serve(
                    guest_tap,
                    host_tap,
                    [2, 0, 0, 0x0e, 0x20, 1],
                    0,
                    &stop,
                    |_| {},
                )
            })
        };
        let payload: Vec<u8> = (0..1400u32).map(|i| (i * 11 % 256) as u8).collect();
        let udp = |what: &'static str| {
            move |e| crate::netns::NetError::Os {
                what: what.into(),
                source: e,
            }
        };
        // Host side: a UDP echo server for every datagram until told to stop. It hands its
        // socket back rather than close it: a datagram still on its way must not draw a
        // port-unreachable back across the card after the guest's last delivery.
        let server = ns
            .host
            .in_namespace(move || std::net::UdpSocket::bind((HOST_IP, 7777)).map_err(udp("bind")))
            .unwrap();
        server
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let echo_stop = Arc::new(AtomicBool::new(false));
        let echo = {
            let echo_stop = echo_stop.clone();
            std::thread::spawn(move || {
                let mut echoed = Vec::new();
                let mut buf = [0u8; 2048];
                while !echo_stop.load(Ordering::Acquire) {
                    match server.recv_from(&mut buf) {
                        Ok((n, from)) => {
                            server.send_to(&buf[..n], from).unwrap();
                            echoed.push(buf[..n].to_vec());
                        }
                        Err(e) if is_timeout(&e) => {}
                        Err(e) => panic!("echo server: {e}"),
                    }
                }
                (server, echoed)
            })
        };
        // Guest side. A datagram may be lost while the taps and ARP start up: send it again
        // every second until an echo comes back.
        let client = ns
            .guest
            .in_namespace(move || std::net::UdpSocket::bind(("0.0.0.0", 0)).map_err(udp("udp")))
            .unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut buf = [0u8; 2048];
        let mut back = Vec::new();
        while back.is_empty() {
            client.send_to(&payload, (HOST_IP, 7777)).unwrap();
            match client.recv(&mut buf) {
                Ok(n) => back.push(buf[..n].to_vec()),
                Err(e) if is_timeout(&e) => {
                    assert!(Instant::now() < deadline, "no echo within 30 s")
                }
                Err(e) => panic!("udp: {e}"),
            }
        }
        echo_stop.store(true, Ordering::Release);
        let (server, echoed) = echo.join().unwrap();
        // Every echo sent crosses the card before it stops (for the exact counts below).
        let deadline = Instant::now() + Duration::from_secs(30);
        while back.len() < echoed.len() {
            match client.recv(&mut buf) {
                Ok(n) => back.push(buf[..n].to_vec()),
                Err(e) if is_timeout(&e) => assert!(
                    Instant::now() < deadline,
                    "{} of {} echoes came back within 30 s",
                    back.len(),
                    echoed.len()
                ),
                Err(e) => panic!("udp: {e}"),
            }
        }
        assert!(!echoed.is_empty());
        for arrived in &echoed {
            assert_eq!(arrived, &payload, "guest → host intact");
        }
        for b in &back {
            assert_eq!(b, &payload, "host → guest intact");
        }
        stop.store(true, Ordering::Relaxed);
        let (figures, model) = runner.join().unwrap().unwrap();
        // ARP request and reply, the datagram and its echo, at least.
        assert!(
            figures.tx_frames >= 2 && figures.rx_frames >= 2,
            "{figures:?}"
        );
        assert_eq!(model.tx_frames, figures.tx_frames);
        assert_eq!(model.rx_frames, figures.rx_frames);
        // Every byte crossed the data port: at least half a trap per byte moved.
        assert!(figures.traps * 2 >= figures.tx_bytes + figures.rx_bytes);
        assert_eq!(
            model.accesses, figures.traps,
            "every access reached the model"
        );
        drop(server);
        drop(ns);
    }
}
