//! A minimal HTTP/1.1 server on a background thread: answers every request with 200 and a
//! short body, reads Content-Length and chunked bodies, honours keep-alive and pipelining,
//! and counts what it served. Just enough to give real TCP connections something to talk to.
use std::{
    io::{BufRead, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

pub struct HttpServer {
    pub addr: SocketAddr,
    served: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

/// Answers a request: (status code, JSON body).
pub type Handler = fn(method: &str, path: &str) -> (u16, String);

fn ok_handler(_: &str, _: &str) -> (u16, String) {
    (200, "ok".into())
}

impl HttpServer {
    /// Answers every request with 200 "ok".
    pub fn start(addr: SocketAddr) -> anyhow::Result<Self> {
        Self::start_with(addr, ok_handler)
    }

    /// Answers with `handler`.
    pub fn start_with(addr: SocketAddr, handler: Handler) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let served = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (served.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let s = s.clone();
                        std::thread::spawn(move || serve(conn, &s, handler));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Self { addr, served, stop })
    }

    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(conn: TcpStream, served: &AtomicU64, handler: Handler) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut writer = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(conn);
    loop {
        // Request line and headers up to the blank line; then the body by Content-Length.
        let mut head = Vec::new();
        loop {
            let mut line = Vec::new();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let blank = line == b"\r\n" || line == b"\n";
            if blank && head.is_empty() {
                // Empty lines before a request line are skipped, as nginx does (RFC 9112 §2.2).
                continue;
            }
            head.extend_from_slice(&line);
            if blank {
                break;
            }
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        if !matches!(req.parse(&head), Ok(httparse::Status::Complete(_))) {
            let _ = writer.write_all(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            return;
        }
        let header = |name: &str| {
            req.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).to_string())
        };
        let chunked =
            header("transfer-encoding").is_some_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
        let body_len: usize = header("content-length")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let body_read = if chunked {
            read_chunked(&mut reader)
        } else {
            let mut body = vec![0; body_len.min(1 << 20)];
            reader.read_exact(&mut body).is_ok()
        };
        if !body_read {
            return;
        }
        served.fetch_add(1, Ordering::Relaxed);
        let conn_hdr = if close { "close" } else { "keep-alive" };
        let (code, body) = handler(req.method.unwrap_or(""), req.path.unwrap_or(""));
        let reason = if code == 200 { "OK" } else { "Not Found" };
        let resp = format!(
            "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: {conn_hdr}\r\n\r\n{body}",
            body.len()
        );
        if writer.write_all(resp.as_bytes()).is_err() || close {
            return;
        }
    }
}

/// Reads a chunked body to its end (chunks, the last chunk, trailer fields, the empty line);
/// false when the stream ends or a size is not hex.
fn read_chunked(reader: &mut impl BufRead) -> bool {
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return false;
        }
        let size = line.trim_end().split(';').next().unwrap_or_default();
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            return false;
        };
        if size == 0 {
            break;
        }
        let mut data = vec![0; size.min(1 << 20) + 2];
        if reader.read_exact(&mut data).is_err() {
            return false;
        }
    }
    // Trailer fields up to the empty line.
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return false;
        }
        if line == "\r\n" || line == "\n" {
            return true;
        }
    }
}
