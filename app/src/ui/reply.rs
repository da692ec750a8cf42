//! The chat's answer to a message the classifier called conversation. The studio has no language model, so
//! the reply says plainly what it can do, picked by the message's topic and by what this server offers now
//! (`/health`), with an example to try.

use crate::HealthResponse;

/// The reply's paragraphs.
pub fn reply(message: &str, health: Option<&HealthResponse>) -> Vec<String> {
    let text = message.to_lowercase();
    let has = |words: &[&str]| words.iter().any(|w| text.contains(w));
    let unavailable = |name: &str| {
        health.and_then(|h| {
            h.capabilities
                .iter()
                .find(|c| c.name == name && !c.available)
                .map(|c| c.reason.clone().unwrap_or_else(|| "not available".into()))
        })
    };
    let mut paragraphs = Vec::new();
    if has(&[
        "train",
        "lora",
        "fine-tune",
        "finetune",
        "my photos",
        "dataset",
        "my face",
    ]) {
        paragraphs.push(
            "To teach the studio a person, style or object, open Train: drop a ZIP of 10 to 30 photos \
             (or the photos themselves), give it a trigger word, and start. You can watch the loss and \
             sample images live, and generate with the result in one click."
                .to_string(),
        );
        if let Some(reason) = unavailable("training") {
            paragraphs.push(format!("Right now this server cannot train: {reason}."));
        }
    } else {
        let opening =
            if has(&["hello", "hi ", "hey", "good morning", "good evening"]) || text == "hi" {
                "Hello! "
            } else if has(&["thank"]) {
                "You're welcome! "
            } else {
                ""
            };
        paragraphs.push(format!(
            "{opening}I'm the studio's image assistant: I don't chat, but I make pictures. Describe an \
             image and I'll draw it, with live previews as it forms."
        ));
        paragraphs.push(
            "Try “a lighthouse on a cliff at dusk, oil painting” or “portrait of an old sailor, \
             35mm photo”. Model, LoRA, steps, size and seed are in Settings; Train teaches the studio your \
             own subject; Gallery keeps everything you made."
                .to_string(),
        );
    }
    if let Some(reason) = unavailable("generation") {
        paragraphs.push(format!(
            "Image generation is unavailable on this server: {reason}."
        ));
    }
    paragraphs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CapabilityState, QueueState};

    fn health(training: Option<&str>) -> HealthResponse {
        let queue = QueueState {
            waiting: 0,
            capacity: 4,
        };
        HealthResponse {
            status: "ok".into(),
            version: "0".into(),
            capabilities: vec![CapabilityState {
                name: "training".into(),
                available: training.is_none(),
                reason: training.map(str::to_owned),
            }],
            generation_queue: queue.clone(),
            training_queue: queue,
            tasks: 0,
            rss_bytes: None,
            memory_plan: None,
            workers: Vec::new(),
        }
    }

    #[test]
    fn replies_follow_the_topic_and_the_servers_state() {
        let greeting = reply("Hi there, how are you?", None);
        assert!(greeting[0].starts_with("Hello!"));
        assert!(greeting.iter().any(|p| p.contains("Try")));
        let training = reply("How do I train a LoRA?", Some(&health(Some("no trainer"))));
        assert!(training[0].contains("Train"));
        assert!(training[1].contains("no trainer"));
        assert_eq!(reply("how do I train?", Some(&health(None))).len(), 1);
    }
}
