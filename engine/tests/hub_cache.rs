//! Loading FLUX from a hub repository through the hub cache, without the real hub: a cache folder
//! laid out as `huggingface_hub` lays it out, an endpoint that refuses connections, and a local
//! HTTP server standing in for the hub that records what it is asked.

mod common;

use candle_core::Device;
use common::tiny_dev;
use engine::hub::{DownloadProgress, Hub, Source};
use engine::pipeline::{FluxPipeline, LoadOptions};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const REPO: &str = "studio-tests/tiny-flux-dev";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Every file of a folder, by path relative to it.
fn files_of(root: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn etag(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// The hub's two requests that hf-hub makes: the repository's listing, and a file by revision
/// (a one-byte range first for its commit, ETag and size, then the bytes from where a partial
/// download stopped). Records each request line with its Range.
struct FakeHub {
    url: String,
    requests: Arc<Mutex<Vec<String>>>,
}

impl FakeHub {
    fn start(files: BTreeMap<String, Vec<u8>>) -> Self {
        Self::at(COMMIT, files)
    }

    /// The hub with `files` as the revision `commit` of the repository.
    fn at(commit: &'static str, files: BTreeMap<String, Vec<u8>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                serve(stream, commit, &files, &log);
            }
        });
        Self { url, requests }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    /// Requests for file contents, not the one-byte probes.
    fn file_requests(&self) -> Vec<String> {
        self.requests()
            .into_iter()
            .filter(|r| r.contains("/resolve/") && !r.ends_with("bytes=0-0"))
            .collect()
    }
}

fn serve(
    mut stream: TcpStream,
    commit: &str,
    files: &BTreeMap<String, Vec<u8>>,
    log: &Mutex<Vec<String>>,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut range = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap() == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_string());
            }
        }
    }
    log.lock()
        .unwrap()
        .push(format!("{path} {}", range.clone().unwrap_or_default()));
    let (status, headers, body) = if path == format!("/api/models/{REPO}/revision/main?blobs=true")
    {
        // As the hub lists with `?blobs=true`: every file here as if stored with LFS.
        let siblings: Vec<_> = files
            .iter()
            .map(|(f, b)| serde_json::json!({ "rfilename": f, "lfs": { "sha256": etag(b) } }))
            .collect();
        let body = serde_json::json!({ "sha": commit, "siblings": siblings }).to_string();
        ("200 OK", String::new(), body.into_bytes())
    } else if let Some(bytes) = path
        .strip_prefix(&format!("/{REPO}/resolve/main/"))
        .and_then(|f| files.get(f))
    {
        let from: usize = range
            .as_deref()
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.split('-').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let to = match range.as_deref() {
            Some("bytes=0-0") => 1,
            _ => bytes.len(),
        };
        let headers = format!(
            "ETag: \"{}\"\r\nX-Repo-Commit: {commit}\r\nContent-Range: bytes {from}-{}/{}\r\n",
            etag(bytes),
            to.max(1) - 1,
            bytes.len()
        );
        ("206 Partial Content", headers, bytes[from..to].to_vec())
    } else {
        ("404 Not Found", String::new(), Vec::new())
    };
    let head = format!(
        "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(&body);
}

fn hub(endpoint: &str, cache: &Path) -> Hub {
    Hub {
        endpoint: endpoint.to_string(),
        cache_dir: cache.to_path_buf(),
        token: None,
        offline: false,
    }
}

/// An address on which nothing listens: connections to it are refused.
fn refusing_endpoint() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    url
}

fn options() -> LoadOptions {
    let preset = engine::presets::find(engine::presets::FLUX_TINY).unwrap();
    LoadOptions {
        source: Source::Hub(REPO.into()),
        ..LoadOptions::from_preset(preset)
    }
}

fn load(opts: &LoadOptions, hub: &Hub) -> anyhow::Result<FluxPipeline> {
    FluxPipeline::load_from(opts, hub, &Device::Cpu, Arc::new(|_| {}))
}

/// A cache holding the tiny model's diffusers files as the snapshot `refs/main` points at.
fn cached_copy(cache: &Path) -> PathBuf {
    let repo = cache.join("models--studio-tests--tiny-flux-dev");
    let snapshot = repo.join("snapshots").join(COMMIT);
    for (rel, bytes) in files_of(&tiny_dev()) {
        if engine::presets::is_needed_file(&rel) {
            let p = snapshot.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, bytes).unwrap();
        }
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    snapshot
}

#[test]
fn a_second_load_from_the_hub_makes_no_file_request() {
    let fake = FakeHub::start(files_of(&tiny_dev()));
    let cache = tempfile::tempdir().unwrap();
    let hub = hub(&fake.url, cache.path());
    let opts = options();
    assert!(!opts.is_ready_in(&hub), "nothing is cached yet");

    let progress = Arc::new(Mutex::new(Vec::<DownloadProgress>::new()));
    let seen = progress.clone();
    FluxPipeline::load_from(
        &opts,
        &hub,
        &Device::Cpu,
        Arc::new(move |p| seen.lock().unwrap().push(p.clone())),
    )
    .unwrap();
    let fetched = fake.file_requests();
    assert!(
        fetched
            .iter()
            .any(|r| r.contains("transformer/config.json")),
        "the first load downloads: {fetched:?}"
    );
    assert!(
        !fetched.iter().any(|r| r.contains("flux1-tiny-dev")),
        "the BFL single file at the root is not needed: {fetched:?}"
    );
    let progress = progress.lock().unwrap();
    let last = progress.last().unwrap();
    assert_eq!(last.files_done, last.files_total);
    assert!(progress.iter().any(|p| p.file_bytes > 0));
    assert!(opts.is_ready_in(&hub), "the cached snapshot is complete");

    let before = fake.requests().len();
    load(&opts, &hub).unwrap();
    let again: Vec<String> = fake.requests()[before..].to_vec();
    assert!(
        again.iter().all(|r| !r.contains("/resolve/")),
        "the second load only asks for the revision: {again:?}"
    );
}

#[test]
fn a_partial_download_resumes_where_it_stopped() {
    let files = files_of(&tiny_dev());
    let name = "vae/diffusion_pytorch_model.safetensors";
    let bytes = files[name].clone();
    let fake = FakeHub::start(files);
    let cache = tempfile::tempdir().unwrap();
    let blobs = cache
        .path()
        .join("models--studio-tests--tiny-flux-dev/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let half = bytes.len() / 2;
    std::fs::write(blobs.join(format!("{}.part", etag(&bytes))), &bytes[..half]).unwrap();

    let hub = hub(&fake.url, cache.path());
    load(&options(), &hub).unwrap();
    let asked: Vec<String> = fake
        .file_requests()
        .into_iter()
        .filter(|r| r.contains(name))
        .collect();
    assert_eq!(
        asked,
        [format!("/{REPO}/resolve/main/{name} bytes={half}-")]
    );
    assert_eq!(std::fs::read(blobs.join(etag(&bytes))).unwrap(), bytes);
}

#[test]
fn a_complete_cached_snapshot_loads_when_the_hub_refuses_connections_or_offline() {
    let cache = tempfile::tempdir().unwrap();
    cached_copy(cache.path());
    let unreachable = hub(&refusing_endpoint(), cache.path());
    assert!(options().is_ready_in(&unreachable));
    load(&options(), &unreachable).unwrap();
    let offline = Hub {
        offline: true,
        ..unreachable
    };
    load(&options(), &offline).unwrap();
}

#[test]
fn an_incomplete_cached_snapshot_offline_fails_naming_what_is_missing() {
    let cache = tempfile::tempdir().unwrap();
    let snapshot = cached_copy(cache.path());
    let shard = "transformer/diffusion_pytorch_model-00002-of-00003.safetensors";
    std::fs::remove_file(snapshot.join(shard)).unwrap();
    std::fs::remove_file(snapshot.join("vae/config.json")).unwrap();
    let unreachable = hub(&refusing_endpoint(), cache.path());
    assert!(!options().is_ready_in(&unreachable));
    for hub in [
        unreachable.clone(),
        Hub {
            offline: true,
            ..unreachable
        },
    ] {
        let err = format!("{:#}", load(&options(), &hub).err().unwrap());
        assert!(
            err.contains(shard) && err.contains("vae/config.json") && err.contains("incomplete"),
            "{err}"
        );
    }
}

#[test]
fn a_model_never_cached_fails_offline_saying_where_it_looked() {
    let cache = tempfile::tempdir().unwrap();
    let hub = Hub {
        offline: true,
        ..hub(&refusing_endpoint(), cache.path())
    };
    let err = format!("{:#}", load(&options(), &hub).err().unwrap());
    assert!(
        err.contains("HF_HUB_OFFLINE") && err.contains("models--studio-tests--tiny-flux-dev"),
        "{err}"
    );
}

#[test]
fn a_transformer_file_with_a_hub_source_downloads_no_transformer_weights() {
    let fake = FakeHub::start(files_of(&tiny_dev()));
    let cache = tempfile::tempdir().unwrap();
    let hub = hub(&fake.url, cache.path());
    let opts = LoadOptions {
        transformer_file: Some(tiny_dev().join("flux1-tiny-dev.safetensors")),
        ..options()
    };
    load(&opts, &hub).unwrap();
    let fetched = fake.file_requests();
    assert!(
        fetched
            .iter()
            .any(|r| r.contains("transformer/config.json")),
        "the folder's config still tells what the file cannot: {fetched:?}"
    );
    assert!(
        !fetched
            .iter()
            .any(|r| r.contains("transformer/diffusion_pytorch_model")),
        "{fetched:?}"
    );
    assert!(opts.is_ready_in(&hub));
    assert!(
        !options().is_ready_in(&hub),
        "without the file it lacks the weights"
    );
}

#[test]
fn a_new_revision_downloads_only_the_files_that_changed() {
    let cache = tempfile::tempdir().unwrap();
    let mut files = files_of(&tiny_dev());
    let first = FakeHub::start(files.clone());
    load(&options(), &hub(&first.url, cache.path())).unwrap();

    const NEXT: &str = "89abcdef0123456789abcdef0123456789abcdef";
    let changed = "scheduler/scheduler_config.json";
    files.get_mut(changed).unwrap().extend_from_slice(b"\n");
    let next = FakeHub::at(NEXT, files);
    let hub = hub(&next.url, cache.path());
    load(&options(), &hub).unwrap();
    let fetched = next.file_requests();
    assert_eq!(
        fetched,
        [format!("/{REPO}/resolve/main/{changed} bytes=0-")]
    );
    let repo = cache.path().join("models--studio-tests--tiny-flux-dev");
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).unwrap(),
        NEXT
    );
    assert_eq!(
        hub.cached_snapshot(REPO),
        Some(repo.join("snapshots").join(NEXT))
    );
}
