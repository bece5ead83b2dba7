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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::{Action, App};
    use crate::testing::FakeDaemon;
    use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
    use std::sync::mpsc;

    /// How long a test waits for an event or a state before failing: generous, since only a
    /// stall on a loaded machine takes more than a few polls.
    const WAIT: Duration = Duration::from_secs(30);

    /// The whole data path without a terminal: the collector polls a fake daemon, the app takes
    /// the events, `p` asks to pin, the pin request posts and its answer comes back.
    #[test]
    fn collector_events_drive_the_app_and_pin_round_trips() {
        let fake = FakeDaemon::start();
        let client = Client::new(&fake.addr());
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let collector = spawn_collector(
            client.clone(),
            Duration::from_millis(50),
            start,
            tx.clone(),
            Arc::clone(&stop),
        )
        .unwrap();
        let mut app = App::new(client.base());
        for _ in 0..3 {
            let e = rx.recv_timeout(WAIT).unwrap();
            assert!(matches!(e, Event::Update { .. }), "{e:?}");
            app.on_event(e);
        }
        assert_eq!(app.devices.len(), 2);
        assert!(app.tuner_api);
        assert_eq!(app.decisions_for("disk0").len(), 1);
        let action = app.on_event(Event::Key(KeyEvent::new(
            KeyCode::Char('p'),
            KeyModifiers::NONE,
        )));
        assert_eq!(
            action,
            Some(Action::SetPinned {
                device: "disk0".into(),
                pin: true
            })
        );
        spawn_pin(client.clone(), "disk0".into(), true, start, tx.clone());
        let mut pinned_seen = false;
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            let e = rx.recv_timeout(WAIT).unwrap();
            let is_pin = matches!(e, Event::PinResult { .. });
            app.on_event(e);
            if is_pin {
                assert_eq!(app.status.as_ref().unwrap().0, "tuner pinned for disk0");
            }
            // The next polls show the device pinned.
            if app.devices[0].tuner.as_ref().is_some_and(|t| t.pinned) {
                pinned_seen = true;
                break;
            }
        }
        assert!(pinned_seen);
        assert_eq!(fake.requests(), vec!["POST /api/v1/devices/disk0/pin"]);
        stop.store(true, Ordering::Release);
        collector.join().unwrap();
    }

    #[test]
    fn a_dead_daemon_sends_disconnected_and_the_collector_keeps_trying() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let collector = spawn_collector(
            Client::new(&format!("127.0.0.1:{port}")),
            Duration::from_millis(20),
            Instant::now(),
            tx,
            Arc::clone(&stop),
        )
        .unwrap();
        for _ in 0..3 {
            let e = rx.recv_timeout(WAIT).unwrap();
            assert!(matches!(e, Event::Disconnected { .. }), "{e:?}");
        }
        stop.store(true, Ordering::Release);
        collector.join().unwrap();
    }
}
