//! A throwaway image registry on a spare localhost port, so a scenario can
//! kill a worker while Docker is really pulling (no registry is reachable
//! from this machine). It serves one local image, exported with
//! `docker save`, under a new name through the registry v2 API — `GET /v2/`,
//! manifests and blobs — and sends the layer slowly, so a pull takes a few
//! seconds and can be caught mid-way. Docker treats `127.0.0.0/8`
//! registries as insecure by default, so plain HTTP is enough.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bollard::Docker;
use futures_util::StreamExt as _;
use tokio::task::JoinHandle;

use crate::procs::poll_for;

const MANIFEST_TYPE: &str = "application/vnd.docker.distribution.manifest.v2+json";
const CONFIG_TYPE: &str = "application/vnd.docker.container.image.v1+json";
/// Docker decompresses by sniffing, so the uncompressed layer `docker save`
/// wrote is served under the gzip media type registries use.
const LAYER_TYPE: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// How long sending one layer takes.
const LAYER_SEND_TIME: Duration = Duration::from_secs(4);
const LAYER_CHUNKS: usize = 40;

struct Content {
    /// `<name>:<tag>` the manifest is served under.
    reference: String,
    manifest: Bytes,
    manifest_digest: String,
    blobs: Blobs,
    /// Layer downloads begun, and finished (every byte sent).
    layers_begun: AtomicUsize,
    layers_done: AtomicUsize,
}

pub struct Registry {
    /// The reference Docker pulls: `127.0.0.1:<port>/<name>:<tag>`.
    pub image: String,
    content: Arc<Content>,
    server: JoinHandle<()>,
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Registry {
    /// Serves the local image `source` (e.g. `rtm-test/engine:1.4.3`) as
    /// `127.0.0.1:<port>/<source>`, read through `docker`.
    pub async fn serve(docker: &Docker, source: &str) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
        let mut export = docker.export_image(source);
        let mut tar = Vec::new();
        while let Some(chunk) = export.next().await {
            tar.extend_from_slice(&chunk.map_err(|e| format!("docker save {source}: {e}"))?);
        }
        let unpacked = std::process::Command::new("tar")
            .arg("-x")
            .arg("-C")
            .arg(dir.path())
            .stdin(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write as _;
                child.stdin.take().expect("piped stdin").write_all(&tar)?;
                child.wait()
            })
            .map_err(|e| format!("unpack the saved image: {e}"))?;
        if !unpacked.success() {
            return Err(format!("tar could not unpack the saved {source}"));
        }
        let (manifest, blobs) = build_manifest(dir.path())?;
        let manifest_digest = digest(&manifest);

        let content = Arc::new(Content {
            reference: source.to_owned(),
            manifest: Bytes::from(manifest),
            manifest_digest,
            blobs,
            layers_begun: AtomicUsize::new(0),
            layers_done: AtomicUsize::new(0),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("bind the registry: {e}"))?;
        let host = listener
            .local_addr()
            .map(|a| a.to_string())
            .map_err(|e| format!("registry address: {e}"))?;
        let app = Router::new()
            .route("/v2/", get(|| async { version_header("{}") }))
            .route("/v2/{*path}", get(serve_path).head(serve_path))
            .with_state(content.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.ok();
        });
        Ok(Self {
            image: format!("{host}/{source}"),
            content,
            server,
        })
    }

    /// Layer downloads begun and finished so far.
    pub fn layer_downloads(&self) -> (usize, usize) {
        (
            self.content.layers_begun.load(Ordering::SeqCst),
            self.content.layers_done.load(Ordering::SeqCst),
        )
    }

    /// Waits until a layer download is under way and unfinished.
    pub async fn wait_mid_layer(&self, timeout: Duration) -> bool {
        poll_for(timeout, Duration::from_millis(20), || {
            let (begun, done) = self.layer_downloads();
            std::future::ready((begun > done).then_some(()))
        })
        .await
        .is_some()
    }
}

/// Blobs by digest: their bytes, and whether each is a layer.
type Blobs = HashMap<String, (Bytes, bool)>;

/// A schema-2 manifest for the image unpacked under `dir` (the layout
/// `docker save` writes: `manifest.json`, a config file, `<id>/layer.tar`),
/// and its blobs by digest.
fn build_manifest(dir: &Path) -> Result<(Vec<u8>, Blobs), String> {
    let read = |rel: &str| {
        std::fs::read(dir.join(rel)).map_err(|e| format!("read {rel} of the saved image: {e}"))
    };
    let index: serde_json::Value = serde_json::from_slice(&read("manifest.json")?)
        .map_err(|e| format!("manifest.json: {e}"))?;
    let entry = &index[0];
    let config_path = entry["Config"].as_str().ok_or("manifest.json: no Config")?;
    let mut config: serde_json::Value = serde_json::from_slice(&read(config_path)?)
        .map_err(|e| format!("the saved image's config: {e}"))?;
    let paths: Vec<&str> = entry["Layers"]
        .as_array()
        .ok_or("manifest.json: no Layers")?
        .iter()
        .filter_map(serde_json::Value::as_str)
        .collect();
    let last = paths.last().ok_or("manifest.json: no layer")?;
    // A file of this run's own goes into the last layer, so its digest is
    // new to Docker: a layer it has pulled before (an earlier run) would
    // be reported "already exists" and never downloaded.
    let stamp = format!(".rtm-registry-{}", uuid::Uuid::new_v4().simple());
    std::fs::write(dir.join(&stamp), b"").map_err(|e| format!("write the layer's stamp: {e}"))?;
    let appended = std::process::Command::new("tar")
        .arg("-rf")
        .arg(dir.join(last))
        .arg("-C")
        .arg(dir)
        .arg(&stamp)
        .status()
        .map_err(|e| format!("tar: {e}"))?;
    if !appended.success() {
        return Err("tar could not append to the saved layer".into());
    }

    let mut blobs = HashMap::new();
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for path in &paths {
        let bytes = read(path)?;
        // Served uncompressed: the blob digest is the diff id.
        let d = digest(&bytes);
        layers.push(serde_json::json!({
            "mediaType": LAYER_TYPE,
            "size": bytes.len(),
            "digest": d,
        }));
        diff_ids.push(serde_json::Value::from(d.clone()));
        blobs.insert(d, (Bytes::from(bytes), true));
    }
    config["rootfs"]["diff_ids"] = serde_json::Value::from(diff_ids);
    let config = serde_json::to_vec(&config).expect("a JSON value");
    let config_digest = digest(&config);
    let config_size = config.len();
    blobs.insert(config_digest.clone(), (Bytes::from(config), false));
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": { "mediaType": CONFIG_TYPE, "size": config_size, "digest": config_digest },
        "layers": layers,
    });
    Ok((serde_json::to_vec(&manifest).expect("a JSON value"), blobs))
}

/// `sha256:<hex>` of `bytes`.
fn digest(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    let hash = sha2::Sha256::digest(bytes);
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn version_header(body: &'static str) -> Response {
    let mut response = body.into_response();
    response.headers_mut().insert(
        "Docker-Distribution-API-Version",
        HeaderValue::from_static("registry/2.0"),
    );
    response
}

async fn serve_path(
    State(content): State<Arc<Content>>,
    method: Method,
    UrlPath(path): UrlPath<String>,
) -> Response {
    if let Some((name, reference)) = path.split_once("/manifests/") {
        let digest = &content.manifest_digest;
        if format!("{name}:{reference}") != content.reference && reference != digest {
            return (StatusCode::NOT_FOUND, "manifest unknown").into_response();
        }
        let bytes = &content.manifest;
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(MANIFEST_TYPE),
        );
        headers.insert(
            "Docker-Content-Digest",
            HeaderValue::from_str(digest).expect("a digest is a header value"),
        );
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        let body = if method == Method::HEAD {
            Body::empty()
        } else {
            Body::from(bytes.clone())
        };
        return (headers, body).into_response();
    }
    if let Some((_, digest)) = path.split_once("/blobs/") {
        let Some((bytes, is_layer)) = content.blobs.get(digest).cloned() else {
            return (StatusCode::NOT_FOUND, "blob unknown").into_response();
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        headers.insert(
            "Docker-Content-Digest",
            HeaderValue::from_str(digest).expect("a digest is a header value"),
        );
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        if method == Method::HEAD {
            return (headers, Body::empty()).into_response();
        }
        if !is_layer {
            return (headers, Body::from(bytes)).into_response();
        }
        content.layers_begun.fetch_add(1, Ordering::SeqCst);
        return (headers, Body::from_stream(slowly(bytes, content.clone()))).into_response();
    }
    (StatusCode::NOT_FOUND, "unknown path").into_response()
}

/// The layer in `LAYER_CHUNKS` pieces over `LAYER_SEND_TIME`; counts the
/// download done once its last piece is handed over.
fn slowly(
    bytes: Bytes,
    content: Arc<Content>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    let chunk = bytes.len().div_ceil(LAYER_CHUNKS).max(1);
    let pause = LAYER_SEND_TIME / LAYER_CHUNKS as u32;
    futures_util::stream::unfold(0usize, move |sent| {
        let bytes = bytes.clone();
        let content = content.clone();
        async move {
            if sent >= bytes.len() {
                return None;
            }
            tokio::time::sleep(pause).await;
            let end = (sent + chunk).min(bytes.len());
            // The server stops polling once Content-Length bytes went out,
            // so the last piece, not the stream's end, marks it done.
            if end == bytes.len() {
                content.layers_done.fetch_add(1, Ordering::SeqCst);
            }
            Some((Ok(bytes.slice(sent..end)), end))
        }
    })
}
