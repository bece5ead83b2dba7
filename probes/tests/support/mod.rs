//! Test fixtures on real kernel devices the test creates and always removes (Drop guards): a
//! loop device backed by a file in a temporary directory, and a network namespace with a veth
//! pair. Nothing here touches the machine's own disks or interfaces.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs a command, panicking with its output if it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A loop device over a file in a temporary directory; detached on drop.
pub struct LoopDevice {
    pub path: PathBuf,
    /// The file under it (direct I/O to the loop device lands on the disk holding this).
    pub backing: PathBuf,
    pub major: u32,
    pub minor: u32,
    _dir: tempfile::TempDir,
}

impl LoopDevice {
    /// A loop device of `mib` MiB, with direct I/O to its backing file (so requests really reach
    /// the file system below rather than stopping in the page cache).
    pub fn new(mib: u64) -> LoopDevice {
        let dir = tempfile::tempdir_in("/var/tmp").expect("temp dir");
        let file = dir.path().join("backing.img");
        let f = std::fs::File::create(&file).expect("backing file");
        // Written out (not sparse) so direct reads hit real blocks.
        let chunk = vec![0x5au8; 1 << 20];
        {
            use std::io::Write;
            let mut w = std::io::BufWriter::new(f);
            for _ in 0..mib {
                w.write_all(&chunk).unwrap();
            }
            w.into_inner().unwrap().sync_all().unwrap();
        }
        let dev = run(
            "losetup",
            &["--find", "--show", "--direct-io=on", file.to_str().unwrap()],
        )
        .trim()
        .to_string();
        let path = PathBuf::from(&dev);
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let majmin = std::fs::read_to_string(format!("/sys/block/{name}/dev")).unwrap();
        let (major, minor) = majmin.trim().split_once(':').unwrap();
        LoopDevice {
            path,
            backing: file,
            major: major.parse().unwrap(),
            minor: minor.parse().unwrap(),
            _dir: dir,
        }
    }

    /// The kernel's name for it (`loop3`).
    pub fn name(&self) -> String {
        self.path.file_name().unwrap().to_str().unwrap().to_string()
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

/// Milliseconds spent on completed (reads, writes) of a block device in /proc/diskstats: the
/// sum over requests of completion time minus allocation time, truncated to ms.
pub fn diskstats_ms(name: &str) -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/diskstats").unwrap();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.get(2) == Some(&name) {
            let n = |i: usize| f.get(i).and_then(|v| v.parse().ok()).unwrap_or(0);
            return (n(6), n(10));
        }
    }
    panic!("{name} not in /proc/diskstats");
}

/// Waits until nothing else is using a new block device: `udevadm settle` where udev runs (it
/// probes a new device's contents), then until its /proc/diskstats line has not moved for 500 ms
/// (at most 20 s). A fixed sleep was too short on a loaded machine and too long on an idle one.
pub fn settle_disk(name: &str) {
    if Path::new("/run/udev/control").exists() {
        let _ = Command::new("udevadm")
            .args(["settle", "--timeout=20"])
            .status();
    }
    let line = || {
        let text = std::fs::read_to_string("/proc/diskstats").unwrap();
        text.lines()
            .find(|l| l.split_whitespace().nth(2) == Some(name))
            .map(str::to_owned)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut last = line();
    loop {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let now = line();
        if now == last {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} kept doing I/O nobody asked for: {now:?}"
        );
        last = now;
    }
}

/// `(reads completed, writes completed, flushes completed)` of a block device in /proc/diskstats.
pub fn diskstats(name: &str) -> (u64, u64, u64) {
    let text = std::fs::read_to_string("/proc/diskstats").unwrap();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.get(2) == Some(&name) {
            let n = |i: usize| f.get(i).and_then(|v| v.parse().ok()).unwrap_or(0);
            return (n(3), n(7), n(17));
        }
    }
    panic!("{name} not in /proc/diskstats");
}

/// A network namespace of our own; deleted on drop (with every interface in it).
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// A fresh namespace `name` with its loopback up.
    pub fn new(name: &str) -> NetNs {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(std::process::Stdio::null())
            .status();
        run("ip", &["netns", "add", name]);
        let ns = NetNs { name: name.into() };
        // No IPv6: no router or neighbour solicitations in the counted traffic.
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"]);
        ns.exec(&["ip", "link", "set", "dev", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// The namespace's inode (what the probes key interfaces by).
    pub fn inode(&self) -> u32 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(Path::new("/run/netns").join(&self.name))
            .unwrap()
            .ino() as u32
    }

    /// An interface's ifindex inside the namespace.
    pub fn ifindex(&self, dev: &str) -> u32 {
        let json = self.exec(&["ip", "-j", "link", "show", "dev", dev]);
        number_after(&json, "\"ifindex\":")
    }

    /// `rx_packets`, `tx_bytes`, ... of an interface inside the namespace (`ip -s -j link`).
    pub fn stat(&self, dev: &str, stat: &str) -> u64 {
        let json = self.exec(&["ip", "-s", "-j", "link", "show", "dev", dev]);
        let (dir, field) = stat.split_once('_').unwrap();
        let at = json
            .find(&format!("\"{dir}\":{{"))
            .unwrap_or_else(|| panic!("{stat} in {json}"));
        number_after(&json[at..], &format!("\"{field}\":"))
    }
}

fn number_after<T: std::str::FromStr>(text: &str, key: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    let at = text.find(key).unwrap_or_else(|| panic!("{key} in {text}"));
    text[at + key.len()..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Two namespaces joined by a veth pair: `a` (10.77.0.1/24) in the first, `b` (10.77.0.2/24)
/// in the second, so traffic between them really crosses the pair.
pub struct VethPair {
    pub ns_a: NetNs,
    pub ns_b: NetNs,
}

impl VethPair {
    /// Namespaces `<prefix>a` and `<prefix>b`.
    pub fn new(prefix: &str) -> VethPair {
        let ns_a = NetNs::new(&format!("{prefix}a"));
        let ns_b = NetNs::new(&format!("{prefix}b"));
        ns_a.exec(&[
            "ip", "link", "add", "name", "a", "type", "veth", "peer", "name", "b", "netns",
            &ns_b.name,
        ]);
        ns_a.exec(&["ip", "addr", "add", "10.77.0.1/24", "dev", "a"]);
        ns_b.exec(&["ip", "addr", "add", "10.77.0.2/24", "dev", "b"]);
        ns_a.exec(&["ip", "link", "set", "dev", "a", "up"]);
        ns_b.exec(&["ip", "link", "set", "dev", "b", "up"]);
        VethPair { ns_a, ns_b }
    }
}

/// Sum over CPUs of IRQ `irq`'s count in /proc/interrupts.
pub fn proc_interrupts(irq: u32) -> u64 {
    let text = std::fs::read_to_string("/proc/interrupts").unwrap();
    let cpus = text.lines().next().unwrap().split_whitespace().count();
    for line in text.lines().skip(1) {
        let mut f = line.split_whitespace();
        if f.next() == Some(&format!("{irq}:")) {
            return f.take(cpus).filter_map(|v| v.parse::<u64>().ok()).sum();
        }
    }
    panic!("irq {irq} not in /proc/interrupts");
}
