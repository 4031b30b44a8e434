//! The daemon's side of the control socket: accept, check the peer, read one bounded request
//! with a deadline, hand it to the engine owner through a bounded channel, write the answer.
//!
//! The server never touches engine state; a slow, hostile or oversized client costs at most one
//! of `max_connections` slots for `read_timeout`, and never blocks the engine.
use std::{
    fs,
    io::{self, ErrorKind},
    os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{Semaphore, mpsc, oneshot},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

use super::{MAX_REQUEST_BYTES, Request, Response, decode_request, encode_response};

/// Requests waiting for the engine. Small on purpose: the CLI is interactive, and a full queue
/// means the engine is busy, which the client is told.
pub const QUEUE_DEPTH: usize = 16;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub socket: PathBuf,
    /// Connections served at once; further ones get a "busy" error and are closed.
    pub max_connections: usize,
    /// Time a client has to send its whole request (and to read the reply).
    pub read_timeout: Duration,
    /// Time the engine has to take and answer a request.
    pub reply_timeout: Duration,
    pub max_request_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            socket: PathBuf::from(super::DEFAULT_SOCKET),
            max_connections: 8,
            read_timeout: Duration::from_secs(5),
            reply_timeout: Duration::from_secs(30),
            max_request_bytes: MAX_REQUEST_BYTES,
        }
    }
}

/// Who sent a request (from SO_PEERCRED), for logs and audit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// One request for the engine owner, which must answer through `reply` (or drop it, which the
/// client sees as an error).
#[derive(Debug)]
pub struct ControlRequest {
    pub request: Request,
    pub peer: Peer,
    pub reply: oneshot::Sender<Response>,
}

impl ControlRequest {
    /// Sends the answer; a client that already gave up is not an error.
    pub fn respond(self, response: Response) {
        let _ = self.reply.send(response);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("another precedent daemon is running (socket {})", path.display())]
    AlreadyRunning { path: PathBuf },
    #[error(
        "{} exists and is not a socket; remove it or set another control socket path",
        path.display()
    )]
    NotASocket { path: PathBuf },
    #[error("control socket {}: {op}: {error}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        error: io::Error,
    },
}

/// Only root, and the daemon's own user (a daemon run unprivileged in tests), may talk.
pub fn peer_allowed(peer_uid: u32, own_uid: u32) -> bool {
    peer_uid == 0 || peer_uid == own_uid
}

/// A bound control socket, ready to [`run`](ControlServer::run).
#[derive(Debug)]
pub struct ControlServer {
    listener: UnixListener,
    config: ServerConfig,
    /// (dev, inode) of our socket file, so shutdown removes only our own.
    identity: (u64, u64),
}

impl ControlServer {
    /// Creates the parent directory (0700) if missing, replaces a stale socket left by a dead
    /// daemon, refuses to start if a live daemon answers on it, and binds with mode 0600.
    /// Must be called inside a tokio runtime.
    pub fn bind(config: ServerConfig) -> Result<Self, ControlError> {
        let path = config.socket.clone();
        let io_err = |op: &'static str| {
            let path = path.clone();
            move |error| ControlError::Io { path, op, error }
        };
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !parent.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&parent)
                .map_err(io_err("creating its directory"))?;
        }
        match fs::symlink_metadata(&path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(ControlError::NotASocket { path });
            }
            Ok(_) => match std::os::unix::net::UnixStream::connect(&path) {
                Ok(_) => return Err(ControlError::AlreadyRunning { path }),
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    tracing::info!(socket = %path.display(), "replacing stale control socket");
                    fs::remove_file(&path).map_err(io_err("removing the stale socket"))?;
                }
                Err(e) => return Err(io_err("probing the existing socket")(e)),
            },
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("stat")(e)),
        }
        // Bind under a temporary name, chmod, then rename into place: the socket is never
        // reachable with the umask's mode, and a client never sees a half-set-up socket.
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "control.sock".into());
        let tmp = parent.join(format!(".{file_name}.{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        let std_listener =
            std::os::unix::net::UnixListener::bind(&tmp).map_err(io_err("binding"))?;
        let setup = fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))
            .map_err(io_err("chmod 0600"))
            .and_then(|()| fs::rename(&tmp, &path).map_err(io_err("renaming into place")))
            .and_then(|()| {
                std_listener
                    .set_nonblocking(true)
                    .map_err(io_err("setting non-blocking"))
            });
        if let Err(e) = setup {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        let meta = fs::symlink_metadata(&path).map_err(io_err("stat after bind"))?;
        let listener = UnixListener::from_std(std_listener).map_err(io_err("registering"))?;
        Ok(ControlServer {
            listener,
            config,
            identity: (meta.dev(), meta.ino()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.config.socket
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, aborts open connections
    /// and removes the socket file. Each request goes to `engine`; see [`QUEUE_DEPTH`].
    pub async fn run(self, engine: mpsc::Sender<ControlRequest>, shutdown: CancellationToken) {
        let ControlServer {
            listener,
            config,
            identity,
        } = self;
        let config = Arc::new(config);
        let own_uid = unsafe { libc::geteuid() };
        let slots = Arc::new(Semaphore::new(config.max_connections));
        let mut conns = JoinSet::new();
        tracing::info!(socket = %config.socket.display(), "control socket listening");
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => match slots.clone().try_acquire_owned() {
                        Ok(permit) => {
                            let (config, engine) = (config.clone(), engine.clone());
                            conns.spawn(async move {
                                serve_one(stream, &config, &engine, own_uid).await;
                                drop(permit);
                            });
                        }
                        Err(_) => {
                            tracing::warn!(max = config.max_connections, "control connection refused: too many open");
                            // The send buffer of a fresh socket takes a short line without blocking.
                            let _ = stream.try_write(&encode_response(&Response::error(
                                "the daemon is busy with other control connections; try again",
                            )));
                        }
                    },
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning on accept.
                        tracing::warn!(error = %e, "control socket accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        conns.abort_all();
        match fs::symlink_metadata(&config.socket) {
            Ok(m) if (m.dev(), m.ino()) == identity => {
                if let Err(e) = fs::remove_file(&config.socket) {
                    tracing::warn!(socket = %config.socket.display(), error = %e, "could not remove control socket");
                }
            }
            _ => {}
        }
        tracing::info!("control socket closed");
    }
}

async fn serve_one(
    stream: UnixStream,
    config: &ServerConfig,
    engine: &mpsc::Sender<ControlRequest>,
    own_uid: u32,
) {
    let peer = match stream.peer_cred() {
        Ok(c) => Peer {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid(),
        },
        Err(e) => {
            tracing::warn!(error = %e, "control connection without peer credentials; closed");
            return;
        }
    };
    let (rd, mut wr) = stream.into_split();
    if !peer_allowed(peer.uid, own_uid) {
        tracing::warn!(uid = peer.uid, pid = ?peer.pid, "control connection refused: not root");
        let reply =
            Response::error("permission denied: only root may use the precedent control socket");
        write_reply(&mut wr, &reply, config.read_timeout).await;
        return;
    }
    let response = match read_request(rd, config).await {
        Ok(None) => return, // connected and closed: a liveness probe, not an error
        Ok(Some(request)) => forward(request, peer, engine, config).await,
        Err(reply) => {
            tracing::warn!(uid = peer.uid, pid = ?peer.pid, error = reply.error.as_deref().unwrap_or(""), "bad control request");
            reply
        }
    };
    write_reply(&mut wr, &response, config.read_timeout).await;
}

/// `Ok(None)`: the client closed without sending anything.
async fn read_request(
    rd: tokio::net::unix::OwnedReadHalf,
    config: &ServerConfig,
) -> Result<Option<Request>, Response> {
    let limit = config.max_request_bytes;
    let mut buf = Vec::with_capacity(1024);
    // One byte over the limit tells "exactly at the limit" from "too large" without reading more.
    let mut reader = BufReader::new(rd.take(limit as u64 + 1));
    match tokio::time::timeout(config.read_timeout, reader.read_until(b'\n', &mut buf)).await {
        Err(_) => {
            return Err(Response::error(format!(
                "no complete request within {}s; closing",
                config.read_timeout.as_secs_f32()
            )));
        }
        Ok(Err(e)) => return Err(Response::error(format!("reading the request failed: {e}"))),
        Ok(Ok(_)) => {}
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > limit {
        return Err(Response::error(format!(
            "request larger than {limit} bytes; closing"
        )));
    }
    if buf.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    decode_request(&buf)
        .map(Some)
        .map_err(|e| Response::error(e.to_string()))
}

async fn forward(
    request: Request,
    peer: Peer,
    engine: &mpsc::Sender<ControlRequest>,
    config: &ServerConfig,
) -> Response {
    let cmd = request.cmd();
    tracing::debug!(cmd, uid = peer.uid, pid = ?peer.pid, "control request");
    let (tx, rx) = oneshot::channel();
    let item = ControlRequest {
        request,
        peer,
        reply: tx,
    };
    match tokio::time::timeout(config.reply_timeout, engine.send(item)).await {
        Err(_) => return Response::error("the daemon is busy; try again"),
        Ok(Err(_)) => return Response::error("the daemon is shutting down"),
        Ok(Ok(())) => {}
    }
    match tokio::time::timeout(config.reply_timeout, rx).await {
        Ok(Ok(response)) => response,
        Ok(Err(_)) => Response::error(format!(
            "the daemon dropped the {cmd} request without answering"
        )),
        Err(_) => Response::error(format!(
            "the daemon did not answer {cmd} within {}s",
            config.reply_timeout.as_secs()
        )),
    }
}

async fn write_reply(
    wr: &mut tokio::net::unix::OwnedWriteHalf,
    response: &Response,
    deadline: Duration,
) {
    let line = encode_response(response);
    let write = async {
        wr.write_all(&line).await?;
        wr.shutdown().await
    };
    match tokio::time::timeout(deadline, write).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "control reply not delivered"),
        Err(_) => tracing::debug!("control client did not read its reply in time"),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        os::unix::net::UnixStream as StdStream,
    };

    use super::*;
    use crate::control::{ClientError, ControlClient, PROTOCOL_VERSION};

    struct Harness {
        _dir: tempfile::TempDir,
        path: PathBuf,
        shutdown: CancellationToken,
        server: tokio::task::JoinHandle<()>,
    }

    /// A server whose "engine" echoes the command and peer uid; `model_reset` is dropped
    /// unanswered and `model_save` never answered, to exercise those paths.
    async fn start(tune: impl FnOnce(&mut ServerConfig)) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run").join("control.sock");
        let mut config = ServerConfig {
            socket: path.clone(),
            ..ServerConfig::default()
        };
        tune(&mut config);
        let server = ControlServer::bind(config).unwrap();
        let (tx, mut rx) = mpsc::channel::<ControlRequest>(QUEUE_DEPTH);
        tokio::spawn(async move {
            let mut parked = Vec::new();
            while let Some(req) = rx.recv().await {
                match req.request {
                    Request::ModelReset => drop(req),
                    Request::ModelSave => parked.push(req),
                    _ => {
                        let data =
                            serde_json::json!({"cmd": req.request.cmd(), "uid": req.peer.uid});
                        req.respond(Response::ok(data));
                    }
                }
            }
        });
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(server.run(tx, shutdown.clone()));
        Harness {
            _dir: dir,
            path,
            shutdown,
            server,
        }
    }

    async fn ask(path: &Path, req: Request) -> Result<Response, ClientError> {
        let client = ControlClient::new(path).with_timeout(Duration::from_secs(10));
        tokio::task::spawn_blocking(move || client.request(&req))
            .await
            .unwrap()
    }

    /// Sends raw bytes and returns the reply line (blocking, for hostile-client tests).
    async fn raw(path: &Path, bytes: Vec<u8>, half_close: bool) -> String {
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let mut s = StdStream::connect(&path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            // The server may close before taking everything (oversize): that is the point.
            let _ = s.write_all(&bytes);
            if half_close {
                let _ = s.shutdown(std::net::Shutdown::Write);
            }
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out
        })
        .await
        .unwrap()
    }

    fn error_of(line: &str) -> String {
        let r: Response =
            serde_json::from_str(line.trim_end()).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        assert!(!r.ok, "{line}");
        assert_eq!(r.version, PROTOCOL_VERSION);
        r.error.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn request_reaches_engine_and_answer_comes_back() {
        let h = start(|_| {}).await;
        let resp = ask(&h.path, Request::Sequences { top: 3 }).await.unwrap();
        let data = resp.into_result().unwrap();
        assert_eq!(data["cmd"], "sequences");
        assert_eq!(data["uid"], unsafe { libc::geteuid() });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn socket_is_0600_in_a_0700_directory() {
        let h = start(|_| {}).await;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&h.path), 0o600);
        assert_eq!(mode(h.path.parent().unwrap()), 0o700);
        assert!(
            fs::symlink_metadata(&h.path)
                .unwrap()
                .file_type()
                .is_socket()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oversize_request_is_refused_and_next_client_is_served() {
        let h = start(|_| {}).await;
        let mut big = br#"{"version":1,"cmd":"rules_add","toml":""#.to_vec();
        big.resize(MAX_REQUEST_BYTES + 10_000, b'a');
        big.extend_from_slice(b"\"}\n");
        let reply = raw(&h.path, big, false).await;
        assert!(
            error_of(&reply).contains("larger than 65536 bytes"),
            "{reply}"
        );
        let resp = ask(&h.path, Request::Status).await.unwrap();
        assert!(resp.ok);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn client_reports_the_servers_refusal_of_an_oversize_request() {
        // The server closes while the client is still writing; the client must still show the
        // server's reason, not "broken pipe".
        let h = start(|_| {}).await;
        let req = Request::RulesAdd {
            toml: "#".repeat(4 * MAX_REQUEST_BYTES),
        };
        let e = ask(&h.path, req).await.unwrap().into_result().unwrap_err();
        assert!(e.contains("larger than"), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn request_of_exactly_the_limit_is_accepted() {
        let h = start(|c| c.max_request_bytes = 200).await;
        let mut line = encode_request_padded(200);
        assert_eq!(line.len(), 201);
        let reply = raw(&h.path, std::mem::take(&mut line), false).await;
        let r: Response = serde_json::from_str(reply.trim_end()).unwrap();
        assert!(r.ok, "{reply}");
        let reply = raw(&h.path, encode_request_padded(201), false).await;
        assert!(
            error_of(&reply).contains("larger than 200 bytes"),
            "{reply}"
        );
    }

    /// A `rules_add` line whose JSON (without the newline) is exactly `len` bytes.
    fn encode_request_padded(len: usize) -> Vec<u8> {
        let base = super::super::encode_request(&Request::RulesAdd {
            toml: String::new(),
        });
        let pad = len - (base.len() - 1);
        super::super::encode_request(&Request::RulesAdd {
            toml: "#".repeat(pad),
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn malformed_json_and_unknown_version_get_error_replies() {
        let h = start(|_| {}).await;
        let reply = raw(&h.path, b"{\"version\":1,\"cmd\":\n".to_vec(), false).await;
        assert!(error_of(&reply).contains("not valid JSON"), "{reply}");
        let reply = raw(
            &h.path,
            b"{\"version\":7,\"cmd\":\"status\"}\n".to_vec(),
            false,
        )
        .await;
        assert!(
            error_of(&reply).contains("version 7 is not supported"),
            "{reply}"
        );
        // A request without the trailing newline, ended by half-close, is fine.
        let reply = raw(
            &h.path,
            b"{\"version\":1,\"cmd\":\"status\"}".to_vec(),
            true,
        )
        .await;
        assert!(
            serde_json::from_str::<Response>(reply.trim_end())
                .unwrap()
                .ok
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_client_is_cut_off_and_frees_its_slot() {
        let h = start(|c| {
            c.read_timeout = Duration::from_millis(300);
            c.max_connections = 1;
        })
        .await;
        let path = h.path.clone();
        let slow = tokio::task::spawn_blocking(move || {
            let mut s = StdStream::connect(&path).unwrap();
            s.write_all(b"{\"version\":1,").unwrap(); // and nothing more
            let mut out = String::new();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let _ = s.read_to_string(&mut out);
            out
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        // While the slow one holds the only slot, others are told the daemon is busy.
        let busy = raw(
            &h.path,
            b"{\"version\":1,\"cmd\":\"status\"}\n".to_vec(),
            false,
        )
        .await;
        assert!(error_of(&busy).contains("busy"), "{busy}");
        let reply = slow.await.unwrap();
        assert!(error_of(&reply).contains("no complete request"), "{reply}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(ask(&h.path, Request::Status).await.unwrap().ok);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn engine_that_drops_or_stalls_gives_an_error_not_a_hang() {
        let h = start(|c| c.reply_timeout = Duration::from_millis(300)).await;
        let e = ask(&h.path, Request::ModelReset)
            .await
            .unwrap()
            .into_result()
            .unwrap_err();
        assert!(e.contains("dropped the model_reset request"), "{e}");
        let e = ask(&h.path, Request::ModelSave)
            .await
            .unwrap()
            .into_result()
            .unwrap_err();
        assert!(e.contains("did not answer model_save"), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn live_daemon_on_the_socket_is_a_startup_error() {
        let h = start(|_| {}).await;
        let err = ControlServer::bind(ServerConfig {
            socket: h.path.clone(),
            ..ServerConfig::default()
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "another precedent daemon is running (socket {})",
                h.path.display()
            )
        );
        // The probe did not disturb the running one.
        assert!(ask(&h.path, Request::Status).await.unwrap().ok);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists(), "a dead daemon's socket file stays behind");
        let e = ask(&path, Request::Status).await.unwrap_err();
        assert!(matches!(e, ClientError::Refused { .. }), "{e}");
        let server = ControlServer::bind(ServerConfig {
            socket: path.clone(),
            ..ServerConfig::default()
        })
        .unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        let stop = CancellationToken::new();
        tokio::spawn(server.run(tx, stop.clone()));
        tokio::spawn(async move {
            while let Some(r) = rx.recv().await {
                ControlRequest::respond(r, Response::ok("fresh"));
            }
        });
        let data = ask(&path, Request::Status)
            .await
            .unwrap()
            .into_result()
            .unwrap();
        assert_eq!(data, "fresh");
        stop.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn regular_file_in_the_way_is_not_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        fs::write(&path, "important").unwrap();
        let err = ControlServer::bind(ServerConfig {
            socket: path.clone(),
            ..ServerConfig::default()
        })
        .unwrap_err();
        assert!(matches!(err, ControlError::NotASocket { .. }), "{err}");
        assert_eq!(fs::read_to_string(&path).unwrap(), "important");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_removes_the_socket_and_clients_say_not_running() {
        let h = start(|_| {}).await;
        h.shutdown.cancel();
        h.server.await.unwrap();
        assert!(!h.path.exists());
        let e = ask(&h.path, Request::Status).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "precedent daemon is not running (socket {} not found)",
                h.path.display()
            )
        );
    }

    #[test]
    fn only_root_and_own_user_are_allowed() {
        assert!(peer_allowed(0, 1000));
        assert!(peer_allowed(1000, 1000));
        assert!(!peer_allowed(1001, 1000));
        assert!(!peer_allowed(65534, 0));
    }

    /// Connects from a thread whose credentials are switched to nobody with the raw syscall
    /// (per-thread on Linux, unlike glibc's setuid which changes every thread).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs root: run with `cargo xtask test`"]
    async fn non_root_peer_is_refused() {
        assert_eq!(unsafe { libc::geteuid() }, 0, "run as root");
        let h = start(|_| {}).await;
        let parent = h.path.parent().unwrap();
        // Open the file modes so only the peer-credential check stands in the way.
        for p in [h._dir.path(), parent] {
            fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
        }
        let as_nobody = |path: PathBuf, open_socket: bool| {
            if open_socket {
                fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
            } else {
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            }
            std::thread::spawn(move || {
                let rc = unsafe { libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534) };
                assert_eq!(rc, 0);
                ControlClient::new(path)
                    .with_timeout(Duration::from_secs(10))
                    .request(&Request::Status)
            })
            .join()
            .unwrap()
        };
        let p = h.path.clone();
        let resp = tokio::task::spawn_blocking(move || as_nobody(p, true))
            .await
            .unwrap()
            .unwrap();
        let e = resp.into_result().unwrap_err();
        assert!(e.contains("only root"), "{e}");
        // With the real mode the kernel stops it first, and the client says what to do.
        let p = h.path.clone();
        let e = tokio::task::spawn_blocking(move || as_nobody(p, false))
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(e, ClientError::PermissionDenied { .. }), "{e}");
        assert!(e.to_string().contains("run this command as root"), "{e}");
        // And root still gets through.
        assert!(ask(&h.path, Request::Status).await.unwrap().ok);
    }
}
