//! API tokens with scopes: one key per token holding its record and the SHA-256 of the whole
//! token (the secret itself is never stored).

use super::{decode, Store, StoreError};
use berth_proto::v1::{StoredToken, Token};
use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};
use prost::Message;

impl Store {
    /// Stores a new token; ALREADY_EXISTS if its id is taken.
    pub async fn create_token(&self, stored: &StoredToken) -> Result<(), StoreError> {
        let id = stored
            .token
            .as_ref()
            .map(|t| t.id.clone())
            .unwrap_or_default();
        let key = self.keys.token(&id);
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), stored.encode_to_vec(), None)]);
        let resp = self
            .client()
            .txn(txn)
            .await
            .map_err(|e| self.unavailable(e))?;
        if !resp.succeeded() {
            return Err(StoreError::AlreadyExists {
                kind: "token",
                name: id,
            });
        }
        Ok(())
    }

    /// Every stored token, oldest first, and the revision they were read at.
    pub async fn list_tokens(&self) -> Result<(Vec<StoredToken>, i64), StoreError> {
        let prefix = self.keys.tokens();
        let resp = self
            .client()
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.unavailable(e))?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
        let mut tokens = resp
            .kvs()
            .iter()
            .map(|kv| decode::<StoredToken>(kv.key(), kv.value()))
            .collect::<Result<Vec<_>, _>>()?;
        tokens.sort_by_key(|t| {
            t.token
                .as_ref()
                .and_then(|t| t.create_time.as_ref())
                .map(|c| (c.seconds, c.nanos))
        });
        Ok((tokens, revision))
    }

    /// Removes a token; its record, or NOT_FOUND.
    pub async fn delete_token(&self, id: &str) -> Result<Token, StoreError> {
        let resp = self
            .client()
            .delete(
                self.keys.token(id),
                Some(etcd_client::DeleteOptions::new().with_prev_key()),
            )
            .await
            .map_err(|e| self.unavailable(e))?;
        let Some(kv) = resp.prev_kvs().first() else {
            return Err(StoreError::NotFound {
                kind: "token",
                name: id.to_string(),
            });
        };
        Ok(decode::<StoredToken>(kv.key(), kv.value())?
            .token
            .unwrap_or_default())
    }
}
