//! Conversions between std time and protobuf's well-known types.

use pbjson_types::{Duration as PbDuration, Timestamp};
use std::time::{Duration, SystemTime};

/// The current wall-clock time as a protobuf timestamp.
pub fn now() -> Timestamp {
    timestamp(SystemTime::now())
}

/// A protobuf timestamp of `time`.
pub fn timestamp(time: SystemTime) -> Timestamp {
    crate::timestamp(time)
}

/// A protobuf duration of `d`.
pub fn pb_duration(d: Duration) -> PbDuration {
    PbDuration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// A std duration, or `None` if the protobuf value is negative or malformed.
pub fn std_duration(d: &PbDuration) -> Option<Duration> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return None;
    }
    Some(Duration::new(d.seconds as u64, d.nanos as u32))
}

/// The wall-clock time of a protobuf timestamp (the epoch for negative or malformed values).
pub fn system_time(t: &Timestamp) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32)
}
