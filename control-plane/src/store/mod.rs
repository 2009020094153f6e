//! Desired and observed state in etcd. Every write is a compare-and-swap on `mod_revision`.

mod agents;
mod breakers;
mod events;
pub mod keys;
mod nodes;
mod requests;
pub mod watch;

pub use events::EventFilter;
pub use keys::Keys;
pub use nodes::{Cordon, LeaseRenewer, Placement};
pub use requests::{StoredRequest, REQUEST_TTL};

use etcd_client::{Client, ConnectOptions};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

/// How long one etcd call may take before the API answers `UNAVAILABLE`.
pub const ETCD_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long connecting to an etcd endpoint may take.
pub const ETCD_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object does not exist.
    #[error("{kind} {name} not found")]
    NotFound { kind: &'static str, name: String },
    /// Create of an object that exists.
    #[error("{kind} {name} already exists")]
    AlreadyExists { kind: &'static str, name: String },
    /// A compare-and-swap lost: someone else wrote first.
    #[error("{kind} {name} was changed by someone else (now at version {current}): re-read it and retry")]
    Conflict {
        kind: &'static str,
        name: String,
        current: String,
    },
    /// etcd did not answer.
    #[error("etcd at {endpoints} is unavailable: {source}")]
    Unavailable {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    /// A stored value could not be decoded.
    #[error("stored value at {key} is corrupt: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: prost::DecodeError,
    },
}

/// Handle on the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    client: Client,
    keys: Keys,
    endpoints: Arc<str>,
    event_lease: Arc<Mutex<Option<events::BucketLease>>>,
    request_leases: Arc<Mutex<std::collections::HashMap<u64, requests::RequestLease>>>,
}

impl Store {
    /// Connects to etcd. The connection is lazy: an unreachable etcd shows up as
    /// `Unavailable` errors on calls, and calls succeed again once it is back.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self, StoreError> {
        let joined: Arc<str> = endpoints.join(",").into();
        let options = ConnectOptions::new()
            .with_timeout(ETCD_REQUEST_TIMEOUT)
            .with_connect_timeout(ETCD_CONNECT_TIMEOUT)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|source| StoreError::Unavailable {
                endpoints: joined.to_string(),
                source,
            })?;
        Ok(Self {
            client,
            keys: Keys::new(prefix),
            endpoints: joined,
            event_lease: Arc::default(),
            request_leases: Arc::default(),
        })
    }

    /// The key layout in use.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Checks that etcd answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut client = self.client.clone();
        client.status().await.map_err(|e| self.unavailable(e))?;
        Ok(())
    }

    fn unavailable(&self, source: etcd_client::Error) -> StoreError {
        StoreError::Unavailable {
            endpoints: self.endpoints.to_string(),
            source,
        }
    }

    fn client(&self) -> Client {
        self.client.clone()
    }
}

fn decode<M: prost::Message + Default>(key: &[u8], value: &[u8]) -> Result<M, StoreError> {
    M::decode(value).map_err(|source| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}
