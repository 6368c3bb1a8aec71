//! The Pingora service: local answers for the API, proxying for the rest.
//!
//! Owns the `ProxyHttp` hooks: `request_filter` answers `/v1/*`, `/health`,
//! `/ready` and `/metrics` itself (no upstream is contacted); every other
//! request goes to the origin unchanged, to the configured upstreams in
//! order, retrying a failed connect on the next one, with a 502 JSON error
//! when none answers.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::http::ResponseHeader;
use pingora::prelude::{HttpPeer, ProxyHttp, Result, Session};
use pingora::proxy::FailToProxy;
use pingora::{Error, ErrorSource, ErrorType};
use serde_json::json;

use crate::api::Reply;
use crate::app::{App, Node};
use crate::routes::{self, Outcome};

/// The gateway service.
pub struct Gateway {
    node: Arc<Node>,
}

impl Gateway {
    /// A service over the node's state (answering "starting" until its app
    /// is up).
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }

    /// The node's app; only hooks that run after `request_filter` let a
    /// request through call it, and it lets none through before the app
    /// is up.
    fn app(&self) -> Result<&Arc<App>> {
        self.node
            .app()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "the node is still starting"))
    }
}

/// Per-request state.
pub struct RequestContext {
    /// Answered locally (not proxied).
    local: bool,
    /// Origin connect attempts so far.
    attempts: usize,
}

/// Writes a complete reply.
pub async fn write_reply(session: &mut Session, reply: Reply) -> Result<()> {
    // No case map: every name we write is lower case already.
    let mut header = ResponseHeader::build_no_case(reply.status, Some(reply.headers.len() + 1))?;
    for (name, value) in reply.headers {
        header.insert_header(name, value)?;
    }
    header.insert_header("content-length", http::HeaderValue::from(reply.body.len()))?;
    let empty = reply.body.is_empty();
    session
        .write_response_header(Box::new(header), empty)
        .await?;
    if !empty {
        session.write_response_body(Some(reply.body), true).await?;
    }
    Ok(())
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestContext;

    fn new_ctx(&self) -> Self::CTX {
        RequestContext {
            local: false,
            attempts: 0,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        let Some(app) = self.node.app() else {
            ctx.local = true;
            let reply = routes::starting(&self.node, session.req_header().uri.path());
            write_reply(session, reply).await?;
            return Ok(true);
        };
        if !routes::is_local(session.req_header().uri.path()) {
            return Ok(false);
        }
        ctx.local = true;
        match routes::dispatch(app, session).await {
            Outcome::Reply(reply) => write_reply(session, reply).await?,
            Outcome::Streamed(_) => {}
        }
        Ok(true)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        let app = self.app()?;
        let origins = app.origins();
        if origins.is_empty() {
            return Err(Error::explain(
                ErrorType::ConnectNoRoute,
                "no origin upstream resolves",
            ));
        }
        let config = app.config();
        let address = origins[ctx.attempts % origins.len()];
        let mut peer = HttpPeer::new(address, false, String::new());
        peer.options.connection_timeout =
            Some(Duration::from_millis(config.origin.connect_timeout_ms));
        peer.options.read_timeout = Some(Duration::from_millis(config.origin.read_timeout_ms));
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut Self::CTX,
        mut error: Box<Error>,
    ) -> Box<Error> {
        ctx.attempts += 1;
        let upstreams = self.node.app().map_or(0, |app| app.origins().len());
        if ctx.attempts < upstreams {
            tracing::warn!(%peer, attempt = ctx.attempts, "origin connect failed; trying the next upstream");
            error.set_retry(true);
        }
        error
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        error: &Error,
        _ctx: &mut Self::CTX,
    ) -> FailToProxy {
        let upstream = matches!(error.esource(), ErrorSource::Upstream);
        let code = if upstream { 502 } else { 500 };
        let downstream_dead = matches!(
            error.etype(),
            ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed
        ) && matches!(error.esource(), ErrorSource::Downstream);
        if !downstream_dead && session.response_written().is_none() {
            let body = if upstream {
                json!({ "error": "bad_gateway", "message": "no origin upstream answered" })
            } else {
                json!({ "error": "internal", "message": "the gateway could not proxy this request" })
            };
            let reply = Reply::json(code, &body);
            if let Err(write_error) = write_reply(session, reply).await {
                tracing::debug!(%write_error, "cannot write proxy error");
            }
        }
        if let Some(app) = self.node.app() {
            app.metrics
                .proxied
                .with_label_values(&[&code.to_string()])
                .inc();
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut Self::CTX) {
        if ctx.local || error.is_some() {
            return;
        }
        let status = session
            .response_written()
            .map_or(0, |response| response.status.as_u16());
        if let Some(app) = self.node.app() {
            app.metrics
                .proxied
                .with_label_values(&[&status.to_string()])
                .inc();
        }
    }
}
