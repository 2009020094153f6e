//! `berth.v1.RequestService`: the replay queue as operators see it.

use super::{to_status, ApiError};
use berth_proto::v1::request_service_server::RequestService;
use berth_proto::v1::{
    DropRequestRequest, DropRequestResponse, GetRequestRequest, ListRequestsRequest,
    ListRequestsResponse, Request as QueuedRequest, RequestState, RetryRequestRequest,
};
use berth_proto::validate::{self, FieldError};
use berth_store::Store;
use tonic::{Request, Response, Status};

/// Most requests a list returns when the caller sets no limit.
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
        let (stored, _) = self
            .store
            .list_requests(agent)
            .await
            .map_err(|e| to_status(e.into()))?;
        let requests = stored
            .into_iter()
            .map(|s| s.request)
            .filter(|r| request.state == 0 || r.state == request.state)
            .take(limit)
            .map(|mut r| {
                // Lists stay small; GetRequest returns bodies.
                r.body.clear();
                if let Some(response) = r.response.as_mut() {
                    response.body.clear();
                }
                r
            })
            .collect();
        Ok(Response::new(ListRequestsResponse { requests }))
    }

    async fn get_request(
        &self,
        request: Request<GetRequestRequest>,
    ) -> Result<Response<QueuedRequest>, Status> {
        let id = request.into_inner().id;
        check_id(&id)?;
        let stored = self
            .store
            .get_request(&id)
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
        let retried = self
            .store
            .update_request(&id, |r| {
                if r.state != RequestState::Dead as i32 {
                    return Err(berth_store::StoreError::Conflict {
                        kind: "request",
                        name: r.id.clone(),
                        current: "not dead-lettered: only a dead request can be retried".into(),
                    });
                }
                r.state = RequestState::Queued as i32;
                r.attempts = 0;
                Ok(())
            })
            .await
            .map_err(|e| match e {
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
