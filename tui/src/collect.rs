//! The threads that feed the app: the collector polls the daemon, the key reader reads the
//! terminal, and a pin request runs on its own short thread. All send [`Event`]s over one channel.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::app::Event;
use crate::client::Client;

/// How many tuner decisions a poll asks for.
pub const DECISIONS: usize = 50;

/// Seconds since `start`.
pub fn secs(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}

/// Polls the daemon every `interval` until `stop`; a failed poll sends `Disconnected` and the
/// next one retries, so a restarted daemon is picked up again on its own.
pub fn spawn_collector(
    client: Client,
    interval: Duration,
    start: Instant,
    tx: Sender<Event>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("enlight-top-collector".into())
        .spawn(move || {
            while !stop.load(Ordering::Acquire) {
                let began = Instant::now();
                let event = match client.poll(DECISIONS) {
                    Ok(poll) => Event::Update {
                        at: secs(start),
                        poll: Box::new(poll),
                    },
                    Err(e) => Event::Disconnected {
                        at: secs(start),
                        error: e.to_string(),
                    },
                };
                if tx.send(event).is_err() {
                    return;
                }
                while began.elapsed() < interval && !stop.load(Ordering::Acquire) {
                    std::thread::sleep(
                        interval
                            .saturating_sub(began.elapsed())
                            .min(Duration::from_millis(50)),
                    );
                }
            }
        })
}

/// Reads keys and resizes until `stop`, and sends a `Tick` every second (status messages
/// expire, the disconnected timer counts).
pub fn spawn_input(
    start: Instant,
    tx: Sender<Event>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    use crossterm::event::{poll, read, Event as CtEvent};
    std::thread::Builder::new()
        .name("enlight-top-input".into())
        .spawn(move || {
            let mut last_tick = Instant::now();
            while !stop.load(Ordering::Acquire) {
                let event = match poll(Duration::from_millis(100)) {
                    Ok(true) => match read() {
                        Ok(CtEvent::Key(k)) => Some(Event::Key(k)),
                        Ok(CtEvent::Resize(..)) => Some(Event::Resize),
                        Ok(_) => None,
                        Err(_) => return,
                    },
                    Ok(false) => None,
                    Err(_) => return,
                };
                let event = event.or_else(|| {
                    (last_tick.elapsed() >= Duration::from_secs(1)).then(|| {
                        last_tick = Instant::now();
                        Event::Tick { at: secs(start) }
                    })
                });
                if let Some(e) = event {
                    if tx.send(e).is_err() {
                        return;
                    }
                }
            }
        })
}

/// Pins or unpins a device's tuner on a short-lived thread; the answer comes back as an event.
pub fn spawn_pin(client: Client, device: String, pin: bool, start: Instant, tx: Sender<Event>) {
    let spawned = std::thread::Builder::new()
        .name("enlight-top-pin".into())
        .spawn({
            let tx = tx.clone();
            let device = device.clone();
            move || {
                let result = client
                    .set_pinned(&device, pin)
                    .map(|r| r.pinned)
                    .map_err(|e| e.to_string());
                let _ = tx.send(Event::PinResult {
                    at: secs(start),
                    device,
                    result,
                });
            }
        });
    if let Err(e) = spawned {
        let _ = tx.send(Event::PinResult {
            at: secs(start),
            device,
            result: Err(e.to_string()),
        });
    }
}
