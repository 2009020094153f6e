//! `berth.v1.RequestService`: the replay queue as operators see it.

use super::{to_status, ApiError};
use berth_proto::v1::request_service_server::RequestService;
use berth_proto::v1::{
    DropRequestRequest, DropRequestResponse, GetRequestRequest, ListRequestsRequest,
    ListRequestsResponse, Request as QueuedRequest, RetryRequestRequest,
};
use berth_proto::validate::{self, FieldError};
use berth_store::Store;
use tonic::{Request, Response, Status};

/// Most requests a page holds when the caller sets no limit (at most 1000 in any case).
pub const DEFAULT_LIST_LIMIT: u32 = 100;

/// Serves `RequestService`.
#[derive(Clone)]
pub struct RequestApi {
    store: Store,
}

impl RequestApi {
    /// The service over `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

fn check_id(id: &str) -> Result<(), Status> {
    if id.is_empty() || id.len() > 128 || !id.chars().all(|c| c.is_ascii_graphic() && c != '/') {
        return Err(to_status(ApiError::Invalid(FieldError {
            field: "id".into(),
            reason: "must be a request id (printable, no '/', at most 128 characters)".into(),
        })));
    }
    Ok(())
}

#[tonic::async_trait]
impl RequestService for RequestApi {
    async fn list_requests(
        &self,
        request: Request<ListRequestsRequest>,
    ) -> Result<Response<ListRequestsResponse>, Status> {
        let request = request.into_inner();
        let agent = Some(request.agent.as_str()).filter(|a| !a.is_empty());
        if let Some(agent) = agent {
            validate::dns_label("agent", agent).map_err(|e| to_status(e.into()))?;
        }
        let limit = match request.limit {
            0 => DEFAULT_LIST_LIMIT,
            n => n,
        } as usize;
        let (mut requests, next_page_token) = self
            .store
            .list_requests(agent, request.state, limit, &request.page_token)
            .await
            .map_err(|e| to_status(e.into()))?;
        // Records only: bodies and answers are kept apart; GetRequest returns them.
        for r in &mut requests {
            r.body.clear();
            r.response = None;
        }
        Ok(Response::new(ListRequestsResponse {
            requests,
            next_page_token,
        }))
    }

    async fn get_request(
        &self,
        request: Request<GetRequestRequest>,
    ) -> Result<Response<QueuedRequest>, Status> {
        let id = request.into_inner().id;
        check_id(&id)?;
        let stored = self
            .store
            .get_request_settled(&id)
            .await
            .map_err(|e| to_status(e.into()))?;
        Ok(Response::new(stored.request))
    }

    async fn retry_request(
        &self,
        request: Request<RetryRequestRequest>,
    ) -> Result<Response<QueuedRequest>, Status> {
        let id = request.into_inner().id;
        check_id(&id)?;
        let retried = self.store.retry_request(&id).await.map_err(|e| match e {
            berth_store::StoreError::Conflict { current, .. } => {
                Status::failed_precondition(format!("request {id} is {current}"))
            }
            e => to_status(e.into()),
        })?;
        tracing::info!(request_id = %id, "request back in the queue");
        Ok(Response::new(retried))
    }

    async fn drop_request(
        &self,
        request: Request<DropRequestRequest>,
    ) -> Result<Response<DropRequestResponse>, Status> {
        let id = request.into_inner().id;
        check_id(&id)?;
        self.store
            .drop_request(&id)
            .await
            .map_err(|e| to_status(e.into()))?;
        tracing::info!(request_id = %id, "request dropped");
        Ok(Response::new(DropRequestResponse {}))
    }
}
