//! Agent specs as the API receives them (protobuf off the wire), through defaults and
//! validation as `CreateAgent` runs them. Validation must not panic, must decide the same way
//! twice, must name a field when it refuses, and what it accepts must still be accepted after
//! a round trip through the wire.
#![no_main]

use berth_proto::v1::AgentSpec;
use berth_proto::{defaults, validate};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(mut spec) = AgentSpec::decode(data) else {
        return;
    };
    let limits = validate::Limits {
        volume_root: "/var/lib/berth/volumes".into(),
    };
    defaults::apply(&mut spec);
    let verdict = validate::spec(&spec, &limits);
    assert_eq!(
        verdict,
        validate::spec(&spec, &limits),
        "validation is not deterministic"
    );
    match verdict {
        Err(refused) => assert!(
            !refused.field.is_empty(),
            "a refusal without a field: {refused}"
        ),
        Ok(()) => {
            let again = AgentSpec::decode(spec.encode_to_vec().as_slice()).expect("re-decodes");
            assert_eq!(
                validate::spec(&again, &limits),
                Ok(()),
                "accepted, then refused after a round trip"
            );
        }
    }
});
