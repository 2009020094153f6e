//! API tokens with scopes against a real control plane and etcd: a read-only token reads and
//! is refused writes, a node token opens only its own node's stream, tokens are stored hashed
//! and listed without secrets, and a revoked token is refused.

use berth_tests::{
    end_of, eventually, open_node_session, open_node_stream, output_text as text, unique_name,
    ControlPlane, Etcd,
};
use std::time::Duration;
use tonic::transport::Channel;

/// The node-agent stream opened with `token` as `node`: the first control message, or the
/// status the control plane refused it with.
async fn connect_as(
    cp: &ControlPlane,
    token: &str,
    node: &str,
) -> Result<berth_proto::v1::ControlMessage, tonic::Status> {
    let channel = Channel::from_shared(cp.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    open_node_stream(channel, token, node).await
}

#[tokio::test]
async fn scoped_tokens_allow_what_their_scope_allows_and_nothing_else() {
    let etcd = Etcd::start().await.unwrap();
    let cp = ControlPlane::start(&etcd.url()).await.unwrap();
    let as_token = |token: &str, args: &[&str]| {
        cp.cli_command(args)
            .env("BERTH_TOKEN", token)
            .output()
            .unwrap()
    };
    let create = |args: &[&str]| cp.create_token(args);
    let read_only = create(&["--scope", "read-only", "--description", "dashboards"]);
    let node_name = unique_name("n1");
    let node = create(&["--scope", "node", "--node", &node_name]);
    assert!(read_only.starts_with("bt_") && read_only.contains('.'));

    let name = unique_name("tok");
    let out = cp.cli(&["deploy", "-n", &name, "-i", "example/echo:1"]);
    assert!(out.status.success(), "{}", text(&out));

    // Read-only: reads pass, writes are refused and change nothing.
    assert!(as_token(&read_only, &["ls"]).status.success());
    assert!(as_token(&read_only, &["get", &name]).status.success());
    assert!(as_token(&read_only, &["nodes"]).status.success());
    let out = as_token(&read_only, &["rm", &name]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("a read-only token may not call /berth.v1.AgentService/DeleteAgent"),
        "{}",
        text(&out)
    );
    assert!(cp.cli(&["get", &name]).status.success(), "still there");
    let out = as_token(&read_only, &["token", "create", "--scope", "admin"]);
    assert!(!out.status.success(), "a read-only token makes no tokens");

    // Node: only its own node's stream.
    let out = as_token(
        &node,
        &["deploy", "-n", &unique_name("x"), "-i", "example/echo:1"],
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("a node token may not call /berth.v1.AgentService/CreateAgent"),
        "{}",
        text(&out)
    );
    let other = connect_as(&cp, &node, "someone-else").await.unwrap_err();
    assert_eq!(other.code(), tonic::Code::PermissionDenied, "{other:?}");
    assert!(other.message().contains(&node_name), "{other:?}");
    connect_as(&cp, &node, &node_name)
        .await
        .expect("its own node's stream opens");
    let refused = connect_as(&cp, &read_only, &node_name).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);

    // Stored hashed, listed without secrets.
    let mut kv = etcd.client().await.unwrap();
    let stored = kv
        .get(
            "/berth/tokens/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert_eq!(stored.kvs().len(), 2);
    let secret_part = |t: &str| t.split_once('.').unwrap().1.to_string();
    for kv in stored.kvs() {
        let value = String::from_utf8_lossy(kv.value());
        assert!(!value.contains(&secret_part(&read_only)) && !value.contains(&secret_part(&node)));
    }
    let listed = text(&cp.cli(&["token", "ls"]));
    assert!(
        listed.contains("read-only")
            && listed.contains(&node_name)
            && listed.contains("dashboards")
    );
    assert!(!listed.contains(&secret_part(&read_only)), "{listed}");
    assert!(!cp.log().contains(&secret_part(&read_only)), "never logged");

    // Revoked: refused from then on.
    let id = read_only.split_once('.').unwrap().0;
    let out = cp.cli(&["token", "revoke", id]);
    assert!(out.status.success(), "{}", text(&out));
    eventually(Duration::from_secs(5), "the revoked token refused", || {
        let out = as_token(&read_only, &["ls"]);
        async move { (!out.status.success() && text(&out).contains("invalid token")).then_some(()) }
    })
    .await
    .unwrap();
    let out = cp.cli(&["token", "create", "--scope", "node"]);
    assert!(!out.status.success(), "a node token needs --node");
}

/// How long after its token's revocation an open stream ends: within a second, or the test
/// fails.
const REVOKED_WITHIN: Duration = Duration::from_secs(1);

#[tokio::test]
async fn revoking_a_token_ends_the_streams_opened_with_it() {
    use berth_proto::v1::agent_service_client::AgentServiceClient;
    use berth_proto::v1::WatchEventsRequest;
    use std::time::Instant;
    let etcd = Etcd::start().await.unwrap();
    let cp = ControlPlane::start(&etcd.url()).await.unwrap();
    let create = |args: &[&str]| cp.create_token(args);
    let read_only = create(&["--scope", "read-only"]);
    let node_name = unique_name("n");
    let node = create(&["--scope", "node", "--node", &node_name]);
    let channel = Channel::from_shared(cp.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let bearer = |token: &str| {
        let value: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
        move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", value.clone());
            Ok(r)
        }
    };
    let revoke = |token: &str| {
        let out = cp.cli(&["token", "revoke", token.split_once('.').unwrap().0]);
        assert!(out.status.success(), "{}", text(&out));
        Instant::now()
    };

    // Events, followed with a read-only token.
    let mut events = AgentServiceClient::with_interceptor(channel.clone(), bearer(&read_only))
        .watch_events(WatchEventsRequest {
            follow: true,
            ..Default::default()
        })
        .await
        .expect("the stream opens")
        .into_inner();
    let revoked = revoke(&read_only);
    let ended = end_of(&mut events).await;
    let took = revoked.elapsed();
    eprintln!("events stream ended {took:?} after the revocation: {ended:?}");
    assert_eq!(ended.map(|s| s.code()), Some(tonic::Code::Unauthenticated));
    assert!(took < REVOKED_WITHIN, "{took:?}");

    // The node-agent stream of a node token: no more assignments or secrets after it.
    let mut session = open_node_session(channel, &node, &node_name)
        .await
        .expect("its node's stream opens");
    let revoked = revoke(&node);
    let ended = end_of(&mut session.inbound).await;
    let took = revoked.elapsed();
    eprintln!("node stream ended {took:?} after the revocation: {ended:?}");
    assert_eq!(ended.map(|s| s.code()), Some(tonic::Code::Unauthenticated));
    assert!(took < REVOKED_WITHIN, "{took:?}");
    drop(session);
    let again = connect_as(&cp, &node, &node_name).await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::Unauthenticated, "{again:?}");
}
