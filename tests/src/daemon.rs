//! A `precedent daemon` child process whose stdout (alert/request JSON lines) and stderr (logs)
//! are collected on background threads. Dropping it sends SIGTERM, then SIGKILL if needed.
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

pub struct Daemon {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: Arc<Mutex<Vec<String>>>,
    /// Private state directory and control socket of a `daemon` child, removed on drop.
    dir: Option<PathBuf>,
}

impl Daemon {
    /// Starts `bin` with `args` and waits until its log says it is running (or it dies).
    pub fn start(bin: &Path, args: &[&str]) -> anyhow::Result<Self> {
        Self::spawn(bin, args, true)
    }

    /// Like [`Daemon::start`], but stdout goes to /dev/null (benchmarks: no collector cost).
    pub fn start_discarding_stdout(bin: &Path, args: &[&str]) -> anyhow::Result<Self> {
        Self::spawn(bin, args, false)
    }

    fn spawn(bin: &Path, args: &[&str], keep_stdout: bool) -> anyhow::Result<Self> {
        // A daemon under test never touches /var/lib/precedent or /run/precedent.
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let mut dir = None;
        if args.first().is_some_and(|a| a == "daemon") {
            static SEQ: AtomicU32 = AtomicU32::new(0);
            let d = std::env::temp_dir().join(format!(
                "precedent-test-{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&d)?;
            if !args.iter().any(|a| a == "--state-dir") {
                args.extend(["--state-dir".into(), d.join("state").display().to_string()]);
            }
            if !args.iter().any(|a| a == "--socket") {
                args.extend([
                    "--socket".into(),
                    d.join("control.sock").display().to_string(),
                ]);
            }
            // An explicit config keeps tests independent of /etc/precedent on the machine.
            if !args.iter().any(|a| a == "--config") {
                let cfg = d.join("precedent.toml");
                std::fs::write(&cfg, "log_format = \"text\"\n")?;
                args.extend(["--config".into(), cfg.display().to_string()]);
            }
            dir = Some(d);
        }
        let mut child = Command::new(bin)
            .args(&args)
            .env("PRECEDENT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(if keep_stdout {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let (tx, lines) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log2.lock().unwrap().push(line);
            }
        });
        let mut d = Self {
            child,
            lines,
            log,
            dir,
        };
        d.wait_for_log("precedent daemon running", Duration::from_secs(30))?;
        Ok(d)
    }

    /// Waits until a stderr line contains `needle`; fails if the daemon exits first.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        self.wait_for_log_count(needle, 1, timeout)
    }

    /// How many stderr lines so far contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits until `count` stderr lines contain `needle` (to wait for a line the daemon has
    /// logged before: the count so far, plus one); fails if the daemon exits first.
    pub fn wait_for_log_count(
        &mut self,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if self.log_count(needle) >= count {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                // Give the stderr thread a moment to collect the last words.
                std::thread::sleep(Duration::from_millis(100));
                bail!(
                    "daemon exited ({status}) before logging {needle:?}; log:\n{}",
                    self.log_text()
                );
            }
            if start.elapsed() > timeout {
                bail!(
                    "daemon did not log {needle:?} within {timeout:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Next stdout line, or None after `timeout` without one.
    pub fn next_line(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Collects stdout lines until `n` arrived or no line came for `quiet`.
    pub fn collect_lines(&self, n: usize, quiet: Duration) -> Vec<String> {
        let mut out = Vec::new();
        while out.len() < n {
            match self.next_line(quiet) {
                Some(l) => out.push(l),
                None => break,
            }
        }
        out
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The control socket of this daemon (for `precedent status --socket ...`).
    pub fn socket(&self) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join("control.sock"))
    }

    /// Its private directory (state in `state/`).
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Sends `sig` (e.g. SIGHUP) to the daemon.
    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// SIGTERM and wait for exit (SIGKILL after `timeout`).
    pub fn stop(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(s) = self.child.try_wait()? {
            return Ok(s);
        }
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                bail!("daemon ignored SIGTERM for {timeout:?}; killed");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.stop(Duration::from_secs(5));
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}
