//! `cargo xtask vm-test`: the root integration tests on Debian's 6.1 LTS kernel, booted under
//! QEMU with software emulation (TCG). The kernel and its veth module come from Debian's
//! `linux-image-amd64`; an initramfs holds busybox, `ip`, the test binaries, the `precedent`
//! binary and their shared libraries; its init runs each test binary and powers off. Results come
//! back on a second serial port (the first is the console), so kernel messages cannot garble them.
//! The kernel is cached in ~/.cache/precedent/vm; the initramfs, built from this checkout's
//! binaries, in target/vm.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io::{BufRead as _, BufReader, BufWriter, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    build_agent, setup, step,
    test::{self, KernelResults, ROOT_TEST_ARGS, TestBinary},
    workspace_root,
};

/// The Debian metapackage that depends on the current 6.1 LTS kernel image.
const KERNEL_METAPACKAGE: &str = "linux-image-amd64";
/// Modules the tests need that Debian builds as modules (veth pairs; the `clsact` qdisc and
/// the BPF classifier the acknowledgement watcher attaches through on kernels before 6.6);
/// their own dependencies are found from each module's `depends=` field.
const MODULES: &[&str] = &["veth", "sch_ingress", "cls_bpf"];
/// Integration test binaries run in the VM by default: the XDP program on crafted packets, the
/// capture path, blocking, and the daemon end to end. Others stay host-only because TCG runs
/// them 10-50x slower (load and fault tests) or they test no kernel interface.
const VM_TESTS: &[&str] = &["xdp_packets", "capture", "blocking", "daemon"];
/// One test binary's limit inside the VM; a binary still running then is killed and its
/// current test reported as hung.
const BINARY_TIMEOUT: Duration = Duration::from_secs(420);
/// Boot and power-off allowance on top of the binaries' limits, for the host-side timeout.
const BOOT_ALLOWANCE: Duration = Duration::from_secs(120);
const VM_MEMORY_MIB: u32 = 3072;

/// `cargo xtask vm-test [--test NAME]...`
pub fn run_cli(tests: &[String]) -> anyhow::Result<()> {
    let start = Instant::now();
    setup::ensure()?;
    let bin = build_agent()?;
    let binaries = test::test_binaries()?;
    let chosen = select(&binaries, tests)?;
    let results = run(&chosen, &bin)?;
    test::print_matrix(std::slice::from_ref(&results));
    test::check(std::slice::from_ref(&results))?;
    eprintln!(
        "vm-test passed on {} in {:.0}s",
        results.kernel,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The integration test binaries named in `names` (default: [`VM_TESTS`]).
pub fn select(binaries: &[TestBinary], names: &[String]) -> anyhow::Result<Vec<TestBinary>> {
    let names: Vec<&str> = if names.is_empty() {
        VM_TESTS.to_vec()
    } else {
        names.iter().map(String::as_str).collect()
    };
    names
        .iter()
        .map(|name| {
            binaries
                .iter()
                .find(|b| b.label == *name)
                .cloned()
                .with_context(|| {
                    let known: Vec<&str> = binaries.iter().map(|b| b.label.as_str()).collect();
                    format!("no test binary {name}; built: {}", known.join(", "))
                })
        })
        .collect()
}

/// Boots the 6.1 kernel with `binaries` and `precedent` in its initramfs and runs their root
/// tests there.
pub fn run(binaries: &[TestBinary], precedent: &Path) -> anyhow::Result<KernelResults> {
    let kernel = ensure_kernel()?;
    let image = build_initramfs(&kernel, binaries, precedent)?;
    boot(&kernel, &image, binaries)
}

/// Debian's kernel, unpacked into the cache: `vmlinuz` and the modules in load order.
struct Kernel {
    /// The kernel package, e.g. `linux-image-6.1.0-48-amd64`.
    package: String,
    dir: PathBuf,
    modules: Vec<String>,
}

impl Kernel {
    fn vmlinuz(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }
    fn module(&self, name: &str) -> PathBuf {
        self.dir.join("modules").join(format!("{name}.ko"))
    }
}

/// Shared by every checkout: the downloaded kernel.
fn vm_cache() -> PathBuf {
    setup::cache_dir().join("vm")
}

/// This checkout's VM files (the initramfs holds its binaries, so it cannot be shared; several
/// checkouts may run the VM at once).
fn vm_build_dir() -> anyhow::Result<PathBuf> {
    let dir = crate::target_dir().join("vm");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Downloads and unpacks the kernel package once; later runs find it in the cache.
fn ensure_kernel() -> anyhow::Result<Kernel> {
    let package = kernel_package()?;
    let dir = vm_cache().join(&package);
    let order = dir.join("modules/load-order");
    if let Some(list) = staged_with_every_module(&order) {
        step(&format!("kernel {package}: cached ({})", dir.display()));
        return Ok(Kernel {
            package,
            modules: list.lines().map(str::to_string).collect(),
            dir,
        });
    }
    let start = Instant::now();
    step(&format!("downloading {package} (apt-get download)"));
    let work = vm_cache().join(format!("{package}.tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    crate::exec(
        Command::new("apt-get")
            .args(["download", "-q", &package])
            .current_dir(&work),
    )?;
    let deb = std::fs::read_dir(&work)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", work.display()))?;
    step(&format!("unpacking {}", deb.display()));
    let root = work.join("root");
    std::fs::create_dir_all(&root)?;
    // Only the kernel and its modules: the package's other files are not needed.
    let tar = format!(
        "dpkg-deb --fsys-tarfile '{}' | tar -x -C '{}' --wildcards './boot/vmlinuz-*' './lib/modules/*/kernel/*'",
        deb.display(),
        root.display()
    );
    crate::exec(Command::new("sh").args(["-c", &tar]))?;
    let vmlinuz = only_entry(&root.join("boot"))?;
    let modules_root = only_entry(&root.join("lib/modules"))?;
    let mut available = BTreeMap::new();
    index_modules(&modules_root, &mut available)?;
    let mut load_order = Vec::new();
    for name in MODULES {
        resolve_module(name, &available, &mut load_order)?;
    }

    let staged = work.join("kernel");
    std::fs::create_dir_all(staged.join("modules"))?;
    std::fs::copy(&vmlinuz, staged.join("vmlinuz"))?;
    for name in &load_order {
        std::fs::copy(&available[name], staged.join(format!("modules/{name}.ko")))?;
    }
    std::fs::write(staged.join("modules/load-order"), load_order.join("\n"))?;
    // The load-order file marks a complete directory; a run that finished first wins.
    if staged_with_every_module(&order).is_none() {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&staged, &dir)?;
    }
    std::fs::remove_dir_all(&work)?;
    eprintln!(
        "kernel downloaded and unpacked in {:.1}s",
        start.elapsed().as_secs_f64()
    );
    Ok(Kernel {
        package,
        dir,
        modules: load_order,
    })
}

/// The cached load order, if the cache holds every module of [`MODULES`] (a cache staged
/// before one was added is staged again).
fn staged_with_every_module(order: &Path) -> Option<String> {
    let list = std::fs::read_to_string(order).ok()?;
    MODULES
        .iter()
        .all(|m| list.lines().any(|l| l == *m))
        .then_some(list)
}

/// The kernel image package `linux-image-amd64` depends on (the 6.1 LTS on bookworm).
fn kernel_package() -> anyhow::Result<String> {
    let find = || -> Option<String> {
        let out = Command::new("apt-cache")
            .args(["depends", KERNEL_METAPACKAGE])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|p| p.starts_with("linux-image-"))
            .map(str::to_string)
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    // A fresh machine may have no package lists yet.
    if crate::is_root() {
        crate::exec(Command::new("apt-get").args(["update", "-q"]))?;
        if let Some(p) = find() {
            return Ok(p);
        }
    }
    bail!(
        "apt-cache knows no kernel package behind {KERNEL_METAPACKAGE}: run `apt-get update` \
         (needs Debian's bookworm archive in the apt sources)"
    )
}

/// The single entry of a directory (`boot/` holds one vmlinuz, `lib/modules/` one version).
fn only_entry(dir: &Path) -> anyhow::Result<PathBuf> {
    let entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    match entries.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!("expected one entry in {}, found {entries:?}", dir.display()),
    }
}

/// Module name (`-` spelled `_`, as the kernel and `depends=` do) -> its .ko file.
fn index_modules(dir: &Path, out: &mut BTreeMap<String, PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            index_modules(&path, out)?;
        } else if let Some(stem) = path.file_name().and_then(|n| n.to_str()) {
            if let Some(name) = stem.strip_suffix(".ko") {
                out.insert(name.replace('-', "_"), path.clone());
            } else if stem.ends_with(".ko.xz") || stem.ends_with(".ko.zst") {
                bail!(
                    "{}: compressed modules are not handled (this kernel package ships plain .ko)",
                    path.display()
                );
            }
        }
    }
    Ok(())
}

/// Appends `name`'s dependencies, then `name`, to `order` (each once).
fn resolve_module(
    name: &str,
    available: &BTreeMap<String, PathBuf>,
    order: &mut Vec<String>,
) -> anyhow::Result<()> {
    let name = name.replace('-', "_");
    if order.contains(&name) {
        return Ok(());
    }
    let path = available
        .get(&name)
        .with_context(|| format!("the kernel package has no module {name}"))?;
    let bytes = std::fs::read(path)?;
    for dep in module_depends(&bytes) {
        resolve_module(&dep, available, order)?;
    }
    order.push(name);
    Ok(())
}

/// The `depends=a,b` entry of a module's .modinfo section (NUL-separated key=value strings).
fn module_depends(ko: &[u8]) -> Vec<String> {
    ko.split(|&b| b == 0)
        .find_map(|s| s.strip_prefix(b"depends="))
        .map(|d| {
            String::from_utf8_lossy(d)
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Writes the initramfs (an uncompressed newc cpio) into the cache, unless the one there was
/// built from the same files.
fn build_initramfs(
    kernel: &Kernel,
    binaries: &[TestBinary],
    precedent: &Path,
) -> anyhow::Result<PathBuf> {
    let build = vm_build_dir()?;
    let image = build.join("initramfs.cpio");
    let init = init_script(kernel, binaries, precedent);
    let busybox = which("busybox")?;
    let ip = which("ip")?;
    // Executables at their host paths, so panics and PRECEDENT_BIN name real paths.
    let mut programs: Vec<(PathBuf, PathBuf)> = vec![
        (busybox, "/bin/busybox".into()),
        (ip, "/usr/sbin/ip".into()),
        (precedent.to_path_buf(), precedent.to_path_buf()),
    ];
    programs.extend(binaries.iter().map(|b| (b.path.clone(), b.path.clone())));
    // Data files the tests read from the source tree (the shipped config).
    let data = [workspace_root().join("dist/precedent.toml")];
    let modules: Vec<PathBuf> = kernel.modules.iter().map(|m| kernel.module(m)).collect();

    let mut fingerprint = init.clone();
    for path in programs
        .iter()
        .map(|(src, _)| src)
        .chain(&data)
        .chain(&modules)
    {
        let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
        let mtime = meta.modified()?.duration_since(std::time::UNIX_EPOCH)?;
        fingerprint.push_str(&format!(
            "\n{} {} {}",
            path.display(),
            meta.len(),
            mtime.as_nanos()
        ));
    }
    let stamp = build.join("initramfs.inputs");
    if image.exists() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == fingerprint) {
        step(&format!("initramfs: unchanged ({})", image.display()));
        return Ok(image);
    }

    let start = Instant::now();
    step("building the initramfs (debug info stripped)");
    let stage = build.join("stage");
    let _ = std::fs::remove_dir_all(&stage);
    std::fs::create_dir_all(&stage)?;
    let mut cpio = Cpio::create(&build.join("initramfs.cpio.tmp"))?;
    for dir in ["/proc", "/sys", "/dev", "/run", "/tmp", "/var", "/usr/bin"] {
        cpio.dir(Path::new(dir))?;
    }
    for b in binaries {
        cpio.dir(&b.dir)?;
    }
    // The kernel opens /dev/console for init's stdio before init can mount devtmpfs.
    cpio.char_device(Path::new("/dev/console"), 5, 1)?;
    cpio.file(Path::new("/init"), init.as_bytes(), 0o755)?;

    let mut libraries = BTreeSet::new();
    for (i, (src, dst)) in programs.iter().enumerate() {
        libraries.extend(shared_libraries(src)?);
        // The test binaries are ~130 MB of mostly DWARF; symbols stay for backtraces.
        let stripped = stage.join(i.to_string());
        crate::exec(
            Command::new("strip")
                .arg("--strip-debug")
                .arg("-o")
                .arg(&stripped)
                .arg(src),
        )?;
        cpio.file(dst, &std::fs::read(&stripped)?, 0o755)?;
    }
    for lib in &libraries {
        let bytes = std::fs::read(lib).with_context(|| format!("reading {}", lib.display()))?;
        cpio.file(lib, &bytes, 0o755)?;
    }
    for file in &data {
        cpio.file(file, &std::fs::read(file)?, 0o644)?;
    }
    for module in &modules {
        let name = module.file_name().expect("module file name");
        cpio.file(
            &Path::new("/lib/modules").join(name),
            &std::fs::read(module)?,
            0o644,
        )?;
    }
    cpio.finish()?;
    std::fs::rename(build.join("initramfs.cpio.tmp"), &image)?;
    std::fs::write(&stamp, fingerprint)?;
    std::fs::remove_dir_all(&stage)?;
    eprintln!(
        "initramfs: {} MiB in {:.1}s",
        std::fs::metadata(&image)?.len() >> 20,
        start.elapsed().as_secs_f64()
    );
    Ok(image)
}

/// The shared libraries (and the dynamic loader) `ldd` names for an executable.
fn shared_libraries(exe: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(exe)
        .output()
        .context("running ldd")?;
    // ldd fails on a static executable ("not a dynamic executable"): nothing to copy.
    if !out.status.success() {
        return Ok(Vec::new());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = l.split_once("=> ").map_or(l, |(_, p)| p);
            let path = path.split(" (").next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

fn which(cmd: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
        .with_context(|| format!("{cmd} not found (cargo xtask setup installs it)"))
}

/// The VM's /init: mounts what the tests use, loads the modules, runs each binary's root tests
/// with a time limit, and reports on /dev/ttyS1 between `@@` marker lines. /tmp stays on the
/// initramfs (already a writable tmpfs): a checkout under /tmp (a CI clone, say) has its test
/// binaries and package directories there, and a tmpfs mounted over it would hide them.
fn init_script(kernel: &Kernel, binaries: &[TestBinary], precedent: &Path) -> String {
    let q = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', r"'\''"));
    let mut s = String::from(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp RUST_BACKTRACE=1\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n\
         mount -t bpf bpf /sys/fs/bpf\n\
         mount -t tmpfs tmpfs /run\n\
         mkdir -p /tmp && chmod 1777 /tmp\n\
         ln -s /run /var/run\n\
         mkdir -p /run/netns\n\
         R=/dev/ttyS1\n",
    );
    for m in &kernel.modules {
        s.push_str(&format!(
            "insmod /lib/modules/{m}.ko || echo \"@@ problem insmod {m} failed\" > $R\n"
        ));
    }
    s.push_str(&format!(
        "ip link set lo up\n\
         export PRECEDENT_BIN={}\n\
         echo \"@@ kernel $(uname -r)\" > $R\n\
         echo \"---- booted $(uname -r) in $(cut -d' ' -f1 /proc/uptime)s\"\n\
         set -o pipefail\n",
        q(precedent)
    ));
    for b in binaries {
        s.push_str(&format!(
            "echo \"@@ begin {label}\" > $R\n\
             echo '---- {label}'\n\
             cd {dir} && CARGO_MANIFEST_DIR={dir} timeout {secs} {exe} {args} 2>&1 | tee $R\n\
             printf '\\n@@ end {label} %s\\n' $? > $R\n",
            label = b.label,
            dir = q(&b.dir),
            secs = BINARY_TIMEOUT.as_secs(),
            exe = q(&b.path),
            args = ROOT_TEST_ARGS.join(" "),
        ));
    }
    s.push_str("echo '@@ done' > $R\nsync\npoweroff -f\n");
    s
}

/// Boots QEMU, echoes the console, and reads the results port once the VM is off (or killed
/// after the time limit).
fn boot(kernel: &Kernel, image: &Path, binaries: &[TestBinary]) -> anyhow::Result<KernelResults> {
    let results_file = vm_build_dir()?.join("results.txt");
    let _ = std::fs::remove_file(&results_file);
    let limit = BOOT_ALLOWANCE + BINARY_TIMEOUT * binaries.len() as u32;
    step(&format!(
        "booting {} under qemu (TCG, {VM_MEMORY_MIB} MiB): {} (limit {}s)",
        kernel.package,
        binaries
            .iter()
            .map(|b| b.label.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        limit.as_secs()
    ));
    let start = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "2"])
        .args(["-m", &VM_MEMORY_MIB.to_string()])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-no-reboot", "-monitor", "none"])
        .arg("-kernel")
        .arg(kernel.vmlinuz())
        .arg("-initrd")
        .arg(image)
        // panic=-1 with -no-reboot: a kernel panic ends QEMU instead of hanging it.
        .args([
            "-append",
            "console=ttyS0 rdinit=/init panic=-1 quiet loglevel=4",
        ])
        .args(["-serial", "stdio"])
        .arg("-serial")
        .arg(format!("file:{}", results_file.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64 (package qemu-system-x86)")?;

    // Echo the console on a thread; the main thread watches the clock.
    let stdout = child.stdout.take().expect("piped stdout");
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let echo = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("[vm] {}", line.trim_end_matches('\r'));
        }
        let _ = done_tx.send(());
    });
    let timed_out = loop {
        if child.try_wait()?.is_some() {
            break false;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break true;
        }
        let _ = done_rx.recv_timeout(Duration::from_millis(500));
    };
    let _ = echo.join();
    eprintln!(
        "vm: {} after {:.0}s",
        if timed_out {
            "killed at the time limit"
        } else {
            "powered off"
        },
        start.elapsed().as_secs_f64()
    );
    let report = std::fs::read_to_string(&results_file).unwrap_or_default();
    let mut results = parse_report(&report, binaries);
    if timed_out {
        results
            .problems
            .push(format!("the VM did not finish within {}s", limit.as_secs()));
    }
    Ok(results)
}

/// Splits the results port's text at the `@@` markers into per-binary outcomes; binaries that
/// never began (the VM died first) are problems, not silent passes.
fn parse_report(report: &str, binaries: &[TestBinary]) -> KernelResults {
    let mut results = KernelResults {
        kernel: "6.1 (VM)".into(),
        ..Default::default()
    };
    let mut current: Option<(String, String)> = None;
    let mut seen = BTreeSet::new();
    for line in report.lines().map(|l| l.trim_end_matches('\r')) {
        if let Some(marker) = line.strip_prefix("@@ ") {
            let mut words = marker.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some("kernel"), Some(release), _) => results.kernel = release.to_string(),
                (Some("begin"), Some(label), _) => {
                    current = Some((label.to_string(), String::new()));
                    seen.insert(label.to_string());
                }
                (Some("end"), Some(label), code) => {
                    if let Some((name, output)) = current.take() {
                        let code = code.and_then(|c| c.parse().ok());
                        results.record(&name, &output, code);
                        // 128 + SIGTERM: busybox timeout stopped it.
                        if code == Some(143) {
                            results.problems.push(format!(
                                "{name}: killed at the {}s limit",
                                BINARY_TIMEOUT.as_secs()
                            ));
                        }
                    } else {
                        results.problems.push(format!("{label}: end without begin"));
                    }
                }
                (Some("problem"), ..) => results.problems.push(marker.to_string()),
                _ => {}
            }
        } else if let Some((_, output)) = current.as_mut() {
            output.push_str(line);
            output.push('\n');
        }
    }
    if let Some((name, output)) = current {
        results.record(&name, &output, None);
    }
    for b in binaries {
        if !seen.contains(&b.label) {
            results
                .problems
                .push(format!("{}: never ran in the VM", b.label));
        }
    }
    results
}

/// A newc ("070701") cpio archive, the format the kernel unpacks as initramfs. Parent
/// directories are written before their entries, each once.
struct Cpio {
    out: BufWriter<File>,
    dirs: BTreeSet<PathBuf>,
    inode: u32,
}

impl Cpio {
    fn create(path: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            out: BufWriter::new(
                File::create(path).with_context(|| format!("creating {}", path.display()))?,
            ),
            dirs: BTreeSet::new(),
            inode: 0,
        })
    }

    fn dir(&mut self, path: &Path) -> anyhow::Result<()> {
        if path == Path::new("/") || self.dirs.contains(path) {
            return Ok(());
        }
        if let Some(parent) = path.parent() {
            self.dir(parent)?;
        }
        self.dirs.insert(path.to_path_buf());
        self.entry(path, 0o040_755, 0, &[])
    }

    fn file(&mut self, path: &Path, data: &[u8], perm: u32) -> anyhow::Result<()> {
        if let Some(parent) = path.parent() {
            self.dir(parent)?;
        }
        self.entry(path, 0o100_000 | perm, 0, data)
    }

    fn char_device(&mut self, path: &Path, major: u32, minor: u32) -> anyhow::Result<()> {
        self.entry(path, 0o020_600, (major << 8) | minor, &[])
    }

    fn entry(&mut self, path: &Path, mode: u32, rdev: u32, data: &[u8]) -> anyhow::Result<()> {
        let name = path
            .to_str()
            .context("non-UTF-8 path")?
            .trim_start_matches('/');
        self.inode += 1;
        let (rmajor, rminor) = (rdev >> 8, rdev & 0xff);
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.inode,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            u32::try_from(data.len()).context("file over 4 GiB")?,
            0, // devmajor
            0, // devminor
            rmajor,
            rminor,
            name.len() + 1,
            0, // check
        );
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.pad(header.len() + name.len() + 1)?;
        self.out.write_all(data)?;
        self.pad(data.len())?;
        Ok(())
    }

    fn pad(&mut self, written: usize) -> anyhow::Result<()> {
        let pad = (4 - written % 4) % 4;
        self.out.write_all(&[0u8; 3][..pad])?;
        Ok(())
    }

    fn finish(mut self) -> anyhow::Result<()> {
        self.entry(Path::new("TRAILER!!!"), 0, 0, &[])?;
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        let mut perm = file.metadata()?.permissions();
        perm.set_mode(0o644);
        file.set_permissions(perm)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_depends_come_from_the_modinfo_strings() {
        let ko = b"\x7fELF junk\0license=GPL\0depends=mrp,garp\0vermagic=6.1.0\0";
        assert_eq!(module_depends(ko), vec!["mrp", "garp"]);
        assert!(module_depends(b"\0depends=\0name=veth\0").is_empty());
    }

    #[test]
    fn report_markers_split_outcomes_per_binary_and_missing_binaries_fail() {
        let bin = |label: &str| TestBinary {
            label: label.into(),
            path: "/x".into(),
            dir: "/".into(),
        };
        let report = "@@ kernel 6.1.0-48-amd64\r\n@@ begin a\r\ntest t1 ... ok\r\n\
                      test result: ok. 1 passed\r\n\n@@ end a 0\r\n@@ begin b\r\ntest t2 ... \
                      Terminated\n@@ end b 143\n";
        let r = parse_report(report, &[bin("a"), bin("b"), bin("c")]);
        assert!(r.problems.iter().any(|p| p.starts_with("b: killed at")));
        assert_eq!(r.kernel, "6.1.0-48-amd64");
        assert_eq!(r.tests[&("a".into(), "t1".into())], test::Outcome::Passed);
        assert_eq!(
            r.tests[&("b".into(), "t2".into())],
            test::Outcome::Unfinished
        );
        assert!(r.problems.iter().any(|p| p.starts_with("c: never ran")));
        assert!(r.failed());
    }

    #[test]
    fn cpio_entries_are_newc_with_parents_first_and_padded() {
        let path = std::env::temp_dir().join(format!("xtask-cpio-{}", std::process::id()));
        let mut c = Cpio::create(&path).unwrap();
        c.file(Path::new("/a/b"), b"hello", 0o644).unwrap();
        c.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        let a = text.find("a\0").unwrap();
        let b = text.find("a/b\0").unwrap();
        assert!(a < b, "parent directory first");
        assert!(text.contains("hello"));
        assert!(
            text.ends_with("TRAILER!!!\0\0\0\0"),
            "trailer padded to 4 bytes"
        );
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.starts_with(b"070701"));
    }
}
