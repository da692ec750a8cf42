//! Property-based fuzzing of the request handling, against the real binary (flux-tiny on the CPU, the real
//! classifier): random and near-valid JSON bodies, raw bytes (invalid UTF-8 included), hostile ids in every
//! path that takes one, and training form fields. Whatever arrives, the answer is a status from the API's
//! list with the JSON error shape (never a 500, an HTML page or a hang), a 200 is a well-formed result, and
//! no request creates anything in the data directory except its own job's files.
//!
//! The corpus in `tests/fuzz-corpus/` (hostile inputs found or written by hand) is replayed first on every
//! run; proptest then draws `FUZZ_CASES` (default 48) fresh cases per property and records any failure it
//! finds in `tests/fuzz_api.proptest-regressions`, which is replayed on later runs.

mod common;

use std::time::Duration;

use common::{require_classifier_encoder, zip_of, Binary};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner};
use serde_json::{json, Value};

/// Every status the API documents.
const DOCUMENTED: [u16; 11] = [200, 202, 400, 404, 405, 409, 413, 415, 422, 429, 503];

struct Client {
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
    url: String,
}

impl Client {
    fn send(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> (u16, Vec<u8>) {
        self.rt.block_on(async {
            let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
            let mut request = self.http.request(method, format!("{}{path}", self.url));
            if let Some(ct) = content_type {
                request = request.header("content-type", ct);
            }
            let response = request.body(body).send().await.expect("the server answers");
            let status = response.status().as_u16();
            (status, response.bytes().await.unwrap().to_vec())
        })
    }

    fn multipart(&self, form: reqwest::multipart::Form) -> (u16, Vec<u8>) {
        self.rt.block_on(async {
            let response = self
                .http
                .post(format!("{}/train/", self.url))
                .multipart(form)
                .send()
                .await
                .expect("the server answers");
            let status = response.status().as_u16();
            (status, response.bytes().await.unwrap().to_vec())
        })
    }
}

/// The API's promise for any answer: a documented status; JSON always; the error shape unless 2xx.
fn check_answer(status: u16, body: &[u8]) -> Result<Value, TestCaseError> {
    prop_assert!(
        DOCUMENTED.contains(&status),
        "status {status}: {}",
        String::from_utf8_lossy(body)
    );
    let json: Value = serde_json::from_slice(body)
        .map_err(|_| TestCaseError::fail(format!("not JSON: {}", String::from_utf8_lossy(body))))?;
    if status >= 300 {
        prop_assert!(json["error"]["code"].is_string(), "{json}");
        prop_assert!(
            json["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{json}"
        );
    }
    Ok(json)
}

fn runner(cases: u32) -> TestRunner {
    let cases = std::env::var("FUZZ_CASES").map_or(cases, |c| c.parse().expect("FUZZ_CASES"));
    TestRunner::new(Config {
        cases,
        source_file: Some(file!()),
        failure_persistence: Some(Box::new(FileFailurePersistence::SourceParallel(
            "proptest-regressions",
        ))),
        ..Config::default()
    })
}

/// Any JSON value, with keys drawn mostly from the API's own field names so that fields are hit often.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::from),
    ];
    let key = prop_oneof![
        prop::sample::select(vec![
            "prompt",
            "seed",
            "steps",
            "guidance",
            "width",
            "height",
            "lora",
            "lora_scale",
            "model",
            "type",
        ])
        .prop_map(str::to_owned),
        ".{0,12}",
    ];
    leaf.prop_recursive(4, 32, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map(key.clone(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A field value near the edge of what `/generate/` accepts: valid, out of range, or of the wrong type.
fn edgy(valid: Vec<Value>) -> impl Strategy<Value = Option<Value>> {
    prop::option::of(prop_oneof![
        prop::sample::select(valid),
        prop::sample::select(vec![
            json!(-1),
            json!(0),
            json!(1e300),
            json!(u64::MAX),
            json!(-0.5),
            json!("12"),
            json!([]),
            json!({}),
            Value::Null,
            json!(true),
        ]),
    ])
}

/// Generation requests that are valid, or invalid in one or a few fields. Valid ones stay small (the tiny
/// model at 64-128 px, at most 3 steps) so each case costs milliseconds.
fn near_valid_generate() -> impl Strategy<Value = Value> {
    (
        prop_oneof![".{0,80}", Just(String::new()), Just("x".repeat(4001))],
        edgy(vec![json!(0), json!(42), json!(u64::MAX)]),
        edgy(vec![json!(1), json!(3)]),
        edgy(vec![json!(0.0), json!(3.5), json!(30.0)]),
        edgy(vec![json!(64), json!(128), json!(65), json!(4096)]),
        edgy(vec![json!(64), json!(80)]),
        edgy(vec![
            json!("none"),
            json!("../../etc/passwd"),
            json!("no-such-lora"),
            json!(""),
        ]),
        edgy(vec![json!(0.0), json!(1.0), json!(100.0)]),
        edgy(vec![json!("flux-tiny"), json!("flux-nope"), json!("")]),
    )
        .prop_map(
            |(prompt, seed, steps, guidance, width, height, lora, lora_scale, model)| {
                let mut body = json!({ "prompt": prompt });
                for (k, v) in [
                    ("seed", seed),
                    ("steps", steps),
                    ("guidance", guidance),
                    ("width", width),
                    ("height", height),
                    ("lora", lora),
                    ("lora_scale", lora_scale),
                    ("model", model),
                ] {
                    if let Some(v) = v {
                        body[k] = v;
                    }
                }
                body
            },
        )
}

/// Files under the data directory, relative to it.
fn data_files(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out
}

#[test]
fn no_request_gets_a_500_a_non_json_answer_or_writes_outside_its_place() {
    require_classifier_encoder();
    let dir = tempfile::tempdir().unwrap();
    let server = Binary::start(dir.path(), &[]);
    let client = Client {
        rt: tokio::runtime::Runtime::new().unwrap(),
        // Only a hang should fail the test: a valid /generate/ of the corpus draws an image, which a
        // 2-core CI machine running other test binaries can take minutes over.
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(600))
            .build()
            .unwrap(),
        url: server.url.clone(),
    };

    // 1. The corpus: every case must get the status it names.
    let corpus =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-corpus/cases.jsonl");
    for line in std::fs::read_to_string(&corpus).unwrap().lines() {
        let case: Value = serde_json::from_str(line).unwrap();
        let body = match (&case["body"], &case["body_repeat"]) {
            (Value::String(s), Value::Number(n)) => s.repeat(n.as_u64().unwrap() as usize),
            (Value::String(s), _) => s.clone(),
            _ => String::new(),
        };
        let mut body = body.into_bytes();
        if let Some(hex) = case["body_hex"].as_str() {
            body = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
        }
        let (status, answer) = client.send(
            case["method"].as_str().unwrap(),
            case["path"].as_str().unwrap(),
            case["content_type"].as_str(),
            body,
        );
        check_answer(status, &answer).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert_eq!(
            status,
            case["expect"].as_u64().unwrap() as u16,
            "{line}: {}",
            String::from_utf8_lossy(&answer)
        );
    }

    // 2. Any JSON, and near-valid generation requests, to both JSON routes.
    runner(48)
        .run(
            &(
                prop::sample::select(vec!["/generate/", "/classify/", "/settings/"]),
                any_json(),
            ),
            |(path, body)| {
                let method = if path == "/settings/" { "PUT" } else { "POST" };
                let (status, answer) = client.send(
                    method,
                    path,
                    Some("application/json"),
                    body.to_string().into_bytes(),
                );
                check_answer(status, &answer)?;
                Ok(())
            },
        )
        .unwrap();
    runner(48)
        .run(&near_valid_generate(), |body| {
            let (status, answer) = client.send(
                "POST",
                "/generate/",
                Some("application/json"),
                body.to_string().into_bytes(),
            );
            let json = check_answer(status, &answer)?;
            if status == 200 {
                // A valid request's answer: the image and the settings asked for.
                prop_assert!(json["image"].as_str().is_some_and(|i| !i.is_empty()));
                for k in ["width", "height", "steps", "seed"] {
                    if body[k].is_u64() {
                        prop_assert_eq!(&json[k], &body[k], "{}", k);
                    }
                }
            } else {
                prop_assert!([413, 422].contains(&status), "{status} for {body}");
            }
            Ok(())
        })
        .unwrap();

    // 3. Raw bytes, invalid UTF-8 included, as JSON or another content type.
    runner(48)
        .run(
            &(
                prop::collection::vec(any::<u8>(), 0..200),
                prop::option::of(prop::sample::select(vec![
                    "application/json",
                    "text/plain",
                    "multipart/form-data",
                    "multipart/form-data; boundary=x",
                    "application/json; charset=latin1",
                ])),
                prop::sample::select(vec!["/generate/", "/classify/", "/train/", "/settings/"]),
            ),
            |(body, content_type, path)| {
                let method = if path == "/settings/" { "PUT" } else { "POST" };
                let (status, answer) = client.send(method, path, content_type, body);
                let json = check_answer(status, &answer)?;
                prop_assert!(status >= 400, "{status}: {json}");
                Ok(())
            },
        )
        .unwrap();

    // 4. Hostile ids in every path that takes one: never found, never a file outside its folder.
    runner(64)
        .run(
            &(
                prop_oneof![
                    "[^\u{0}]{1,40}",
                    Just("...".to_owned()),
                    Just("../../studio.db".to_owned()),
                    Just("%2e%2e%2fstudio.db".to_owned()),
                    Just("00000000-0000-0000-0000-000000000000".to_owned()),
                    Just("/etc/passwd".to_owned()),
                ],
                prop::sample::select(vec![
                    ("GET", "/train/status/{}"),
                    ("GET", "/jobs/{}"),
                    ("POST", "/jobs/{}/cancel"),
                    ("POST", "/train/{}/resume"),
                    ("GET", "/images/{}"),
                    ("GET", "/loras/{}"),
                    (
                        "GET",
                        "/train/00000000-0000-0000-0000-000000000000/samples/{}",
                    ),
                    ("GET", "/train/{}/samples/x.png"),
                ]),
            ),
            |(id, (method, template))| {
                // A segment of dots alone, encoded or not, is resolved away by any URL parser (WHATWG
                // counts `%2E%2E` as `..`): no client can send it, and `/images/..` is the chat page.
                prop_assume!(!id.chars().all(|c| c == '.'));
                let segment: String = id
                    .bytes()
                    .map(|b| {
                        // Dots are encoded too: a bare `.` or `..` segment would be resolved away by the
                        // client's URL parser before it reached the server.
                        if b.is_ascii_alphanumeric() || b"-_~%".contains(&b) {
                            (b as char).to_string()
                        } else {
                            format!("%{b:02X}")
                        }
                    })
                    .collect();
                let path = template.replace("{}", &segment);
                let (status, answer) = client.send(method, &path, None, Vec::new());
                check_answer(status, &answer)?;
                // 503: resume needs training, which this build may lack; it answers before looking the id up.
                prop_assert!(
                    [400, 404, 405, 503].contains(&status),
                    "{status} for {path}"
                );
                Ok(())
            },
        )
        .unwrap();

    // 5. Training forms with every field wrong in some way: refused, and nothing of them stays behind.
    runner(32)
        .run(
            &(
                prop::option::of(prop_oneof![
                    Just(zip_of(&[("notes.txt", b"no images here")])),
                    Just(b"PK\x03\x04 not really a zip".to_vec()),
                    prop::collection::vec(any::<u8>(), 0..64),
                ]),
                prop::option::of(prop_oneof![
                    ".{0,30}",
                    Just("[1, 2]".to_owned()),
                    Just("[]".to_owned()),
                    Just(" , ".to_owned()),
                    Just("{\"a\": 1}".to_owned()),
                ]),
                prop::collection::btree_map("[a-z_]{1,12}", ".{0,20}", 0..4),
            ),
            |(dataset, keywords, extra)| {
                let mut form = reqwest::multipart::Form::new();
                if let Some(d) = dataset {
                    form = form.part(
                        "dataset",
                        reqwest::multipart::Part::bytes(d).file_name("d.zip"),
                    );
                }
                if let Some(k) = keywords {
                    form = form.text("keywords", k);
                }
                for (k, v) in extra {
                    form = form.text(k, v);
                }
                let (status, answer) = client.multipart(form);
                check_answer(status, &answer)?;
                prop_assert!(
                    status >= 400,
                    "{status}: {}",
                    String::from_utf8_lossy(&answer)
                );
                Ok(())
            },
        )
        .unwrap();

    // Only the database and generated images are there: no refused upload left a file.
    let stray: Vec<_> = data_files(dir.path())
        .into_iter()
        .filter(|f| !f.starts_with("studio.db") && !f.starts_with("images/"))
        .collect();
    assert!(
        stray.is_empty(),
        "files left by refused requests: {stray:?}"
    );
}
