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
