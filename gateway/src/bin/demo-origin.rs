//! `demo-origin [ADDR]`: a small origin server to stand behind the gateway.
//!
//! Every request is answered with a JSON echo of what arrived (method, path,
//! query, headers, body), so the proxying can be seen and tested end to end;
//! `/` answers a short HTML page. Listens on 127.0.0.1:8090 by default.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::json;

/// Largest request body echoed back.
const BODY_BYTES_MAX: usize = 1024 * 1024;

async fn answer(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = request.method().to_string();
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or_default().to_owned();
    let headers: serde_json::Map<String, serde_json::Value> = request
        .headers()
        .iter()
        .map(|(name, value)| {
            (
                name.to_string(),
                json!(value.to_str().unwrap_or("<binary>")),
            )
        })
        .collect();
    let body = match Limited::new(request.into_body(), BODY_BYTES_MAX)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            let response = Response::builder()
                .status(413)
                .body(Full::new(Bytes::from_static(
                    b"{\"error\":\"payload_too_large\"}",
                )))
                .unwrap_or_default();
            return Ok(response);
        }
    };
    if path == "/" && method == "GET" {
        let page = "<!doctype html><title>demo origin</title><h1>Demo origin</h1>\
                    <p>This page came through the inventory gateway.</p>\n";
        let response = Response::builder()
            .header("content-type", "text/html; charset=utf-8")
            .header("x-origin", "demo")
            .body(Full::new(Bytes::from(page)))
            .unwrap_or_default();
        return Ok(response);
    }
    let echo = json!({
        "origin": "demo",
        "method": method,
        "path": path,
        "query": query,
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
        "body_bytes": body.len(),
    });
    let response = Response::builder()
        .header("content-type", "application/json")
        .header("x-origin", "demo")
        .body(Full::new(Bytes::from(echo.to_string())))
        .unwrap_or_default();
    Ok(response)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let address: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8090".to_owned())
        .parse()?;
    let listener = tokio::net::TcpListener::bind(address).await?;
    eprintln!("demo-origin: listening on http://{address}");
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let served = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service_fn(answer))
                .await;
            if let Err(error) = served {
                eprintln!("demo-origin: connection error: {error}");
            }
        });
    }
}
