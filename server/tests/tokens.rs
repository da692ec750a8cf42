//! Users' API tokens through the real binary and its `token` command: each user sees only their own
//! jobs, images and conversations (others' are 404, as missing ones), an admin's token and the server's
//! `--token` see all, a revoked token is refused with 401, and WebSockets take the same tokens.

mod common;

use std::path::Path;
use std::process::Command;

use common::{repo_root, Api, Binary};
use futures_util::StreamExt;
use serde_json::{json, Value};

/// Runs `studio token ...` on the data directory; (success, stdout, stderr).
fn token_command(data: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_studio"))
        .current_dir(repo_root())
        .arg("token")
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .env("RUST_LOG", "warn")
        .output()
        .expect("running studio token");
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn create(data: &Path, user: &str, admin: bool) -> String {
    let mut args = vec!["create", "--user", user];
    if admin {
        args.push("--admin");
    }
    let (ok, out, err) = token_command(data, &args);
    assert!(ok, "{err}");
    out.trim().to_owned()
}

/// A generation's job id.
async fn generate(client: &Api) -> String {
    let (status, body) = client
        .post(
            "/generate/",
            json!({"prompt": "a fox", "steps": 2, "seed": 1}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["job_id"].as_str().unwrap().to_owned()
}

async fn job_ids(client: &Api) -> Vec<String> {
    let (status, list) = client.get("/jobs/").await;
    assert_eq!(status, 200, "{list}");
    let mut ids: Vec<String> = list["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread")]
async fn a_users_token_sees_only_that_users_jobs_images_and_conversations_and_an_admin_sees_all() {
    let dir = tempfile::tempdir().unwrap();
    let alice_token = create(dir.path(), "alice", false);
    let bob_token = create(dir.path(), "bob", false);
    let admin_token = create(dir.path(), "root", true);
    let studio = Binary::start(dir.path(), &["--token", "operator-secret"]);
    let api = Api::new(studio.url.clone());
    let client = |token: Option<&str>| api.with_token(token);
    let (alice, bob, admin, operator, nobody) = (
        client(Some(&alice_token)),
        client(Some(&bob_token)),
        client(Some(&admin_token)),
        client(Some("operator-secret")),
        client(None),
    );

    let alices = generate(&alice).await;
    let bobs = generate(&bob).await;
    assert_eq!(job_ids(&alice).await, std::slice::from_ref(&alices));
    assert_eq!(job_ids(&bob).await, std::slice::from_ref(&bobs));
    let both = sorted(vec![alices.clone(), bobs.clone()]);
    assert_eq!(job_ids(&admin).await, both);
    assert_eq!(job_ids(&operator).await, both);
    let (_, record) = alice.get(&format!("/jobs/{alices}")).await;
    assert_eq!(record["owner"], "alice");

    // Bob's job, its image and its cancel are not found for Alice, as a job that does not exist.
    for path in [format!("/jobs/{bobs}"), format!("/images/{bobs}")] {
        let (status, body) = alice.get(&path).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(body["error"]["code"], "not_found");
        assert_eq!(admin.get(&path).await.0, 200, "{path}");
    }
    assert_eq!(alice.get(&format!("/images/{alices}")).await.0, 200);
    assert_eq!(
        alice
            .post(&format!("/jobs/{bobs}/cancel"), json!({}))
            .await
            .0,
        404
    );
    // Nor may she draw with his trained LoRA: the id is not one she knows.
    let (status, _) = alice
        .post("/generate/", json!({"prompt": "a fox", "lora": bobs}))
        .await;
    assert_eq!(status, 422);

    // Conversations: Bob's is his.
    let (status, answer) = bob
        .post("/chat/", json!({"message": "hello", "max_tokens": 2}))
        .await;
    assert_eq!(status, 200, "{answer}");
    let conversation = answer["conversation_id"].as_str().unwrap().to_owned();
    let (_, mine) = alice.get("/chat/conversations").await;
    assert_eq!(mine, json!([]));
    let (_, his) = bob.get("/chat/conversations").await;
    assert_eq!(his.as_array().unwrap().len(), 1);
    let path = format!("/chat/conversations/{conversation}");
    assert_eq!(alice.get(&path).await.0, 404);
    let (status, _) = alice
        .post(
            "/chat/",
            json!({"message": "hi", "conversation_id": conversation, "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 404);
    assert_eq!(admin.get(&path).await.0, 200);

    // No token, or a made-up one: 401.
    assert_eq!(nobody.get("/jobs/").await.0, 401);
    assert_eq!(client(Some("studio_madeup")).get("/jobs/").await.0, 401);

    // WebSockets take the same tokens in `?token=`: Alice's generation stream works and records her job.
    let ws = studio.url.replace("http://", "ws://");
    let (mut socket, _) =
        tokio_tungstenite::connect_async(format!("{ws}/ws/generate?token={alice_token}"))
            .await
            .unwrap();
    use futures_util::SinkExt;
    socket
        .send(tokio_tungstenite::tungstenite::Message::Text(
            json!({"prompt": "a cat", "steps": 2}).to_string().into(),
        ))
        .await
        .unwrap();
    let mut job = None;
    while let Some(Ok(message)) = socket.next().await {
        if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
            let event: Value = serde_json::from_str(&text).unwrap();
            job = event["job_id"].as_str().map(str::to_owned);
        }
    }
    let job = job.expect("the stream named its job");
    assert!(job_ids(&alice).await.contains(&job));
    assert!(!job_ids(&bob).await.contains(&job));
    let refused = tokio_tungstenite::connect_async(format!("{ws}/ws/generate?token=studio_madeup"))
        .await
        .expect_err("a bad token is refused before the upgrade");
    assert!(refused.to_string().contains("401"), "{refused}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_token_is_refused_with_401_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let token = create(dir.path(), "carol", false);
    let studio = Binary::start(dir.path(), &[]);
    let carol = Api::new(studio.url.clone()).with_token(Some(&token));
    assert_eq!(carol.get("/jobs/").await.0, 200);
    // With tokens in the store, the server is no longer open.
    let nobody = carol.with_token(None);
    assert_eq!(nobody.get("/jobs/").await.0, 401);
    let carol = nobody.with_token(Some(&create(dir.path(), "carol", false)));
    assert_eq!(carol.get("/jobs/").await.0, 200);
    let (ok, _, err) = token_command(dir.path(), &["revoke", "carol"]);
    assert!(ok, "{err}");
    let (status, body) = carol.get("/jobs/").await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "unauthorized");
    // Her tokens were the last ones: the server does not become open again.
    let nobody = carol.with_token(None);
    assert_eq!(nobody.get("/jobs/").await.0, 401);
}

#[test]
fn tokens_round_trip_through_the_cli_and_are_printed_only_at_creation() {
    let dir = tempfile::tempdir().unwrap();
    let token = create(dir.path(), "dave", true);
    assert!(token.starts_with("studio_") && token.len() > 60, "{token}");
    let (ok, list, _) = token_command(dir.path(), &["list"]);
    assert!(ok);
    let fields: Vec<&str> = list.trim().split('\t').collect();
    assert_eq!(&fields[1..3], ["dave", "admin"], "{list}");
    assert!(!list.contains(&token), "the list shows the token itself");
    let db = std::fs::read(dir.path().join("studio.db")).unwrap();
    assert!(
        !db.windows(token.len()).any(|w| w == token.as_bytes()),
        "the token is stored in clear"
    );
    let (ok, _, _) = token_command(dir.path(), &["revoke", fields[0]]);
    assert!(ok);
    let (_, list, _) = token_command(dir.path(), &["list"]);
    assert_eq!(list, "");
    let (ok, _, err) = token_command(dir.path(), &["revoke", "dave"]);
    assert!(!ok);
    assert!(err.contains("studio token list"), "{err}");
    let (ok, _, err) = token_command(dir.path(), &["create", "--user", "has space"]);
    assert!(!ok);
    assert!(err.contains("user name"), "{err}");
}
