//! `App`: the plain state of `enlight top` and how events change it. No terminal and no network
//! here: keys and daemon polls come in as [`Event`]s, requests to the daemon go out as
//! [`Action`]s, and rendering (`impl Widget for &App`, in [`crate::ui`]) only reads.

use std::collections::{BTreeMap, VecDeque};

use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use crate::model::{Decision, DeviceView, HealthView, Poll};
use crate::stats::Hist;

/// Everything that happens to the app, sent over one channel by the collector and key threads.
#[derive(Debug)]
pub enum Event {
    /// A key press.
    Key(KeyEvent),
    /// The terminal changed size (redraw).
    Resize,
    /// A successful poll of the daemon, at `at` seconds since start.
    Update { at: f64, poll: Box<Poll> },
    /// A poll failed (daemon down or restarting).
    Disconnected { at: f64, error: String },
    /// The answer to a pin/unpin request.
    PinResult {
        at: f64,
        device: String,
        result: Result<bool, String>,
    },
    /// Time passed (status messages expire).
    Tick { at: f64 },
}

/// What the app asks its shell to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Leave (the shell restores the terminal).
    Quit,
    /// Pin (`pin = true`) or unpin the tuner of a device through the daemon's API.
    SetPinned { device: String, pin: bool },
}

/// The aggregation window for rates, percentiles and the histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Window {
    S1,
    S10,
    S60,
}

impl Window {
    pub const ALL: [Window; 3] = [Window::S1, Window::S10, Window::S60];

    pub fn secs(self) -> f64 {
        match self {
            Window::S1 => 1.0,
            Window::S10 => 10.0,
            Window::S60 => 60.0,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Window::S1 => "1s",
            Window::S10 => "10s",
            Window::S60 => "60s",
        }
    }
}

/// Which screen is showing.
#[derive(Debug, Clone, PartialEq)]
pub enum Screen {
    List,
    Device(String),
    Compare(String, String),
}

/// The link to the daemon.
#[derive(Debug, Clone, PartialEq)]
pub enum Connection {
    /// No answer yet.
    Connecting,
    Connected {
        since: f64,
    },
    /// Polls fail; the figures on screen are the last ones received.
    Disconnected {
        since: f64,
        error: String,
        was_connected: bool,
    },
}

/// One cumulative read of a device.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub at: f64,
    pub hist: Hist,
    pub ops: u64,
    pub bytes: u64,
    pub interrupts: u64,
}

/// A device's figures over a window.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowFigures {
    /// Seconds actually covered (shorter than the window until enough history exists; 0 when
    /// only one read exists and the figures are the daemon's own).
    pub span: f64,
    pub ops_per_sec: f64,
    pub bytes_per_sec: f64,
    pub interrupts_per_sec: f64,
    /// p50, p99, p999 in ns.
    pub percentiles: [Option<f64>; 3],
    pub hist: Hist,
}

/// p50/p99/p999 (ns) per window at one time, for the chart.
#[derive(Debug, Clone, PartialEq)]
pub struct PercentilePoint {
    pub at: f64,
    pub by_window: [[Option<f64>; 3]; 3],
}

/// Seconds of samples kept (the longest window plus slack).
const HISTORY_SECS: f64 = 65.0;
/// Seconds of percentile points kept for the chart.
pub const CHART_SECS: f64 = 120.0;
/// How long a status message shows.
const STATUS_SECS: f64 = 5.0;

/// The state of `enlight top`.
#[derive(Debug, Clone)]
pub struct App {
    /// The daemon's base URL (shown in the header).
    pub daemon: String,
    pub screen: Screen,
    /// Index into `devices` on the list screen.
    pub selected: usize,
    pub window: Window,
    pub paused: bool,
    pub help: bool,
    pub connection: Connection,
    /// Times the link came back after being lost.
    pub reconnects: u64,
    /// Seconds since start of the latest event.
    pub now: f64,
    pub devices: Vec<DeviceView>,
    pub health: HealthView,
    /// Whether the daemon serves the tuner API.
    pub tuner_api: bool,
    /// Recent tuner decisions, newest last.
    pub decisions: Vec<Decision>,
    pub samples: BTreeMap<String, VecDeque<Sample>>,
    pub chart: BTreeMap<String, VecDeque<PercentilePoint>>,
    /// A message for the status line, and when it was set.
    pub status: Option<(String, f64)>,
    last_ticks: Option<u64>,
}

impl App {
    pub fn new(daemon: &str) -> App {
        App {
            daemon: daemon.to_string(),
            screen: Screen::List,
            selected: 0,
            window: Window::S10,
            paused: false,
            help: false,
            connection: Connection::Connecting,
            reconnects: 0,
            now: 0.0,
            devices: Vec::new(),
            health: HealthView::default(),
            tuner_api: false,
            decisions: Vec::new(),
            samples: BTreeMap::new(),
            chart: BTreeMap::new(),
            status: None,
            last_ticks: None,
        }
    }

    /// Applies one event; returns what the shell must do.
    pub fn on_event(&mut self, event: Event) -> Option<Action> {
        match event {
            Event::Key(k) => return self.on_key(k),
            Event::Resize => {}
            Event::Tick { at } => self.advance(at),
            Event::Update { at, poll } => {
                self.advance(at);
                self.on_poll(at, *poll);
            }
            Event::Disconnected { at, error } => {
                self.advance(at);
                self.connection = match &self.connection {
                    Connection::Disconnected {
                        since,
                        was_connected,
                        ..
                    } => Connection::Disconnected {
                        since: *since,
                        error,
                        was_connected: *was_connected,
                    },
                    Connection::Connected { .. } => Connection::Disconnected {
                        since: at,
                        error,
                        was_connected: true,
                    },
                    Connection::Connecting => Connection::Disconnected {
                        since: at,
                        error,
                        was_connected: false,
                    },
                };
            }
            Event::PinResult { at, device, result } => {
                self.advance(at);
                let msg = match result {
                    Ok(true) => format!("tuner pinned for {device}"),
                    Ok(false) => format!("tuner unpinned for {device}"),
                    Err(e) => format!("pin/unpin {device} failed: {e}"),
                };
                self.status = Some((msg, at));
            }
        }
        None
    }

    fn advance(&mut self, at: f64) {
        self.now = self.now.max(at);
        if let Some((_, since)) = &self.status {
            if self.now - since > STATUS_SECS {
                self.status = None;
            }
        }
    }

    fn on_poll(&mut self, at: f64, poll: Poll) {
        // The daemon came back: its counters started again from zero, so differences against
        // older samples would mean nothing.
        let restarted = matches!(
            self.connection,
            Connection::Disconnected {
                was_connected: true,
                ..
            }
        ) || self.last_ticks.is_some_and(|t| poll.health.ticks < t);
        if restarted {
            self.samples.clear();
            self.chart.clear();
            self.reconnects += 1;
            self.status = Some(("reconnected to enlightd".into(), at));
        }
        if !matches!(self.connection, Connection::Connected { .. }) {
            self.connection = Connection::Connected { since: at };
        }
        if self.paused {
            return;
        }
        let fresh_tick = self.last_ticks != Some(poll.health.ticks);
        self.last_ticks = Some(poll.health.ticks);
        self.tuner_api = poll.tuner_api;
        self.decisions = poll.decisions;
        self.health = poll.health;
        self.devices = poll.devices;
        if self.selected >= self.devices.len() {
            self.selected = self.devices.len().saturating_sub(1);
        }
        if !fresh_tick {
            return;
        }
        let hists: BTreeMap<&str, Hist> = poll
            .histograms
            .iter()
            .map(|h| (h.device.as_str(), Hist::merge_ops(&h.ops)))
            .collect();
        for d in &self.devices {
            let sample = Sample {
                at,
                hist: hists.get(d.name.as_str()).cloned().unwrap_or_default(),
                ops: d.total.ops_total,
                bytes: d.total.bytes_total,
                interrupts: d.interrupts_total,
            };
            let q = self.samples.entry(d.name.clone()).or_default();
            if q.back().is_some_and(|s| s.ops > sample.ops) {
                q.clear();
            }
            q.push_back(sample);
            while q.front().is_some_and(|s| at - s.at > HISTORY_SECS) {
                q.pop_front();
            }
        }
        self.samples
            .retain(|name, _| self.devices.iter().any(|d| &d.name == name));
        let names: Vec<String> = self.devices.iter().map(|d| d.name.clone()).collect();
        for name in names {
            let by_window = Window::ALL.map(|w| {
                self.figures_for(&name, w)
                    .map(|f| f.percentiles)
                    .unwrap_or([None; 3])
            });
            let c = self.chart.entry(name).or_default();
            c.push_back(PercentilePoint { at, by_window });
            while c.front().is_some_and(|p| at - p.at > CHART_SECS) {
                c.pop_front();
            }
        }
        self.chart
            .retain(|name, _| self.devices.iter().any(|d| &d.name == name));
    }

    fn on_key(&mut self, k: KeyEvent) -> Option<Action> {
        if k.kind == KeyEventKind::Release {
            return None;
        }
        if k.modifiers.contains(KeyModifiers::CONTROL) && k.code == KeyCode::Char('c') {
            return Some(Action::Quit);
        }
        if self.help {
            // Any key closes the overlay; q still quits.
            self.help = false;
            return (k.code == KeyCode::Char('q')).then_some(Action::Quit);
        }
        match k.code {
            KeyCode::Char('q') => return Some(Action::Quit),
            KeyCode::Char('?') | KeyCode::Char('h') | KeyCode::F(1) => self.help = true,
            KeyCode::Char('1') => self.window = Window::S1,
            KeyCode::Char('2') => self.window = Window::S10,
            KeyCode::Char('3') => self.window = Window::S60,
            KeyCode::Char('w') => {
                self.window = match self.window {
                    Window::S1 => Window::S10,
                    Window::S10 => Window::S60,
                    Window::S60 => Window::S1,
                }
            }
            KeyCode::Char(' ') => {
                self.paused = !self.paused;
            }
            KeyCode::Up | KeyCode::Char('k') => self.move_selection(-1),
            KeyCode::Down | KeyCode::Char('j') => self.move_selection(1),
            KeyCode::Enter => {
                if let Some(d) = self.selected_device() {
                    self.screen = Screen::Device(d.name.clone());
                }
            }
            KeyCode::Esc | KeyCode::Backspace => self.screen = Screen::List,
            KeyCode::Char('c') => {
                if let Some(left) = self.selected_device().map(|d| d.name.clone()) {
                    match self.counterpart(&left) {
                        Some(right) => self.screen = Screen::Compare(left, right),
                        None => {
                            self.status = Some(("compare needs a second device".into(), self.now))
                        }
                    }
                }
            }
            KeyCode::Tab | KeyCode::Left | KeyCode::Right => {
                if let Screen::Compare(left, right) = &self.screen {
                    let others: Vec<&str> = self
                        .devices
                        .iter()
                        .map(|d| d.name.as_str())
                        .filter(|n| n != left)
                        .collect();
                    if !others.is_empty() {
                        let i = others.iter().position(|n| n == right).unwrap_or(0);
                        let step = if k.code == KeyCode::Left {
                            others.len() - 1
                        } else {
                            1
                        };
                        let next = others[(i + step) % others.len()].to_string();
                        self.screen = Screen::Compare(left.clone(), next);
                    }
                }
            }
            KeyCode::Char('p') => {
                let d = self.focused_device()?;
                let name = d.name.clone();
                return match &d.tuner {
                    Some(t) => Some(Action::SetPinned {
                        device: name,
                        pin: !t.pinned,
                    }),
                    None => {
                        self.status = Some((format!("no tuner runs for {name}"), self.now));
                        None
                    }
                };
            }
            _ => {}
        }
        None
    }

    fn move_selection(&mut self, by: isize) {
        if self.devices.is_empty() {
            return;
        }
        let n = self.devices.len() as isize;
        let i = (self.selected as isize + by).clamp(0, n - 1);
        self.selected = i as usize;
        // On a device screen, up/down walk the devices too.
        if let Screen::Device(_) = self.screen {
            self.screen = Screen::Device(self.devices[self.selected].name.clone());
        }
    }

    /// The device under the cursor on the list.
    pub fn selected_device(&self) -> Option<&DeviceView> {
        self.devices.get(self.selected)
    }

    /// The device the screen is about: the one shown, or the selected one on the list (and the
    /// left one when comparing).
    pub fn focused_device(&self) -> Option<&DeviceView> {
        match &self.screen {
            Screen::List => self.selected_device(),
            Screen::Device(n) | Screen::Compare(n, _) => self.device(n),
        }
    }

    /// A device by name.
    pub fn device(&self, name: &str) -> Option<&DeviceView> {
        self.devices.iter().find(|d| d.name == name)
    }

    /// The device to compare `name` with: preferably one of another kind (emulated against
    /// enlightened), else the next one.
    fn counterpart(&self, name: &str) -> Option<String> {
        let me = self.device(name)?;
        self.devices
            .iter()
            .find(|d| d.name != name && d.kind != me.kind)
            .or_else(|| self.devices.iter().find(|d| d.name != name))
            .map(|d| d.name.clone())
    }

    /// A device's figures over the current window.
    pub fn figures(&self, name: &str) -> Option<WindowFigures> {
        self.figures_for(name, self.window)
    }

    /// A device's figures over `window`: the difference between its newest read and the newest
    /// read at least (nearly) `window` older; with a single read, the daemon's own figures.
    pub fn figures_for(&self, name: &str, window: Window) -> Option<WindowFigures> {
        let q = self.samples.get(name)?;
        let newest = q.back()?;
        // Reads arrive about once per daemon interval, never exactly on time: take the older
        // read whose age is closest to the window (the oldest one while history is shorter).
        let older = q.iter().rev().skip(1).min_by(|a, b| {
            let da = ((newest.at - a.at) - window.secs()).abs();
            let db = ((newest.at - b.at) - window.secs()).abs();
            da.total_cmp(&db)
        });
        match older {
            Some(o) => {
                let span = newest.at - o.at;
                let hist = newest.hist.since(&o.hist);
                let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / span.max(1e-9);
                Some(WindowFigures {
                    span,
                    ops_per_sec: rate(newest.ops, o.ops),
                    bytes_per_sec: rate(newest.bytes, o.bytes),
                    interrupts_per_sec: rate(newest.interrupts, o.interrupts),
                    percentiles: hist.percentiles(),
                    hist,
                })
            }
            None => {
                let d = self.device(name)?;
                let s = |v: Option<f64>| v.map(|s| s * 1e9);
                Some(WindowFigures {
                    span: 0.0,
                    ops_per_sec: d.total.ops_per_sec,
                    bytes_per_sec: d.total.bytes_per_sec,
                    interrupts_per_sec: d.interrupts_per_sec,
                    percentiles: [
                        s(d.total.p50_seconds),
                        s(d.total.p99_seconds),
                        s(d.total.p999_seconds),
                    ],
                    hist: newest.hist.clone(),
                })
            }
        }
    }

    /// Recent decisions about one device, newest last.
    pub fn decisions_for(&self, name: &str) -> Vec<&Decision> {
        self.decisions.iter().filter(|d| d.device == name).collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::{DeviceHistogram, OpHistogram, OpView, TunerView};

    pub(crate) fn device(name: &str, kind: &str, ops: u64, tuner: Option<TunerView>) -> DeviceView {
        DeviceView {
            name: name.into(),
            device: "disk".into(),
            kind: kind.into(),
            pid: 42,
            present: true,
            attached: true,
            total: OpView {
                op: "all".into(),
                ops_total: ops,
                bytes_total: ops * 4096,
                ..OpView::default()
            },
            interrupts_total: ops / 4,
            tuner,
            ..DeviceView::default()
        }
    }

    pub(crate) fn poll(ticks: u64, devices: Vec<(DeviceView, Vec<[u64; 3]>)>) -> Box<Poll> {
        Box::new(Poll {
            histograms: devices
                .iter()
                .map(|(d, b)| DeviceHistogram {
                    device: d.name.clone(),
                    kind: d.kind.clone(),
                    ops: vec![OpHistogram {
                        op: "read".into(),
                        count: b.iter().map(|x| x[2]).sum(),
                        buckets: b.clone(),
                    }],
                })
                .collect(),
            devices: devices.into_iter().map(|(d, _)| d).collect(),
            health: HealthView {
                ticks,
                ..HealthView::default()
            },
            decisions: Vec::new(),
            tuner_api: true,
        })
    }

    fn key(c: KeyCode) -> Event {
        Event::Key(KeyEvent::new(c, KeyModifiers::NONE))
    }

    #[test]
    fn window_figures_difference_the_reads_a_window_apart() {
        let mut app = App::new("http://x");
        // One read per second; 1000 ops/s, all at ~10us, except two slow ops per second from t=5.
        for t in 0..=20u64 {
            let slow = 2 * t.saturating_sub(4);
            let b = vec![
                [10_000, 10_078, t * 1000 - slow],
                [5_000_000, 5_039_062, slow],
            ];
            let b: Vec<[u64; 3]> = b.into_iter().filter(|x| x[2] > 0).collect();
            app.on_event(Event::Update {
                at: t as f64,
                poll: poll(t, vec![(device("d", "synthetic", t * 1000, None), b)]),
            });
        }
        let f = app.figures_for("d", Window::S10).unwrap();
        assert_eq!(f.span, 10.0);
        assert_eq!(f.ops_per_sec, 1000.0);
        assert_eq!(f.bytes_per_sec, 4096.0 * 1000.0);
        assert_eq!(f.interrupts_per_sec, 250.0);
        assert_eq!(f.hist.total(), 10_000);
        let [p50, p99, p999] = f.percentiles;
        assert_eq!(p50, Some(10_039.0));
        assert_eq!(p99, Some(10_039.0));
        assert_eq!(p999, Some(5_019_531.0), "20 slow ops in 10,000");
        let one = app.figures_for("d", Window::S1).unwrap();
        assert_eq!((one.span, one.hist.total()), (1.0, 1000));
        // 20 s of history: the 60 s window covers what exists.
        assert_eq!(app.figures_for("d", Window::S60).unwrap().span, 20.0);
        assert_eq!(app.chart["d"].len(), 21);
    }

    #[test]
    fn a_restarted_daemon_drops_the_old_history_and_counts_a_reconnect() {
        let mut app = App::new("http://x");
        for t in 0..5u64 {
            app.on_event(Event::Update {
                at: t as f64,
                poll: poll(
                    t + 100,
                    vec![(device("d", "synthetic", 1000 * t, None), vec![])],
                ),
            });
        }
        app.on_event(Event::Disconnected {
            at: 5.0,
            error: "connection refused".into(),
        });
        assert!(matches!(
            app.connection,
            Connection::Disconnected {
                was_connected: true,
                since: 5.0,
                ..
            }
        ));
        app.on_event(Event::Disconnected {
            at: 6.0,
            error: "connection refused".into(),
        });
        assert!(matches!(
            app.connection,
            Connection::Disconnected { since: 5.0, .. }
        ));
        app.on_event(Event::Update {
            at: 7.0,
            poll: poll(1, vec![(device("d", "synthetic", 10, None), vec![])]),
        });
        assert_eq!(app.connection, Connection::Connected { since: 7.0 });
        assert_eq!(app.reconnects, 1);
        assert_eq!(app.samples["d"].len(), 1);
        assert_eq!(app.status.as_ref().unwrap().0, "reconnected to enlightd");
    }

    #[test]
    fn keys_navigate_switch_windows_pause_and_pin() {
        let mut app = App::new("http://x");
        let pinned = TunerView {
            mode: "auto".into(),
            state: "pinned".into(),
            pinned: true,
            ..TunerView::default()
        };
        app.on_event(Event::Update {
            at: 0.0,
            poll: poll(
                1,
                vec![
                    (device("a", "synthetic", 1, None), vec![]),
                    (device("b", "emulated", 1, Some(pinned)), vec![]),
                    (device("c", "synthetic", 1, None), vec![]),
                ],
            ),
        });
        assert_eq!(app.on_event(key(KeyCode::Char('p'))), None);
        assert_eq!(app.status.as_ref().unwrap().0, "no tuner runs for a");
        app.on_event(key(KeyCode::Down));
        assert_eq!(
            app.on_event(key(KeyCode::Char('p'))),
            Some(Action::SetPinned {
                device: "b".into(),
                pin: false
            })
        );
        app.on_event(key(KeyCode::Enter));
        assert_eq!(app.screen, Screen::Device("b".into()));
        app.on_event(key(KeyCode::Down));
        assert_eq!(app.screen, Screen::Device("c".into()));
        app.on_event(key(KeyCode::Esc));
        assert_eq!(app.screen, Screen::List);
        app.on_event(key(KeyCode::Up));
        // Compare prefers a device of another kind.
        app.on_event(key(KeyCode::Char('c')));
        assert_eq!(app.screen, Screen::Compare("b".into(), "a".into()));
        app.on_event(key(KeyCode::Tab));
        assert_eq!(app.screen, Screen::Compare("b".into(), "c".into()));
        app.on_event(key(KeyCode::Char('1')));
        assert_eq!(app.window, Window::S1);
        app.on_event(key(KeyCode::Char('w')));
        assert_eq!(app.window, Window::S10);
        app.on_event(key(KeyCode::Char('?')));
        assert!(app.help);
        assert_eq!(app.on_event(key(KeyCode::Char('x'))), None);
        assert!(!app.help);
        app.on_event(key(KeyCode::Char(' ')));
        assert!(app.paused);
        // Paused: figures stay as they were.
        app.on_event(Event::Update {
            at: 1.0,
            poll: poll(2, vec![(device("z", "synthetic", 1, None), vec![])]),
        });
        assert_eq!(app.devices.len(), 3);
        assert_eq!(app.on_event(key(KeyCode::Char('q'))), Some(Action::Quit));
        assert_eq!(
            app.on_event(Event::Key(KeyEvent::new(
                KeyCode::Char('c'),
                KeyModifiers::CONTROL
            ))),
            Some(Action::Quit)
        );
    }

    #[test]
    fn pin_results_show_for_a_few_seconds() {
        let mut app = App::new("http://x");
        app.on_event(Event::PinResult {
            at: 1.0,
            device: "d".into(),
            result: Ok(true),
        });
        assert_eq!(app.status.as_ref().unwrap().0, "tuner pinned for d");
        app.on_event(Event::Tick { at: 3.0 });
        assert!(app.status.is_some());
        app.on_event(Event::Tick { at: 7.0 });
        assert!(app.status.is_none());
    }
}
