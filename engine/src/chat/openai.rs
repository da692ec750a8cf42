//! An OpenAI-compatible server as the chat's model (Ollama, llama.cpp's `llama-server`, vLLM, …):
//! `POST {base}/chat/completions` with `"stream": true`, its server-sent events read as they come.

use std::io::{BufRead, BufReader};
use std::ops::ControlFlow;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde::Deserialize;
use serde_json::json;

use super::{Answer, FinishReason, LanguageModel, SamplingSettings, Turn};

pub struct OpenAiChat {
    /// Up to and including `/v1`, e.g. `http://127.0.0.1:11434/v1`.
    base_url: String,
    model: String,
    api_key: Option<String>,
    agent: ureq::Agent,
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Delta,
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct Delta {
    content: Option<String>,
}

impl OpenAiChat {
    pub fn new(base_url: &str, model: &str, api_key: Option<String>) -> OpenAiChat {
        OpenAiChat {
            base_url: base_url.trim_end_matches('/').to_string(),
            model: model.to_string(),
            api_key,
            agent: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(10))
                // Between two chunks of the stream, not for the whole answer.
                .timeout_read(Duration::from_secs(300))
                .build(),
        }
    }
}

impl LanguageModel for OpenAiChat {
    fn name(&self) -> &str {
        &self.model
    }

    fn answer(
        &mut self,
        turns: &[Turn],
        settings: &SamplingSettings,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Answer> {
        let url = format!("{}/chat/completions", self.base_url);
        let messages: Vec<_> = turns
            .iter()
            .map(|t| json!({"role": t.role.as_str(), "content": t.content}))
            .collect();
        let mut body = json!({
            "model": self.model,
            "messages": messages,
            "stream": true,
            "max_tokens": settings.max_tokens,
            "temperature": settings.temperature,
            "seed": settings.seed,
        });
        if let Some(p) = settings.top_p {
            body["top_p"] = json!(p);
        }
        let mut request = self.agent.post(&url);
        if let Some(key) = &self.api_key {
            request = request.set("Authorization", &format!("Bearer {key}"));
        }
        let response = request.send_json(body).map_err(|e| match e {
            ureq::Error::Status(code, response) => anyhow!(
                "the chat server at {url} answered {code}: {}",
                response.into_string().unwrap_or_default().trim()
            ),
            other => anyhow!("the chat server at {url} cannot be reached: {other}"),
        })?;
        let mut text = String::new();
        let mut pieces = 0usize;
        let mut finish = FinishReason::Length;
        for line in BufReader::new(response.into_reader()).lines() {
            let line = line.with_context(|| format!("reading the stream from {url}"))?;
            let Some(data) = line.strip_prefix("data:").map(str::trim) else {
                continue; // Comments, `event:` lines and the blank lines between events.
            };
            if data == "[DONE]" {
                break;
            }
            let chunk: Chunk = serde_json::from_str(data).with_context(|| {
                format!("{url} sent an event that is not a chat completion chunk: {data}")
            })?;
            for choice in chunk.choices {
                if let Some(piece) = choice.delta.content.filter(|p| !p.is_empty()) {
                    text.push_str(&piece);
                    pieces += 1;
                    if on_text(&piece).is_break() {
                        // Dropping the response closes the connection: the server stops generating.
                        return Ok(Answer {
                            text,
                            tokens: pieces,
                            finish: FinishReason::Cancelled,
                            prompt_tokens: 0,
                        });
                    }
                }
                match choice.finish_reason.as_deref() {
                    Some("length") => finish = FinishReason::Length,
                    Some(_) => finish = FinishReason::Stop,
                    None => {}
                }
            }
        }
        Ok(Answer {
            text,
            // The stream's chunks: servers send about one token each.
            tokens: pieces,
            finish,
            prompt_tokens: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::Role;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    /// A one-shot HTTP server that answers with `events` as an SSE stream and hands back the request.
    fn serve_once(events: &'static str) -> (String, std::thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            // Headers, then the JSON body whose length they give.
            loop {
                let n = stream.read(&mut buf).unwrap();
                request.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&request).to_string();
                if let Some(end) = text.find("\r\n\r\n") {
                    let length: usize = text
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if request.len() >= end + 4 + length {
                        break;
                    }
                }
            }
            let head =
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
            stream.write_all(head.as_bytes()).unwrap();
            stream.write_all(events.as_bytes()).unwrap();
            String::from_utf8_lossy(&request).to_string()
        });
        (url, handle)
    }

    #[test]
    fn a_streamed_completion_arrives_piece_by_piece() {
        let (url, server) = serve_once(
            ": keep-alive\n\n\
             data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"},\"finish_reason\":null}]}\n\n\
             data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"},\"finish_reason\":null}]}\n\n\
             data: {\"choices\":[{\"delta\":{\"content\":\"lo!\"},\"finish_reason\":null}]}\n\n\
             data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
             data: [DONE]\n\n",
        );
        let mut chat = OpenAiChat::new(&url, "llama3.2", Some("k".into()));
        let mut pieces = Vec::new();
        let answer = chat
            .answer(
                &[Turn::new(Role::User, "hi")],
                &SamplingSettings::default(),
                &mut |p| {
                    pieces.push(p.to_string());
                    ControlFlow::Continue(())
                },
            )
            .unwrap();
        assert_eq!(pieces, ["Hel", "lo!"]);
        assert_eq!(answer.text, "Hello!");
        assert_eq!(answer.finish, FinishReason::Stop);
        let request = server.join().unwrap();
        assert!(
            request.starts_with("POST /v1/chat/completions"),
            "{request}"
        );
        assert!(request.contains("Bearer k"), "{request}");
        assert!(
            request.contains("\"stream\":true") && request.contains("\"model\":\"llama3.2\""),
            "{request}"
        );
    }

    #[test]
    fn an_unreachable_server_is_an_error_naming_it() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        drop(listener);
        let mut chat = OpenAiChat::new(&url, "m", None);
        let err = chat
            .answer(
                &[Turn::new(Role::User, "hi")],
                &SamplingSettings::default(),
                &mut |_| ControlFlow::Continue(()),
            )
            .unwrap_err();
        assert!(format!("{err}").contains("cannot be reached"), "{err}");
    }
}
