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
