use super::*;
use crate::defaults;
use crate::time::pb_duration;
use crate::v1::{HealthCheck, Resources, VolumeMount};

fn limits() -> Limits {
    Limits {
        volume_root: PathBuf::from("/var/lib/berth/volumes"),
    }
}

fn valid() -> AgentSpec {
    let mut spec = AgentSpec {
        name: "hello".into(),
        image: "example/echo:1".into(),
        ..Default::default()
    };
    defaults::apply(&mut spec);
    spec
}

fn field_of(edit: impl FnOnce(&mut AgentSpec)) -> String {
    let mut spec = valid();
    edit(&mut spec);
    spec::validate_ok_or_field(&spec)
}

mod spec {
    use super::*;
    pub fn validate_ok_or_field(s: &AgentSpec) -> String {
        match super::super::spec(s, &limits()) {
            Ok(()) => "ok".into(),
            Err(e) => e.field,
        }
    }
}

fn volume(source: &str, target: &str) -> VolumeMount {
    VolumeMount {
        source: source.into(),
        target: target.into(),
        read_only: false,
    }
}

#[test]
fn a_defaulted_minimal_spec_is_valid() {
    assert_eq!(field_of(|_| {}), "ok");
}

#[test]
fn names_must_be_dns_labels() {
    for bad in ["", "Bad_Name", "-x", "x-", &"a".repeat(64), "a.b"] {
        assert_eq!(field_of(|s| s.name = bad.into()), "spec.name", "{bad:?}");
    }
    for good in ["a", "echo-2", &"a".repeat(63)] {
        assert_eq!(field_of(|s| s.name = good.into()), "ok", "{good:?}");
    }
}

#[test]
fn images_must_be_references() {
    for bad in [
        "",
        "Echo",
        "acme/Echo",
        "a b",
        "echo:",
        "echo@sha256:xyz",
        ":tag",
        "-echo",
    ] {
        assert_eq!(field_of(|s| s.image = bad.into()), "spec.image", "{bad:?}");
    }
    for good in [
        "echo",
        "berth/echo-agent:local",
        "localhost:5000/a/b_c:v1.2",
        "ghcr.io/acme/bot@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    ] {
        assert_eq!(field_of(|s| s.image = good.into()), "ok", "{good:?}");
    }
}

#[test]
fn env_keys_are_identifiers() {
    assert_eq!(
        field_of(|s| {
            s.env.insert("1A".into(), "x".into());
        }),
        "spec.env[\"1A\"]"
    );
    assert_eq!(
        field_of(|s| {
            s.env.insert("A=B".into(), "x".into());
        }),
        "spec.env[\"A=B\"]"
    );
    assert_eq!(
        field_of(|s| {
            s.env.insert("A_1".into(), "x".into());
        }),
        "ok"
    );
}

#[test]
fn host_volumes_stay_under_the_root() {
    let cases = [
        (
            "/var/lib/berth/volumes/../../../etc",
            "spec.volumes[0].source",
        ),
        ("/etc", "spec.volumes[0].source"),
        ("/", "spec.volumes[0].source"),
        ("/var/run/docker.sock", "spec.volumes[0].source"),
        (
            "/var/lib/berth/volumes/docker.sock",
            "spec.volumes[0].source",
        ),
        ("/var/lib/berth/volumesX/a", "spec.volumes[0].source"),
        ("../x", "spec.volumes[0].source"),
        ("/var/lib/berth/volumes/hello", "ok"),
        ("named-volume", "ok"),
    ];
    for (source, want) in cases {
        assert_eq!(
            field_of(|s| s.volumes = vec![volume(source, "/data")]),
            want,
            "{source:?}"
        );
    }
    assert_eq!(
        field_of(|s| s.volumes = vec![volume("v", "relative")]),
        "spec.volumes[0].target"
    );
    assert_eq!(
        field_of(|s| s.volumes = vec![volume("v", "/")]),
        "spec.volumes[0].target"
    );
    assert_eq!(
        field_of(|s| s.volumes = vec![volume("v", "/data"), volume("w", "/data/")]),
        "spec.volumes[1].target"
    );
}

#[test]
fn resources_are_bounded() {
    let res = |cpu_millis, memory_bytes| {
        Some(Resources {
            cpu_millis,
            memory_bytes,
        })
    };
    assert_eq!(
        field_of(|s| s.resources = res(MAX_CPU_MILLIS + 1, 0)),
        "spec.resources.cpu_millis"
    );
    assert_eq!(
        field_of(|s| s.resources = res(500, 1024)),
        "spec.resources.memory_bytes"
    );
    assert_eq!(
        field_of(|s| s.resources = res(500, MAX_MEMORY_BYTES + 1)),
        "spec.resources.memory_bytes"
    );
    assert_eq!(field_of(|s| s.resources = res(500, 512 << 20)), "ok");
}

#[test]
fn ports_replicas_and_durations_are_checked() {
    assert_eq!(field_of(|s| s.port = 70000), "spec.port");
    assert_eq!(
        field_of(|s| s.replicas = Some(MAX_REPLICAS + 1)),
        "spec.replicas"
    );
    assert_eq!(
        field_of(|s| s.stop_grace = Some(pbjson_types::Duration {
            seconds: -1,
            nanos: 0
        })),
        "spec.stop_grace"
    );
    assert_eq!(
        field_of(|s| s.request_timeout = Some(pb_duration(Duration::from_secs(7200)))),
        "spec.request_timeout"
    );
}

#[test]
fn health_checks_are_checked() {
    let health = |path: &str, timeout: u64| {
        let mut spec = valid();
        spec.health = Some(HealthCheck {
            path: path.into(),
            ..Default::default()
        });
        defaults::apply(&mut spec);
        spec.health.as_mut().unwrap().timeout = Some(pb_duration(Duration::from_secs(timeout)));
        spec::validate_ok_or_field(&spec)
    };
    assert_eq!(health("health", 1), "spec.health.path");
    assert_eq!(health("/health", 60), "spec.health.timeout");
    assert_eq!(health("/health", 1), "ok");
}

#[test]
fn labels_and_tokens_are_checked() {
    assert_eq!(
        field_of(|s| {
            s.labels.insert("bad key".into(), "v".into());
        }),
        "spec.labels[\"bad key\"]"
    );
    assert_eq!(
        field_of(|s| {
            s.node_selector.insert("gpu".into(), "a b".into());
        }),
        "spec.node_selector[\"gpu\"]"
    );
    assert_eq!(
        field_of(|s| s.gateway_token = "short".into()),
        "spec.gateway_token"
    );
    assert_eq!(
        field_of(|s| s.gateway_token = "a-long-enough-secret".into()),
        "ok"
    );
}

#[test]
fn oversized_specs_are_refused() {
    assert_eq!(
        field_of(|s| s.args = vec!["x".repeat(MAX_SPEC_BYTES)]),
        "spec"
    );
}

#[test]
fn autoscale_defaults_fill_and_bounds_are_checked() {
    use crate::v1::AutoscaleSettings;
    let autoscaled = |a: AutoscaleSettings, replicas: Option<u32>| {
        let mut spec = AgentSpec {
            name: "hello".into(),
            image: "example/echo:1".into(),
            replicas,
            autoscale: Some(a),
            ..Default::default()
        };
        defaults::apply(&mut spec);
        spec
    };
    // Defaults: min 1, max 10, target 10, to zero after 5m; it starts with min replicas.
    let spec = autoscaled(AutoscaleSettings::default(), None);
    let a = spec.autoscale.unwrap();
    assert_eq!((a.min, a.max, a.target_concurrency), (Some(1), 10, 10));
    assert_eq!(
        a.scale_to_zero_after,
        Some(pb_duration(defaults::SCALE_TO_ZERO_AFTER))
    );
    assert_eq!(spec.replicas, Some(1));
    // min 0 starts with one replica; a count given is kept within [min, max].
    let zero = AutoscaleSettings {
        min: Some(0),
        ..Default::default()
    };
    assert_eq!(autoscaled(zero, None).replicas, Some(1));
    assert_eq!(autoscaled(zero, Some(0)).replicas, Some(0));
    assert_eq!(autoscaled(zero, Some(40)).replicas, Some(10));
    // A min above the default max raises the max.
    let big = AutoscaleSettings {
        min: Some(12),
        ..Default::default()
    };
    assert_eq!(autoscaled(big, None).autoscale.unwrap().max, 12);

    let field = |edit: &dyn Fn(&mut AutoscaleSettings)| {
        let mut spec = autoscaled(AutoscaleSettings::default(), None);
        edit(spec.autoscale.as_mut().unwrap());
        spec::validate_ok_or_field(&spec)
    };
    assert_eq!(field(&|_| {}), "ok");
    assert_eq!(field(&|a| a.max = MAX_REPLICAS + 1), "spec.autoscale.max");
    assert_eq!(field(&|a| a.min = Some(5)), "ok");
    assert_eq!(
        field(&|a| {
            a.min = Some(5);
            a.max = 4;
        }),
        "spec.autoscale.min"
    );
    assert_eq!(
        field(&|a| a.target_concurrency = MAX_TARGET_CONCURRENCY + 1),
        "spec.autoscale.target_concurrency"
    );
    assert_eq!(
        field(&|a| a.scale_to_zero_after = Some(pb_duration(Duration::from_millis(10)))),
        "spec.autoscale.scale_to_zero_after"
    );
    // Scale to zero needs the queue that keeps the waking requests.
    let mut spec = autoscaled(zero, None);
    spec.replay.as_mut().unwrap().disabled = true;
    let err = super::spec(&spec, &limits()).unwrap_err();
    assert_eq!(err.field, "spec.autoscale.min");
    assert!(err.reason.contains("replay"), "{}", err.reason);
}
