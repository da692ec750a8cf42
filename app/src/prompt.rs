//! Help with prompts: `POST /chat/prompt` (the language model turns a short request into a detailed FLUX
//! prompt, or rewrites the last prompt with a follow-up's change), and the rule the chat uses without it:
//! a follow-up after an image ("same but at night", "make it red") changes the last prompt instead of
//! starting over. The rule lives here because the browser applies it without asking the server.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ContextTurn;

/// Longest request accepted, in characters: help is for short requests.
pub const MAX_PROMPT_REQUEST_CHARS: usize = 500;

/// Longest prompt the help writes, in characters (cut at the last whole phrase before it).
pub const MAX_HELPED_PROMPT_CHARS: usize = 400;

/// `POST /chat/prompt`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PromptHelpRequest {
    /// What the user asked for: a short image request, or a follow-up to the last image.
    pub request: String,
    /// The prompt of the last image, which a follow-up changes. When absent, the last image turn of
    /// `context` is used; with neither, the request is a new image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_prompt: Option<String>,
    /// The conversation's last turns, as `/classify/` takes them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub context: Vec<ContextTurn>,
}

impl PromptHelpRequest {
    pub fn new(request: impl Into<String>) -> PromptHelpRequest {
        PromptHelpRequest {
            request: request.into(),
            previous_prompt: None,
            context: Vec::new(),
        }
    }

    /// Checks what can be checked without the server's state.
    pub fn validate(&self) -> Result<(), String> {
        if self.request.trim().is_empty() {
            return Err("request must not be empty".into());
        }
        if self.request.chars().count() > MAX_PROMPT_REQUEST_CHARS {
            return Err(format!(
                "request is longer than {MAX_PROMPT_REQUEST_CHARS} characters: prompt help is for \
                 short requests; send a long prompt to /generate/ as it is"
            ));
        }
        Ok(())
    }

    /// The prompt a follow-up changes: `previous_prompt`, else the context's last image when the request
    /// reads as a follow-up ([`follow_up_change`]).
    pub fn previous(&self) -> Option<&str> {
        self.previous_prompt
            .as_deref()
            .or_else(|| {
                follow_up_change(&self.request)?;
                self.context
                    .iter()
                    .rev()
                    .find(|t| t.kind == crate::TurnKind::Image)
                    .map(|t| t.text.as_str())
            })
            .map(str::trim)
            .filter(|p| !p.is_empty())
    }
}

/// `POST /chat/prompt` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PromptHelpResponse {
    /// The detailed prompt, to show (and edit) before it is drawn.
    pub prompt: String,
    /// The prompt it changed, for a follow-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_prompt: Option<String>,
    /// The language model that wrote it.
    pub model: String,
}

/// Openings of a follow-up that only say "change the last picture"; what comes after them is the change.
/// Longest first, so that "same but" wins over "same".
const FOLLOW_UP_OPENINGS: &[&str] = &[
    "do the same but",
    "the same thing but",
    "same thing but",
    "the same but",
    "same but",
    "same again but",
    "same again",
    "same thing",
    "same",
    "again but",
    "again",
    "another one but",
    "another one",
    "another",
    "one more but",
    "one more",
    "more like this",
    "more of these",
    "variations",
    "now make it",
    "now make them",
    "now",
    "but",
    "instead",
    "this time",
    "make it",
    "make them",
    "change it to",
    "turn it into",
    "try it",
];

/// Single words that make a message a follow-up when it opens with them ("make the sky purple",
/// "bigger", "without the hat", "give him a scarf"); they stay part of the change.
const FOLLOW_UP_WORDS: &[&str] = &[
    "make", "with", "without", "more", "less", "bigger", "smaller", "darker", "brighter", "add",
    "remove", "replace", "put", "give", "change", "turn", "paint", "colour", "color", "fix",
    "erase", "swap", "keep",
];

/// Words that speak of the picture itself: a message using one ("I'd like it bluer", "put this on a
/// beach") changes the last picture even when it opens with none of the above.
const REFERS_TO_PICTURE: &[&str] = &["it", "this", "them", "the image", "the picture"];

/// What a message that the classifier calls an image request asks of the last picture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FollowUp {
    /// "another one", "again", "more like this": the same prompt with new seeds.
    Again,
    /// "same but at night", "make it red", "remove the hat": the last picture, changed so.
    Change(String),
    /// Anything else: a new picture.
    New,
}

/// The one rule for follow-ups, used by the chat (with or without prompt help) and `POST /chat/prompt`.
pub fn follow_up(message: &str) -> FollowUp {
    match follow_up_change(message) {
        Some(change) if change.is_empty() => FollowUp::Again,
        Some(change) => FollowUp::Change(change),
        None => FollowUp::New,
    }
}

/// The change a follow-up asks for: `Some("at night")` for "same but at night", `Some("red")` for
/// "make it red", `Some("")` for "another one" (the same prompt again), `None` when the message does
/// not read as a follow-up (a new request starts over).
pub fn follow_up_change(message: &str) -> Option<String> {
    // Politeness adds nothing to a prompt: "one more please" is "one more".
    let message = message.trim().trim_end_matches(['.', '!', '?', ' ']);
    let message = strip_word_suffix(strip_word_prefix(message, "please"), "please")
        .trim_end_matches([',', ' ']);
    let text = message.to_lowercase();
    let starts_with_word = |lead: &str| {
        text.strip_prefix(lead)
            .filter(|rest| rest.is_empty() || rest.starts_with([' ', ',', ':', '-']))
    };
    // Keep the user's own spelling of the change (where lowercasing kept the lengths).
    let original_tail = |rest: &str| {
        if message.len() == text.len() {
            message[message.len() - rest.len()..].to_string()
        } else {
            rest.to_string()
        }
    };
    for lead in FOLLOW_UP_OPENINGS {
        if let Some(rest) = starts_with_word(lead) {
            let rest = rest.trim_start_matches([' ', ',', ':', '-']);
            let rest = ["and ", "but ", "with it "]
                .iter()
                .find_map(|joint| rest.strip_prefix(joint))
                .unwrap_or(rest);
            return Some(original_tail(rest).trim().to_string());
        }
    }
    let first = text.split_whitespace().next()?;
    if FOLLOW_UP_WORDS.contains(&first) {
        // "make the sky purple" changes "the sky" to purple: the verb itself adds nothing to a prompt.
        let change = if first == "make" {
            message[first.len()..].trim()
        } else {
            message
        };
        return Some(change.to_string());
    }
    let words: Vec<&str> = text
        .split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|w| !w.is_empty())
        .collect();
    let refers = REFERS_TO_PICTURE.iter().any(|r| {
        if r.contains(' ') {
            text.contains(r)
        } else {
            words.contains(r)
        }
    });
    refers.then(|| message.to_string())
}

fn strip_word_prefix<'a>(text: &'a str, word: &str) -> &'a str {
    match text.get(..word.len()) {
        Some(head) if head.eq_ignore_ascii_case(word) => {
            let rest = &text[word.len()..];
            if rest.is_empty() || rest.starts_with([' ', ',']) {
                rest.trim_start_matches([' ', ','])
            } else {
                text
            }
        }
        _ => text,
    }
}

fn strip_word_suffix<'a>(text: &'a str, word: &str) -> &'a str {
    let Some(cut) = text.len().checked_sub(word.len()) else {
        return text;
    };
    match text.get(cut..) {
        Some(tail) if tail.eq_ignore_ascii_case(word) => {
            let head = &text[..cut];
            if head.is_empty() || head.ends_with([' ', ',']) {
                head.trim_end_matches([' ', ','])
            } else {
                text
            }
        }
        _ => text,
    }
}

/// The deterministic rule for a follow-up without the language model: the change is appended to the
/// last prompt as one more phrase ("a red apple" + "same but at night" = "a red apple, at night"); an
/// empty change ("another one") or one the prompt already says gives the last prompt as it was.
pub fn merge_follow_up(previous: &str, change: &str) -> String {
    let previous = previous.trim().trim_end_matches([',', ' ']);
    let change = change.trim().trim_matches([',', ' ']);
    if change.is_empty() || previous.to_lowercase().contains(&change.to_lowercase()) {
        return previous.to_string();
    }
    format!("{previous}, {change}")
}

/// A prompt's subject: its first phrase ("a red apple" of "a red apple, studio light, 35mm photo").
pub fn subject(prompt: &str) -> &str {
    prompt
        .split([',', '.', ';', '\n'])
        .next()
        .unwrap_or("")
        .trim()
}

/// Words of `text` that carry its meaning (no articles, prepositions or very short words), lowercase:
/// what a rewritten prompt must still say to keep the user's subject.
pub fn content_words(text: &str) -> Vec<String> {
    const FILLER: &[&str] = &[
        "the", "and", "with", "for", "from", "into", "onto", "over", "under", "some", "please",
        "draw", "paint", "show", "picture", "image", "photo", "make", "create", "generate", "of",
        "an", "in", "on", "at", "me", "my", "it", "its", "this", "that",
    ];
    text.split(|c: char| !c.is_alphanumeric())
        .map(str::to_lowercase)
        .filter(|w| w.chars().count() >= 3 && !FILLER.contains(&w.as_str()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follow_ups_give_their_change_and_new_requests_none() {
        assert_eq!(
            follow_up_change("same but at night").as_deref(),
            Some("at night")
        );
        assert_eq!(follow_up_change("Make it red!").as_deref(), Some("red"));
        assert_eq!(follow_up_change("another one").as_deref(), Some(""));
        assert_eq!(
            follow_up_change("make the sky purple").as_deref(),
            Some("the sky purple")
        );
        assert_eq!(
            follow_up_change("without the hat").as_deref(),
            Some("without the hat")
        );
        assert_eq!(
            follow_up_change("Same, but in Winter.").as_deref(),
            Some("in Winter")
        );
        assert_eq!(follow_up_change("a red apple"), None);
        assert_eq!(follow_up_change("samurai in the rain"), None);
        assert_eq!(follow_up_change("nowhere man"), None);
    }

    #[test]
    fn a_follow_up_after_an_image_is_the_same_again_a_change_or_a_new_picture() {
        for change in [
            "make it night",
            "remove the hat",
            "add a moon",
            "now in watercolor",
            "give him a red scarf",
            "can you put this on a beach?",
            "I'd like it bluer",
        ] {
            assert!(matches!(follow_up(change), FollowUp::Change(_)), "{change}");
        }
        for again in [
            "another one",
            "one more please",
            "again!",
            "Another, please",
            "more like this",
        ] {
            assert_eq!(follow_up(again), FollowUp::Again, "{again}");
        }
        for new in [
            "a lighthouse on a cliff",
            "portrait of an old sailor, 35mm photo",
            "please, a bowl of ramen",
        ] {
            assert_eq!(follow_up(new), FollowUp::New, "{new}");
        }
    }

    #[test]
    fn a_follow_up_is_merged_into_the_last_prompt() {
        assert_eq!(
            merge_follow_up("a red apple", "at night"),
            "a red apple, at night"
        );
        assert_eq!(merge_follow_up("a red apple, ", ""), "a red apple");
        assert_eq!(merge_follow_up("a red apple", "Red"), "a red apple");
    }

    #[test]
    fn the_previous_prompt_comes_from_the_request_or_the_last_image_in_context() {
        let mut request = PromptHelpRequest::new("same but at night");
        assert_eq!(request.previous(), None);
        request.context = vec![
            ContextTurn {
                role: crate::TurnRole::Assistant,
                text: "a red apple".into(),
                kind: crate::TurnKind::Image,
            },
            ContextTurn {
                role: crate::TurnRole::Assistant,
                text: "a poem".into(),
                kind: crate::TurnKind::Text,
            },
        ];
        assert_eq!(request.previous(), Some("a red apple"));
        request.previous_prompt = Some("a green pear".into());
        assert_eq!(request.previous(), Some("a green pear"));
    }

    #[test]
    fn subjects_and_content_words() {
        assert_eq!(subject("a red apple, studio light"), "a red apple");
        assert_eq!(content_words("draw me a red apple"), ["red", "apple"]);
        assert!(PromptHelpRequest::new(" ").validate().is_err());
        assert!(
            PromptHelpRequest::new("x".repeat(MAX_PROMPT_REQUEST_CHARS + 1))
                .validate()
                .is_err()
        );
    }
}
