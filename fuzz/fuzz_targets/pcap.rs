//! Packet captures (pcap, pcapng, gzipped or not) through `precedent replay`'s reader: the
//! bytes are written to a file and replayed in full. Whatever the bytes, the replay must end
//! with records in timestamp order and a summary that adds up, never a panic or a hang.
#![no_main]

use std::{path::PathBuf, sync::OnceLock};

use libfuzzer_sys::fuzz_target;
use precedent::replay::{Format, Replay, ReplayOptions};

/// One file per fuzzing process, rewritten for every input. In memory where there is a tmpfs:
/// on ext4, truncating and rewriting a file flushes it (auto_da_alloc), 40 times slower.
fn scratch() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        dir.join(format!("precedent-fuzz-pcap-{}", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let path = scratch();
    std::fs::write(path, data).expect("writing the scratch capture");
    let opts = ReplayOptions {
        format: Some(Format::Pcap),
        ..ReplayOptions::default()
    };
    // A file that is text (a log) is refused up front, with the reason.
    let Ok(mut replay) = Replay::open(&[path], &opts) else {
        return;
    };
    let mut records = 0u64;
    let mut last_ts = 0;
    for r in replay.by_ref() {
        assert!(r.ts_ns >= last_ts, "records out of timestamp order");
        last_ts = r.ts_ns;
        match &r.conflict {
            // Two disagreeing copies of one place, after the request analysed of them.
            Some(c) => assert!(!c.analysed.is_empty() && c.analysed != c.replaced),
            None => {
                assert!(r.path.starts_with('/'));
                records += 1;
            }
        }
    }
    let s = replay.finish();
    assert_eq!(s.records, records);
    assert_eq!(s.skipped_total, s.skipped.values().sum::<u64>());
    assert!(s.errors.len() <= 1, "one file, at most one read error");
});
