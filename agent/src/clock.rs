//! The two clocks precedent deals in. The kernel stamps events and block expiries with
//! CLOCK_MONOTONIC (`bpf_ktime_get_ns`); people and logs want wall time.

fn read(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and out-pointer; these clocks cannot fail on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

/// CLOCK_MONOTONIC now, in nanoseconds: the clock the XDP program compares expiries with.
pub fn monotonic_ns() -> u64 {
    read(libc::CLOCK_MONOTONIC) as u64
}

/// Unix time now, in nanoseconds.
pub fn unix_ns() -> u64 {
    read(libc::CLOCK_REALTIME) as u64
}

/// CLOCK_REALTIME − CLOCK_MONOTONIC: add to a kernel timestamp to get Unix nanoseconds.
pub fn mono_to_unix_offset_ns() -> i128 {
    read(libc::CLOCK_REALTIME) - read(libc::CLOCK_MONOTONIC)
}

/// The daemon's one timeline: CLOCK_MONOTONIC moved to Unix time by the offset of the moment
/// it started. Capture timestamps (kernel, monotonic) and the "now" that expires sessions and
/// waiting requests must be on the same clock: with the wall clock for the one and the
/// kernel's for the other, a wall-clock step (NTP correcting a VM's clock at boot, by
/// minutes) made every session look idle at once, then again at every maintenance tick, and
/// every request waiting for its acknowledgement look timed out. Steps since the start show
/// as [`Timeline::drift_ns`]; times on the timeline are off wall time by that much.
#[derive(Debug, Clone, Copy)]
pub struct Timeline {
    offset: i128,
}

impl Timeline {
    pub fn start() -> Self {
        Timeline {
            offset: mono_to_unix_offset_ns(),
        }
    }

    /// Now, on the timeline (Unix nanoseconds as of the start, moving with the monotonic clock).
    pub fn now_ns(&self) -> u64 {
        self.from_kernel(monotonic_ns())
    }

    /// A kernel timestamp (CLOCK_MONOTONIC) on the timeline.
    pub fn from_kernel(&self, ts_ns: u64) -> u64 {
        (ts_ns as i128 + self.offset).max(0) as u64
    }

    /// The offset the timeline converts with (for [`crate::capture::CapturedRequest::decode`]).
    pub fn offset_ns(&self) -> i128 {
        self.offset
    }

    /// How far the wall clock has been stepped since the start (positive: forward).
    pub fn drift_ns(&self) -> i128 {
        mono_to_unix_offset_ns() - self.offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeline_follows_the_monotonic_clock_from_the_wall_time_it_started_at() {
        let t = Timeline::start();
        let wall = unix_ns() as i128;
        assert!((t.now_ns() as i128 - wall).abs() < 1_000_000_000);
        let k = monotonic_ns();
        assert_eq!(t.from_kernel(k + 5), t.from_kernel(k) + 5);
        assert!(t.drift_ns().abs() < 1_000_000_000);
        // A timeline started an hour "earlier" (as if the wall clock stepped forward an hour
        // since) reads an hour behind, and says so.
        let stepped = Timeline {
            offset: t.offset - 3_600_000_000_000,
        };
        assert!((stepped.drift_ns() - 3_600_000_000_000).abs() < 1_000_000_000);
        assert!(t.now_ns() - stepped.now_ns() >= 3_599_000_000_000);
    }
}
