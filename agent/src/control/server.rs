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
    #[error("control socket {}: {op}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
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
            move |source| ControlError::Io { path, op, source }
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
