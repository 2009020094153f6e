//! Manifests as `berth apply -f` reads them: any text, through YAML parsing, the manifest's
//! fields and quantities, into specs, then the API's defaults and validation. Nothing may
//! panic; a refusal is an error message, never empty.
#![no_main]

use berth_proto::{defaults, manifest, validate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let limits = validate::Limits {
        volume_root: "/var/lib/berth/volumes".into(),
    };
    match manifest::parse_all(text) {
        Err(message) => assert!(!message.is_empty(), "a refusal without a message"),
        Ok(specs) => {
            for mut spec in specs {
                defaults::apply(&mut spec);
                let _ = validate::spec(&spec, &limits);
            }
        }
    }
});
