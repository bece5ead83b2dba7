//! enlightd: discovers synthetic devices, attaches the eBPF probes to their processes, turns the
//! kernel-side counters into HDR histograms and serves them.
//!
//! - [`config`]: TOML + flags.
//! - [`model`]: the shared model ([`State`]: devices, their figures, the daemon's health), which
//!   the collectors write and everything else reads.
//! - [`collector`]: the per-interval work (registry → attach → read maps → state), behind a
//!   [`collector::ProbeSource`] so it is unit-tested with a fake.
//! - [`metrics`]: Prometheus exposition of the state; [`api`]: the JSON views; [`scrape`]: both
//!   rendered once per tick, so a scrape serves bytes rather than rendering.
//!
//! [`Daemon::start`] loads the probes and starts the collector on its own thread (map reads are
//! blocking system calls); [`Daemon::serve`] runs the HTTP server until a shutdown future
//! resolves. [`DaemonHandle`] reads the same state in-process (`enlight demo` uses it).

pub mod api;
pub mod collector;
pub mod config;
pub mod exposition;
pub mod histograms;
pub mod kernel;
pub mod knobs;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod peaks;
pub mod runtime_lock;
pub mod scrape;
pub mod selfcost;
#[doc(hidden)]
pub mod testing;
pub mod tuner;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use axum::extract::State as AxumState;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

pub use api::{DeviceView, HealthView, OpView};
pub use collector::{Collector, ProbeSource};
pub use config::{Config, ConfigError};
pub use model::State;

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Privileges or kernel features are missing.
    #[error(transparent)]
    Preflight(#[from] enlight_probes::PreflightError),
    /// The probes did not load.
    #[error(transparent)]
    Probes(#[from] enlight_probes::ProbeError),
    /// The HTTP server failed.
    #[error("http server: {0}")]
    Http(std::io::Error),
    /// A thread could not be started.
    #[error("starting the collector thread: {0}")]
    Thread(std::io::Error),
    /// Another enlightd serves the runtime directory (or it cannot be locked).
    #[error(transparent)]
    Locked(#[from] runtime_lock::LockError),
    /// A tuner is configured and its audit log cannot be written: it would tune with no trail.
    #[error(
        "tuner audit log {path}: {source} (set [tuner] audit_log to a file enlightd can write)"
    )]
    AuditLog {
        /// The log.
        path: std::path::PathBuf,
        /// Why it cannot be opened.
        source: std::io::Error,
    },
}

/// Read access to the daemon's state.
#[derive(Clone)]
pub struct DaemonHandle {
    state: Arc<Mutex<State>>,
    tuner: Arc<tuner::shell::TunerShared>,
    /// `/metrics` and `/api/v1/devices`, rendered by the collector after each tick.
    scrapes: Arc<scrape::ScrapeCache>,
}

impl DaemonHandle {
    /// Every device, as `/api/v1/devices` serves it.
    pub fn devices(&self) -> Vec<DeviceView> {
        let mut devices = (*self.scrapes.latest().devices).clone();
        for d in &mut devices {
            d.tuner = self.tuner.view(&d.name);
        }
        devices
    }

    /// `/api/v1/devices` as JSON: the bytes rendered at the last tick, unless a tuner runs
    /// (its views change between ticks, so they are filled in and serialized per request).
    pub fn devices_json(&self) -> axum::body::Bytes {
        let latest = self.scrapes.latest();
        if !self.tuner.enabled() {
            return latest.devices_json.clone();
        }
        let mut devices = (*latest.devices).clone();
        for d in &mut devices {
            d.tuner = self.tuner.view(&d.name);
        }
        // Plain data: serializing cannot fail.
        serde_json::to_vec(&devices)
            .expect("device views serialize")
            .into()
    }

    /// The tuner's shared state (decisions, pins).
    pub fn tuner(&self) -> &tuner::shell::TunerShared {
        &self.tuner
    }

    /// The Prometheus exposition, as `/metrics` serves it.
    pub fn render_metrics(&self) -> String {
        String::from_utf8(self.metrics_bytes().into()).expect("the exposition is UTF-8")
    }

    /// The Prometheus exposition (text format) as `/metrics` serves it: the bytes rendered at
    /// the last tick, followed by the tuner's families when a tuner runs.
    pub fn metrics_bytes(&self) -> axum::body::Bytes {
        self.metrics_bytes_as(exposition::Format::Text)
    }

    /// [`metrics_bytes`](Self::metrics_bytes) in `format`.
    pub fn metrics_bytes_as(&self, format: exposition::Format) -> axum::body::Bytes {
        self.scrapes.serve(format, &self.tuner.families())
    }

    /// The daemon's own health.
    pub fn health(&self) -> HealthView {
        let mut h = api::health(&self.state.lock().expect("state lock"));
        h.tuner_audit_log = self.tuner.audit_health();
        h
    }

    /// Collector intervals completed so far.
    pub fn ticks(&self) -> u64 {
        self.state.lock().expect("state lock").ticks
    }

    /// Collector intervals completed so far, and when the maps were last read.
    pub fn ticks_and_read_at(&self) -> (u64, Option<std::time::Instant>) {
        let st = self.state.lock().expect("state lock");
        (st.ticks, st.read_at)
    }
}

/// A running collector.
pub struct Daemon {
    handle: DaemonHandle,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// The tuner's configuration, runtime directory and collector interval, started by
    /// [`Daemon::serve`] when any device is to be tuned.
    tuner: (tuner::config::TunerConfig, std::path::PathBuf, Duration),
    /// `[kernel]`: which kernel devices the tuner may change.
    kernel_config: kernel::KernelConfig,
    /// The kernel's BPF run-time statistics, on while this lives (enlightd's self-cost);
    /// dropped after the collector has stopped.
    _run_stats: Option<std::os::fd::OwnedFd>,
    /// One daemon per runtime directory; released when the daemon is dropped.
    _lock: runtime_lock::RuntimeLock,
}

impl Daemon {
    /// Locks the runtime directory, checks privileges, loads the real probes and starts
    /// collecting.
    pub fn start(config: Config) -> Result<Daemon, DaemonError> {
        // First: a second daemon on the directory is told so before it loads anything.
        let lock = runtime_lock::RuntimeLock::acquire(&config.runtime_dir)?;
        enlight_probes::preflight()?;
        if !enlight_probes::can_attach_uprobes() {
            log::warn!(
                "no CAP_SYS_ADMIN: the kernel refuses uprobes without it, so no USDT site of our \
                 devices can be attached (kernel devices are still traced) and the programs' run \
                 times stay off (BPF_ENABLE_STATS needs it too)"
            );
        }
        // The programs' run counts and times (what they cost) advance only while the kernel's
        // run-time statistics are on: on for as long as the daemon runs, off when it stops
        // (the kernel counts holders; it needs CAP_SYS_ADMIN, and without it the daemon runs
        // and says so).
        let run_stats = enlight_probes::enable_run_stats();
        let probes = enlight_probes::Probes::load()?;
        let kernel = kernel::collector::start(&config);
        let mut daemon = Daemon::start_locked(config, probes, kernel, lock)?;
        {
            let mut st = daemon.handle.state.lock().expect("state lock");
            match &run_stats {
                Ok(_) => st.self_cost.bpf_stats_enabled = true,
                Err(e) => {
                    log::warn!(
                        "{e}: the eBPF programs' run counts and times (enlight_bpf_program_*) stay at 0"
                    );
                    st.self_cost.bpf_stats_error = Some(e.to_string());
                }
            }
            daemon.handle.scrapes.publish(&st);
        }
        daemon._run_stats = run_stats.ok();
        Ok(daemon)
    }

    /// Starts collecting from any probe source.
    pub fn start_with<P: ProbeSource + 'static>(
        config: Config,
        probes: P,
    ) -> Result<Daemon, DaemonError> {
        Daemon::start_full(config, probes, None)
    }

    /// Starts collecting from any probe source, and from the kernel's devices if given.
    pub fn start_full<P: ProbeSource + 'static>(
        config: Config,
        probes: P,
        kernel: Option<kernel::collector::RealKernelCollector>,
    ) -> Result<Daemon, DaemonError> {
        let lock = runtime_lock::RuntimeLock::acquire(&config.runtime_dir)?;
        Daemon::start_locked(config, probes, kernel, lock)
    }

    fn start_locked<P: ProbeSource + 'static>(
        config: Config,
        probes: P,
        mut kernel: Option<kernel::collector::RealKernelCollector>,
        lock: runtime_lock::RuntimeLock,
    ) -> Result<Daemon, DaemonError> {
        if config.tuner.any_enabled() {
            // A tuner that cannot keep its audit trail does not start (`--check` says so too).
            let path = config.tuner.audit_path(&config.runtime_dir);
            tuner::audit::AuditLog::open(&path)
                .map_err(|source| DaemonError::AuditLog { path, source })?;
        }
        if config.kernel.enabled {
            for name in kernel::unknown_tune_names(&config.kernel) {
                log::warn!(
                    "[kernel] tune names {name:?}, which is no disk or NIC of this machine: \
                     it is ignored until such a device appears"
                );
            }
        } else if !config.kernel.tune.is_empty() {
            log::warn!(
                "[kernel] tune names devices, but the kernel's devices are not observed \
                 ([kernel] enabled = false, no --kernel): tune is ignored"
            );
        }
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let interval = Duration::from_millis(config.interval_ms);
        let tuner_shared = Arc::new(tuner::shell::TunerShared::default());
        let scrapes = Arc::new(scrape::ScrapeCache::default());
        // Before the first tick a scrape sees the empty state, as it always did.
        scrapes.publish(&state.lock().expect("state lock"));
        let mut collector = Collector::new(
            probes,
            config.runtime_dir.clone(),
            Duration::from_secs(config.device_grace_secs),
        )
        .with_peak_window(Duration::from_secs(config.peak_window_secs));
        let thread = {
            let (state, stop) = (Arc::clone(&state), Arc::clone(&stop));
            let tuner_shared = Arc::clone(&tuner_shared);
            let scrapes = Arc::clone(&scrapes);
            std::thread::Builder::new()
                .name("enlightd-collector".into())
                .spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        let started = std::time::Instant::now();
                        {
                            let mut st = state.lock().expect("state lock");
                            collector.tick(&mut st);
                            if let Some(k) = kernel.as_mut() {
                                k.tick(&mut st);
                            }
                            tuner_shared.note_tick(st.ticks);
                            // Under the state lock: whoever sees this tick's count sees its
                            // rendering too.
                            scrapes.publish(&st);
                        }
                        // Sleep in short steps so shutdown is prompt.
                        while started.elapsed() < interval && !stop.load(Ordering::Acquire) {
                            std::thread::sleep(
                                interval
                                    .saturating_sub(started.elapsed())
                                    .min(Duration::from_millis(50)),
                            );
                        }
                    }
                })
                .map_err(DaemonError::Thread)?
        };
        Ok(Daemon {
            handle: DaemonHandle {
                state,
                tuner: tuner_shared,
                scrapes,
            },
            stop,
            thread: Some(thread),
            tuner: (config.tuner.clone(), config.runtime_dir.clone(), interval),
            kernel_config: config.kernel.clone(),
            _run_stats: None,
            _lock: lock,
        })
    }

    /// A handle on the state.
    pub fn handle(&self) -> DaemonHandle {
        self.handle.clone()
    }

    /// Serves HTTP on `listener` until `shutdown` resolves, then stops the collector.
    pub async fn serve(
        mut self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), DaemonError> {
        let (tuner_stop, tuner_task) = self.start_tuner();
        let result = axum::serve(listener, router(self.handle.clone()))
            .with_graceful_shutdown(shutdown)
            .await;
        if let (Some(stop), Some(task)) = (tuner_stop, tuner_task) {
            let _ = stop.send(());
            let _ = task.await;
        }
        self.stop_collector();
        result.map_err(DaemonError::Http)
    }

    /// Starts the tuner's shell (docs/tuner.md) if any device is to be tuned or recommended for.
    #[allow(clippy::type_complexity)]
    fn start_tuner(
        &self,
    ) -> (
        Option<tokio::sync::oneshot::Sender<()>>,
        Option<tokio::task::JoinHandle<()>>,
    ) {
        let (config, runtime_dir, interval) = self.tuner.clone();
        if !config.any_enabled() {
            return (None, None);
        }
        let shell = tuner::shell::Shell::new(
            config,
            &runtime_dir,
            // Kernel NICs through ethtool (journalled, policy-checked), the rest by socket.
            Box::new(kernel::backend::KernelAwareFactory::new(
                self.kernel_config.clone(),
                runtime_dir.clone(),
            )),
            Arc::clone(&self.handle.tuner),
        );
        let state = Arc::clone(&self.handle.state);
        let source = move || tuner::shell::samples(&state.lock().expect("state lock"));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let poll = (interval / 5).max(Duration::from_millis(10));
        // Kernel devices: an admin's ethtool change is seen as the kernel announces it (the
        // ethtool monitor group), not only at the next tick's re-read.
        let (notify, notices) = tokio::sync::mpsc::unbounded_channel();
        let listener = self
            .kernel_config
            .enabled
            .then(|| kernel::monitor::listen(None, notify))
            .flatten();
        let task = tokio::spawn(tuner::shell::run_notified(
            shell,
            source,
            poll,
            notices,
            async move {
                let _ = rx.await;
                // Stops the monitor's thread with the tuner.
                drop(listener);
            },
        ));
        (Some(tx), Some(task))
    }

    fn stop_collector(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop_collector();
    }
}

/// Runs the daemon with real probes: the whole of `enlightd` after flag parsing.
pub async fn run(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    Daemon::start(config)?.serve(listener, shutdown).await
}

/// The HTTP routes.
pub fn router(handle: DaemonHandle) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics_handler))
        .route("/api/v1/devices", get(devices_handler))
        .route("/api/v1/health", get(health_handler))
        .route("/api/v1/histograms", get(histograms_handler))
        .route(
            "/api/v1/devices/{name}/histogram",
            get(device_histogram_handler),
        )
        .route("/api/v1/tuner/decisions", get(tuner_decisions_handler))
        .route(
            "/api/v1/devices/{name}/pin",
            axum::routing::post(tuner_pin_handler),
        )
        .route(
            "/api/v1/devices/{name}/unpin",
            axum::routing::post(tuner_unpin_handler),
        )
        .with_state(handle)
}

async fn index() -> &'static str {
    "enlightd\n  /metrics         Prometheus exposition\n  /api/v1/devices  per-device figures (JSON)\n  /api/v1/health   the daemon's own health (JSON)\n  /api/v1/histograms  per-device latency buckets, cumulative (JSON)\n  /api/v1/tuner/decisions?device=NAME&limit=N  the tuner's decisions (JSON)\n  POST /api/v1/devices/NAME/pin, /unpin  pin a device against the tuner\n"
}

/// `/metrics`: OpenMetrics when the scraper's `Accept` asks for it, the text format otherwise
/// (see [`exposition::negotiate`]).
async fn metrics_handler(
    AxumState(handle): AxumState<DaemonHandle>,
    headers: axum::http::HeaderMap,
) -> Response {
    let format = exposition::negotiate(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    let content_type = match format {
        exposition::Format::Text => exposition::TEXT_CONTENT_TYPE,
        exposition::Format::OpenMetrics => exposition::OPENMETRICS_CONTENT_TYPE,
    };
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, content_type)],
        handle.metrics_bytes_as(format),
    )
        .into_response()
}

async fn devices_handler(AxumState(handle): AxumState<DaemonHandle>) -> Response {
    (
        StatusCode::OK,
        // What axum's Json sets.
        [(header::CONTENT_TYPE, "application/json")],
        handle.devices_json(),
    )
        .into_response()
}

async fn histograms_handler(
    AxumState(handle): AxumState<DaemonHandle>,
) -> Json<Vec<histograms::DeviceHistogram>> {
    Json(histograms::histograms(
        &handle.state.lock().expect("state lock"),
    ))
}

async fn device_histogram_handler(
    AxumState(handle): AxumState<DaemonHandle>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Response {
    let state = handle.state.lock().expect("state lock");
    match state.devices.get(&name) {
        Some(d) => Json(histograms::device_histogram(d)).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({ "error": format!("no device {name:?}") })),
        )
            .into_response(),
    }
}

async fn health_handler(AxumState(handle): AxumState<DaemonHandle>) -> Json<HealthView> {
    Json(handle.health())
}

/// `?device=NAME&limit=N` of `/api/v1/tuner/decisions`.
#[derive(serde::Deserialize)]
struct DecisionsQuery {
    device: Option<String>,
    limit: Option<usize>,
}

async fn tuner_decisions_handler(
    AxumState(handle): AxumState<DaemonHandle>,
    axum::extract::Query(q): axum::extract::Query<DecisionsQuery>,
) -> Json<Vec<tuner::Decision>> {
    Json(
        handle
            .tuner
            .decisions(q.device.as_deref(), q.limit.unwrap_or(100)),
    )
}

fn tuner_pin(handle: &DaemonHandle, name: &str, pinned: bool) -> Response {
    if !handle
        .state
        .lock()
        .expect("state lock")
        .devices
        .contains_key(name)
    {
        return (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": format!("no device {name:?}")})),
        )
            .into_response();
    }
    handle.tuner.set_pinned(name, pinned);
    Json(serde_json::json!({"device": name, "pinned": pinned})).into_response()
}

async fn tuner_pin_handler(
    AxumState(handle): AxumState<DaemonHandle>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Response {
    tuner_pin(&handle, &name, true)
}

async fn tuner_unpin_handler(
    AxumState(handle): AxumState<DaemonHandle>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Response {
    tuner_pin(&handle, &name, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collector::tests::{io, record, FakeProbes};
    use enlight_driver::registry::Registration;
    use enlight_probes::IoKey;

    /// Issue 12, item 9: a second daemon on the same runtime directory refuses to start and
    /// names the first's pid; once the first is gone, the directory is free again.
    #[test]
    fn one_daemon_per_runtime_directory() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            runtime_dir: dir.path().join("run"),
            interval_ms: 50,
            ..Config::default()
        };
        let first = Daemon::start_with(config.clone(), FakeProbes::default()).unwrap();
        let second = Daemon::start_with(config.clone(), FakeProbes::default());
        let e = second
            .err()
            .expect("a second daemon on the same directory is refused");
        assert!(
            e.to_string()
                .contains(&format!("pid {}", std::process::id())),
            "{e}"
        );
        drop(first);
        drop(Daemon::start_with(config, FakeProbes::default()).unwrap());
    }

    #[test]
    fn http_endpoints_serve_the_collected_state() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let _reg = Registration::register(dir.path(), &record("disk0", me)).unwrap();
        let fake = FakeProbes::default();
        fake.snapshot.lock().unwrap().io.insert(
            IoKey {
                pid: me,
                dev: 0,
                op: 0,
            },
            io(1000, &[(20_000, 990), (90_000, 10)]),
        );
        let config = Config {
            runtime_dir: dir.path().into(),
            interval_ms: 50,
            ..Config::default()
        };
        let daemon = Daemon::start_with(config, fake).unwrap();
        let handle = daemon.handle();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = rt.spawn(daemon.serve(listener, async {
            let _ = rx.await;
        }));
        while handle.ticks() < 2 {
            std::thread::sleep(Duration::from_millis(20));
        }
        let get = |path: &str| {
            ureq::get(&format!("http://{addr}{path}"))
                .call()
                .map_err(Box::new)
        };
        let devices: Vec<DeviceView> =
            serde_json::from_str(&get("/api/v1/devices").unwrap().into_string().unwrap()).unwrap();
        assert_eq!(devices.len(), 1);
        let d = &devices[0];
        assert_eq!(
            (d.name.as_str(), d.total.ops_total, d.attached),
            ("disk0", 1000, true)
        );
        let p50 = d.total.p50_seconds.unwrap();
        assert!((p50 - 20e-6).abs() / 20e-6 < 0.01, "{p50}");
        let p999 = d.total.p999_seconds.unwrap();
        assert!((p999 - 90e-6).abs() / 90e-6 < 0.01, "{p999}");
        let metrics = get("/metrics").unwrap();
        assert!(metrics
            .header("content-type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4"));
        let text = metrics.into_string().unwrap();
        assert!(text.contains(
            "enlight_io_ops_total{device=\"disk0\",kind=\"synthetic\",op=\"read\"} 1000"
        ));
        testing::promtool_check(&text);
        // What Prometheus asks for: OpenMetrics, the same samples.
        let om = ureq::get(&format!("http://{addr}/metrics"))
            .set(
                "Accept",
                "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
            )
            .call()
            .unwrap();
        assert_eq!(
            om.header("content-type").unwrap(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        let om = om.into_string().unwrap();
        assert!(om.ends_with("# EOF\n"));
        assert!(om.contains(
            "# TYPE enlight_io_ops counter\nenlight_io_ops_total{device=\"disk0\",kind=\"synthetic\",op=\"read\"} 1000\n"
        ));
        testing::openmetrics_check(&om);
        let health: HealthView =
            serde_json::from_str(&get("/api/v1/health").unwrap().into_string().unwrap()).unwrap();
        assert_eq!(health.devices_attached, 1);
        let hists: Vec<histograms::DeviceHistogram> =
            serde_json::from_str(&get("/api/v1/histograms").unwrap().into_string().unwrap())
                .unwrap();
        assert_eq!((hists.len(), hists[0].ops[0].count), (1, 1000));
        let one: histograms::DeviceHistogram = serde_json::from_str(
            &get("/api/v1/devices/disk0/histogram")
                .unwrap()
                .into_string()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(one, hists[0]);
        assert!(
            matches!(get("/api/v1/devices/nope/histogram"), Err(e) if matches!(*e, ureq::Error::Status(404, _)))
        );
        assert!(matches!(get("/nope"), Err(e) if matches!(*e, ureq::Error::Status(404, _))));
        assert!(matches!(
            ureq::post(&format!("http://{addr}/metrics")).call(),
            Err(ureq::Error::Status(405, _))
        ));
        tx.send(()).unwrap();
        rt.block_on(server).unwrap().unwrap();
    }
}
