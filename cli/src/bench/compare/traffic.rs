//! The NIC runs' traffic: ping's round trips and iperf3's throughput between a NIC's two
//! namespaces.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::children::DieWithParent;

/// `pings` pings from the host end to the guest end of a NIC, 10 ms apart: ping's output, and
/// the round-trip times it printed, in µs, sorted.
pub(super) fn ping_rtts_us(
    ends: &crate::emulated::NicEndpoints,
    pings: u32,
) -> Result<(std::process::Output, Vec<f64>)> {
    let ping = Command::new("ip")
        .args(["netns", "exec", &ends.host_netns, "ping", "-c"])
        .arg(pings.to_string())
        .args(["-i", "0.01", "-W", "2", &ends.guest_ip])
        .die_with_parent(libc::SIGKILL)
        .output()
        .context("running ping (apt-get install iputils-ping)")?;
    let mut rtts: Vec<f64> = String::from_utf8_lossy(&ping.stdout)
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse::<f64>().ok())
        .map(|ms| ms * 1000.0)
        .collect();
    rtts.sort_by(f64::total_cmp);
    Ok((ping, rtts))
}

/// One iperf3 TCP run of `seconds` from the guest end of NIC `name` to a server at its host
/// end: the bits per second received.
pub(super) fn iperf3_bits_per_second(
    ends: &crate::emulated::NicEndpoints,
    name: &str,
    seconds: f64,
) -> Result<f64> {
    let server = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ends.host_netns,
            "iperf3",
            "-s",
            "-1",
            "-B",
            &ends.host_ip,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .die_with_parent(libc::SIGKILL)
        .spawn()
        .context("running iperf3 (apt-get install iperf3)")?;
    // iperf3 3.12 with -J exits 0 even when it could not connect, saying so only in the
    // JSON's "error": retry while the server is not listening yet; any other failure is
    // reported, not read as 0 bit/s.
    let deadline = Instant::now() + Duration::from_secs(10);
    let iperf3: Result<f64> = loop {
        let client = match Command::new("ip")
            .args([
                "netns",
                "exec",
                &ends.guest_netns,
                "iperf3",
                "-J",
                "-c",
                &ends.host_ip,
                "-t",
            ])
            .arg(format!("{seconds}"))
            .die_with_parent(libc::SIGKILL)
            .output()
        {
            Ok(client) => client,
            // The server is still waiting for its one client: it is killed below.
            Err(e) => break Err(anyhow::Error::new(e).context("running iperf3")),
        };
        let j: serde_json::Value = serde_json::from_slice(&client.stdout).unwrap_or_default();
        if let Some(bps) = j["end"]["sum_received"]["bits_per_second"].as_f64() {
            break Ok(bps);
        }
        let why = j["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&client.stderr).into_owned());
        if !why.contains("unable to connect") || Instant::now() > deadline {
            break Err(anyhow::anyhow!("iperf3 through {name}: {why}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut server = server;
    if iperf3.is_err() {
        let _ = server.kill();
    }
    let _ = server.wait();
    iperf3
}
