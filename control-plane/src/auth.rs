//! Bearer-token authentication and scopes for every gRPC call, as one tower layer in front of
//! all routes. Tokens are kept as SHA-256 hashes and compared in constant time. The token
//! file's tokens are admin tokens and the join-token file's admit node agents under any name;
//! tokens made through `TokenService` carry a scope (admin, read-only, or node bound to one
//! node name) and live in etcd, mirrored here by a watch so that a revoked token is refused
//! within a second. The caller's [`Principal`] goes into the request's extensions.

pub use berth_store::token_mirror::{
    token_hash, IssuedTokens, Principal, TokenFileError, TokenSet,
};
use futures::future::BoxFuture;
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::Status;
use tower::{Layer, Service};

/// The calls a read-only token may make.
const READ_ONLY_METHODS: &[&str] = &[
    "/berth.v1.AgentService/GetAgent",
    "/berth.v1.AgentService/ListAgents",
    "/berth.v1.AgentService/WatchEvents",
    "/berth.v1.AgentService/StreamLogs",
    "/berth.v1.NodeService/ListNodes",
    "/berth.v1.NodeService/GetNode",
    "/berth.v1.NodeService/ListDeniedNodes",
    "/berth.v1.RequestService/ListRequests",
    "/berth.v1.RequestService/GetRequest",
];

/// Every token the control plane accepts.
#[derive(Clone, Default)]
pub struct Tokens {
    /// Admin tokens from the token file: every API call.
    pub admin: TokenSet,
    /// Join tokens from the join-token file: only `NodeAgentService`, under any node name.
    pub join: TokenSet,
    /// Tokens made through `TokenService`.
    pub issued: IssuedTokens,
}

impl Tokens {
    /// Checks the `authorization` header for the gRPC method at `path`: who is calling, or
    /// UNAUTHENTICATED (no or unknown token) or PERMISSION_DENIED (a scope that does not
    /// allow the call). Health checks need no token (`None`).
    pub(crate) fn authorize(
        &self,
        path: &str,
        headers: &http::HeaderMap,
    ) -> Result<Option<(Principal, Option<String>)>, Status> {
        // Health checks are open so that load balancers and orchestrators can probe.
        if path.starts_with("/grpc.health.v1.Health/") {
            return Ok(None);
        }
        let token = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let Some(token) = token else {
            return Err(Status::unauthenticated(
                "missing credentials: send `authorization: Bearer <token>` (berth: set BERTH_TOKEN or --token)",
            ));
        };
        // A token made through TokenService can be revoked while its calls run.
        let (principal, revocable) = if self.admin.contains(token) {
            (Principal::Admin, None)
        } else if self.join.contains(token) {
            (Principal::Node(None), None)
        } else if let Some(principal) = self.issued.principal(token) {
            (principal, Some(token.to_string()))
        } else {
            return Err(Status::unauthenticated("invalid token"));
        };
        let node_stream = path.starts_with("/berth.v1.NodeAgentService/");
        let allowed = match &principal {
            Principal::Node(_) => node_stream,
            Principal::Admin => !node_stream,
            Principal::ReadOnly => {
                READ_ONLY_METHODS.contains(&path) || path.starts_with("/grpc.reflection.")
            }
        };
        if !allowed {
            let what = if node_stream {
                "the node-agent stream needs a join or node token"
            } else {
                "not allowed"
            };
            return Err(Status::permission_denied(format!(
                "a {} token may not call {path}: {what}",
                principal.scope_name()
            )));
        }
        Ok(Some((principal, revocable)))
    }
}

/// The tower layer that refuses unauthenticated calls before they reach a service.
#[derive(Clone)]
pub struct AuthLayer(Arc<Tokens>);

impl AuthLayer {
    /// A layer accepting `tokens`.
    pub fn new(tokens: Tokens) -> Self {
        Self(Arc::new(tokens))
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            tokens: self.0.clone(),
        }
    }
}

/// The service made by [`AuthLayer`].
#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    tokens: Arc<Tokens>,
}

impl<S, B> Service<http::Request<B>> for Auth<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        match self
            .tokens
            .authorize(request.uri().path(), request.headers())
        {
            Ok(None) => Box::pin(self.inner.call(request)),
            Ok(Some((principal, revocable))) => {
                request.extensions_mut().insert(principal);
                let call = self.inner.call(request);
                let Some(token) = revocable else {
                    return Box::pin(call);
                };
                // Its answer (a stream above all: the node-agent stream, events, logs) ends
                // as soon as the token is revoked.
                let revoked = Box::pin(self.tokens.issued.revoked(&token));
                Box::pin(async move {
                    let response = call.await?;
                    Ok(response.map(|body| tonic::body::Body::new(Revocable { body, revoked })))
                })
            }
            Err(status) => {
                tracing::debug!(path = request.uri().path(), code = ?status.code(), "call refused");
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

/// A response body that ends with `UNAUTHENTICATED` ("token revoked") in its trailers once
/// the token it was opened with is revoked.
struct Revocable {
    body: tonic::body::Body,
    revoked: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
}

impl http_body::Body for Revocable {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if self.revoked.as_mut().poll(cx).is_ready() {
            if self.body.is_end_stream() {
                return Poll::Ready(None);
            }
            // Ends the stream here: the trailers carry why, and the body is not read again.
            self.body = tonic::body::Body::empty();
            let status = Status::unauthenticated("token revoked");
            let mut trailers = http::HeaderMap::new();
            let _ = status.add_header(&mut trailers);
            return Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))));
        }
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_proto::v1::{StoredToken, TokenScope};
    use futures::FutureExt;

    fn set(tokens: &[&str]) -> TokenSet {
        TokenSet::from_tokens(tokens)
    }

    fn headers(value: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, value.parse().unwrap());
        h
    }

    #[test]
    fn admin_and_join_tokens_open_their_own_paths_only() {
        let tokens = Tokens {
            admin: set(&["admin-token-0123456789"]),
            join: set(&["join-token-0123456789"]),
            issued: IssuedTokens::default(),
        };
        let agent = "/berth.v1.AgentService/GetAgent";
        let node = "/berth.v1.NodeAgentService/Connect";
        assert!(tokens
            .authorize(agent, &headers("Bearer admin-token-0123456789"))
            .is_ok());
        assert!(tokens
            .authorize(agent, &headers("Bearer join-token-0123456789"))
            .is_err());
        assert!(tokens
            .authorize(node, &headers("Bearer join-token-0123456789"))
            .is_ok());
        assert!(tokens
            .authorize(node, &headers("Bearer admin-token-0123456789"))
            .is_err());
        assert!(tokens.authorize(agent, &http::HeaderMap::new()).is_err());
        assert!(tokens
            .authorize(agent, &headers("Basic admin-token-0123456789"))
            .is_err());
        assert!(tokens
            .authorize("/grpc.health.v1.Health/Check", &http::HeaderMap::new())
            .is_ok());
    }

    #[test]
    fn issued_tokens_carry_their_scope() {
        use berth_proto::v1::Token;
        let issued = IssuedTokens::default();
        let stored = |id: &str, scope: TokenScope, node: &str, secret: &str| StoredToken {
            token: Some(Token {
                id: id.into(),
                scope: scope as i32,
                node: node.into(),
                ..Default::default()
            }),
            sha256: token_hash(&format!("{id}.{secret}")).to_vec(),
        };
        issued.put(&stored("bt_ro", TokenScope::ReadOnly, "", "s1"));
        issued.put(&stored("bt_n1", TokenScope::Node, "n1", "s2"));
        let tokens = Tokens {
            issued: issued.clone(),
            ..Default::default()
        };
        let call =
            |path: &str, token: &str| tokens.authorize(path, &headers(&format!("Bearer {token}")));
        let get = "/berth.v1.AgentService/GetAgent";
        let delete = "/berth.v1.AgentService/DeleteAgent";
        let connect = "/berth.v1.NodeAgentService/Connect";
        assert_eq!(
            call(get, "bt_ro.s1").unwrap(),
            Some((Principal::ReadOnly, Some("bt_ro.s1".into())))
        );
        assert_eq!(
            call(delete, "bt_ro.s1").unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            call(connect, "bt_ro.s1").unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            call(get, "bt_ro.wrong").unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            call(connect, "bt_n1.s2").unwrap(),
            Some((Principal::Node(Some("n1".into())), Some("bt_n1.s2".into())))
        );
        assert_eq!(
            call(get, "bt_n1.s2").unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        // Calls with it end when it is revoked, not when another token is.
        let mut revoked = Box::pin(issued.revoked("bt_n1.s2"));
        issued.remove("bt_other");
        assert!((&mut revoked).now_or_never().is_none(), "still valid");
        issued.remove("bt_n1");
        assert!(revoked.now_or_never().is_some(), "revoked");
        issued.remove("bt_ro");
        assert_eq!(
            call(get, "bt_ro.s1").unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn token_files_skip_comments_and_refuse_short_tokens() {
        let dir = std::env::temp_dir().join(format!("berth-auth-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good");
        std::fs::write(
            &good,
            "# admins\n\nfirst-token-0123456789\n  second-token-0123456789  \n",
        )
        .unwrap();
        let set = TokenSet::from_file(&good).unwrap();
        assert!(set.contains("first-token-0123456789"));
        assert!(set.contains("second-token-0123456789"));
        assert!(!set.contains("third-token-0123456789"));
        let short = dir.join("short");
        std::fs::write(&short, "ok-token-0123456789\nshort\n").unwrap();
        assert!(matches!(
            TokenSet::from_file(&short),
            Err(TokenFileError::TooShort { line: 2, .. })
        ));
        let empty = dir.join("empty");
        std::fs::write(&empty, "# nothing\n").unwrap();
        assert!(matches!(
            TokenSet::from_file(&empty),
            Err(TokenFileError::Empty { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
