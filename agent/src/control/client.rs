//! The CLI's side of the control socket: a blocking, one-request client with a deadline.
//!
//! Blocking std I/O on purpose: the CLI sends one request and exits, so it needs no runtime.
//! Every failure becomes a one-line message that names the socket and what to do.
use std::{
    io::{self, ErrorKind, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::{MAX_RESPONSE_BYTES, Request, Response, encode_request};

/// Longer than the server's reply timeout, so the daemon's own "did not answer" error wins.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(40);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("precedent daemon is not running (socket {} not found)", path.display())]
    NotRunning { path: PathBuf },
    #[error(
        "precedent daemon is not running (socket {} refuses connections: left by a daemon that stopped)",
        path.display()
    )]
    Refused { path: PathBuf },
    #[error(
        "permission denied on control socket {}: it is root-only; run this command as root (sudo)",
        path.display()
    )]
    PermissionDenied { path: PathBuf },
    #[error("precedent daemon did not answer within {}s (socket {})", timeout.as_secs(), path.display())]
    Timeout { path: PathBuf, timeout: Duration },
    #[error("control socket {}: {error}", path.display())]
    Io { path: PathBuf, error: io::Error },
    #[error("unexpected reply from the daemon on {}: {detail}", path.display())]
    Protocol { path: PathBuf, detail: String },
}

#[derive(Debug, Clone)]
pub struct ControlClient {
    path: PathBuf,
    timeout: Duration,
}

impl ControlClient {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ControlClient {
            path: path.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends one request and waits (at most the timeout, overall) for the response. A
    /// response with `ok: false` is returned as `Ok`: it is the daemon's answer.
    pub fn request(&self, request: &Request) -> Result<Response, ClientError> {
        let deadline = Instant::now() + self.timeout;
        let mut stream = UnixStream::connect(&self.path).map_err(|e| self.connect_error(e))?;
        stream
            .set_write_timeout(Some(self.timeout))
            .map_err(|e| self.io(e))?;
        // The server may refuse before reading (peer check, oversize request) and close: the
        // write then fails with EPIPE but its error reply is waiting to be read.
        let write_error = stream.write_all(&encode_request(request)).err();
        if let Some(e) = write_error.as_ref()
            && !matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset)
        {
            return Err(self.io(write_error.expect("checked above")));
        }
        // Our half-close tells the server nothing more is coming.
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let mut buf = Vec::with_capacity(4096);
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.timed_out());
            }
            stream
                .set_read_timeout(Some(left))
                .map_err(|e| self.io(e))?;
            match stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.len() > MAX_RESPONSE_BYTES {
                        return Err(
                            self.protocol(format!("reply larger than {MAX_RESPONSE_BYTES} bytes"))
                        );
                    }
                    if buf.last() == Some(&b'\n') {
                        break;
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(self.timed_out());
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io(e)),
            }
        }
        if buf.is_empty() {
            return Err(match write_error {
                Some(e) => self.io(e),
                None => self.protocol("the daemon closed the connection without a reply".into()),
            });
        }
        serde_json::from_slice(&buf).map_err(|e| self.protocol(e.to_string()))
    }

    fn connect_error(&self, e: io::Error) -> ClientError {
        let path = self.path.clone();
        match e.kind() {
            ErrorKind::NotFound => ClientError::NotRunning { path },
            ErrorKind::ConnectionRefused => ClientError::Refused { path },
            ErrorKind::PermissionDenied => ClientError::PermissionDenied { path },
            _ => ClientError::Io { path, error: e },
        }
    }

    fn io(&self, error: io::Error) -> ClientError {
        ClientError::Io {
            path: self.path.clone(),
            error,
        }
    }

    fn timed_out(&self) -> ClientError {
        ClientError::Timeout {
            path: self.path.clone(),
            timeout: self.timeout,
        }
    }

    fn protocol(&self, detail: String) -> ClientError {
        ClientError::Protocol {
            path: self.path.clone(),
            detail,
        }
    }
}

/// One request to the daemon at `socket` with the default timeout.
pub fn request(socket: impl Into<PathBuf>, request: &Request) -> Result<Response, ClientError> {
    ControlClient::new(socket).request(request)
}
