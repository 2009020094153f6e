//! `berth.v1.TokenService`: API tokens with scopes. A token is `{id}.{secret}`; only its
//! SHA-256 is stored, its secret is returned once, and neither is ever logged.

use super::{to_status, ApiError};
use crate::auth::token_hash;
use berth_proto::time::now;
use berth_proto::v1::token_service_server::TokenService;
use berth_proto::v1::{
    CreateTokenRequest, CreateTokenResponse, ListTokensRequest, ListTokensResponse,
    RevokeTokenRequest, StoredToken, Token, TokenScope,
};
use berth_proto::validate::{self, FieldError};
use berth_store::Store;
use tonic::{Request, Response, Status};

/// Longest token description.
pub const MAX_DESCRIPTION: usize = 256;

/// Serves `TokenService`.
#[derive(Clone)]
pub struct TokenApi {
    store: Store,
}

impl TokenApi {
    /// The service over `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

fn invalid(field: &str, reason: &str) -> Status {
    to_status(ApiError::Invalid(FieldError {
        field: field.into(),
        reason: reason.into(),
    }))
}

/// Checks a create request: the scope, the node for node tokens, the description.
fn check(request: &CreateTokenRequest) -> Result<TokenScope, Status> {
    let scope = match TokenScope::try_from(request.scope) {
        Ok(TokenScope::Unspecified) | Err(_) => {
            return Err(invalid("scope", "is required: admin, read-only or node"))
        }
        Ok(scope) => scope,
    };
    if scope == TokenScope::Node {
        validate::dns_label("node", &request.node).map_err(|e| to_status(e.into()))?;
    } else if !request.node.is_empty() {
        return Err(invalid("node", "is only for node tokens"));
    }
    if request.description.chars().count() > MAX_DESCRIPTION {
        return Err(invalid(
            "description",
            &format!("is longer than {MAX_DESCRIPTION} characters"),
        ));
    }
    Ok(scope)
}

#[tonic::async_trait]
impl TokenService for TokenApi {
    async fn create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let request = request.into_inner();
        let scope = check(&request)?;
        let id = format!("bt_{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff);
        let secret = format!(
            "{id}.{:032x}{:08x}",
            rand::random::<u128>(),
            rand::random::<u32>()
        );
        let token = Token {
            id: id.clone(),
            scope: scope as i32,
            node: request.node,
            description: request.description,
            create_time: Some(now()),
        };
        let stored = StoredToken {
            token: Some(token.clone()),
            sha256: token_hash(&secret).to_vec(),
        };
        self.store
            .create_token(&stored)
            .await
            .map_err(|e| to_status(e.into()))?;
        tracing::info!(token = %id, scope = scope.as_str_name(), "token created");
        Ok(Response::new(CreateTokenResponse {
            token: Some(token),
            secret,
        }))
    }

    async fn list_tokens(
        &self,
        _: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        let (stored, _) = self
            .store
            .list_tokens()
            .await
            .map_err(|e| to_status(e.into()))?;
        Ok(Response::new(ListTokensResponse {
            tokens: stored.into_iter().filter_map(|s| s.token).collect(),
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<Response<Token>, Status> {
        let id = request.into_inner().id;
        if id.is_empty() {
            return Err(invalid("id", "is required"));
        }
        let token = self
            .store
            .delete_token(&id)
            .await
            .map_err(|e| to_status(e.into()))?;
        tracing::info!(token = %id, "token revoked");
        Ok(Response::new(token))
    }
}
