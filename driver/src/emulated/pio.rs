//! Port I/O between a guest driver and a device model.
//!
//! [`PioDevice`] is the device model's side (what QEMU's `MemoryRegionOps` are); [`PioBus`] is
//! the guest driver's side (its `inb`/`outw`). Without KVM, [`ThreadBus`] connects the two: the
//! device model lives on its own thread and every register access is a synchronous hand-off to
//! it and back (the guest's instruction does not retire until the model has handled it), which
//! costs what a cross-thread wake-up really costs: two futex round trips, or a spin when both
//! threads happen to be running. Nothing stands in for a cost.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

/// A device model reached through port I/O.
pub trait PioDevice: Send {
    /// A read of `size` bytes (1, 2 or 4) at `port`.
    fn pio_read(&mut self, port: u16, size: u8) -> u32;
    /// A write of `size` bytes (1, 2 or 4) at `port`.
    fn pio_write(&mut self, port: u16, size: u8, value: u32);
}

impl PioDevice for super::ide::IdeDisk {
    fn pio_read(&mut self, port: u16, size: u8) -> u32 {
        super::ide::IdeDisk::pio_read(self, port, size)
    }
    fn pio_write(&mut self, port: u16, size: u8, value: u32) {
        super::ide::IdeDisk::pio_write(self, port, size, value)
    }
}

/// The guest driver's view of port I/O: each call is one trapped register access.
pub trait PioBus {
    /// `in` of `size` bytes.
    fn read(&mut self, port: u16, size: u8) -> u32;
    /// `out` of `size` bytes.
    fn write(&mut self, port: u16, size: u8, value: u32);
    /// Accesses trapped so far.
    fn traps(&self) -> u64;
}

/// A bus that calls the model in the caller's thread: for unit tests of drivers only (it traps
/// nothing).
pub struct DirectBus<D: PioDevice> {
    /// The model.
    pub device: D,
    accesses: u64,
}

impl<D: PioDevice> DirectBus<D> {
    /// A bus over `device`.
    pub fn new(device: D) -> Self {
        DirectBus {
            device,
            accesses: 0,
        }
    }
}

impl<D: PioDevice> PioBus for DirectBus<D> {
    fn read(&mut self, port: u16, size: u8) -> u32 {
        self.accesses += 1;
        self.device.pio_read(port, size)
    }
    fn write(&mut self, port: u16, size: u8, value: u32) {
        self.accesses += 1;
        self.device.pio_write(port, size, value)
    }
    fn traps(&self) -> u64 {
        self.accesses
    }
}

enum Access {
    Read { port: u16, size: u8 },
    Write { port: u16, size: u8, value: u32 },
}

/// The thread transport: the device model runs on its own thread and each access is a
/// synchronous request/reply hand-off to it.
pub struct ThreadBus<D: PioDevice + 'static> {
    to_model: Option<SyncSender<Access>>,
    from_model: Receiver<u32>,
    thread: Option<JoinHandle<D>>,
    traps: u64,
}

impl<D: PioDevice + 'static> ThreadBus<D> {
    /// Moves `device` onto a new thread named `name`.
    pub fn spawn(device: D, name: &str) -> std::io::Result<Self> {
        let (to_model, requests) = sync_channel::<Access>(1);
        let (replies, from_model) = sync_channel::<u32>(1);
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let mut device = device;
                // Ends when the guest side hangs up.
                while let Ok(access) = requests.recv() {
                    let value = match access {
                        Access::Read { port, size } => device.pio_read(port, size),
                        Access::Write { port, size, value } => {
                            device.pio_write(port, size, value);
                            0
                        }
                    };
                    if replies.send(value).is_err() {
                        break;
                    }
                }
                device
            })?;
        Ok(ThreadBus {
            to_model: Some(to_model),
            from_model,
            thread: Some(thread),
            traps: 0,
        })
    }

    fn round_trip(&mut self, access: Access) -> u32 {
        self.traps += 1;
        let sent = self.to_model.as_ref().map(|t| t.send(access).is_ok());
        match (sent, self.from_model.recv()) {
            (Some(true), Ok(v)) => v,
            // The model thread died (it panicked): the bus floats, as an unclaimed port does.
            _ => 0xFFFF_FFFF,
        }
    }

    /// Stops the model thread and returns the model (its counters, its backing file).
    pub fn stop(mut self) -> Option<D> {
        self.to_model.take();
        self.thread.take().and_then(|t| t.join().ok())
    }
}

impl<D: PioDevice + 'static> Drop for ThreadBus<D> {
    fn drop(&mut self) {
        self.to_model.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl<D: PioDevice + 'static> PioBus for ThreadBus<D> {
    fn read(&mut self, port: u16, size: u8) -> u32 {
        self.round_trip(Access::Read { port, size })
    }
    fn write(&mut self, port: u16, size: u8, value: u32) {
        self.round_trip(Access::Write { port, size, value });
    }
    fn traps(&self) -> u64 {
        self.traps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch register per port, counting what reached it.
    struct Scratch {
        regs: [u32; 8],
        seen: u64,
        thread: Option<std::thread::ThreadId>,
    }

    impl PioDevice for Scratch {
        fn pio_read(&mut self, port: u16, _size: u8) -> u32 {
            self.seen += 1;
            self.thread = Some(std::thread::current().id());
            self.regs[port as usize % 8]
        }
        fn pio_write(&mut self, port: u16, _size: u8, value: u32) {
            self.seen += 1;
            self.regs[port as usize % 8] = value;
        }
    }

    #[test]
    fn every_access_reaches_the_model_thread_in_order() {
        let dev = Scratch {
            regs: [0; 8],
            seen: 0,
            thread: None,
        };
        let mut bus = ThreadBus::spawn(dev, "model").unwrap();
        for i in 0..1000u32 {
            bus.write((i % 8) as u16, 4, i);
            assert_eq!(bus.read((i % 8) as u16, 4), i);
        }
        assert_eq!(bus.traps(), 2000);
        let dev = bus.stop().unwrap();
        assert_eq!(dev.seen, 2000);
        assert_ne!(dev.thread, Some(std::thread::current().id()));
    }
}
