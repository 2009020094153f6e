//! Bearer-token authentication for every gRPC call, as one tower layer in front of all routes.
//! Tokens are kept as SHA-256 hashes and compared in constant time.

use futures::future::BoxFuture;
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};
use subtle::ConstantTimeEq;
use tonic::Status;
use tower::{Layer, Service};

/// Shortest token accepted in a token file.
pub const MIN_TOKEN_LEN: usize = 16;

/// A token file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// The file cannot be read.
    #[error("token file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A line holds a token that is too short.
    #[error("token file {path}, line {line}: a token needs at least {MIN_TOKEN_LEN} characters")]
    TooShort { path: String, line: usize },
    /// The file holds no token.
    #[error("token file {path} holds no token (one token per line; '#' starts a comment)")]
    Empty { path: String },
}

/// Hashes of the accepted tokens.
#[derive(Clone, Default)]
pub struct TokenSet(Vec<[u8; 32]>);

impl TokenSet {
    /// Reads one token per line; blank lines and lines starting with '#' are skipped.
    pub fn from_file(path: &Path) -> Result<Self, TokenFileError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: display.clone(),
            source,
        })?;
        let mut hashes = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let token = line.trim();
            if token.is_empty() || token.starts_with('#') {
                continue;
            }
            if token.len() < MIN_TOKEN_LEN {
                return Err(TokenFileError::TooShort {
                    path: display,
                    line: i + 1,
                });
            }
            hashes.push(hash(token));
        }
        if hashes.is_empty() {
            return Err(TokenFileError::Empty { path: display });
        }
        Ok(Self(hashes))
    }

    /// Whether `token` is one of the set. Every entry is compared, in constant time.
    pub fn contains(&self, token: &str) -> bool {
        let candidate = hash(token);
        self.0
            .iter()
            .fold(subtle::Choice::from(0), |found, h| {
                found | h.ct_eq(&candidate)
            })
            .into()
    }
}

fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Which token a gRPC path needs.
#[derive(Clone, Default)]
pub struct Tokens {
    /// Admin tokens: every API call.
    pub admin: TokenSet,
    /// Join tokens: only `NodeAgentService`.
    pub join: TokenSet,
}

impl Tokens {
    /// Checks the `authorization` header for the gRPC method at `path`.
    fn authorize(&self, path: &str, headers: &http::HeaderMap) -> Result<(), Status> {
        // Health checks are open so that load balancers and orchestrators can probe.
        if path.starts_with("/grpc.health.v1.Health/") {
            return Ok(());
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
        let allowed = if path.starts_with("/berth.v1.NodeAgentService/") {
            &self.join
        } else {
            &self.admin
        };
        if allowed.contains(token) {
            Ok(())
        } else {
            Err(Status::unauthenticated("invalid token"))
        }
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

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        match self
            .tokens
            .authorize(request.uri().path(), request.headers())
        {
            Ok(()) => Box::pin(self.inner.call(request)),
            Err(status) => {
                tracing::debug!(path = request.uri().path(), "unauthenticated call refused");
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(tokens: &[&str]) -> TokenSet {
        TokenSet(tokens.iter().map(|t| hash(t)).collect())
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
