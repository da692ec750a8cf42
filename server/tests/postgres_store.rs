//! The studio on a PostgreSQL store, through the real binary and a throwaway PostgreSQL cluster (Debian's
//! `initdb`): refused until `studio migrate`, then its jobs, events, tokens and conversations live in
//! PostgreSQL, and survive both PostgreSQL restarting under a running server and the server's kill -9.

mod common;

use std::process::Command;

use common::{repo_root, Api, Binary};
use serde_json::json;
use server::store::throwaway::ThrowawayPostgres;

/// Runs `studio <args>`; (success, stdout, stderr).
fn studio(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_studio"))
        .current_dir(repo_root())
        .args(args)
        .env_remove("STUDIO_DATABASE")
        .env("RUST_LOG", "warn")
        .output()
        .expect("running studio");
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// A finished generation's job id.
async fn generate(client: &Api, prompt: &str) -> String {
    let (status, body) = client
        .post(
            "/generate/",
            json!({"prompt": prompt, "steps": 2, "seed": 1}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["job_id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_studio_keeps_its_store_in_postgresql_across_a_postgresql_restart_and_its_own_kill_9() {
    let postgres = ThrowawayPostgres::start()
        .expect("this test needs Debian's postgresql: run `bash scripts/postgres`");
    let url = postgres.url();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();

    let (started, _, refusal) = studio(&[
        "serve",
        "--port",
        "0",
        "--data-dir",
        data,
        "--database",
        &url,
    ]);
    assert!(
        !started,
        "a server started on an unmigrated PostgreSQL store"
    );
    assert!(
        refusal.contains("run `studio migrate --database"),
        "{refusal}"
    );
    let (migrated, _, said) = studio(&["migrate", "--database", &url]);
    assert!(migrated, "{said}");
    assert!(said.contains("schema 0 -> "), "{said}");
    let (created, token, said) =
        studio(&["token", "create", "--user", "alice", "--database", &url]);
    assert!(created, "{said}");

    let server = Binary::start(dir.path(), &["--database", &url]);
    let alice = Api::new(server.url.clone()).with_token(Some(token.trim()));
    assert_eq!(Api::new(server.url.clone()).get("/jobs/").await.0, 401);
    let before = generate(&alice, "a fox before the restart").await;
    let (status, answer) = alice
        .post("/chat/", json!({"message": "hello", "max_tokens": 2}))
        .await;
    assert_eq!(status, 200, "{answer}");

    // PostgreSQL stops as in a crash and comes back; the running server carries on.
    postgres.stop().unwrap();
    postgres.start_server().unwrap();
    let after = generate(&alice, "a fox after the restart").await;
    assert_eq!(alice.get(&format!("/images/{after}")).await.0, 200);

    server.kill();
    let server = Binary::start(dir.path(), &["--database", &url]);
    let alice = Api::new(server.url.clone()).with_token(Some(token.trim()));
    let (status, list) = alice.get("/jobs/").await;
    assert_eq!(status, 200, "{list}");
    let mut listed: Vec<(String, String)> = list["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| {
            (
                j["id"].as_str().unwrap().into(),
                j["status"].as_str().unwrap().into(),
            )
        })
        .collect();
    listed.sort();
    let mut expected = vec![
        (before, "completed".to_owned()),
        (after, "completed".to_owned()),
    ];
    expected.sort();
    assert_eq!(listed, expected);
    let (_, conversations) = alice.get("/chat/conversations").await;
    assert_eq!(
        conversations.as_array().map(Vec::len),
        Some(1),
        "{conversations}"
    );
}
