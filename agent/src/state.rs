//! Persistence: named state files (model, endpoints, live sessions, runtime rules, blocks, the
//! session secret) in the state directory, written atomically and read back defensively.
//!
//! A file is a 44-byte header (magic, container version, payload kind, kind version, payload
//! length, CRC-32) followed by a postcard payload. Saving keeps the replaced file as `.prev`;
//! loading falls back to it when the main file is damaged, and moves damaged files aside
//! (`NAME.state.corrupt-TS`) so the daemon starts fresh instead of crash-looping.
use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read as _, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Serialize, de::DeserializeOwned};

/// Default state directory (systemd's `StateDirectory=precedent`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/precedent";

const MAGIC: [u8; 8] = *b"PRCDSTAT";
/// Version of the container (header layout); payload versions are per kind.
const CONTAINER_VERSION: u16 = 1;
const KIND_LEN: usize = 16;
/// Bytes before the payload.
pub const HEADER_LEN: usize = 8 + 2 + 2 + KIND_LEN + 4 + 8 + 4;
/// Larger files are treated as corrupt rather than read into memory: the model is tens of MB.
pub const MAX_STATE_BYTES: u64 = 1 << 30;
/// Damaged copies kept per kind; older ones are deleted so a failing disk cannot fill itself.
const MAX_CORRUPT_KEPT: usize = 3;
const TMP_MARKER: &str = ".tmp-";

/// A type that is stored in its own state file. `KIND` names the file (`KIND.state`) and is
/// recorded in the header; bump `VERSION` whenever the serialised shape changes: files of
/// another version are moved aside, never misread.
///
/// Payloads are postcard, which does not support `deserialize_any`: avoid `#[serde(untagged)]`,
/// `#[serde(flatten)]` and internally tagged enums in persisted types.
pub trait Persist: Serialize + DeserializeOwned {
    /// ASCII `[a-z0-9_-]`, at most 16 bytes.
    const KIND: &'static str;
    const VERSION: u32;

    /// What the type cannot say about itself (indexes in range, counts that add up), checked on
    /// every decoded value: a file that passes its checksum but was not written by this code
    /// (hand-made, from a buggy build) is then damage, moved aside, not a panic later.
    fn check(&self) -> Result<(), String> {
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "state directory {dir} is full (no space left on device) while writing {file}; the previous copy is intact; free space or move the state directory (state_dir in the config)"
    )]
    NoSpace { dir: PathBuf, file: String },
    #[error("state directory {dir}: {op}: {error}")]
    Io {
        dir: PathBuf,
        op: String,
        error: io::Error,
    },
    #[error("could not serialise {kind} state: {detail}")]
    Encode { kind: &'static str, detail: String },
    #[error("state kind {0:?} is not 1..=16 bytes of [a-z0-9_-]")]
    BadKind(&'static str),
    #[error("{path}: {damage}")]
    Damaged { path: PathBuf, damage: Damage },
    #[error("{path}: no such file")]
    Missing { path: PathBuf },
}

/// Where a load came from.
#[derive(Debug, PartialEq)]
pub enum Loaded<T> {
    /// No state file: first start (or it was never saved).
    Fresh,
    /// The main file.
    Current(T),
    /// The main file was missing or damaged (and moved aside); the previous good copy was used.
    Previous(T),
    /// Every copy was damaged or incompatible and moved aside; start fresh.
    Discarded,
}

impl<T> Loaded<T> {
    pub fn into_value(self) -> Option<T> {
        match self {
            Loaded::Current(v) | Loaded::Previous(v) => Some(v),
            Loaded::Fresh | Loaded::Discarded => None,
        }
    }
}

/// Why a file was rejected (logged, and the file moved aside).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Damage {
    #[error("file is {0} bytes, shorter than the {HEADER_LEN}-byte header")]
    TooShort(u64),
    #[error("file is {0} bytes, over the {MAX_STATE_BYTES}-byte limit")]
    TooLong(u64),
    #[error("not a precedent state file (bad magic)")]
    BadMagic,
    #[error("container version {found}, this build reads {CONTAINER_VERSION}")]
    ContainerVersion { found: u16 },
    #[error("holds {found:?} state, expected {expected:?}")]
    WrongKind {
        found: String,
        expected: &'static str,
    },
    #[error("{kind} state version {found}, this build reads {expected}")]
    KindVersion {
        kind: &'static str,
        found: u32,
        expected: u32,
    },
    #[error("payload is {actual} bytes, header says {declared} (truncated or padded)")]
    Length { declared: u64, actual: u64 },
    #[error("checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("payload does not decode: {0}")]
    Decode(String),
    #[error("payload decodes but is inconsistent: {0}")]
    Inconsistent(String),
}

/// The state directory. Cheap to clone-by-path; every call opens what it needs.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Creates the directory (0700) if missing and removes temp files left by an interrupted
    /// save (a crash or SIGKILL mid-write). Call once at start-up, before any save.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StateError> {
        let dir = dir.into();
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| io_err(&dir, "creating it", e))?;
        }
        let state = StateDir { dir };
        state.clean_temp_files()?;
        Ok(state)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// `KIND.state`, the main file of a kind.
    pub fn file_path<T: Persist>(&self) -> PathBuf {
        self.dir.join(format!("{}.state", T::KIND))
    }

    fn prev_path<T: Persist>(&self) -> PathBuf {
        self.dir.join(format!("{}.state.prev", T::KIND))
    }

    fn clean_temp_files(&self) -> Result<(), StateError> {
        let entries = fs::read_dir(&self.dir).map_err(|e| io_err(&self.dir, "listing it", e))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.contains(TMP_MARKER) {
                match fs::remove_file(entry.path()) {
                    Ok(()) => {
                        tracing::info!(file = %entry.path().display(), "removed temp file of an interrupted state save")
                    }
                    Err(e) => {
                        tracing::warn!(file = %entry.path().display(), error = %e, "could not remove leftover temp file")
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes `value` atomically: a temp file in the same directory, fsync, the current file
    /// kept as `.prev`, rename over the current file, fsync the directory. On any failure
    /// (ENOSPC included) the temp file is removed and the current file is untouched.
    /// Returns the bytes written.
    pub fn save<T: Persist>(&self, value: &T) -> Result<u64, StateError> {
        self.save_view::<T>(value)
    }

    /// Like [`StateDir::save`], but writes `view` (a borrowing twin of `T` that serialises
    /// identically) so a large value need not be cloned just to be saved.
    pub fn save_view<T: Persist>(&self, view: &impl Serialize) -> Result<u64, StateError> {
        check_kind(T::KIND)?;
        let payload = postcard::to_allocvec(view).map_err(|e| StateError::Encode {
            kind: T::KIND,
            detail: e.to_string(),
        })?;
        let bytes = encode_file(T::KIND, T::VERSION, &payload);
        self.write_atomic::<T>(&bytes, |f, b| f.write_all(b))?;
        Ok(bytes.len() as u64)
    }

    /// The write path with the byte-writing step injectable, so tests can simulate ENOSPC.
    fn write_atomic<T: Persist>(
        &self,
        bytes: &[u8],
        write: impl FnOnce(&mut File, &[u8]) -> io::Result<()>,
    ) -> Result<(), StateError> {
        self.write_atomic_named(&format!("{}.state", T::KIND), bytes, write)
    }

    /// [`StateDir::write_atomic`] for any file name in the directory (`.prev` beside it).
    fn write_atomic_named(
        &self,
        file_name: &str,
        bytes: &[u8],
        write: impl FnOnce(&mut File, &[u8]) -> io::Result<()>,
    ) -> Result<(), StateError> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let tmp = self.dir.join(format!(
            ".{file_name}{TMP_MARKER}{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let result = (|| {
            // 0600 from creation: state holds hashed session keys and the secret.
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| self.write_err(file_name, "creating temp file", e))?;
            write(&mut f, bytes).map_err(|e| self.write_err(file_name, "writing temp file", e))?;
            f.sync_all()
                .map_err(|e| self.write_err(file_name, "fsync of temp file", e))?;
            Ok(())
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        let main = self.dir.join(file_name);
        let prev = self.dir.join(format!("{file_name}.prev"));
        // Keep the replaced copy as `.prev` via a hard link, so there is never a moment
        // without a main file. If the main file is missing (first save, or moved aside as
        // damaged) the existing `.prev` is the last good copy and stays.
        if main.exists() {
            match fs::remove_file(&prev) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    let _ = fs::remove_file(&tmp);
                    return Err(self.write_err(file_name, "removing old .prev", e));
                }
            }
            if let Err(e) = fs::hard_link(&main, &prev) {
                // No hard links on this filesystem: a copy is slower but keeps the guarantee.
                tracing::debug!(error = %e, "hard link for .prev failed; copying");
                if let Err(e) = fs::copy(&main, &prev) {
                    let _ = fs::remove_file(&prev);
                    let _ = fs::remove_file(&tmp);
                    return Err(self.write_err(file_name, "keeping previous copy", e));
                }
            }
        }
        if let Err(e) = fs::rename(&tmp, &main) {
            let _ = fs::remove_file(&tmp);
            return Err(self.write_err(file_name, "renaming temp file into place", e));
        }
        // The rename is only durable once the directory entry is on disk.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| self.write_err(file_name, "fsync of the directory", e))?;
        Ok(())
    }

    fn write_err(&self, file: &str, op: &str, e: io::Error) -> StateError {
        if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
            StateError::NoSpace {
                dir: self.dir.clone(),
                file: file.to_string(),
            }
        } else {
            io_err(&self.dir, &format!("{op} for {file}"), e)
        }
    }

    /// Loads the main file, else the `.prev` copy. Damaged or incompatible files are moved
    /// aside with an error log line. Only I/O failures other than "not found" (say, EACCES)
    /// are errors: starting fresh then would overwrite a good file the daemon merely could not read.
    pub fn load<T: Persist>(&self) -> Result<Loaded<T>, StateError> {
        check_kind(T::KIND)?;
        let main = self.file_path::<T>();
        let prev = self.prev_path::<T>();
        let mut damaged = false;
        match self.read_one::<T>(&main)? {
            Some(Ok(v)) => return Ok(Loaded::Current(v)),
            Some(Err(damage)) => {
                damaged = true;
                self.move_aside::<T>(&main, &damage);
            }
            None => {}
        }
        match self.read_one::<T>(&prev)? {
            Some(Ok(v)) => {
                tracing::warn!(kind = T::KIND, file = %prev.display(), "using the previous good state copy");
                Ok(Loaded::Previous(v))
            }
            Some(Err(damage)) => {
                self.move_aside::<T>(&prev, &damage);
                Ok(Loaded::Discarded)
            }
            None if damaged => Ok(Loaded::Discarded),
            None => Ok(Loaded::Fresh),
        }
    }

    /// `None`: no such file. `Some(Err)`: the file is damaged.
    fn read_one<T: Persist>(&self, path: &Path) -> Result<Option<Result<T, Damage>>, StateError> {
        let mut f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&self.dir, &format!("opening {}", path.display()), e)),
        };
        let len = f
            .metadata()
            .map_err(|e| io_err(&self.dir, &format!("stat of {}", path.display()), e))?
            .len();
        if len > MAX_STATE_BYTES {
            return Ok(Some(Err(Damage::TooLong(len))));
        }
        let mut bytes = Vec::with_capacity(len as usize);
        f.read_to_end(&mut bytes)
            .map_err(|e| io_err(&self.dir, &format!("reading {}", path.display()), e))?;
        Ok(Some(decode_file::<T>(&bytes)))
    }

    fn move_aside<T: Persist>(&self, path: &Path, damage: &Damage) {
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let base = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let base = base.unwrap_or_else(|| format!("{}.state", T::KIND));
        let mut target = self.dir.join(format!("{base}.corrupt-{ts}"));
        let mut n = 1;
        while target.exists() {
            target = self.dir.join(format!("{base}.corrupt-{ts}-{n}"));
            n += 1;
        }
        match fs::rename(path, &target) {
            Ok(()) => tracing::error!(
                kind = T::KIND,
                file = %path.display(),
                moved_to = %target.display(),
                problem = %damage,
                "damaged state file moved aside"
            ),
            Err(e) => {
                // Still never read it again this run; deleting would lose evidence, so log loudly.
                tracing::error!(kind = T::KIND, file = %path.display(), problem = %damage, error = %e,
                    "damaged state file could not be moved aside");
            }
        }
        self.prune_corrupt::<T>();
    }

    fn prune_corrupt<T: Persist>(&self) {
        let prefix = format!("{}.state", T::KIND);
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        let mut corrupt: Vec<(SystemTime, PathBuf)> = entries
            .flatten()
            .filter(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.starts_with(&prefix) && n.contains(".corrupt-")
            })
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        if corrupt.len() <= MAX_CORRUPT_KEPT {
            return;
        }
        corrupt.sort();
        let excess = corrupt.len() - MAX_CORRUPT_KEPT;
        for (_, p) in corrupt.into_iter().take(excess) {
            let _ = fs::remove_file(&p);
        }
    }

    /// The per-install session-hashing secret: loaded, or created (mode 0600) on first start
    /// or when the stored one is damaged. A new secret only changes future session hashes.
    /// Tightens the mode to 0600 if someone loosened it.
    pub fn load_or_create_secret(&self) -> Result<[u8; 16], StateError> {
        let path = self.file_path::<Secret>();
        if let Ok(meta) = fs::metadata(&path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode != 0o600 {
                tracing::warn!(file = %path.display(), mode = format!("{mode:o}"), "secret file mode was not 0600; fixing");
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
                    .map_err(|e| io_err(&self.dir, "chmod 0600 of the secret", e))?;
            }
        }
        if let Some(Secret(s)) = self.load::<Secret>()?.into_value() {
            return Ok(s);
        }
        let secret = crate::session::SessionKeyer::random_secret()
            .map_err(|e| io_err(&self.dir, "reading /dev/urandom for a new secret", e))?;
        self.save(&Secret(secret))?;
        tracing::info!(file = %path.display(), "created a new session-hashing secret");
        Ok(secret)
    }
}

/// Saves `view` (serialised like a `T`) as a state file at any path, in the same format and
/// with the same atomic write as [`StateDir::save_view`]: what `precedent replay --model-out`
/// uses, so `--model-out /var/lib/precedent/model.state` hands a model to the daemon. The
/// parent directory must exist; the replaced file is kept as `PATH.prev`.
pub fn save_view_to_path<T: Persist>(
    path: &Path,
    view: &impl Serialize,
) -> Result<u64, StateError> {
    check_kind(T::KIND)?;
    let (dir, name) = split_path(path)?;
    let payload = postcard::to_allocvec(view).map_err(|e| StateError::Encode {
        kind: T::KIND,
        detail: e.to_string(),
    })?;
    let bytes = encode_file(T::KIND, T::VERSION, &payload);
    // Not `StateDir::open`: that creates the directory and sweeps temp files, which is right
    // for the state directory and wrong for whatever directory the operator names.
    StateDir { dir }.write_atomic_named(&name, &bytes, |f, b| f.write_all(b))?;
    Ok(bytes.len() as u64)
}

/// Checks that [`save_view_to_path`] can write `path`, by creating and removing an empty file
/// beside it: a replay of a month of logs learns to the end before it saves, and only then
/// would it find the directory missing or read-only.
pub fn check_writable_path(path: &Path) -> Result<(), StateError> {
    let (dir, name) = split_path(path)?;
    let probe = dir.join(format!(".{name}.probe-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(|e| io_err(&dir, &format!("creating a file for {name}"), e))?;
    std::fs::remove_file(&probe).map_err(|e| io_err(&dir, "removing the probe file", e))
}

/// Reads a `T` state file from any path. Unlike [`StateDir::load`] nothing is moved aside and
/// there is no fallback: the operator named this file, so damage is an error that says why.
pub fn load_from_path<T: Persist>(path: &Path) -> Result<T, StateError> {
    check_kind(T::KIND)?;
    let (dir, _) = split_path(path)?;
    match (StateDir { dir }).read_one::<T>(path)? {
        Some(Ok(v)) => Ok(v),
        Some(Err(damage)) => Err(StateError::Damaged {
            path: path.to_path_buf(),
            damage,
        }),
        None => Err(StateError::Missing {
            path: path.to_path_buf(),
        }),
    }
}

/// The session-hashing secret stored in a state directory (its `secret` file, or a copy), for
/// `precedent replay --session-secret`: hashed with the daemon's secret, the same session
/// identifier gets the same short id in replay's alerts as in the daemon's.
pub fn load_secret_from_path(path: &Path) -> Result<[u8; 16], StateError> {
    load_from_path::<Secret>(path).map(|Secret(s)| s)
}

fn split_path(path: &Path) -> Result<(PathBuf, String), StateError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| StateError::Io {
            dir: path.to_path_buf(),
            op: "naming a state file".into(),
            error: io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"),
        })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((dir, name))
}

/// The session-hashing secret as stored.
#[derive(Serialize, serde::Deserialize, PartialEq, Eq)]
struct Secret([u8; 16]);

impl Persist for Secret {
    const KIND: &'static str = "secret";
    const VERSION: u32 = 1;
}

fn io_err(dir: &Path, op: &str, error: io::Error) -> StateError {
    StateError::Io {
        dir: dir.to_path_buf(),
        op: op.to_string(),
        error,
    }
}

fn check_kind(kind: &'static str) -> Result<(), StateError> {
    let ok = !kind.is_empty()
        && kind.len() <= KIND_LEN
        && kind
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(StateError::BadKind(kind))
    }
}

/// Header fields, little-endian: magic[8] container_version:u16 flags:u16 kind[16]
/// kind_version:u32 payload_len:u64 crc32:u32 (over the header before it and the payload).
/// The bytes of a state file holding `payload`; public, with [`decode_file`], for the fuzz targets.
pub fn encode_file(kind: &str, version: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&CONTAINER_VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    let mut k = [0u8; KIND_LEN];
    k[..kind.len()].copy_from_slice(kind.as_bytes());
    out.extend_from_slice(&k);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&out);
    h.update(payload);
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// A state file's bytes back into a `T`, or why not: what [`StateDir::load`] does once read.
pub fn decode_file<T: Persist>(bytes: &[u8]) -> Result<T, Damage> {
    if bytes.len() < HEADER_LEN {
        return Err(Damage::TooShort(bytes.len() as u64));
    }
    let (head, payload) = bytes.split_at(HEADER_LEN);
    if head[..8] != MAGIC {
        return Err(Damage::BadMagic);
    }
    let u16_at = |o: usize| u16::from_le_bytes([head[o], head[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(head[o..o + 4].try_into().expect("4 bytes"));
    let container = u16_at(8);
    if container != CONTAINER_VERSION {
        return Err(Damage::ContainerVersion { found: container });
    }
    let kind_raw = &head[12..12 + KIND_LEN];
    let kind_end = kind_raw.iter().position(|&b| b == 0).unwrap_or(KIND_LEN);
    let kind = String::from_utf8_lossy(&kind_raw[..kind_end]).into_owned();
    let o = 12 + KIND_LEN;
    let version = u32_at(o);
    let declared = u64::from_le_bytes(head[o + 4..o + 12].try_into().expect("8 bytes"));
    let stored = u32_at(o + 12);
    // Length and checksum first: a damaged file reports damage, not a misleading kind/version.
    if declared != payload.len() as u64 {
        return Err(Damage::Length {
            declared,
            actual: payload.len() as u64,
        });
    }
    let mut h = crc32fast::Hasher::new();
    h.update(&head[..o + 12]);
    h.update(payload);
    let computed = h.finalize();
    if computed != stored {
        return Err(Damage::Checksum { stored, computed });
    }
    if kind != T::KIND {
        return Err(Damage::WrongKind {
            found: kind,
            expected: T::KIND,
        });
    }
    if version != T::VERSION {
        return Err(Damage::KindVersion {
            kind: T::KIND,
            found: version,
            expected: T::VERSION,
        });
    }
    let (value, rest) =
        postcard::take_from_bytes::<T>(payload).map_err(|e| Damage::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(Damage::Decode(format!(
            "{} trailing bytes after the value",
            rest.len()
        )));
    }
    value.check().map_err(Damage::Inconsistent)?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Sample {
        name: String,
        counts: Vec<u64>,
    }
    impl Persist for Sample {
        const KIND: &'static str = "sample";
        const VERSION: u32 = 3;
    }

    /// Same kind, next version: what a format change looks like.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct SampleV4 {
        name: String,
        counts: Vec<u64>,
    }
    impl Persist for SampleV4 {
        const KIND: &'static str = "sample";
        const VERSION: u32 = 4;
    }

    fn sample(n: u64) -> Sample {
        Sample {
            name: format!("gen{n}"),
            counts: (0..n).collect(),
        }
    }

    fn dir() -> (tempfile::TempDir, StateDir) {
        let t = tempfile::tempdir().unwrap();
        let s = StateDir::open(t.path()).unwrap();
        (t, s)
    }

    fn names(d: &StateDir) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn corrupt_files(d: &StateDir) -> Vec<String> {
        names(d)
            .into_iter()
            .filter(|n| n.contains(".corrupt-"))
            .collect()
    }

    #[test]
    fn round_trip_returns_what_was_saved() {
        let (_t, d) = dir();
        assert_eq!(d.load::<Sample>().unwrap(), Loaded::Fresh);
        d.save(&sample(5)).unwrap();
        assert_eq!(d.load::<Sample>().unwrap(), Loaded::Current(sample(5)));
        d.save(&sample(7)).unwrap();
        assert_eq!(d.load::<Sample>().unwrap(), Loaded::Current(sample(7)));
        assert_eq!(names(&d), ["sample.state", "sample.state.prev"]);
    }

    #[test]
    fn state_files_are_mode_0600() {
        let (_t, d) = dir();
        d.save(&sample(1)).unwrap();
        d.save(&sample(2)).unwrap();
        for f in [d.file_path::<Sample>(), d.prev_path::<Sample>()] {
            assert_eq!(
                fs::metadata(&f).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
    }

    #[test]
    fn flipped_byte_moves_file_aside_and_loads_prev() {
        let (_t, d) = dir();
        d.save(&sample(3)).unwrap();
        d.save(&sample(4)).unwrap();
        let main = d.file_path::<Sample>();
        let mut bytes = fs::read(&main).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        fs::write(&main, &bytes).unwrap();

        assert_eq!(d.load::<Sample>().unwrap(), Loaded::Previous(sample(3)));
        assert!(!main.exists());
        let c = corrupt_files(&d);
        assert_eq!(c.len(), 1, "{c:?}");
        assert!(c[0].starts_with("sample.state.corrupt-"), "{c:?}");
        // The damaged bytes are kept for inspection.
        assert_eq!(fs::read(d.path().join(&c[0])).unwrap(), bytes);
        // The next save does not clobber the good .prev with anything damaged.
        d.save(&sample(5)).unwrap();
        assert_eq!(d.load::<Sample>().unwrap(), Loaded::Current(sample(5)));
        assert_eq!(
            fs::read(d.prev_path::<Sample>()).unwrap(),
            encode_file("sample", 3, &postcard::to_allocvec(&sample(3)).unwrap())
        );
    }

    /// A value the type itself can tell is broken: `counts` must not be longer than `cap`.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Capped {
        cap: usize,
        counts: Vec<u64>,
    }
    impl Persist for Capped {
        const KIND: &'static str = "capped";
        const VERSION: u32 = 1;
        fn check(&self) -> Result<(), String> {
            if self.counts.len() > self.cap {
                return Err(format!(
                    "{} counts over the cap {}",
                    self.counts.len(),
                    self.cap
                ));
            }
            Ok(())
        }
    }

    #[test]
    fn checksum_valid_but_inconsistent_file_is_damage_moved_aside() {
        let (_t, d) = dir();
        let bad = Capped {
            cap: 1,
            counts: vec![1, 2, 3],
        };
        // save() does not check (the running code only writes what it built); load() does.
        d.save(&bad).unwrap();
        let bytes = fs::read(d.file_path::<Capped>()).unwrap();
        assert_eq!(
            decode_file::<Capped>(&bytes),
            Err(Damage::Inconsistent("3 counts over the cap 1".into()))
        );
        assert_eq!(d.load::<Capped>().unwrap(), Loaded::Discarded);
        assert_eq!(corrupt_files(&d).len(), 1);
    }

    #[test]
    fn header_damage_is_detected_by_checksum() {
        let (_t, d) = dir();
        d.save(&sample(3)).unwrap();
        let main = d.file_path::<Sample>();
        let mut bytes = fs::read(&main).unwrap();
        bytes[12] ^= 1; // inside the kind name
        fs::write(&main, &bytes).unwrap();
        assert!(matches!(
            decode_file::<Sample>(&bytes),
            Err(Damage::Checksum { .. })
        ));
        assert_eq!(d.load::<Sample>().unwrap(), Loaded::Discarded);
        assert_eq!(corrupt_files(&d).len(), 1);
        // And after that it is a fresh start, not an error.
        assert_eq!(d.load::<Sample>().unwrap(), Loaded::Fresh);
    }

    #[test]
    fn truncated_file_is_moved_aside() {
        let (_t, d) = dir();
        d.save(&sample(50)).unwrap();
        let main = d.file_path::<Sample>();
        let bytes = fs::read(&main).unwrap();
        for cut in [0, 7, HEADER_LEN - 1, HEADER_LEN, bytes.len() - 1] {
            assert!(
                decode_file::<Sample>(&bytes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        fs::write(&main, &bytes[..bytes.len() / 2]).unwrap();
        assert_eq!(d.load::<Sample>().unwrap(), Loaded::Discarded);
        assert!(!main.exists());
        assert_eq!(corrupt_files(&d).len(), 1);
    }

    #[test]
    fn other_version_is_moved_aside_not_misread() {
        let (_t, d) = dir();
        d.save(&sample(2)).unwrap();
        let bytes = fs::read(d.file_path::<Sample>()).unwrap();
        assert_eq!(
            decode_file::<SampleV4>(&bytes),
            Err(Damage::KindVersion {
                kind: "sample",
                found: 3,
                expected: 4
            })
        );
        assert_eq!(d.load::<SampleV4>().unwrap(), Loaded::Discarded);
        assert_eq!(corrupt_files(&d).len(), 1);
    }

    #[test]
    fn wrong_magic_and_wrong_kind_are_rejected() {
        let mut bytes = encode_file("sample", 3, &postcard::to_allocvec(&sample(1)).unwrap());
        bytes[0] = b'X';
        assert_eq!(decode_file::<Sample>(&bytes), Err(Damage::BadMagic));
        let other = encode_file("blocks", 3, &postcard::to_allocvec(&sample(1)).unwrap());
        assert!(matches!(
            decode_file::<Sample>(&other),
            Err(Damage::WrongKind { .. })
        ));
    }

    #[test]
    fn undecodable_payload_with_valid_checksum_is_rejected() {
        // A well-formed container whose payload is not a Sample (e.g. a bug that forgot to bump
        // VERSION): caught at decode, never returned half-read.
        let bytes = encode_file("sample", 3, &[0xff; 3]);
        assert!(matches!(
            decode_file::<Sample>(&bytes),
            Err(Damage::Decode(_))
        ));
        let mut payload = postcard::to_allocvec(&sample(1)).unwrap();
        payload.push(0);
        assert!(matches!(
            decode_file::<Sample>(&encode_file("sample", 3, &payload)),
            Err(Damage::Decode(_))
        ));
    }

    #[test]
    fn kill_during_write_leaves_old_file_and_temp_is_cleaned() {
        let t = tempfile::tempdir().unwrap();
        let d = StateDir::open(t.path()).unwrap();
        d.save(&sample(9)).unwrap();
        // What a SIGKILL between create and rename leaves behind: a partial temp file.
        let tmp = t.path().join(".sample.state.tmp-4242-0");
        fs::write(&tmp, b"PRCDSTAT partial").unwrap();
        assert_eq!(d.load::<Sample>().unwrap(), Loaded::Current(sample(9)));
        // The next start removes it.
        let d = StateDir::open(t.path()).unwrap();
        assert!(!tmp.exists());
        assert_eq!(names(&d), ["sample.state"]);
        assert_eq!(d.load::<Sample>().unwrap(), Loaded::Current(sample(9)));
    }

    #[test]
    fn crash_between_prev_and_rename_still_loads_a_good_copy() {
        // If the main file is gone (moved aside earlier, or lost), .prev is used.
        let (_t, d) = dir();
        d.save(&sample(1)).unwrap();
        d.save(&sample(2)).unwrap();
        fs::remove_file(d.file_path::<Sample>()).unwrap();
        assert_eq!(d.load::<Sample>().unwrap(), Loaded::Previous(sample(1)));
    }

    #[test]
    fn no_space_during_write_keeps_previous_file_and_says_so() {
        let (_t, d) = dir();
        d.save(&sample(1)).unwrap();
        let before = fs::read(d.file_path::<Sample>()).unwrap();
        let bytes = encode_file("sample", 3, &postcard::to_allocvec(&sample(2)).unwrap());
        let err = d
            .write_atomic::<Sample>(&bytes, |f, b| {
                f.write_all(&b[..10])?;
                Err(io::Error::from_raw_os_error(libc::ENOSPC))
            })
            .unwrap_err();
        assert!(matches!(err, StateError::NoSpace { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("no space left") && msg.contains("previous copy is intact"),
            "{msg}"
        );
        assert_eq!(fs::read(d.file_path::<Sample>()).unwrap(), before);
        assert_eq!(
            names(&d),
            ["sample.state"],
            "temp file removed, no .prev churn"
        );
    }

    #[test]
    fn unreadable_state_is_an_error_not_a_fresh_start() {
        let (_t, d) = dir();
        // A directory where the file should be: reading fails with EISDIR, not NotFound.
        fs::create_dir(d.file_path::<Sample>()).unwrap();
        assert!(matches!(d.load::<Sample>(), Err(StateError::Io { .. })));
    }

    #[test]
    fn corrupt_copies_are_capped() {
        let (_t, d) = dir();
        for i in 0..(MAX_CORRUPT_KEPT + 3) {
            fs::write(d.file_path::<Sample>(), format!("garbage {i}")).unwrap();
            assert_eq!(d.load::<Sample>().unwrap(), Loaded::Discarded);
        }
        assert_eq!(corrupt_files(&d).len(), MAX_CORRUPT_KEPT);
    }

    #[test]
    fn secret_is_created_0600_and_stable() {
        let t = tempfile::tempdir().unwrap();
        let d = StateDir::open(t.path().join("sub")).unwrap();
        assert_eq!(
            fs::metadata(d.path()).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let s1 = d.load_or_create_secret().unwrap();
        let path = d.file_path::<Secret>();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(d.load_or_create_secret().unwrap(), s1);
        assert_ne!(s1, [0u8; 16]);
        // A loosened mode is tightened again.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(d.load_or_create_secret().unwrap(), s1);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn bad_kind_names_are_refused() {
        #[derive(Serialize, Deserialize)]
        struct Bad;
        impl Persist for Bad {
            const KIND: &'static str = "../escape";
            const VERSION: u32 = 1;
        }
        let (_t, d) = dir();
        assert!(matches!(d.save(&Bad), Err(StateError::BadKind(_))));
    }

    #[test]
    fn a_writable_path_is_checked_without_leaving_anything() {
        let t = tempfile::tempdir().unwrap();
        check_writable_path(&t.path().join("model.state")).unwrap();
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 0);
        let err = check_writable_path(&t.path().join("missing/model.state")).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn path_save_and_load_use_the_state_file_format() {
        let (_t, d) = dir();
        // Saved by path under the daemon's file name, read by the daemon's loader.
        let path = d.file_path::<Sample>();
        save_view_to_path::<Sample>(&path, &sample(4)).unwrap();
        assert_eq!(d.load::<Sample>().unwrap(), Loaded::Current(sample(4)));
        // Any other name works too, and reads back; a second save keeps `.prev`.
        let other = d.path().join("elsewhere.bin");
        save_view_to_path::<Sample>(&other, &sample(2)).unwrap();
        save_view_to_path::<Sample>(&other, &sample(3)).unwrap();
        assert_eq!(load_from_path::<Sample>(&other).unwrap(), sample(3));
        assert!(d.path().join("elsewhere.bin.prev").exists());
    }

    #[test]
    fn path_load_reports_damage_and_absence_without_moving_files() {
        let (_t, d) = dir();
        let path = d.path().join("m.state");
        assert!(matches!(
            load_from_path::<Sample>(&path),
            Err(StateError::Missing { .. })
        ));
        fs::write(
            &path,
            b"not a state file at all, but long enough for a header....",
        )
        .unwrap();
        let err = load_from_path::<Sample>(&path).unwrap_err();
        assert!(matches!(err, StateError::Damaged { .. }), "{err:?}");
        assert!(err.to_string().contains("bad magic"), "{err}");
        assert!(path.exists(), "an operator's file is never moved aside");
        save_view_to_path::<SampleV4>(&path, &sample(1)).unwrap();
        assert!(matches!(
            load_from_path::<Sample>(&path),
            Err(StateError::Damaged {
                damage: Damage::KindVersion { .. },
                ..
            })
        ));
    }

    /// A real full filesystem: a 64 KiB tmpfs.
    #[test]
    #[ignore = "needs root: run with `cargo xtask test`"]
    fn full_tmpfs_keeps_previous_file() {
        let t = tempfile::tempdir().unwrap();
        let mnt = t.path().to_str().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs", mnt])
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount tmpfs");
        let result = std::panic::catch_unwind(|| {
            let d = StateDir::open(t.path()).unwrap();
            d.save(&sample(10)).unwrap();
            let big = sample(200_000); // ~200 KB of varints
            let err = d.save(&big).unwrap_err();
            assert!(matches!(err, StateError::NoSpace { .. }), "{err:?}");
            assert_eq!(d.load::<Sample>().unwrap(), Loaded::Current(sample(10)));
        });
        let _ = std::process::Command::new("umount").arg(mnt).status();
        result.unwrap();
    }
}
