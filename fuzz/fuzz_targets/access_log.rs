//! Access-log lines (`combined`, `common`) and `jsonl` exports, as `precedent replay` reads them:
//! every line of the input through all three line parsers. A record must be well formed; a bad
//! line must be a named skip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use precedent::{
    http::HttpConfig,
    replay::{Origin, ReplayRecord, formats::LineParser},
};

fuzz_target!(|data: &[u8]| {
    let config = HttpConfig::default();
    let max_path = config.max_path_len;
    let mut parser = LineParser::new(config);
    for (i, line) in data.split(|&b| b == b'\n').enumerate() {
        let origin = Origin {
            file: 0,
            pos: i as u64 + 1,
        };
        let check = |r: &ReplayRecord| {
            assert!(r.path.starts_with('/') && r.path.len() <= max_path);
            assert_eq!(r.origin, origin);
        };
        let combined = parser.clf(line, true, origin);
        let common = parser.clf(line, false, origin);
        if let Ok(r) = &combined {
            check(r);
            // A combined line is a common line with two more fields.
            assert_eq!(
                common.as_ref().ok(),
                Some(r),
                "combined line rejected as common"
            );
        }
        if let Ok(r) = &common {
            check(r);
            assert!(r.headers.is_empty() && r.session.is_none());
        }
        if let Ok(r) = parser.jsonl(line, origin) {
            check(&r);
        }
    }
});
