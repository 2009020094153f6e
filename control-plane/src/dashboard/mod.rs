//! The web dashboard, served by the control plane on its own port over the same TLS as its
//! API: agents, one agent (live), nodes, and the replay queue, with their actions. Sign-in is
//! with an API token, kept in an HttpOnly, SameSite=Strict cookie. Every page and action makes
//! the same call the gRPC API serves, checked with the same scopes (`auth.rs`): a read-only
//! token sees everything, is shown no action, and is refused one anyway. Pages are rendered on
//! the server (maud); `live.js` refreshes a page's parts when the server pushes a change
//! (server-sent events fed by etcd watches), so nothing polls.

mod agents;
mod layout;
mod live;
mod nodes;
mod queue;

use crate::api::{AgentApi, NodeApi, RequestApi};
use crate::auth::{Principal, Tokens};
use axum::extract::{Form, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use berth_store::Store;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

/// The cookie that holds the signed-in token.
const COOKIE: &str = "berth_token";

/// What the dashboard's handlers share.
pub struct Dashboard {
    pub(crate) agents: AgentApi,
    pub(crate) nodes: NodeApi,
    pub(crate) requests: RequestApi,
    pub(crate) tokens: Tokens,
    pub(crate) store: Store,
    /// Served over TLS: the cookie is marked Secure.
    pub(crate) secure: bool,
    /// Cancelled when the control plane stops: live streams end then.
    pub(crate) stop: CancellationToken,
}

/// A signed-in caller.
pub(crate) struct Caller {
    token: String,
    /// Its scope: admin is shown actions.
    pub(crate) principal: Principal,
}

impl Caller {
    /// Whether the caller may change things (actions are shown only then).
    pub(crate) fn admin(&self) -> bool {
        self.principal == Principal::Admin
    }
}

/// Why a page could not be shown.
pub(crate) struct PageError(Status);

impl From<Status> for PageError {
    fn from(status: Status) -> Self {
        Self(status)
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let status = self.0;
        let code = match status.code() {
            Code::Unauthenticated => return Redirect::to("/login?expired=1").into_response(),
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                StatusCode::BAD_REQUEST
            }
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (
            code,
            Html(layout::error(code, status.message()).into_string()),
        )
            .into_response()
    }
}

pub(crate) type PageResult = Result<Response, PageError>;

impl Dashboard {
    /// The token in the request's cookie, if any.
    fn token(headers: &HeaderMap) -> Option<String> {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(name, _)| *name == COOKIE)
            .map(|(_, value)| value.to_string())
            .filter(|t| !t.is_empty())
    }

    /// The signed-in caller, if its token may call `path`: UNAUTHENTICATED without one.
    pub(crate) fn caller(&self, headers: &HeaderMap, path: &str) -> Result<Caller, Status> {
        let token = Self::token(headers)
            .ok_or_else(|| Status::unauthenticated("sign in with an API token"))?;
        let principal = self.check(&token, path)?;
        Ok(Caller { token, principal })
    }

    /// `token`'s scope, if it may call the gRPC method `path`.
    fn check(&self, token: &str, path: &str) -> Result<Principal, Status> {
        let mut headers = http::HeaderMap::new();
        let bearer = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| Status::unauthenticated("invalid token"))?;
        headers.insert(header::AUTHORIZATION, bearer);
        match self.tokens.authorize(path, &headers)? {
            Some((principal, _)) => Ok(principal),
            None => Err(Status::internal("an open method needs no caller")),
        }
    }

    /// A gRPC request for `path` on behalf of `caller`, checked as the API checks it.
    pub(crate) fn request<T>(
        &self,
        caller: &Caller,
        path: &str,
        message: T,
    ) -> Result<tonic::Request<T>, Status> {
        let principal = self.check(&caller.token, path)?;
        let mut request = tonic::Request::new(message);
        request.extensions_mut().insert(principal);
        Ok(request)
    }

    /// Completes when the caller's token is revoked (never for a token from a file).
    pub(crate) fn revoked(&self, caller: &Caller) -> impl std::future::Future<Output = ()> {
        let issued = self.tokens.issued.principal(&caller.token).is_some();
        let revoked = self.tokens.issued.revoked(&caller.token);
        async move {
            if issued {
                revoked.await
            } else {
                std::future::pending().await
            }
        }
    }
}

/// The dashboard's routes.
pub fn router(dashboard: Arc<Dashboard>) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/agents") }))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/static/style.css", get(|| async { css() }))
        .route("/static/live.js", get(|| async { js() }))
        .route("/agents", get(agents::agents))
        .route("/fragments/agents", get(agents::agents_fragment))
        .route("/agents/{name}", get(agents::agent))
        .route("/fragments/agents/{name}", get(agents::agent_fragment))
        .route("/agents/{name}/{action}", post(agents::agent_action))
        .route("/nodes", get(nodes::nodes))
        .route("/fragments/nodes", get(nodes::nodes_fragment))
        .route("/nodes/{name}/{action}", post(nodes::node_action))
        .route("/requests", get(queue::requests))
        .route("/requests/{id}", get(queue::request))
        .route("/requests/{id}/{action}", post(queue::request_action))
        .route("/queues/{agent}/{action}", post(queue::dead_letters_action))
        .route("/live", get(live::stream))
        .with_state(dashboard)
}

fn css() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("style.css"),
    )
}

fn js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("live.js"),
    )
}

#[derive(serde::Deserialize)]
struct LoginQuery {
    expired: Option<String>,
}

async fn login_page(Query(query): Query<LoginQuery>) -> Html<String> {
    let note = query
        .expired
        .map(|_| "Your token is no longer valid: sign in again.");
    Html(layout::login(note).into_string())
}

#[derive(serde::Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(d): State<Arc<Dashboard>>, Form(form): Form<LoginForm>) -> Response {
    let token = form.token.trim().to_string();
    match d.check(&token, "/berth.v1.AgentService/ListAgents") {
        Ok(principal) => {
            tracing::info!(scope = principal.scope_name(), "dashboard sign-in");
            let secure = if d.secure { "; Secure" } else { "" };
            let cookie = format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict{secure}");
            let mut response = Redirect::to("/agents").into_response();
            if let Ok(value) = HeaderValue::from_str(&cookie) {
                response.headers_mut().insert(header::SET_COOKIE, value);
            }
            response
        }
        Err(status) => (
            StatusCode::UNAUTHORIZED,
            Html(
                layout::login(Some(&format!("Not signed in: {}", status.message()))).into_string(),
            ),
        )
            .into_response(),
    }
}

async fn logout() -> Response {
    let mut response = Redirect::to("/login").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("berth_token=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict"),
    );
    response
}
