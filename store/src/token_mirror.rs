//! The tokens both servers accept, as hashes: a file's set ([`TokenSet`]), and the scoped
//! tokens made through `TokenService`, mirrored from etcd by [`mirror_tokens`] so that a
//! revoked token is refused within a second. Compared in constant time; never logged.

use crate::watch::{list_watch, Change};
use crate::{Keys, Store};
use berth_proto::v1::{StoredToken, TokenScope};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};
use subtle::ConstantTimeEq;

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

    /// A set of the given tokens (for tests and for tokens not read from a file).
    pub fn from_tokens(tokens: &[&str]) -> Self {
        Self(tokens.iter().map(|t| hash(t)).collect())
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

/// Who a call comes from, once its token is checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// Everything.
    Admin,
    /// Reads only.
    ReadOnly,
    /// The node-agent stream only; as the named node when the token is bound to one (a join
    /// token from the file is not).
    Node(Option<String>),
}

impl Principal {
    /// The scope's name as users write it.
    pub fn scope_name(&self) -> &'static str {
        match self {
            Principal::Admin => "admin",
            Principal::ReadOnly => "read-only",
            Principal::Node(_) => "node",
        }
    }
}

/// A token made through `TokenService`, as the auth layer keeps it.
#[derive(Clone)]
struct Issued {
    sha256: [u8; 32],
    principal: Principal,
}

/// A stored token as the auth layer keeps it, by id; `None` when it cannot be used.
fn issued(stored: &StoredToken) -> Option<(String, Issued)> {
    let token = stored.token.as_ref()?;
    let sha256 = <[u8; 32]>::try_from(stored.sha256.as_slice()).ok()?;
    let principal = match TokenScope::try_from(token.scope) {
        Ok(TokenScope::Admin) => Principal::Admin,
        Ok(TokenScope::ReadOnly) => Principal::ReadOnly,
        Ok(TokenScope::Node) => Principal::Node(Some(token.node.clone())),
        _ => return None,
    };
    Some((token.id.clone(), Issued { sha256, principal }))
}

/// The tokens made through `TokenService`, by id; kept current from etcd. Every change bumps
/// a generation that [`IssuedTokens::revoked`] waits on, so open streams learn of a revocation.
#[derive(Clone)]
pub struct IssuedTokens {
    tokens: Arc<RwLock<HashMap<String, Issued>>>,
    generation: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for IssuedTokens {
    fn default() -> Self {
        Self {
            tokens: Arc::default(),
            generation: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }
}

impl IssuedTokens {
    fn changed(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Completes once `token` is no longer valid (revoked, or changed to another scope):
    /// what a stream opened with it waits on to end.
    pub fn revoked(&self, token: &str) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (tokens, token) = (self.clone(), token.to_string());
        let mut changes = self.generation.subscribe();
        let granted = self.principal(&token);
        async move {
            loop {
                if tokens.principal(&token) != granted {
                    return;
                }
                if changes.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }
    }

    /// Adds or replaces a stored token.
    pub fn put(&self, stored: &StoredToken) {
        let Some((id, issued)) = issued(stored) else {
            return;
        };
        self.tokens
            .write()
            .expect("token map lock")
            .insert(id, issued);
        self.changed();
    }

    /// Forgets a token (revoked).
    pub fn remove(&self, id: &str) {
        self.tokens.write().expect("token map lock").remove(id);
        self.changed();
    }

    /// Replaces every token (after a re-list), in one step: a token listed again is never
    /// seen missing in between.
    pub fn replace(&self, stored: &[StoredToken]) {
        let all = stored.iter().filter_map(issued).collect();
        *self.tokens.write().expect("token map lock") = all;
        self.changed();
    }

    /// The principal of `token` (`{id}.{secret}`), compared in constant time.
    pub fn principal(&self, token: &str) -> Option<Principal> {
        let (id, _) = token.split_once('.')?;
        let issued = self
            .tokens
            .read()
            .expect("token map lock")
            .get(id)
            .cloned()?;
        bool::from(issued.sha256.ct_eq(&hash(token))).then_some(issued.principal)
    }
}

/// The SHA-256 of a whole token, as stored.
pub fn token_hash(token: &str) -> [u8; 32] {
    hash(token)
}

/// Keeps `issued` equal to the tokens in etcd until `stop` is cancelled: a revoked token is
/// refused as soon as its delete is seen.
pub async fn mirror_tokens(
    store: Store,
    issued: IssuedTokens,
    stop: tokio_util::sync::CancellationToken,
) {
    use prost::Message;
    let decode = |kv: &etcd_client::KeyValue| StoredToken::decode(kv.value()).ok();
    let mut changes = list_watch(&store, store.keys().tokens());
    let mut listed = Vec::new();
    loop {
        let change = tokio::select! {
            _ = stop.cancelled() => return,
            change = changes.next() => change,
        };
        match change {
            Change::Init => listed.clear(),
            Change::InitApply(kv) => listed.extend(decode(&kv)),
            Change::InitDone { .. } => issued.replace(&std::mem::take(&mut listed)),
            Change::Put(kv) => {
                if let Some(stored) = decode(&kv) {
                    issued.put(&stored);
                }
            }
            Change::Delete(kv) => issued.remove(&Keys::last_segment(kv.key())),
        }
    }
}
