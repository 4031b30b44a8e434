//! Small pieces the daemon tests share: a scratch directory removed on drop, the config file
//! they hand the daemon, one request to the test banking API, and polling.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// A directory under the system temp dir, unique per test and process, emptied on creation
/// (leftovers of a killed run) and removed on drop. Derefs to its path.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!("precedent-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("creating a scratch directory");
        Self(d)
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `dir/precedent.toml` (text logs, then `body`) and returns its path as the
/// `--config` argument.
pub fn write_config(dir: &Path, body: &str) -> String {
    let p = dir.join("precedent.toml");
    std::fs::write(&p, format!("log_format = \"text\"\n{body}")).expect("writing the config");
    p.display().to_string()
}

/// One request with a bearer token on a fresh connection; the status line, or the error
/// kind (a blocked client times out after 800 ms).
pub fn request(
    target: SocketAddr,
    token: &str,
    method: &str,
    path: &str,
) -> Result<String, std::io::ErrorKind> {
    let mut s =
        TcpStream::connect_timeout(&target, Duration::from_millis(800)).map_err(|e| e.kind())?;
    s.set_read_timeout(Some(Duration::from_millis(800)))
        .map_err(|e| e.kind())?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: bank.test\r\nAuthorization: Bearer {token}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    );
    s.write_all(req.as_bytes()).map_err(|e| e.kind())?;
    status_line(&mut s)
}

/// One request sent in pieces, each its own TCP segment (no Nagle, a pause between writes),
/// as an attacker would to hide it from anything that reads one segment at a time; the
/// status line, or the error kind.
pub fn request_in_pieces(
    target: SocketAddr,
    pieces: &[&str],
) -> Result<String, std::io::ErrorKind> {
    let mut s =
        TcpStream::connect_timeout(&target, Duration::from_millis(800)).map_err(|e| e.kind())?;
    s.set_nodelay(true).map_err(|e| e.kind())?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.kind())?;
    for piece in pieces {
        s.write_all(piece.as_bytes()).map_err(|e| e.kind())?;
        std::thread::sleep(Duration::from_millis(40));
    }
    status_line(&mut s)
}

/// Reads the response to its end; its first line.
fn status_line(s: &mut TcpStream) -> Result<String, std::io::ErrorKind> {
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| e.kind())?;
    Ok(String::from_utf8_lossy(&buf)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// Polls `f` every 50 ms until it returns true or `timeout` passes; its last answer.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}
