//! The chat with the shipped language model (SmolLM2-135M-Instruct from `scripts/fetch-models`): a greeting
//! gets an answer streamed over `/ws/chat`, a stop stops it, conversations are kept across restarts and can
//! be deleted, and bad requests get JSON errors.

mod common;

use std::sync::Arc;

use app::{
    ChatEvent, ChatFinish, Conversation, ConversationSummary, ErrorCode, PromptHelpResponse,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use server::config::ChatConfig;
use server::jobs::capability::{Capabilities, Chat};
use tokio_tungstenite::tungstenite::Message;

fn chat_model() -> std::path::PathBuf {
    let path = common::repo_root().join(engine::chat::DEFAULT_LM_FILE);
    assert!(
        path.is_file(),
        "the chat model is missing at {}: run scripts/fetch-models first",
        path.display()
    );
    path
}

fn docs_encoder() -> String {
    let dir = common::repo_root().join(engine::classifier::DEFAULT_ENCODER_DIR);
    assert!(
        dir.join("config.json").is_file(),
        "MiniLM is missing at {}: run scripts/fetch-models first",
        dir.display()
    );
    dir.display().to_string()
}

/// The studio with the real chat capability (the model loaded at the first answer) and nothing else.
async fn studio(data: &std::path::Path) -> (String, server::Running) {
    let mut config = common::config(data);
    config.chat.chat_model = chat_model().display().to_string();
    config.chat.chat_device = engine::device::DeviceChoice::Cpu;
    // Indexing the docs at each start is most of these tests' time; the docs' own test turns it on.
    config.chat.chat_docs = false;
    let chat = server::capabilities::chat::load(&config.chat).unwrap();
    let caps = Capabilities {
        chat: Some(Arc::new(chat) as Arc<dyn Chat>),
        ..Capabilities::default()
    };
    let running = server::start(&config, caps).await.unwrap();
    (format!("http://{}", running.addr), running)
}

/// POSTs `body` as JSON to the studio's `path`: the status and the answer's JSON.
async fn post_json(url: &str, path: &str, body: &Value) -> (u16, Value) {
    let answer = reqwest::Client::new()
        .post(format!("{url}{path}"))
        .json(body)
        .send()
        .await
        .unwrap();
    (answer.status().as_u16(), answer.json().await.unwrap())
}

/// `GET /chat/conversations`.
async fn conversations(url: &str) -> Vec<ConversationSummary> {
    reqwest::get(format!("{url}/chat/conversations"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn events(url: &str, request: Value, stop_after_first: bool) -> Vec<ChatEvent> {
    let ws = format!("{}/ws/chat", url.replace("http://", "ws://"));
    let (mut socket, _) = tokio_tungstenite::connect_async(&ws).await.unwrap();
    socket
        .send(Message::Text(request.to_string().into()))
        .await
        .unwrap();
    let mut events = Vec::new();
    while let Some(Ok(message)) = socket.next().await {
        let Message::Text(text) = message else {
            continue;
        };
        let event: ChatEvent = serde_json::from_str(&text).unwrap();
        let first_token = matches!(event, ChatEvent::Token { .. })
            && !events.iter().any(|e| matches!(e, ChatEvent::Token { .. }));
        events.push(event);
        if stop_after_first && first_token {
            socket
                .send(Message::Text(r#"{"type": "stop"}"#.into()))
                .await
                .unwrap();
        }
    }
    events
}

fn tokens(events: &[ChatEvent]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            ChatEvent::Token { text } => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_greeting_gets_an_answer_streamed_token_by_token_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (url, _running) = studio(dir.path()).await;
    let events = events(
        &url,
        json!({"message": "Hello!", "max_tokens": 24, "temperature": 0}),
        false,
    )
    .await;
    let ChatEvent::Start {
        conversation_id, ..
    } = &events[0]
    else {
        panic!("no start: {events:?}");
    };
    let pieces = events
        .iter()
        .filter(|e| matches!(e, ChatEvent::Token { .. }))
        .count();
    assert!(pieces >= 3, "streamed in pieces: {events:?}");
    let Some(ChatEvent::Done(done)) = events.last() else {
        panic!("no done: {events:?}");
    };
    assert_eq!(done.answer, tokens(&events).trim());
    assert!(done.answer.split_whitespace().count() >= 3, "{done:?}");
    assert_eq!(&done.conversation_id, conversation_id);
    assert_eq!(done.model, chat_model().display().to_string());
    let conversation: Conversation =
        reqwest::get(format!("{url}/chat/conversations/{conversation_id}"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    let said: Vec<&str> = conversation
        .messages
        .iter()
        .map(|m| m.content.as_str())
        .collect();
    assert_eq!(said, ["Hello!", done.answer.as_str()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_ends_the_answer_where_it_is_and_keeps_what_it_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let (url, _running) = studio(dir.path()).await;
    let events = events(
        &url,
        json!({"message": "Tell me a long story about a dragon.", "max_tokens": 400, "seed": 3}),
        true,
    )
    .await;
    let Some(ChatEvent::Done(done)) = events.last() else {
        panic!("no done: {events:?}");
    };
    assert_eq!(done.finish, ChatFinish::Cancelled, "{done:?}");
    // The stop is seen after the piece in flight: a few tokens, never the whole budget.
    assert!(done.tokens < 20, "{done:?}");
    let conversation: Conversation =
        reqwest::get(format!("{url}/chat/conversations/{}", done.conversation_id))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(conversation.messages[1].finish, Some(ChatFinish::Cancelled));
    assert_eq!(conversation.messages[1].content, done.answer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_survive_a_restart_continue_and_can_be_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let (url, running) = studio(dir.path()).await;
    let first: app::ChatResponse = http
        .post(format!("{url}/chat/"))
        .json(&json!({"message": "Hi there", "max_tokens": 8, "temperature": 0}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    running.jobs.shutdown();
    running.server.abort();
    let _ = running.server.await;

    let (url, _running) = studio(dir.path()).await;
    let list: Vec<ConversationSummary> = reqwest::get(format!("{url}/chat/conversations/"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(
        (
            list[0].id.as_str(),
            list[0].title.as_str(),
            list[0].messages
        ),
        (first.conversation_id.as_str(), "Hi there", 2)
    );
    let next: app::ChatResponse = http
        .post(format!("{url}/chat/"))
        .json(&json!({"message": "And again", "conversation_id": first.conversation_id, "max_tokens": 8}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(next.conversation_id, first.conversation_id);
    let one = format!("{url}/chat/conversations/{}", first.conversation_id);
    let conversation: Conversation = reqwest::get(&one).await.unwrap().json().await.unwrap();
    assert_eq!(conversation.messages.len(), 4);
    assert_eq!(http.delete(&one).send().await.unwrap().status(), 204);
    assert_eq!(reqwest::get(&one).await.unwrap().status(), 404);
    assert_eq!(http.delete(&one).send().await.unwrap().status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_chat_requests_get_json_errors_before_anything_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (url, _running) = studio(dir.path()).await;
    let post = |body: Value| {
        let url = url.clone();
        async move {
            let (status, body) = post_json(&url, "/chat/", &body).await;
            let code = body["error"]["code"].as_str().unwrap_or_default();
            (status, code.to_owned())
        }
    };
    assert_eq!(
        post(json!({"message": "  "})).await,
        (422, "validation".into())
    );
    assert_eq!(
        post(json!({"message": "hi", "temperature": 9})).await,
        (422, "validation".into())
    );
    assert_eq!(
        post(json!({"message": "hi", "conversation_id": "11111111-1111-4111-8111-111111111111"}))
            .await,
        (404, "not_found".into())
    );
    assert_eq!(
        post(json!({"message": "hi", "conversation_id": "../x"})).await,
        (404, "not_found".into())
    );
    let list = conversations(&url).await;
    assert!(list.is_empty(), "{list:?}");
    // A refused stream request: one error event.
    let events = events(&url, json!({"message": ""}), false).await;
    assert!(
        matches!(&events[..], [ChatEvent::Error(e)] if e.code == ErrorCode::Validation),
        "{events:?}"
    );
}

#[tokio::test]
async fn without_a_language_model_the_chat_answers_503_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path());
    config.chat.chat_model = "no-such-model".into();
    let err = server::capabilities::chat::load(&config.chat)
        .err()
        .expect("an unknown model is refused");
    let caps = Capabilities {
        chat_error: Some(format!("{err:#}")),
        ..Capabilities::default()
    };
    let running = server::start(&config, caps).await.unwrap();
    let answer = reqwest::Client::new()
        .post(format!("http://{}/chat/", running.addr))
        .json(&json!({"message": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 503);
    let body: Value = answer.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("none of the presets"),
        "{body}"
    );
}

async fn help(url: &str, body: Value) -> PromptHelpResponse {
    let answer = reqwest::Client::new()
        .post(format!("{url}/chat/prompt"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    answer.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_help_makes_a_short_request_a_longer_prompt_and_a_follow_up_changes_it() {
    let dir = tempfile::tempdir().unwrap();
    let (url, _running) = studio(dir.path()).await;
    let first = help(&url, json!({"request": "red apple"})).await;
    let prompt = first.prompt.to_lowercase();
    assert!(prompt.contains("red apple"), "{first:?}");
    assert!(
        first.prompt.split_whitespace().count() >= 6,
        "a detailed prompt: {first:?}"
    );
    assert!(first.prompt.chars().count() <= app::prompt::MAX_HELPED_PROMPT_CHARS);
    assert_eq!(first.previous_prompt, None);

    // The follow-up names the last image through the context, as the chat sends it.
    let next = help(
        &url,
        json!({"request": "same but at night", "context": [
            {"role": "user", "text": "red apple", "kind": "text"},
            {"role": "assistant", "text": first.prompt, "kind": "image"},
        ]}),
    )
    .await;
    assert_eq!(next.previous_prompt.as_deref(), Some(first.prompt.as_str()));
    let changed = next.prompt.to_lowercase();
    assert!(changed.contains("apple"), "the subject is kept: {next:?}");
    assert!(changed.contains("night"), "the change is made: {next:?}");
    assert_ne!(next.prompt, first.prompt);

    // "another one" is the same prompt again; bad requests are refused before the model runs.
    let again = help(
        &url,
        json!({"request": "another one", "previous_prompt": first.prompt}),
    )
    .await;
    assert_eq!(again.prompt, first.prompt);
    let refused = reqwest::Client::new()
        .post(format!("{url}/chat/prompt"))
        .json(&json!({"request": " "}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 422);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_question_about_training_a_lora_is_answered_from_the_training_doc_and_cites_it_unless_docs_are_off(
) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path());
    config.chat.chat_model = chat_model().display().to_string();
    config.chat.chat_device = engine::device::DeviceChoice::Cpu;
    config.chat.chat_docs_encoder = docs_encoder();
    config.chat.chat_docs = true;
    let chat = server::capabilities::chat::load(&config.chat).unwrap();
    // The retrieval itself: the nearest section is the training doc's.
    let found = chat.studio_docs("how do I train a LoRA?", 3).unwrap();
    assert_eq!(found[0].1.doc, "docs/training.md", "{found:#?}");
    // Small talk and writing requests find nothing close enough to be given to the model.
    for other in [
        "Hello!",
        "hi there, how are you today?",
        "write a haiku about autumn",
    ] {
        let (similarity, chunk) = &chat.studio_docs(other, 1).unwrap()[0];
        assert!(
            *similarity < 0.45,
            "{other:?} matched {} at {similarity}",
            chunk.citation()
        );
    }
    // Turned off, no question gets docs.
    let without = server::capabilities::chat::load(&ChatConfig {
        chat_docs: false,
        ..config.chat.clone()
    })
    .unwrap();
    assert!(without
        .studio_docs("how do I train a LoRA?", 3)
        .unwrap()
        .is_empty());
    let caps = Capabilities {
        chat: Some(Arc::new(chat) as Arc<dyn Chat>),
        ..Capabilities::default()
    };
    let running = server::start(&config, caps).await.unwrap();
    let answer: app::ChatResponse = reqwest::Client::new()
        .post(format!("http://{}/chat/", running.addr))
        .json(&json!({"message": "How do I train a LoRA?", "max_tokens": 16, "temperature": 0}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        answer
            .sources
            .first()
            .is_some_and(|s| s.starts_with("docs/training.md § ")),
        "{answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_started_for_an_image_is_listed_empty_and_bad_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (url, _running) = studio(dir.path()).await;
    let create = |body: Value| {
        let url = url.clone();
        async move { post_json(&url, "/chat/conversations", &body).await }
    };
    let (status, made) = create(json!({"title": "red apple"})).await;
    assert_eq!(status, 201, "{made}");
    let made: Conversation = serde_json::from_value(made).unwrap();
    assert_eq!((made.title.as_str(), made.messages.len()), ("red apple", 0));
    let list = conversations(&url).await;
    assert_eq!(list.len(), 1);
    assert_eq!(
        (list[0].id.as_str(), list[0].messages),
        (made.id.as_str(), 0)
    );
    for bad in [
        json!({"title": "  "}),
        json!({"title": "x", "messages": []}),
        json!({}),
    ] {
        let (status, body) = create(bad.clone()).await;
        assert_eq!(status, 422, "{bad}: {body}");
    }
    // An image of a job this studio never ran is not recorded.
    let image = json!({"job_id": "11111111-1111-4111-8111-111111111111", "prompt": "red apple"});
    let images = format!("/chat/conversations/{}/images", made.id);
    assert_eq!(post_json(&url, &images, &image).await.0, 404);
    let list = conversations(&url).await;
    assert_eq!(list.len(), 1, "the refused ones kept nothing");
    assert_eq!(list[0].messages, 0);
}
