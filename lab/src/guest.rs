//! A running guest: QEMU inside the lab's network namespace, its console in a log file, a
//! command channel on its second serial port, and host TCP ports forwarded to it.
//!
//! Guest NIC `i` is on tap `labtap<i>` (host end `10.78.<i>.1/24`, guest `10.78.<i>.2/24`, MAC
//! `52:54:00:4c:00:<i>`), so traffic between the namespace and the guest crosses that device.
//! Disks are sparse files in the guest's run directory. Dropping the [`Guest`] kills QEMU and
//! removes the namespace, its taps and the run directory (disk images and sockets).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::netns::Netns;
use crate::{Accel, DiskKind, Image, LabError, NicKind};

/// What to boot.
#[derive(Clone, Debug)]
pub struct GuestSpec {
    pub accel: Accel,
    pub disks: Vec<DiskKind>,
    pub nics: Vec<NicKind>,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Size of each disk (a sparse file).
    pub disk_mib: u64,
    /// How long the guest may take to reach its command loop.
    pub boot_timeout: Duration,
    /// Where the console goes (default: `console.log` in the run directory, removed with it).
    pub console_log: Option<PathBuf>,
}

impl Default for GuestSpec {
    fn default() -> Self {
        GuestSpec {
            accel: Accel::Tcg,
            disks: vec![DiskKind::VirtioBlk],
            nics: vec![NicKind::E1000],
            memory_mib: 1024,
            cpus: 1,
            disk_mib: 256,
            boot_timeout: Duration::from_secs(120),
            console_log: None,
        }
    }
}

/// A guest NIC and the host's end of its link.
#[derive(Clone, Debug)]
pub struct GuestNic {
    pub kind: NicKind,
    pub tap: String,
    pub mac: String,
    pub host_addr: Ipv4Addr,
    pub guest_addr: Ipv4Addr,
}

/// The addressing of NIC `i` (pure).
pub fn nic_plan(i: usize, kind: NicKind) -> GuestNic {
    GuestNic {
        kind,
        tap: format!("labtap{i}"),
        mac: format!("52:54:00:4c:00:{i:02x}"),
        host_addr: Ipv4Addr::new(10, 78, i as u8, 1),
        guest_addr: Ipv4Addr::new(10, 78, i as u8, 2),
    }
}

/// QEMU's arguments (pure): `pc` machine (its PIIX IDE controller is the emulated disk's),
/// no default devices, console on ttyS0 into `console`, the command channel on ttyS1.
pub fn qemu_args(
    spec: &GuestSpec,
    image: &Image,
    console: &Path,
    agent_socket: &Path,
    disk_files: &[PathBuf],
    nics: &[GuestNic],
) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "-machine".into(),
        "pc".into(),
        "-accel".into(),
        spec.accel.qemu_name().into(),
        "-m".into(),
        spec.memory_mib.to_string(),
        "-smp".into(),
        spec.cpus.to_string(),
        "-nodefaults".into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
        "-serial".into(),
        format!("file:{}", console.display()),
        "-chardev".into(),
        format!(
            "socket,id=agent,path={},server=on,wait=off",
            agent_socket.display()
        ),
        "-serial".into(),
        "chardev:agent".into(),
        "-kernel".into(),
        image.kernel.display().to_string(),
        "-initrd".into(),
        image.initrd.display().to_string(),
    ];
    let net: Vec<String> = nics
        .iter()
        .map(|n| format!("{},{}/24", n.mac, n.guest_addr))
        .collect();
    let mut append = "console=ttyS0 panic=-1 quiet".to_string();
    if !net.is_empty() {
        append.push_str(&format!(" lab.net={}", net.join(";")));
    }
    a.push("-append".into());
    a.push(append);
    let mut scsi = false;
    for (i, (kind, file)) in spec.disks.iter().zip(disk_files).enumerate() {
        let f = file.display();
        match kind {
            DiskKind::Ide => {
                a.push("-drive".into());
                a.push(format!("file={f},if=ide,format=raw,index={i}"));
            }
            DiskKind::VirtioBlk => {
                a.push("-drive".into());
                a.push(format!("file={f},if=none,id=d{i},format=raw"));
                a.push("-device".into());
                a.push(format!("virtio-blk-pci,drive=d{i}"));
            }
            DiskKind::VirtioScsi => {
                if !scsi {
                    a.push("-device".into());
                    a.push("virtio-scsi-pci,id=scsi0".into());
                    scsi = true;
                }
                a.push("-drive".into());
                a.push(format!("file={f},if=none,id=d{i},format=raw"));
                a.push("-device".into());
                a.push(format!("scsi-hd,drive=d{i},bus=scsi0.0"));
            }
        }
    }
    for (i, n) in nics.iter().enumerate() {
        a.push("-netdev".into());
        a.push(format!(
            "tap,id=n{i},ifname={},script=no,downscript=no",
            n.tap
        ));
        a.push("-device".into());
        let model = match n.kind {
            // QEMU's plain `e1000` is an 82540EM, for which Linux's e1000 has no interrupt
            // moderation (get_coalesce refuses MACs older than 82545); the 82545EM model has
            // it (ITR), which the tuner's rx-usecs needs. Same driver, same emulation.
            NicKind::E1000 => "e1000-82545em",
            NicKind::VirtioNet => "virtio-net-pci",
        };
        a.push(format!("{model},netdev=n{i},mac={}", n.mac));
    }
    a
}

/// The last line of console output worth naming (pure): escape sequences and blank lines
/// dropped.
/// The least guest memory that unpacks an initramfs of `image_bytes` (pure): the kernel keeps
/// the image and the unpacked files (in tmpfs) in RAM together, and needs about 256 MiB for
/// itself, the modules and enlightd. Below it the boot ends in "Unable to mount root fs".
pub fn memory_needed_mib(image_bytes: u64) -> u64 {
    2 * image_bytes.div_ceil(1 << 20) + 256
}

pub fn last_console_line(text: &str) -> String {
    text.lines()
        .map(|l| {
            let mut out = String::new();
            let mut chars = l.chars().peekable();
            while let Some(c) = chars.next() {
                if c == '\u{1b}' {
                    // CSI: ESC [ ... final byte in @..~
                    if chars.peek() == Some(&'[') {
                        chars.next();
                        for c in chars.by_ref() {
                            if ('@'..='~').contains(&c) {
                                break;
                            }
                        }
                    }
                } else if !c.is_control() {
                    out.push(c);
                }
            }
            out.trim().to_string()
        })
        .rfind(|l| !l.is_empty())
        .unwrap_or_else(|| "(no console output)".into())
}

/// The pid in a run directory's name, `enlight-lab-<pid>-XXXXXX` (pure).
pub fn run_dir_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("enlight-lab-")?;
    let (pid, suffix) = rest.split_once('-')?;
    (!suffix.is_empty()).then_some(())?;
    pid.parse().ok()
}

/// Removes the run directories (disk images, sockets, console) of labs whose process is gone:
/// a lab killed with SIGKILL cannot remove its own (its QEMU dies with it).
pub fn remove_stale_run_dirs(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = run_dir_owner(&name) {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                log::warn!(
                    "lab: removing {} left by a lab that died",
                    e.path().display()
                );
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// The last `n` non-empty console lines (pure), for errors: the log itself is removed with the
/// guest's run directory.
pub fn console_tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A command's result in the guest.
#[derive(Clone, Debug)]
pub struct CommandOutput {
    pub status: i32,
    pub output: String,
}

impl CommandOutput {
    pub fn success(&self) -> bool {
        self.status == 0
    }
}

struct Agent {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

/// A running guest (see the module docs).
pub struct Guest {
    child: Option<Child>,
    agent: Mutex<Agent>,
    pub nics: Vec<GuestNic>,
    pub disks: Vec<(DiskKind, PathBuf)>,
    pub accel: Accel,
    pub kernel_release: String,
    console: PathBuf,
    forwards: Mutex<Vec<Forward>>,
    // Dropped after QEMU is dead: the namespace (and its taps), then the run directory.
    netns: Option<Netns>,
    _dir: tempfile::TempDir,
}

impl Guest {
    /// Boots a guest and waits for its command loop. `prepare` adjusts QEMU's command before it
    /// is spawned (enlight makes it die with its parent); `stop` is polled while waiting (a
    /// signal ends the wait, and everything is removed).
    pub fn boot(
        spec: &GuestSpec,
        image: &Image,
        prepare: &dyn Fn(&mut Command),
        stop: &dyn Fn() -> bool,
    ) -> Result<Guest, LabError> {
        let image_bytes = std::fs::metadata(&image.initrd)
            .map_err(|e| LabError::io(format!("reading {}", image.initrd.display()), e))?
            .len();
        let needed_mib = memory_needed_mib(image_bytes);
        if u64::from(spec.memory_mib) < needed_mib {
            return Err(LabError::ImageTooLarge {
                image: image.initrd.display().to_string(),
                image_mib: image_bytes >> 20,
                memory_mib: spec.memory_mib,
                needed_mib,
            });
        }
        remove_stale_run_dirs(&std::env::temp_dir());
        let dir = tempfile::Builder::new()
            .prefix(&format!("enlight-lab-{}-", std::process::id()))
            .tempdir()
            .map_err(|e| LabError::io("creating the guest's run directory", e))?;
        let console = spec
            .console_log
            .clone()
            .unwrap_or_else(|| dir.path().join("console.log"));
        let agent_socket = dir.path().join("agent.sock");
        let mut disk_files = Vec::new();
        for (i, kind) in spec.disks.iter().enumerate() {
            let p = dir.path().join(format!("disk{i}-{}.img", kind.name()));
            let f = std::fs::File::create(&p)
                .map_err(|e| LabError::io(format!("creating {}", p.display()), e))?;
            f.set_len(spec.disk_mib << 20)
                .map_err(|e| LabError::io(format!("sizing {}", p.display()), e))?;
            disk_files.push(p);
        }
        let mut netns = Netns::create()?;
        let nics: Vec<GuestNic> = spec
            .nics
            .iter()
            .enumerate()
            .map(|(i, k)| nic_plan(i, *k))
            .collect();
        for n in &nics {
            netns.add_tap(&n.tap, &format!("{}/24", n.host_addr))?;
        }
        let args = qemu_args(spec, image, &console, &agent_socket, &disk_files, &nics);
        let mut cmd = netns.command("qemu-system-x86_64");
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        prepare(&mut cmd);
        log::debug!("lab: {cmd:?}");
        let child = cmd.spawn().map_err(|e| {
            LabError::io(
                "starting qemu-system-x86_64 (apt-get install qemu-system-x86)",
                e,
            )
        })?;
        let mut guest = Guest {
            child: Some(child),
            agent: Mutex::new(Agent {
                // Replaced once connected; a placeholder pair until then.
                reader: BufReader::new(
                    UnixStream::pair()
                        .map_err(|e| LabError::io("socketpair", e))?
                        .0,
                ),
                writer: UnixStream::pair()
                    .map_err(|e| LabError::io("socketpair", e))?
                    .0,
                next_id: 0,
            }),
            nics,
            disks: spec.disks.iter().copied().zip(disk_files).collect(),
            accel: spec.accel,
            kernel_release: image.kernel_release.clone(),
            console,
            forwards: Mutex::new(Vec::new()),
            netns: Some(netns),
            _dir: dir,
        };
        guest.wait_ready(spec.boot_timeout, &agent_socket, stop)?;
        Ok(guest)
    }

    fn console_text(&self) -> String {
        std::fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last console line (for errors).
    pub fn last_console_line(&self) -> String {
        last_console_line(&self.console_text())
    }

    /// The console log's path.
    pub fn console_log(&self) -> &Path {
        &self.console
    }

    fn exited(&mut self, what: &str) -> Option<LabError> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                let mut last = self.last_console_line();
                if !err.trim().is_empty() {
                    last = format!("{last}; qemu: {}", err.trim());
                }
                Some(LabError::Exited {
                    what: what.into(),
                    status: status.to_string(),
                    last_line: last,
                    log: console_tail(&self.console_text(), 15),
                })
            }
            _ => None,
        }
    }

    fn wait_ready(
        &mut self,
        timeout: Duration,
        agent_socket: &Path,
        stop: &dyn Fn() -> bool,
    ) -> Result<(), LabError> {
        let deadline = Instant::now() + timeout;
        let what = "reach its command loop (ENLIGHT-LAB-READY on the console)";
        loop {
            if stop() {
                return Err(LabError::Channel("stopped while the guest booted".into()));
            }
            if let Some(e) = self.exited(what) {
                return Err(e);
            }
            if self.console_text().contains("ENLIGHT-LAB-READY") {
                break;
            }
            if Instant::now() > deadline {
                return Err(LabError::Deadline {
                    what: what.into(),
                    secs: timeout.as_secs(),
                    last_line: self.last_console_line(),
                    log: console_tail(&self.console_text(), 15),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let stream = UnixStream::connect(agent_socket)
            .map_err(|e| LabError::io(format!("connecting to {}", agent_socket.display()), e))?;
        let writer = stream
            .try_clone()
            .map_err(|e| LabError::io("cloning the agent socket", e))?;
        *self.agent.lock().unwrap_or_else(|p| p.into_inner()) = Agent {
            reader: BufReader::new(stream),
            writer,
            next_id: 1,
        };
        // The first command proves the loop answers; asked again every few seconds in case a
        // line was lost while the shell started (a late answer to an earlier one is skipped).
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.run("true", Duration::from_secs(5)) {
                Ok(_) => return Ok(()),
                Err(LabError::Deadline { .. }) if Instant::now() < deadline && !stop() => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Runs `command` (one line of `sh`) in the guest; its combined output and exit status.
    pub fn run(&self, command: &str, timeout: Duration) -> Result<CommandOutput, LabError> {
        if command.contains('\n') {
            return Err(LabError::Channel("a guest command is one line".into()));
        }
        let mut agent = self.agent.lock().unwrap_or_else(|p| p.into_inner());
        let id = agent.next_id;
        agent.next_id += 1;
        agent
            .writer
            .write_all(format!("{id} {command}\n").as_bytes())
            .map_err(|e| LabError::Channel(format!("sending {command:?}: {e}")))?;
        let deadline = Instant::now() + timeout;
        let end = format!("@@LAB-END {id} ");
        let mut output = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(LabError::Deadline {
                    what: format!("finish {command:?}"),
                    secs: timeout.as_secs(),
                    last_line: self.last_console_line(),
                    log: console_tail(&self.console_text(), 15),
                });
            }
            agent
                .reader
                .get_ref()
                .set_read_timeout(Some(left.min(Duration::from_millis(500))))
                .map_err(|e| LabError::Channel(e.to_string()))?;
            let mut line = String::new();
            match agent.reader.read_line(&mut line) {
                Ok(0) => {
                    return Err(LabError::Channel(format!(
                        "the guest closed the channel during {command:?}; last console line: {:?}",
                        self.last_console_line()
                    )))
                }
                Ok(_) => {
                    let trimmed = line.trim_end_matches(['\n', '\r']);
                    if let Some(rc) = trimmed.strip_prefix(&end) {
                        let status = rc.trim().parse().unwrap_or(-1);
                        return Ok(CommandOutput { status, output });
                    }
                    if trimmed.starts_with("@@LAB-END ") {
                        // The end of an earlier command we stopped waiting for.
                        output.clear();
                        continue;
                    }
                    output.push_str(trimmed);
                    output.push('\n');
                }
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    // A partial line stays in `line`: keep it.
                    output.push_str(&line);
                }
                Err(e) => return Err(LabError::Channel(format!("reading: {e}"))),
            }
        }
    }

    /// [`Guest::run`] that fails unless the command succeeds; its output.
    pub fn check(&self, command: &str, timeout: Duration) -> Result<String, LabError> {
        let out = self.run(command, timeout)?;
        if !out.success() {
            return Err(LabError::Channel(format!(
                "guest command {command:?} failed ({}): {}",
                out.status,
                out.output.trim()
            )));
        }
        Ok(out.output)
    }

    /// The lab's network namespace (where the guest's NICs' host ends are).
    pub fn netns_name(&self) -> &str {
        &self
            .netns
            .as_ref()
            .expect("netns lives as long as the guest")
            .name
    }

    /// A host command run inside the lab's namespace (`ip netns exec`): iperf3, ping, curl.
    pub fn host_command(&self, program: &str) -> Command {
        self.netns.as_ref().expect("netns").command(program)
    }

    /// Forwards `listen` on the host to `port` of the guest's first NIC, until the guest is
    /// dropped. Returns the address actually bound (port 0 picks one).
    pub fn forward(&self, listen: SocketAddr, port: u16) -> Result<SocketAddr, LabError> {
        let nic = self
            .nics
            .first()
            .ok_or_else(|| LabError::Channel("the guest has no NIC to forward to".into()))?;
        let target = SocketAddr::V4(SocketAddrV4::new(nic.guest_addr, port));
        let listener =
            TcpListener::bind(listen).map_err(|e| LabError::io(format!("binding {listen}"), e))?;
        let bound = listener
            .local_addr()
            .map_err(|e| LabError::io("local address", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| LabError::io("nonblocking listener", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let ns_path = self.netns_name().to_string();
        let stop2 = stop.clone();
        let connections = Arc::new(AtomicU64::new(0));
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        match crate::netns::connect_in(&ns_path, target, Duration::from_secs(5)) {
                            Ok(server) => splice(client, server),
                            Err(e) => log::warn!("lab: forwarding to {target}: {e}"),
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(e) => {
                        log::warn!("lab: accepting on the forward: {e}");
                        std::thread::sleep(Duration::from_millis(100))
                    }
                }
            }
        });
        self.forwards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Forward {
                stop,
                thread: Some(thread),
                _connections: connections,
            });
        Ok(bound)
    }
}

/// Copies both ways between two sockets on two threads, closing each direction when its
/// reader ends (a port forward: no crate here does it without an async runtime).
fn splice(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let pipe = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(std::net::Shutdown::Write);
        });
    };
    pipe(a, b2);
    pipe(b, a2);
}

struct Forward {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    _connections: Arc<AtomicU64>,
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.forwards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The namespace goes after QEMU (which holds its taps open); the run directory last.
        self.netns.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> Image {
        Image {
            kernel: "/c/vmlinuz".into(),
            initrd: "/c/initrd.cpio".into(),
            kernel_release: "6.1.0-57-amd64".into(),
            kernel_package: "linux-image-6.1.0-57-amd64".into(),
            rebuilt: false,
        }
    }

    #[test]
    fn every_device_gets_its_qemu_model_and_every_nic_its_tap() {
        let spec = GuestSpec {
            disks: vec![DiskKind::Ide, DiskKind::VirtioBlk, DiskKind::VirtioScsi],
            nics: vec![NicKind::E1000, NicKind::VirtioNet],
            ..GuestSpec::default()
        };
        let nics: Vec<GuestNic> = spec
            .nics
            .iter()
            .enumerate()
            .map(|(i, k)| nic_plan(i, *k))
            .collect();
        let files: Vec<PathBuf> = (0..3).map(|i| format!("/r/d{i}.img").into()).collect();
        let a = qemu_args(
            &spec,
            &image(),
            Path::new("/r/console.log"),
            Path::new("/r/agent.sock"),
            &files,
            &nics,
        )
        .join(" ");
        assert!(a.contains("-accel tcg"), "{a}");
        assert!(
            a.contains("file=/r/d0.img,if=ide,format=raw,index=0"),
            "{a}"
        );
        assert!(a.contains("virtio-blk-pci,drive=d1"), "{a}");
        assert!(
            a.contains("virtio-scsi-pci,id=scsi0") && a.contains("scsi-hd,drive=d2"),
            "{a}"
        );
        assert!(
            a.contains("tap,id=n0,ifname=labtap0,script=no,downscript=no"),
            "{a}"
        );
        assert!(
            a.contains("e1000-82545em,netdev=n0,mac=52:54:00:4c:00:00"),
            "{a}"
        );
        assert!(
            a.contains("virtio-net-pci,netdev=n1,mac=52:54:00:4c:00:01"),
            "{a}"
        );
        assert!(
            a.contains("lab.net=52:54:00:4c:00:00,10.78.0.2/24;52:54:00:4c:00:01,10.78.1.2/24"),
            "{a}"
        );
        assert!(a.contains("-serial file:/r/console.log") && a.contains("-serial chardev:agent"));
    }

    #[test]
    fn a_guest_needs_room_for_its_image_twice() {
        assert_eq!(memory_needed_mib(0), 256);
        assert_eq!(memory_needed_mib(110 << 20), 476);
        // A debug enlightd left unstripped made a ~450 MB image: not for a 1 GiB guest.
        assert!(memory_needed_mib(450 << 20) > 1024);
    }

    #[test]
    fn a_run_directory_names_its_lab() {
        assert_eq!(run_dir_owner("enlight-lab-4242-aBc123"), Some(4242));
        assert_eq!(run_dir_owner("enlight-lab-4242-"), None);
        assert_eq!(run_dir_owner("enlight-lab-x-abc"), None);
        assert_eq!(run_dir_owner("enlight-demo-4242-abc"), None);
    }

    #[test]
    fn the_last_console_line_skips_escapes_and_blank_lines() {
        let text = "SeaBIOS\n\u{1b}[2J\u{1b}[0mBooting from ROM...\n\n  \n";
        assert_eq!(last_console_line(text), "Booting from ROM...");
        assert_eq!(last_console_line(""), "(no console output)");
        assert_eq!(console_tail("a\n\nb\nc\n", 2), "b\nc");
    }
}
