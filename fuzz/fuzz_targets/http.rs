//! The live path's HTTP request parser on any bytes a client can send (the XDP program hands
//! the daemon the first `capture_len` bytes of a TCP payload). A parsed request must keep the
//! promises the rest of the engine relies on; anything else must be a named skip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use precedent::http::{HttpConfig, OwnedRequest, Parser};

fuzz_target!(|data: &[u8]| {
    let mut parser = Parser::new(HttpConfig::default());
    let max_path = parser.config().max_path_len;
    let first = parser.parse(data).map(|r| {
        assert!(
            r.path.starts_with('/'),
            "path {:?} is not origin-form",
            r.path
        );
        assert!(r.path.len() <= max_path, "path over max_path_len");
        assert!(
            !r.path.contains(['#', '?']),
            "path keeps a query or fragment"
        );
        if let Some(q) = r.query {
            assert!(!q.contains('#'), "query keeps a fragment");
        }
        if let Some(h) = r.host {
            assert!(
                h.len() <= 255
                    && h.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b)),
                "host {h:?} has characters no host name has"
            );
        }
        for name in ["cookie", "authorization"] {
            for v in r.headers.get_all(name) {
                assert!(
                    !v.bytes().any(|b| b.is_ascii_control() && b != b'\t'),
                    "control byte in a kept header"
                );
            }
        }
        OwnedRequest::from(&r)
    });
    // The parser reuses a scratch buffer: a second parse must not see the first one's bytes.
    let again = parser.parse(data).map(|r| OwnedRequest::from(&r));
    assert_eq!(first, again, "parse is not repeatable with a reused parser");
});
